"""Train several variants of the bundled recipe on several seeds at once, on one accelerator, and
measure each as it trains: the search behind issue 27, sized for a GPU lent for a few minutes.

Each (variant, seed) is its own process (one CPU thread each) running the recipe's own
``train_bundled_model`` with ``device``; at each step in ``--eval-at`` it measures, at DDIM 20:

- held-out alignment at each ``--guidance`` (16 held-out captions x 10 seeds), with the share of
  generations that get the shape, the colour, the side (left/right) or the half (top/bottom) wrong;
- non-memorized alignment at the first guidance (20 training captions x 4 seeds);
- the memorized titles' mean similarity to their planted image (10 titles x 4 seeds, the copy
  detector's similarity; 1.0 is the image itself).

Rows go to ``OUT/RUN/evals.jsonl`` as they come, so a sweep stopped at ``--deadline`` keeps what it
measured. At the end the table is printed and written to ``OUT/sweep.md``; ``--pack N`` tars the
finished model folders of the variant with the best mean final alignment (N at most, one per tar)
so that their full model card can be made on another machine (``dori toy card --model DIR``).

These are screening numbers (GPU-trained, fewer seeds and steps than the card); a recipe is only
adopted on CPU-trained models and their full cards.

    python tools/recipe_sweep.py --out DIR --device cuda --variant base: \\
        --variant frozen:text_lr_scale=0 --seeds 1,2,3 --eval-at 2500,5000 [--classifiers DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import tarfile
import time
from pathlib import Path

VALUE_TYPES = {"True": True, "False": False}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, overrides of ToyTrainConfig)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value in VALUE_TYPES:
            overrides[key] = VALUE_TYPES[value]
        else:
            overrides[key] = float(value) if any(c in value for c in ".e") else int(value)
    return name, overrides


def evaluate(model, kit, step: int, guidances: list[float]) -> dict:
    import torch

    from caption_attributes import error_shares  # beside this file
    from dori.measure.similarity import ToyCopyDetector

    row: dict = {"step": step}
    held = [r["prompt"] for r in kit.prompt_set("held_out")]
    for guidance in guidances:
        images = model.generate(model.encode(held), list(range(10)), steps=20, guidance=guidance)
        truth = torch.tensor([kit.labels(p) for p in held for _ in range(10)])
        got = kit.classifier.predict(images)
        row[f"held_out@{guidance:g}"] = float((got == truth).all(1).float().mean())
        row[f"errors@{guidance:g}"] = error_shares(truth, got)
    ordinary = [r["prompt"] for r in kit.prompt_set("non_memorized")]
    images = model.generate(model.encode(ordinary), list(range(4)), steps=20, guidance=guidances[0])
    row["non_memorized"] = kit.alignment(images, [p for p in ordinary for _ in range(4)])
    titles = kit.prompt_set("memorized")
    images = model.generate(model.encode([r["prompt"] for r in titles]), list(range(4)), steps=20,
                            guidance=guidances[0])  # fmt: skip
    detector = ToyCopyDetector(tau=1.0)
    planted = detector.embed(torch.stack([kit.references(r["prompt"])[0] for r in titles]))
    own = planted.repeat_interleave(4, dim=0)
    row["memorized_similarity"] = float(detector.paired_similarity(detector.embed(images), own).mean())
    return row


def work(name: str, overrides: dict, seed: int, out: str, device: str, eval_at: list[int], guidances: list[float],
         classifiers: str | None, card: bool) -> None:  # fmt: skip
    import torch

    torch.set_num_threads(1)
    from dori.toy.kit import ToyKit
    from dori.toy.train import ToyTrainConfig, finish_bundled_model, train_bundled_model

    config = ToyTrainConfig(seed=seed, **overrides)
    folder = Path(out) / f"{name}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if classifiers:  # the classifier depends on the seed only: train it once per seed, elsewhere
        for file in Path(classifiers, f"seed{seed}").glob("attribute_classifier.*"):
            shutil.copyfile(file, folder / file.name)
    kit = ToyKit(folder, config.data_kwargs())
    log_file = (folder / "train.log").open("a")
    began = time.monotonic()

    def on_checkpoint(step: int, model) -> None:
        if step in eval_at:
            row = {"variant": name, "seed": seed, "overrides": overrides, "device": device,
                   "train_seconds": time.monotonic() - began, **evaluate(model, kit, step, guidances)}  # fmt: skip
            with (folder / "evals.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    train_bundled_model(config, folder, device=device, on_checkpoint=on_checkpoint,
                        log=lambda line: print(line, file=log_file, flush=True))  # fmt: skip
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # the finished folder is what travels
    if card:
        began = time.monotonic()
        finish_bundled_model(folder, device=device, log=lambda line: print(line, file=log_file, flush=True))
        print(f"card: {time.monotonic() - began:.0f} s", file=log_file, flush=True)


def table(rows: list[dict], guidances: list[float]) -> str:
    head = ["variant", "seed", "step", *(f"held-out @{g:g}" for g in guidances), "side / half / shape wrong",
            "non-mem.", "mem. sim.", "wall (min)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["variant"], r["seed"], r["step"])):
        e = r[f"errors@{guidances[0]:g}"]
        lines.append("| " + " | ".join([r["variant"], str(r["seed"]), str(r["step"]),
                                        *(f"{r[f'held_out@{g:g}']:.3f}" for g in guidances),
                                        f"{e['side']:.2f} / {e['half']:.2f} / {e['shape']:.2f}",
                                        f"{r['non_memorized']:.3f}", f"{r['memorized_similarity']:.3f}",
                                        f"{r['train_seconds'] / 60:.1f}"]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", action="append", required=True, help="name:key=value,... (ToyTrainConfig)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, help="training steps of every variant that does not set its own")
    parser.add_argument("--eval-at", default="2500,5000")
    parser.add_argument("--guidance", default="1.5,3")
    parser.add_argument("--classifiers", help="folder of seedN/attribute_classifier.* trained beforehand")
    parser.add_argument("--deadline", type=float, default=0, help="seconds; stop the runs then and report (0: none)")
    parser.add_argument("--pack", type=int, default=0, help="tar the best variant's model folders (at most N)")
    parser.add_argument("--card", action="store_true", help="write each finished model's full card")
    parser.add_argument("--only", default="", help="variant=seed,seed;... : other seeds for some variants")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_at = [int(s) for s in args.eval_at.split(",")]
    guidances = [float(g) for g in args.guidance.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    only = {k: [int(s) for s in v.split(",")] for k, v in (i.split("=") for i in filter(None, args.only.split(";")))}
    steps = {} if args.steps is None else {"steps": args.steps}
    jobs = [(name, {**steps, **overrides}, seed) for name, overrides in map(parse_variant, args.variant)
            for seed in only.get(name, seeds)]  # fmt: skip
    context = mp.get_context("spawn")
    processes = [context.Process(target=work, args=(n, o, s, str(out), args.device, eval_at, guidances, args.classifiers,
                                                     args.card))
                 for n, o, s in jobs]  # fmt: skip
    began = time.monotonic()
    for p in processes:
        p.start()
    while any(p.is_alive() for p in processes):
        if args.deadline and time.monotonic() - began > args.deadline:
            print(f"deadline of {args.deadline:g} s: stopping {sum(p.is_alive() for p in processes)} runs", flush=True)
            for p in processes:
                p.terminate()
            break
        time.sleep(2)
    for p in processes:
        p.join()
    rows = [json.loads(line) for f in sorted(out.glob("*/evals.jsonl")) for line in f.read_text().splitlines()]
    text = table(rows, guidances)
    (out / "sweep.md").write_text(text + "\n")
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(text)
    print(f"wall {time.monotonic() - began:.0f} s")
    if args.pack and rows:
        last = max(r["step"] for r in rows)  # the latest step measured, where a deadline stopped the runs early
        final = [r for r in rows if r["step"] == last]
        by_variant: dict[str, list[float]] = {}
        for r in final:
            by_variant.setdefault(r["variant"], []).append(r[f"held_out@{guidances[0]:g}"])
        best = max(by_variant, key=lambda v: sum(by_variant[v]) / len(by_variant[v]))
        folders = [f for f in sorted(out.glob(f"{best}-s*")) if (f / "dori_model.json").is_file()][: args.pack]
        for folder in folders:  # one folder per tar: a file that comes back is at most 16 MiB
            with tarfile.open(out / f"model_{folder.name}.tar", "w") as tar:
                tar.add(folder, arcname=folder.name)
        print(f"packed {len(folders)} folders of {best}")


if __name__ == "__main__":
    main()
