"""The bundled recipe's training step, timed: the fifth recipe and the sixth-recipe candidates in
SD's layout (docs/BUNDLED_MODEL.md), each as ``dori toy train`` runs its step (channels-last U-Net,
AdamW, gradient clipping, the frozen text encoder's forward), on random data at the recipe's batch.

    python benchmarks/recipe_step.py [--steps 4] [--device cpu] [--models bundled DIR ...]

Prints one row per recipe: parameters, value neurons in NeMo's sites, seconds per step (median of
``--steps`` after one warm-up) and the minutes that the recipe's step count would take. With
``--models``, a second table times sampling with each trained model folder (16 images, DDIM 50, with
guidance: what most of a study's time goes to), so that a recipe's study time can be judged beside
the shipped model's before a study is run. Run on an
otherwise idle machine: a second torch process on 2 cores slows both several times over.
"""

from __future__ import annotations

import argparse
import statistics
import time

RECIPES = {
    "fifth (shipped defaults)": {},
    "A: SD layout, 2x2 packed, (64, 128, 128)": dict(unet_layout="sd", channels=(64, 128, 128), space_to_depth=2,
                                                      attention_heads=8, batch_size=64, steps=2500),
    "B: SD layout, 4x4 packed, (128, 256, 256)": dict(unet_layout="sd", channels=(128, 256, 256), space_to_depth=4,
                                                       attention_heads=8, batch_size=64, steps=2500),
    "SD layout, pixels, (32, 64, 128), batch 32": dict(unet_layout="sd", channels=(32, 64, 128), attention_heads=8),
}


def time_recipe(overrides: dict, steps: int, device: str) -> dict:
    from dori.bundled.recipe import ToyTrainConfig
    from dori.bundled.train import step_seconds
    config = ToyTrainConfig(**overrides)
    model, times = step_seconds(config, steps, device)
    per_step = statistics.median(times)
    return {"params": sum(p.numel() for p in model.unet.parameters()),
            "value": sum(site.width for site in model.value_sites()), "batch": config.batch_size,
            "per_step": per_step, "minutes": per_step * config.steps / 60, "steps": config.steps}  # fmt: skip


def time_sampling(spec: str, repeats: int) -> float:
    import torch

    from dori.models import load_model

    model = load_model(spec)
    emb = model.encode(["a red circle, top left"] * 4)
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(emb, list(range(4)), steps=50, guidance=3.0)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=[], help="model folders (or 'bundled') to time sampling with")
    parser.add_argument("--only-models", action="store_true", help="skip the training-step table")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if not args.only_models:
        print("| recipe | U-Net parameters | value neurons | batch | s / step | steps | minutes |")
        print("|---|---|---|---|---|---|---|")
        for name, overrides in RECIPES.items():
            r = time_recipe(overrides, args.steps, args.device)
            print(f"| {name} | {r['params'] / 1e6:.2f} M | {r['value']} | {r['batch']} | {r['per_step']:.2f} | "
                  f"{r['steps']} | {r['minutes']:.0f} |", flush=True)
    if args.models:
        print("\n| model | s to sample 16 images (DDIM 50, guidance 3) | ratio to the first |")
        print("|---|---|---|")
        first = None
        for spec in args.models:
            seconds = time_sampling(spec, 2)
            first = first or seconds
            print(f"| {spec} | {seconds:.1f} | {seconds / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
