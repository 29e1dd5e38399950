"""Train one recipe variant on one seed with the recipe's own code and write its full model card
(``train_bundled_model`` then ``finish_bundled_model``), on the CPU's every core; resumable.

The SD-layout candidate A, seed 0 (docs/BUNDLED_MODEL.md), was measured so:

    python tools/train_candidate.py --out runs/sixthA-s0 --seed 0 \\
        --variant A:unet_layout=sd,channels=64/128/128,space_to_depth=2,attention_heads=8,batch_size=64,steps=2500

(``tools/recipe_sweep.py`` runs several such jobs at once, one thread each, for a GPU.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recipe_sweep import parse_variant  # beside this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", required=True, help="name:key=value,... (ToyTrainConfig)")
    args = parser.parse_args()
    from dori.bundled.recipe import ToyTrainConfig
    from dori.bundled.train import finish_bundled_model, train_bundled_model
    _, overrides = parse_variant(args.variant)
    out = Path(args.out)
    resume = (out / "checkpoint.pt").exists()
    if resume or not (out / "unet").exists():
        train_bundled_model(ToyTrainConfig(seed=args.seed, **overrides), out, resume=resume,
                            log=lambda line: print(line, flush=True))  # fmt: skip
    began = time.monotonic()
    finish_bundled_model(out, log=lambda line: print(line, flush=True))
    print(f"card {time.monotonic() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
