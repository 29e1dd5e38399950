"""Can Wanda hide the memorized titles at any ratio on this model?

Wanda prunes weights of one site set (the feed-forward output projections ``ff.net.2`` in the
paper's setting; ``--sites value`` for the cross-attention value projections). Its strongest
possible mask zeroes every weight of the set. This script prints MR, similarity and held-out
prompt alignment with each site set fully zeroed, beside the unmasked model: if MR stays high with
a whole set zeroed, no ratio of Wanda on that set can stop replication, and ``--ratio auto`` walks
its whole ladder (the study then reports the largest ratio, marked as not satisfied):

    python tools/wanda_site_floor.py [--model bundled] [--seeds 4] [--steps 20]

On the fourth (shipped) bundled model, 4 seeds, DDIM 20: none MR 1.00; every feed-forward weight
zeroed 0.73 (similarity 0.76, held-out alignment 0.92 -> 0.70); every value-projection weight
zeroed 0.00 (alignment 0.00).
"""

from __future__ import annotations

import argparse

import torch

from dori.interventions import Mitigation, intervene
from dori.models import load_model
from dori.evaluation import evaluate_replication, utility
from dori.references import References, load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="bundled", help="'bundled' or a bundled-format model folder")
    args = parser.parse_args()
    model = load_model(args.model)
    prompts = load_prompts("bundled:memorized", model)
    refs = References(model, images=None, sscd=None)
    settings = {"none": [], "every feed-forward weight (ffn)": model.ffn_sites(),
                "every value-projection weight (value)": model.value_sites()}  # fmt: skip
    print("| zeroed | sites | weights | MR | similarity | held-out alignment |")
    print("|---|---|---|---|---|---|")
    for label, sites in settings.items():
        mask = {s.name: torch.ones_like(s.module.weight, dtype=torch.bool) for s in sites}
        with intervene(model, Mitigation("weights", model.fingerprint(), weights=mask, method="floor")):
            summary, _, _ = evaluate_replication(model, prompts, refs, seeds=args.seeds, steps=args.steps,
                                                 guidance=None, batch_size=64)  # fmt: skip
            util = utility(model, seeds=4, steps=args.steps, guidance=None, batch_size=64)
        print(f"| {label} | {len(sites)} | {sum(int(m.sum()) for m in mask.values())} | {summary['mr']:.2f} | "
              f"{summary['sscd_mean']:.2f} ± {summary['sscd_std']:.2f} | {util['alignment']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
