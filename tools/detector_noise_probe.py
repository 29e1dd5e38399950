"""The bundled copy detector on each memorized title's own planted image with i.i.d. Gaussian pixel
noise added (images in [0, 1], noise seeded by ``--seed``): how far noise alone moves a title's
similarity, next to the card's tau. Nothing is generated; the folder gives the data and the detector.

    python tools/detector_noise_probe.py DIR [--sigmas 0.05 0.1 0.15] [--grid planted.png]

``--grid`` also saves the planted images, one per row in the card's order, to compare with
``card_memorized.png`` by eye.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path)
    args = parser.parse_args()
    import torch

    from dori.report_images import save_grid
    from dori.toy.kit import ToyKit

    kit = ToyKit.from_folder(args.folder)
    detector = kit.detector
    titles = [row["prompt"] for row in kit.prompt_set("memorized")]
    planted = torch.stack([kit.references(title)[0] for title in titles])
    if args.grid:
        save_grid(planted, args.grid, columns=1)
    generator = torch.Generator().manual_seed(args.seed)
    own = detector.embed(planted)
    print(f"{args.folder}: tau {detector.tau:.3f}; similarity of each title's noisy planted image to itself\n")
    print("| sigma | " + " | ".join(str(i + 1) for i in range(len(titles))) + " |")
    print("|---" * (len(titles) + 1) + "|")
    for sigma in args.sigmas:
        noisy = (planted + sigma * torch.randn(planted.shape, generator=generator)).clamp(0, 1)
        scores = detector.paired_similarity(detector.embed(noisy), own)
        print(f"| {sigma:g} | " + " | ".join(f"{s:.2f}" for s in scores.tolist()) + " |")
    print("\n" + "\n".join(f"{i + 1}: {title}" for i, title in enumerate(titles)))


if __name__ == "__main__":
    main()
