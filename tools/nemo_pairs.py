"""Why NeMo's check (regime check (a)) flags ordinary captions: the reference's threshold is the
mean + 1 std of *every* seed pair's SSIM over the ordinary training captions, while a caption is
flagged when its *best* pair (of 45, at 10 seeds) passes it. This prints, for the captions check (a)
tests, how their own pairs sit against that threshold, and what the flagged share would be if every
caption's pairs were drawn from the pooled distribution (the pairs shuffled across captions, seeded),
and the counts at METHOD.md's reading of the threshold (the same rule over each caption's best pair).

    python tools/nemo_pairs.py DIR [--seeds 10] [--shuffle-seed 0]

DIR is a bundled-kind folder; the first U-Net step only, as NeMo's check (no image is generated).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--shuffle-seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    from dori.measure.detection import nemo_threshold, pairwise_consistency
    from dori.mitigate.nemo import NemoConfig
    from dori.models.loading import load_model
    from dori.references import load_prompts
    from dori.toy.kit import ToyKit
    from dori.bundled.regime import RegimeConfig

    model = load_model(args.folder)
    kit = ToyKit.from_folder(args.folder)
    config = RegimeConfig(nemo=NemoConfig(seeds=args.seeds))  # check (a)'s prompt sets, schedule and batches
    groups = {"reference": load_prompts("bundled:ordinary", model).texts,
              "tested": config.prompts(kit, "non_memorized", "held_out"),
              "planted": config.prompts(kit, "memorized", "template")}  # fmt: skip
    texts = list(dict.fromkeys(t for group in groups.values() for t in group))  # each caption's pairs once
    scores = pairwise_consistency(model, model.encode(texts), seeds=list(range(config.nemo.seeds)),
                                  steps=config.nemo.steps, batch_size=config.batch_size)  # fmt: skip
    by_text = dict(zip(texts, scores))
    reference, tested, planted = (torch.tensor([by_text[t] for t in group], dtype=torch.float64)
                                  for group in groups.values())  # fmt: skip
    threshold = nemo_threshold(reference.tolist())
    flagged = tested.max(1).values > threshold
    generator = torch.Generator().manual_seed(args.shuffle_seed)
    shuffled = tested.flatten()[torch.randperm(tested.numel(), generator=generator)].view_as(tested)
    print(f"{args.folder}: {args.seeds} seeds, {tested.shape[1]} pairs per caption")
    print(f"threshold {threshold:.3f} (ordinary training captions: {reference.shape[0]}, pair SSIM mean "
          f"{reference.mean():.3f}, std {reference.std():.3f}); pairs above it: {(reference > threshold).double().mean():.1%}")
    print(f"check (a)'s ordinary captions: {int(flagged.sum())} of {len(flagged)} flagged; "
          f"with their pairs shuffled across captions: {int((shuffled.max(1).values > threshold).sum())}")
    print(f"per-caption pair mean: flagged {tested[flagged].mean(1).mean():.3f}, not flagged "
          f"{tested[~flagged].mean(1).mean():.3f}; planted titles {planted.mean(1).mean():.3f}")
    print(f"planted: {int((planted.max(1).values > threshold).sum())} of {len(planted)} flagged")
    best = nemo_threshold(reference.max(1, keepdim=True).values.tolist())  # the statistic itself, pooled
    print(f"METHOD.md's wording (mean + 1 std of each ordinary training caption's best pair, which dori "
          f"used before it matched NeMo's code; the reference pools every pair): threshold {best:.3f}, ordinary "
          f"{int((tested.max(1).values > best).sum())} of {len(tested)}, planted "
          f"{int((planted.max(1).values > best).sum())} of {len(planted)} flagged")


if __name__ == "__main__":
    main()
