"""Which cross-attention blocks carry the memorized titles: their MR with the value neurons of NeMo's
sites (down and mid blocks) zeroed, with those of the up blocks zeroed, and with both, on a trained
bundled-kind folder (its card's copy detector and guidance; DDIM 50, seeds 0..N-1).

    python tools/value_routes.py DIR [--seeds 10] [--write]

Regime check (c) zeroes NeMo's sites only; a model whose up blocks also carry the titles keeps them
there, out of NeMo's reach. ``--write`` also saves the table as ``DIR/value_routes.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import torch

    from dori.interventions import mask_neurons
    from dori.models.loading import load_model
    from dori.toy.kit import ToyKit
    from dori.bundled.regime import RegimeConfig, titles_mr

    model = load_model(args.folder)
    kit = ToyKit.from_folder(args.folder)
    nemo = [s.name for s in model.value_sites()]
    up = [s.name for s in model.value_sites(("up_blocks.",))]
    config = RegimeConfig(seeds=args.seeds)
    rows = []
    for name, sites in [("none", []), ("NeMo's sites (down, mid)", nemo), ("up blocks", up), ("all", nemo + up)]:
        zeroed = {s.name: torch.zeros(s.width) for s in model.sites(sites)}
        with mask_neurons(model, zeroed):
            rows.append({"zeroed": name, "neurons": sum(len(v) for v in zeroed.values()),
                         **titles_mr(model, kit, config)})  # fmt: skip
    print(f"{args.folder}: memorized titles, {args.seeds} seeds, guidance {model.default_guidance:g}\n")
    print("| value neurons zeroed | neurons | MR | similarity |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['zeroed']} | {row['neurons']} | {row['mr']:.2f} | {row['sscd_mean']:.3f} |")
    if args.write:
        (args.folder / "value_routes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
