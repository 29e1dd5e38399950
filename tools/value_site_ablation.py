"""Which cross-attention value projections carry the bundled model's memorized titles?

NeMo only looks at the value projections of the down and mid blocks. This script zeroes every
output channel of (a) NeMo's sites, (b) the up blocks' value projections, (c) all of them, and
prints MR, similarity and held-out prompt alignment for each, beside the unmasked model (a group
the model does not have, such as the up blocks of today's bundled model, or one that repeats an
earlier group is left out):

    python tools/value_site_ablation.py [--model bundled] [--seeds 5] [--steps 20]

The first bundled model (cross-attention also on the way up) gave MR 1.00 / 0.78 / 0.00 / 0.00
for none / NeMo's sites / up blocks / all: its titles travelled through the up blocks, which is
why today's bundled model has no cross-attention there (docs/BUNDLED_MODEL.md).
"""

from __future__ import annotations

import argparse

import torch

from dori.interventions import mask_neurons
from dori.models import load_model
from dori.evaluation import evaluate_replication, utility
from dori.references import References, load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="bundled", help="'bundled' or a bundled-format model folder")
    args = parser.parse_args()
    model = load_model(args.model)
    prompts = load_prompts("bundled:memorized", model)
    refs = References(model, images=None, sscd=None)
    nemo = [s.name for s in model.value_sites()]
    every = [name for name, _ in model.unet.named_modules() if name.endswith("attn2.to_v")]
    settings = {"none": [], "NeMo's sites (down, mid)": nemo, "up blocks only": [n for n in every if n not in nemo],
                "all value projections": every}  # fmt: skip
    seen: set[tuple[str, ...]] = set()  # a group the model lacks, or one equal to an earlier group, is left out
    for label, sites in list(settings.items()):
        if (label != "none" and not sites) or tuple(sites) in seen:
            del settings[label]
        seen.add(tuple(sites))
    widths = {s.name: s.width for s in model.sites(every)}
    print("| zeroed value projections | sites | MR | similarity | held-out alignment |")
    print("|---|---|---|---|---|")
    for label, sites in settings.items():
        with mask_neurons(model, {name: torch.zeros(widths[name]) for name in sites}):
            summary, _, _ = evaluate_replication(model, prompts, refs, seeds=args.seeds, steps=args.steps,
                                                 guidance=None, batch_size=64)  # fmt: skip
            util = utility(model, seeds=4, steps=args.steps, guidance=None, batch_size=64)
        print(f"| {label} | {len(sites)} | {summary['mr']:.2f} | {summary['sscd_mean']:.2f} ± {summary['sscd_std']:.2f} "
              f"| {util['alignment']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
