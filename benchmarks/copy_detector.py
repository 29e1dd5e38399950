"""The bundled copy detector's cost, by its options: seconds to calibrate tau on the bundled
model's training data (what `dori toy card` and `dori toy train` spend on it), to embed images,
and to score generations against references as the replicate stage does, with the noise floor and
the scales on and off.

    python benchmarks/copy_detector.py [--queries 1000] [--images 1000]

Run on an otherwise idle machine; every row in this one process, one after another.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000, help="calibration queries (the card's: 1000)")
    parser.add_argument("--images", type=int, default=1000, help="images embedded and scored")
    args = parser.parse_args()
    import torch

    from dori.measure.similarity import SCALES, calibrate_toy_detector
    from dori.models.loading import bundled_model_dir
    from dori.toy.kit import ToyKit

    kit = ToyKit.from_folder(bundled_model_dir())
    images = kit.ordinary_images
    batch = images[: args.images]
    references = torch.stack([pair.image for pair in kit.data.planted])
    print(f"{len(images)} training images; calibration with {args.queries} queries; {len(batch)} images "
          f"embedded and scored against {len(references)} references; torch threads {torch.get_num_threads()}\n")
    print("| noise floor | scales | calibrate (s) | tau | embed (s) | score vs references (s) |")
    print("|---|---|---|---|---|---|")
    for floor, scales in ((0.0, (1.0,)), (3.0, (1.0,)), (3.0, SCALES)):
        start = time.perf_counter()
        detector, _ = calibrate_toy_detector(images, queries=args.queries, noise_floor=floor, scales=scales)
        calibrate = time.perf_counter() - start
        start = time.perf_counter()
        features = detector.embed(batch)
        embed = time.perf_counter() - start
        reference_features = detector.embed(references)
        start = time.perf_counter()
        detector.similarity(features, reference_features)
        score = time.perf_counter() - start
        print(f"| {floor:g} | {', '.join(f'{s:g}' for s in scales)} | {calibrate:.1f} | {detector.tau:.4f} | "
              f"{embed:.2f} | {score:.2f} |")


if __name__ == "__main__":
    main()
