"""Train several variants of the bundled recipe on several seeds at once, on one accelerator, and
measure each as it trains: the search behind the fifth recipe, sized for a GPU lent for a few minutes.

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

With ``--regime`` each run, once trained, measures the regime checks (a) to (d) of
``dori.bundled.regime`` and ``dori.bundled.card.card_checks`` stage by stage into ``OUT/RUN/regime.jsonl``
(with its memorized and held-out grids), and ``OUT/regime.md`` holds one row per run.
``--train-seconds S`` fits each run's step count into S seconds (timed on a few steps at its start),
so that a screen finishes inside the minutes a GPU is lent; the row says how many steps it trained.

    python tools/recipe_sweep.py --out DIR --device cuda --seeds 0,1,2 --eval-at 99999 --regime \
        --variant A:unet_layout=sd,channels=64/128/128,space_to_depth=2,attention_heads=8,batch_size=64,steps=2500 \
        --classifiers DIR --train-seconds 200 --deadline 480

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
    """``name:key=value,key=value`` -> (name, overrides of ToyTrainConfig); ``a/b/c`` is a tuple of
    integers (``channels=64/128/128``), a word that is no number stays a string (``unet_layout=sd``)."""
    name, _, rest = text.partition(":")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value in VALUE_TYPES:
            overrides[key] = VALUE_TYPES[value]
        elif "/" in value:
            overrides[key] = tuple(int(v) for v in value.split("/"))
        else:
            try:
                overrides[key] = float(value) if any(c in value for c in ".e") else int(value)
            except ValueError:
                overrides[key] = value
    return name, overrides


def fit_steps(config, device: str, seconds: float, *, probe: int = 8) -> int:
    """The most steps (a multiple of the checkpoint interval, at least one interval, at most the
    recipe's) that this process can train in ``seconds``, timed on ``probe`` training steps of the
    recipe (``dori.bundled.train.step_seconds``) while the other runs start beside it."""
    import statistics

    from dori.bundled.train import step_seconds
    per_step = statistics.median(step_seconds(config, probe, device)[1])
    every = config.checkpoint_every
    return max(every, min(config.steps, int(seconds / per_step) // every * every))


def screen_regime(folder: Path, device: str, say, nemo_seeds: int) -> None:
    """The regime checks (docs/BUNDLED_MODEL.md) and the card's own checks (d), stage by stage, each stage's row
    appended to ``folder/regime.jsonl`` as soon as it is measured (a run stopped at its limit keeps
    what it measured). (a) and (b) need no copy detector, so they come first."""
    import time

    from dori.mitigate.nemo import NemoConfig
    from dori.mitigate.nemo_reference import nemo_reference
    from dori.models.loading import load_model
    from dori.report_images import save_grid
    from dori.bundled.card import benchmark, calibrate, card_checks, choose_guidance, guidance_sweep, measure_bundled
    from dori.toy.kit import ToyKit
    from dori.bundled.regime import RegimeConfig, nemo_flags, nemo_localises, site_floors

    def row(stage: str, began: float, **numbers) -> None:
        with (folder / "regime.jsonl").open("a") as f:
            f.write(json.dumps({"stage": stage, "seconds": time.monotonic() - began, **numbers}) + "\n")

    model = load_model(folder, device=device)
    kit = ToyKit.from_folder(folder)
    config = RegimeConfig(nemo=NemoConfig(seeds=nemo_seeds))
    began = time.monotonic()
    stats, threshold = nemo_reference(model, reference_prompts="bundled:ordinary", stats=None, threshold=None,
                                      config=config.nemo, say=say)  # fmt: skip
    row("a", began, **nemo_flags(model, kit, threshold, config))
    began = time.monotonic()
    row("b", began, **nemo_localises(model, kit, stats, threshold, config))
    began = time.monotonic()
    prepared = folder / "copy_benchmark.json"  # the detector depends on the seed's data only: made beforehand
    if prepared.is_file() and (folder / "copy_detector.json").is_file():
        bench = json.loads(prepared.read_text())
    else:
        calibrate(kit)
        bench = benchmark(kit)
    sweep = guidance_sweep(model, kit)
    guidance = choose_guidance(sweep)
    row("guidance", began, sweep=sweep, guidance=guidance, tau=kit.detector.tau, copy_benchmark=bench)
    began = time.monotonic()
    row("c", began, **site_floors(model, kit, RegimeConfig(guidance=guidance, nemo=config.nemo)))
    began = time.monotonic()
    numbers, images = measure_bundled(model, kit, guidance=guidance)
    numbers["copy_benchmark"] = bench
    for name in ("memorized", "held_out"):
        save_grid(images[name], folder / f"card_{name}.png", columns=numbers["seeds"])
    keep = ("mr", "sscd_mean", "alignment", "fd")
    row("d", began, **{name: {k: numbers[name][k] for k in keep if k in numbers[name]}
                       for name in ("memorized", "template", "non_memorized", "held_out")},
        auc=numbers["noise_norm"]["auc"], **card_checks(numbers))  # fmt: skip


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
        row[f"held_out@{guidance:g}"] = kit.alignment(images, [p for p in held for _ in range(10)])
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
         classifiers: str | None, card: bool, regime: bool = False, train_seconds: float = 0,
         nemo_seeds: int = 10) -> None:  # fmt: skip
    import dataclasses

    import torch

    torch.set_num_threads(1)
    from dori.toy.kit import ToyKit
    from dori.bundled.recipe import ToyTrainConfig
    from dori.bundled.train import finish_bundled_model, train_bundled_model
    config = ToyTrainConfig(seed=seed, **overrides)
    folder = Path(out) / f"{name}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if train_seconds:
        config = dataclasses.replace(config, steps=fit_steps(config, device, train_seconds))
    if classifiers:  # the classifier (and copy detector) depend on the seed only: made once per seed, elsewhere
        for pattern in ("attribute_classifier.*", "copy_detector.json", "copy_benchmark.json"):
            for file in Path(classifiers, f"seed{seed}").glob(pattern):
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
    if regime:
        with (folder / "regime.jsonl").open("a") as f:
            f.write(json.dumps({"stage": "train", "variant": name, "seed": seed, "overrides": overrides,
                                "steps": config.steps, "seconds": time.monotonic() - began}) + "\n")  # fmt: skip
        screen_regime(folder, device, lambda line: print(line, file=log_file, flush=True), nemo_seeds)


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


def regime_table(out: Path) -> str:
    """One row per run of ``--regime``: each check's numbers and pass or fail, as far as measured."""
    head = ["run", "steps", "train min", "(a) planted flagged", "(b) neurons per title (of)", "(b) passed check",
            "(c) ffn-zeroed / value-zeroed MR", "(d) mem. / non-mem. / held-out MR", "(d) held-out alignment",
            "a d"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for file in sorted(out.glob("*/regime.jsonl")):
        got = {r["stage"]: r for r in map(json.loads, file.read_text().splitlines())}
        a, b, c, d, t = (got.get(k) for k in ("a", "b", "c", "d", "train"))
        verdict = " ".join("-" if x is None else ("pass" if x["passed"] else "FAIL") for x in (a, d))  # (b), (c): measured
        lines.append("| " + " | ".join([
            file.parent.name, str(t["steps"]) if t else "-", f"{t['seconds'] / 60:.1f}" if t else "-",
            f"{a['planted_flagged']}/{a['n_planted']}" if a else "-",
            f"{min(b['neurons_per_title'])}-{max(b['neurons_per_title'])} ({b['value_neurons']})" if b else "-",
            f"{sum(b['mitigated'])}/{len(b['mitigated'])}" if b else "-",
            f"{c['ffn_zeroed']['mr']:.2f} / {c['value_zeroed']['mr']:.2f}" if c else "-",
            f"{d['memorized']['mr']:.2f} / {d['non_memorized']['mr']:.2f} / {d['held_out']['mr']:.2f}" if d else "-",
            f"{d['held_out']['alignment']:.3f}" if d else "-", verdict]) + " |")  # fmt: skip
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
    parser.add_argument("--classifiers", help="folder of seedN/attribute_classifier.* trained beforehand (and "
                        "copy_detector.json with copy_benchmark.json, used by --regime)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds; stop the runs then and report (0: none)")
    parser.add_argument("--pack", type=int, default=0, help="tar the best variant's model folders (at most N)")
    parser.add_argument("--card", action="store_true", help="write each finished model's full card")
    parser.add_argument("--only", default="", help="variant=seed,seed;... : other seeds for some variants")
    parser.add_argument("--regime", action="store_true",
                        help="after training, the regime checks and the card's checks, stage by stage (regime.jsonl)")
    parser.add_argument("--train-seconds", type=float, default=0,
                        help="fit each run's steps into this many seconds, timed at its start (0: the recipe's)")
    parser.add_argument("--nemo-seeds", type=int, default=10, help="NeMo's seeds in the regime checks")
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
                                                     args.card, args.regime, args.train_seconds, args.nemo_seeds))
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
    if args.regime:
        text = regime_table(out)
        (out / "regime.md").write_text(text + "\n")
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
