"""Split the bundled copy detector's score into its two terms for an attack's embeddings.

The toy copy detector scores min(high-pass correlation, 1 - RMSE / scale). This script
generates from the plain memorized prompts and from the embeddings that ``dori attack`` saved
(under the mitigation the attack ran against), and prints each term per prompt, so one can see
whether an attack restored the image's structure (correlation) or its colours (pixel term):

    python tools/detector_terms.py --attack RUN [--mitigation MASK_DIR] [--step 50] [--seeds 4] [--steps 20]
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from dori.interventions import each_mask, load_mask
from dori.models import load_model
from dori.workflows import References, attack_targets, load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", required=True, help="a 'dori attack' run folder (attack_embeddings.safetensors)")
    parser.add_argument("--mitigation", default=None, help="the mask folder the attack ran against")
    parser.add_argument("--prompts", default="bundled:memorized")
    parser.add_argument("--step", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    model = load_model("bundled")
    refs = References(model, images=None, sscd=None)
    prompts = load_prompts(args.prompts, model)
    mitigation = None if args.mitigation is None else load_mask(args.mitigation, model)
    found = load_file(f"{args.attack}/attack_embeddings.safetensors")[f"step_{args.step}"].to(model.dtype)
    detector, seeds, n = refs.detector, list(range(args.seeds)), args.seeds
    settings = {"steps": args.steps, "guidance": args.guidance}

    def terms(images: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
        a, b = detector.embed(images), detector.embed(target)
        correlation = (a.details @ b.details.T).squeeze(1)
        rmse = torch.cdist(a.pixels, b.pixels).squeeze(1) / a.pixels.shape[1] ** 0.5
        return float(correlation.mean()), float((1 - rmse / detector.scale).mean())

    with torch.no_grad():
        plain = model.generate(model.encode(prompts.texts), seeds, **settings)
        attacked = torch.zeros_like(plain)
        for group in each_mask(model, mitigation, prompts.texts):
            made = model.generate(found[group], seeds, **settings)
            for k, i in enumerate(group):
                attacked[i * n : (i + 1) * n] = made[k * n : (k + 1) * n]
    print(f"copy threshold tau = {detector.tau:.3f}; score = min(correlation, pixel)")
    print("plain: the prompt on the unmitigated model; attack: the found embedding under the mitigation")
    print("| prompt | correlation (plain) | pixel (plain) | correlation (attack) | pixel (attack) |")
    print("|---|---|---|---|---|")
    for i, (prompt, target) in enumerate(zip(prompts.texts, attack_targets(model, prompts, refs))):
        rows = slice(i * n, (i + 1) * n)
        (c0, p0), (c1, p1) = terms(plain[rows], target), terms(attacked[rows], target)
        print(f"| {prompt} | {c0:.3f} | {p0:.3f} | {c1:.3f} | {p1:.3f} |")


if __name__ == "__main__":
    main()
