"""The ``dori`` command: a thin layer over the library (loading, files, progress bars, errors)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dori.configs import (
    STUDY_DEFAULT_STAGES,
    STUDY_STAGES,
    AttackRunConfig,
    DetectConfig,
    LocalityConfig,
    MitigateConfig,
    ReplicateConfig,
    UnlearnRunConfig,
    WandaSweepConfig,
)
from dori.errors import DoriError

app = typer.Typer(
    help="dori: find, attack and remove memorized training images in text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The bundled model: train it, measure it.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
console = Console(stderr=True)

ModelOption = Annotated[str, typer.Option("--model", help="'bundled' or a local model folder (diffusers layout).")]
DeviceOption = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu, cuda, cuda:1.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")]
MitigationOption = Annotated[str | None, typer.Option("--mitigation", help="A folder written by 'dori mitigate'.")]
TypeOption = Annotated[str | None, typer.Option("--type", help="Keep only prompts of this type (VM, TM).")]
LimitOption = Annotated[int | None, typer.Option("--limit", help="Only the first N prompts.")]
ImagesOption = Annotated[str | None, typer.Option("--images", help="Training images, files named by prompt index (real models).")]
SscdOption = Annotated[str | None, typer.Option("--sscd", help="SSCD TorchScript file (real models).")]
GuidanceOption = Annotated[float | None, typer.Option("--guidance", help="Classifier-free guidance (default: the model's own: 7.0 for SD, the card's rule for the bundled model).")]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Images per U-Net batch.")]


def _columns() -> tuple:
    """The columns of every progress bar: description, bar, done/total, elapsed, remaining."""
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())  # fmt: skip


@contextmanager
def progress_bar(description: str, total: int):
    """Yield ``advance(n)`` for a rich progress bar on stderr."""
    with Progress(*_columns(), console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise DoriError(f"{name} must be at least 1, got {value}")
    return value


def _load(model: str, device: str, dtype: str):
    from dori.models.loading import load_model
    from dori.parallel import device_for

    with console.status(f"loading model {model}"):
        return load_model(model, device=device_for(device), dtype=dtype)


GRID_SEEDS, GRID_PROMPTS = 16, 64  # dori generate's grid.png: at most this many seeds (columns) and prompts (rows)


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeat for several.")] = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", help="Generate from saved embeddings (safetensors, e.g. from dori attack).")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The tensor in --embeddings (default: the last attack step).")] = None,
    model: ModelOption = "bundled",
    seeds: Annotated[int, typer.Option("--seeds", help="Images per prompt (seeds first-seed .. first-seed+N-1).")] = 4,
    first_seed: Annotated[int, typer.Option("--first-seed")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = 50,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Classifier-free guidance (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Generate images from prompts or saved embeddings: one PNG per row and seed, and a grid."""
    import torch

    import os
    import shutil

    from dori.report_images import save_grid, to_pil
    from dori.runs import prepare_out_dir, write_json_atomic, write_manifest

    from dori.configs import MAX_COUNT, MAX_SEED, check_range

    for flag, value in (("--seeds", seeds), ("--steps", steps), ("--batch-size", batch_size)):
        check_range(flag, value, 1, MAX_COUNT)
    check_range("--first-seed", first_seed, 0, MAX_SEED)
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise DoriError(f"--guidance must be a finite number of at least 0, got {guidance}")
    if bool(prompt) == (embeddings is not None):
        raise DoriError("give either --prompt TEXT (repeat for several) or --embeddings FILE")
    diffusion = _load(model, device, dtype)
    if str(out).strip() in ("", "."):
        raise DoriError("--out must name a new folder for the images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DoriError(f"{out} already exists and is not an empty folder; choose a new --out")
    if embeddings is not None:
        from dori.attack import load_embeddings

        emb = load_embeddings(embeddings, diffusion, key)
        prompt = [f"{embeddings.name}[{i}]" for i in range(emb.shape[0])]
    else:
        emb = diffusion.encode(prompt)
    seed_list = list(range(first_seed, first_seed + seeds))
    config = {"model": model, "prompts": prompt, "embeddings": None if embeddings is None else str(embeddings),
              "key": key, "seeds": seed_list, "steps": steps, "guidance": guidance}  # fmt: skip
    # Images stream to a hidden folder beside --out, batch by batch (memory stays at one batch), and
    # the folder takes its name only when every image is written: a refused or interrupted run
    # leaves nothing behind (generate does not resume), a finished one is complete.
    staging = prepare_out_dir(out.parent / f".{out.name}.partial-{os.getpid()}")
    grid_columns, grid_rows = min(seeds, GRID_SEEDS), min(len(prompt), GRID_PROMPTS)
    shown = torch.zeros(grid_rows * grid_columns, 3, *diffusion.image_size)
    files = []
    try:
        with progress_bar("generating", len(prompt) * seeds) as advance:
            for rows, images in diffusion.generate_chunks(emb, seed_list, steps=steps, guidance=guidance,
                                                          batch_size=batch_size):  # fmt: skip
                if not torch.isfinite(images).all():
                    raise DoriError("the model generated NaN or infinite pixels; check its weights and --dtype "
                                    "(float16 can overflow on CPU; use float32)")  # fmt: skip
                for n, image in zip(range(rows.start, rows.stop), images):
                    i, j = divmod(n, seeds)
                    name = f"prompt{i:03d}_seed{seed_list[j]}.png"
                    to_pil(image).save(staging / name)
                    files.append({"prompt": prompt[i], "seed": seed_list[j], "file": name})
                    if i < grid_rows and j < grid_columns:
                        shown[i * grid_columns + j] = image
                advance(rows.stop - rows.start)
        save_grid(shown, staging / "grid.png", columns=grid_columns)
        write_json_atomic(staging / "images.json", files)
        write_manifest(staging, "generate", config)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DoriError(f"{out} was filled by something else while generating; choose a new --out")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    part = "" if (grid_rows, grid_columns) == (len(prompt), seeds) else \
        f" (the grid shows the first {grid_columns} seeds of the first {grid_rows} prompts)"  # fmt: skip
    console.print(f"wrote {len(files)} images and grid.png to {out}{part}")


ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out (same parameters).")]


def _workflows():
    from dori import workflows

    return workflows


@app.command()
def replicate(
    prompts: Annotated[str, typer.Option("--prompts", help="Prompt set: bundled:NAME, sd14:NAME, or a .csv/.jsonl/.txt file.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    model: ModelOption = "bundled",
    mitigation: MitigationOption = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Generations per prompt.")] = ReplicateConfig.seeds,
    first_seed: Annotated[int, typer.Option("--first-seed")] = ReplicateConfig.first_seed,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = ReplicateConfig.steps,
    guidance: GuidanceOption = ReplicateConfig.guidance,
    type: TypeOption = ReplicateConfig.type,
    limit: LimitOption = ReplicateConfig.limit,
    images: ImagesOption = ReplicateConfig.images,
    sscd: SscdOption = ReplicateConfig.sscd,
    sscd_convention: Annotated[str, typer.Option("--sscd-convention", help="resize320 (NeMo) or center224 (Wen et al.).")] = ReplicateConfig.sscd_convention,
    batch_size: BatchOption = ReplicateConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Measure replication: SSCD_orig (mean, median, max) and MR per prompt and over the set."""
    wf = _workflows()
    config = ReplicateConfig(prompts=prompts, model=model, mitigation=mitigation, seeds=seeds, first_seed=first_seed, steps=steps,
                                guidance=guidance, type=type, limit=limit, images=images, sscd=sscd,
                                sscd_convention=sscd_convention, batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    n = len(wf.load_prompts(prompts, diffusion, kind=type, limit=limit))
    with progress_bar("replicate", n * seeds) as advance:
        summary = wf.run_replicate(config, diffusion, out, resume=resume, progress=advance)
    console.print(f"MR {summary['mr']:.3f}, SSCD_orig {summary['sscd_mean']:.3f} +- {summary['sscd_std']:.3f} "
                  f"(median {summary['sscd_median']:.3f}) over {summary['n_prompts']} prompts x {summary['n_seeds']} seeds "
                  f"-> {out}/summary.json")  # fmt: skip


@app.command()
def detect(
    memorized: Annotated[str, typer.Option("--memorized", help="Memorized prompt set.")],
    non_memorized: Annotated[str, typer.Option("--non-memorized", help="Non-memorized prompt set.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    model: ModelOption = "bundled",
    mitigation: MitigationOption = None,
    generations: Annotated[int, typer.Option("--generations", help="Generations per prompt for the noise norm.")] = DetectConfig.generations,
    consistency_seeds: Annotated[int, typer.Option("--consistency-seeds", help="Seeds for NeMo's SSIM check.")] = DetectConfig.consistency_seeds,
    steps: Annotated[int, typer.Option("--steps")] = DetectConfig.steps,
    guidance: GuidanceOption = DetectConfig.guidance,
    all_steps: Annotated[bool, typer.Option("--all-steps", help="Also average the noise norm over all steps.")] = DetectConfig.all_steps,
    limit: LimitOption = DetectConfig.limit,
    batch_size: BatchOption = DetectConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Detect memorized prompts: noise-difference norm and NeMo's SSIM check, with ROC-AUC and TPR@1%FPR."""
    wf = _workflows()
    config = DetectConfig(memorized=memorized, non_memorized=non_memorized, model=model, mitigation=mitigation,
                          generations=generations,
                             consistency_seeds=consistency_seeds, steps=steps, guidance=guidance, all_steps=all_steps,
                             limit=limit, batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    n = sum(len(wf.load_prompts(s, diffusion, limit=limit)) for s in (memorized, non_memorized))
    with progress_bar("detect", n) as advance:
        summary = wf.run_detect(config, diffusion, out, resume=resume, progress=advance)
    nn, ss = summary["noise_norm"], summary["ssim"]
    console.print(f"noise norm AUC {nn['auc']:.3f}, TPR@1%FPR {nn['tpr_at_1pct_fpr']:.3f}; SSIM AUC {ss['auc']:.3f}, "
                  f"TPR@1%FPR {ss['tpr_at_1pct_fpr']:.3f}, threshold {ss['threshold']:.3f} -> {out}/summary.json")  # fmt: skip


@app.command()
def mitigate(
    method: Annotated[str, typer.Option("--method", help="nemo or wanda.")],
    prompts: Annotated[str, typer.Option("--prompts", help="The memorized prompts to mitigate.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (mask, mitigated weights, summary).")],
    model: ModelOption = "bundled",
    reference_prompts: Annotated[str | None, typer.Option("--reference-prompts", help="NeMo: non-memorized prompts for statistics and threshold.")] = MitigateConfig.reference_prompts,
    stats: Annotated[str | None, typer.Option("--stats", help="NeMo: a statistics file (e.g. nemo_sd14_value_stats.pt).")] = MitigateConfig.stats,
    threshold: Annotated[float | None, typer.Option("--threshold", help="NeMo: SSIM threshold (0.428 for SD v1.4).")] = MitigateConfig.threshold,
    sites: Annotated[str, typer.Option("--sites", help="Wanda: ffn or value sites.")] = MitigateConfig.sites,
    ratio: Annotated[str, typer.Option("--ratio", help="Wanda: top fraction of each row considered, or 'auto': the smallest of 0.01, 0.02, 0.05, 0.1, 0.2, 0.5 that stops replication on the defender's own seeds.")] = str(MitigateConfig.ratio),
    scope: Annotated[str, typer.Option("--scope", help="NeMo: 'prompt' runs each prompt under its own neurons (as NeMo evaluates); 'union' runs all prompts under all neurons.")] = MitigateConfig.scope,
    seeds: Annotated[int, typer.Option("--seeds", help="Generations per prompt for MR before / after.")] = MitigateConfig.seeds,
    utility_seeds: Annotated[int, typer.Option("--utility-seeds")] = MitigateConfig.utility_seeds,
    steps: Annotated[int, typer.Option("--steps")] = MitigateConfig.steps,
    guidance: GuidanceOption = MitigateConfig.guidance,
    type: TypeOption = MitigateConfig.type,
    limit: LimitOption = MitigateConfig.limit,
    images: ImagesOption = MitigateConfig.images,
    sscd: SscdOption = MitigateConfig.sscd,
    batch_size: BatchOption = MitigateConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Apply a pruning mitigation (NeMo neurons or Wanda weights); save the mask and mitigated weights."""
    config = MitigateConfig(method=method, prompts=prompts, model=model, reference_prompts=reference_prompts, stats=stats,
                            threshold=threshold, sites=sites, ratio=ratio, scope=scope, seeds=seeds, utility_seeds=utility_seeds,
                            steps=steps, guidance=guidance, type=type, limit=limit, images=images, sscd=sscd,
                            batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    with console.status("mitigating") as status:
        summary = _workflows().run_mitigate(config, diffusion, out, resume=resume, progress=status.update)
    if summary.get("ratio_rule") == "auto":
        ladder = ", ".join(f"{r['ratio']:g}: {r['mr']:.2f}" for r in summary["ladder_mr"])
        console.print(f"wanda: ratio {summary['ratio']:g} chosen (defender's MR by ratio {ladder})")
    console.print(f"{method}: MR {summary['mr_before']:.3f} -> {summary['mr_after']:.3f}, similarity "
                  f"{summary['sscd_mean_before']:.3f} -> {summary['sscd_mean_after']:.3f}, utility "
                  f"{summary['utility_before']} -> {summary['utility_after']} -> {out}/summary.json")  # fmt: skip


@app.command()
def attack(
    prompts: Annotated[str, typer.Option("--prompts", help="Memorized prompts whose images to bring back.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    model: ModelOption = "bundled",
    mitigation: MitigationOption = None,
    init: Annotated[str, typer.Option("--init", help="prompt, random or other.")] = AttackRunConfig.init,
    other_prompts: Annotated[str | None, typer.Option("--other-prompts", help="Prompts for --init other.")] = AttackRunConfig.other_prompts,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps.")] = AttackRunConfig.steps,
    learning_rate: Annotated[float, typer.Option("--lr")] = AttackRunConfig.learning_rate,
    attack_batch: Annotated[int, typer.Option("--attack-batch", help="(noise, t) pairs per step.")] = AttackRunConfig.attack_batch,
    steps_curve: Annotated[str, typer.Option("--steps-curve", help="Step counts at which to measure MR.")] = AttackRunConfig.steps_curve,
    control: Annotated[bool, typer.Option("--control/--no-control", help="Also attack non-memorized targets.")] = AttackRunConfig.control,
    seeds: Annotated[int, typer.Option("--seeds", help="Generations per embedding.")] = AttackRunConfig.seeds,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="DDIM steps of the evaluation's generations.")] = AttackRunConfig.eval_steps,
    guidance: GuidanceOption = AttackRunConfig.guidance,
    attack_seed: Annotated[int, typer.Option("--attack-seed")] = AttackRunConfig.attack_seed,
    type: TypeOption = AttackRunConfig.type,
    limit: LimitOption = AttackRunConfig.limit,
    images: ImagesOption = AttackRunConfig.images,
    sscd: SscdOption = AttackRunConfig.sscd,
    batch_size: BatchOption = AttackRunConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """The DoRI attack: optimise conditioning embeddings that bring memorized images back."""
    config = AttackRunConfig(prompts=prompts, model=model, mitigation=mitigation, init=init, other_prompts=other_prompts,
                             steps=steps, learning_rate=learning_rate, attack_batch=attack_batch,
                             steps_curve=steps_curve, control=control, seeds=seeds, eval_steps=eval_steps,
                             guidance=guidance, attack_seed=attack_seed, type=type, limit=limit, images=images, sscd=sscd,
                             batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    wf = _workflows()
    n = len(wf.load_prompts(prompts, diffusion, kind=type, limit=limit))
    n_control = sum(len(wf.load_prompts(s, diffusion, limit=config.control_limit)) for s in wf.control_sets(diffusion))
    total = n * seeds * len(config.curve()) + (n_control * seeds * 2 if control else 0)
    with progress_bar("attack + evaluation", total) as advance:
        summary = wf.run_attack(config, diffusion, out, resume=resume, progress=advance)
    curve = ", ".join(f"{k}: {v:.2f}" for k, v in summary["steps_curve"].items())
    console.print(f"DoRI MR {summary['mr']:.3f}, similarity {summary['sscd_mean']:.3f} +- {summary['sscd_std']:.3f}; "
                  f"MR by steps {curve}")  # fmt: skip
    for name, result in summary.get("control", {}).items():
        console.print(f"control {name}: MR {result['mr']:.3f}, similarity {result['sscd_mean']:.3f}")
    console.print(f"-> {out}/summary.json")


@app.command("wanda-sweep")
def wanda_sweep(
    prompts: Annotated[str, typer.Option("--prompts", help="The memorized prompts.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (results.jsonl, sweep.csv, sweep.png, summary.json).")],
    model: ModelOption = "bundled",
    sites: Annotated[str, typer.Option("--sites", help="ffn or value sites.")] = WandaSweepConfig.sites,
    ladder: Annotated[str, typer.Option("--ladder", help="Comma-separated Wanda ratios, increasing.")] = WandaSweepConfig.ladder,
    seeds: Annotated[int, typer.Option("--seeds", help="Generations per prompt.")] = WandaSweepConfig.seeds,
    utility_seeds: Annotated[int, typer.Option("--utility-seeds")] = WandaSweepConfig.utility_seeds,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps of every generation.")] = WandaSweepConfig.steps,
    guidance: GuidanceOption = WandaSweepConfig.guidance,
    attack_steps: Annotated[int, typer.Option("--attack-steps", help="DoRI steps at each ratio.")] = WandaSweepConfig.attack_steps,
    learning_rate: Annotated[float, typer.Option("--lr")] = WandaSweepConfig.learning_rate,
    attack_batch: Annotated[int, typer.Option("--attack-batch", help="(noise, t) pairs per step.")] = WandaSweepConfig.attack_batch,
    attack_seed: Annotated[int, typer.Option("--attack-seed")] = WandaSweepConfig.attack_seed,
    type: TypeOption = WandaSweepConfig.type,
    limit: LimitOption = WandaSweepConfig.limit,
    images: ImagesOption = WandaSweepConfig.images,
    sscd: SscdOption = WandaSweepConfig.sscd,
    batch_size: BatchOption = WandaSweepConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """How hard must Wanda prune before DoRI fails? MR, MR after DoRI and utility at each ratio."""
    from dori.sweep import run_wanda_sweep

    config = WandaSweepConfig(prompts=prompts, model=model, sites=sites, ladder=ladder, seeds=seeds,
                              utility_seeds=utility_seeds, steps=steps, guidance=guidance, attack_steps=attack_steps,
                              learning_rate=learning_rate, attack_batch=attack_batch, attack_seed=attack_seed,
                              type=type, limit=limit, images=images, sscd=sscd, batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    with console.status("wanda sweep") as status:
        summary = run_wanda_sweep(config, diffusion, out, resume=resume, progress=status.update)
    for row in summary["rows"]:
        utility = "–" if row["utility"] is None else f"{row['utility']:.2f}"
        console.print(f"ratio {row['ratio']:<5g}: MR {row['mr']:.2f}, after DoRI {row['mr_dori']:.2f}, utility {utility}")
    console.print(f"-> {out}/summary.json, {out}/sweep.png")


@app.command()
def locality(
    prompts: Annotated[str, typer.Option("--prompts", help="Memorized prompts (Y_mem); the first --targets are attacked.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (summary.json, triggers, plots).")],
    model: ModelOption = "bundled",
    mitigation: MitigationOption = None,
    inits: Annotated[int, typer.Option("--inits", help="Random initialisations (triggers) per target.")] = LocalityConfig.inits,
    targets: Annotated[int, typer.Option("--targets", help="Memorized images to attack.")] = LocalityConfig.targets,
    non_memorized: Annotated[str | None, typer.Option("--non-memorized", help="Prompts whose embeddings give the distance scale.")] = LocalityConfig.non_memorized,
    steps: Annotated[int, typer.Option("--steps", help="Attack steps.")] = LocalityConfig.steps,
    learning_rate: Annotated[float, typer.Option("--lr")] = LocalityConfig.learning_rate,
    attack_batch: Annotated[int, typer.Option("--attack-batch", help="(noise, t) pairs per trigger per step.")] = LocalityConfig.attack_batch,
    seeds: Annotated[int, typer.Option("--seeds", help="Generations per trigger for its success check.")] = LocalityConfig.seeds,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="DDIM steps of the success check's generations.")] = LocalityConfig.eval_steps,
    agreement_triggers: Annotated[int, typer.Option("--agreement-triggers", help="Triggers per target given to NeMo and Wanda.")] = LocalityConfig.agreement_triggers,
    wanda_sites: Annotated[str, typer.Option("--wanda-sites", help="ffn or value.")] = LocalityConfig.wanda_sites,
    reference_prompts: Annotated[str | None, typer.Option("--reference-prompts", help="NeMo: non-memorized prompts for statistics and threshold.")] = LocalityConfig.reference_prompts,
    stats: Annotated[str | None, typer.Option("--stats", help="NeMo: a statistics file.")] = LocalityConfig.stats,
    threshold: Annotated[float | None, typer.Option("--threshold", help="NeMo: SSIM threshold.")] = LocalityConfig.threshold,
    tsne: Annotated[bool, typer.Option("--tsne/--no-tsne", help="Also a t-SNE projection (besides PCA).")] = LocalityConfig.tsne,
    guidance: GuidanceOption = LocalityConfig.guidance,
    seed: Annotated[int, typer.Option("--seed")] = LocalityConfig.seed,
    type: TypeOption = LocalityConfig.type,
    limit: LimitOption = LocalityConfig.limit,
    images: ImagesOption = LocalityConfig.images,
    sscd: SscdOption = LocalityConfig.sscd,
    batch_size: BatchOption = LocalityConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Non-locality: where the triggers of one image lie, what they activate, which weights they select."""
    from dori.locality import run_locality

    config = LocalityConfig(prompts=prompts, model=model, mitigation=mitigation, inits=inits, targets=targets,
                            non_memorized=non_memorized, steps=steps, learning_rate=learning_rate,
                            attack_batch=attack_batch, seeds=seeds, eval_steps=eval_steps,
                            agreement_triggers=agreement_triggers,
                            wanda_sites=wanda_sites, reference_prompts=reference_prompts, stats=stats,
                            threshold=threshold, tsne=tsne, guidance=guidance, seed=seed, type=type, limit=limit,
                            images=images, sscd=sscd, batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    with console.status("locality") as status:
        summary = run_locality(config, diffusion, out, resume=resume, progress=status.update)
    for view, sentence in summary["verdicts"].items():
        console.print(f"{view}: {sentence}")
    console.print(f"{summary['seconds']:.0f} s -> {out}/summary.json")


@app.command()
def unlearn(
    prompts: Annotated[str, typer.Option("--prompts", help="The memorized prompts to remove.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, fine-tuned model in out/model).")],
    model: ModelOption = "bundled",
    mitigation: Annotated[str | None, typer.Option("--mitigation", help="Surrogates from this mitigated model (default: NeMo, run here).")] = UnlearnRunConfig.mitigation,
    retain_prompts: Annotated[str | None, typer.Option("--retain-prompts", help="Real models: non-memorized pairs (with --images).")] = UnlearnRunConfig.retain_prompts,
    steps: Annotated[int, typer.Option("--steps", help="Fine-tuning steps.")] = UnlearnRunConfig.steps,
    learning_rate: Annotated[float, typer.Option("--lr")] = UnlearnRunConfig.learning_rate,
    retain_batch: Annotated[int, typer.Option("--retain-batch")] = UnlearnRunConfig.retain_batch,
    triggers_per_target: Annotated[int, typer.Option("--triggers")] = UnlearnRunConfig.triggers_per_target,
    inner_steps: Annotated[int, typer.Option("--inner-steps", help="Attack steps per fine-tuning step (warm start).")] = UnlearnRunConfig.inner_steps,
    warm_start: Annotated[bool, typer.Option("--warm-start/--fresh", help="Continue triggers, or a fresh search every step.")] = UnlearnRunConfig.warm_start,
    fresh_steps: Annotated[int, typer.Option("--fresh-steps")] = UnlearnRunConfig.fresh_steps,
    adv_weight: Annotated[float, typer.Option("--adv-weight")] = UnlearnRunConfig.adv_weight,
    seeds: Annotated[int, typer.Option("--seeds", help="Generations per prompt in the evaluation.")] = UnlearnRunConfig.seeds,
    eval_attack_steps: Annotated[int, typer.Option("--eval-attack-steps", help="Steps of the evaluation's DoRI attack.")] = UnlearnRunConfig.eval_attack_steps,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="Sampling steps in the evaluation.")] = UnlearnRunConfig.eval_steps,
    utility_seeds: Annotated[int, typer.Option("--utility-seeds")] = UnlearnRunConfig.utility_seeds,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = UnlearnRunConfig.checkpoint_every,
    seed: Annotated[int, typer.Option("--seed")] = UnlearnRunConfig.seed,
    type: TypeOption = UnlearnRunConfig.type,
    limit: LimitOption = UnlearnRunConfig.limit,
    images: ImagesOption = UnlearnRunConfig.images,
    sscd: SscdOption = UnlearnRunConfig.sscd,
    batch_size: BatchOption = UnlearnRunConfig.batch_size,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Adversarial fine-tuning: remove memorization for real, then attack the result again."""
    config = UnlearnRunConfig(prompts=prompts, model=model, mitigation=mitigation, retain_prompts=retain_prompts,
                              steps=steps, learning_rate=learning_rate, retain_batch=retain_batch,
                              triggers_per_target=triggers_per_target, inner_steps=inner_steps, warm_start=warm_start,
                              fresh_steps=fresh_steps, adv_weight=adv_weight, seeds=seeds,
                              eval_attack_steps=eval_attack_steps, eval_steps=eval_steps, utility_seeds=utility_seeds,
                              checkpoint_every=checkpoint_every, seed=seed, type=type, limit=limit, images=images,
                              sscd=sscd, batch_size=batch_size)  # fmt: skip
    diffusion = _load(model, device, dtype)
    with console.status("unlearning") as status:
        summary = _workflows().run_unlearn(config, diffusion, out, resume=resume, progress=status.update)
    console.print(f"DoRI MR {summary['mr_attack_before']:.3f} -> {summary['mr_attack_after']:.3f}; plain prompts MR "
                  f"{summary['mr_prompt_after']:.3f}; utility {summary['utility_before']} -> {summary['utility_after']}; "
                  f"{summary['seconds']:.0f} s -> {out}/summary.json (model: {summary['model']})")  # fmt: skip


@app.command()
def study(
    out: Annotated[Path, typer.Option("--out", help="Study folder (stages/, summary.json, report.html).")],
    model: ModelOption = "bundled",
    memorized: Annotated[str, typer.Option("--memorized")] = "bundled:memorized",
    non_memorized: Annotated[str, typer.Option("--non-memorized")] = "bundled:non_memorized",
    stages: Annotated[str, typer.Option("--stages", help=f"Comma-separated stages, from {', '.join(STUDY_STAGES)} (wanda_sweep, Wanda's trade-off curve, is not in the default).")] = ",".join(STUDY_DEFAULT_STAGES),
    quick: Annotated[bool, typer.Option("--quick", help="Reduced settings (for tests and a first look).")] = False,
    images: ImagesOption = None,
    sscd: SscdOption = None,
    batch_size: BatchOption = 64,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Generations per prompt (default: 10; bundled model 4).")] = None,
    sampling_steps: Annotated[int | None, typer.Option("--sampling-steps", help="DDIM steps (default: 50; bundled model 20).")] = None,
    resume: ResumeOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """The whole study: detect, replicate, NeMo / Wanda, DoRI on each, the control, adversarial fine-tuning, report."""
    from dori.study import StudyConfig, run_study

    config = StudyConfig(model=model, memorized=memorized, non_memorized=non_memorized, stages=stages, quick=quick,
                         images=images, sscd=sscd, batch_size=batch_size, seeds=seeds,
                         sampling_steps=sampling_steps)  # fmt: skip
    diffusion = _load(model, device, dtype)
    with console.status("study") as status:
        summary = run_study(config, diffusion, out, resume=resume, progress=lambda m: status.update(f"study: {m}"))
    for name, row in summary["table"].items():
        console.print(f"{name:>20}: MR {row['mr']:.3f}, similarity {row['sscd_mean']:.3f}, utility {row['utility']}")
    console.print(f"report: {out}/report.html")


@toy_app.command("train")
def toy_train(
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, weights and the model card.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from out/checkpoint.pt.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: the recipe's).")] = None,
    eval_seeds: Annotated[int, typer.Option("--eval-seeds", help="Seeds per prompt for the model card.")] = 10,
    skip_card: Annotated[bool, typer.Option("--skip-card", help="Train only; no calibration or card.")] = False,
) -> None:
    """Train the bundled model by dori's recipe, calibrate its copy detector, write its model card."""
    from dori.runs import prepare_out_dir
    from dori.toy.train import ToyTrainConfig, finish_bundled_model, train_bundled_model

    config = ToyTrainConfig(seed=seed, **({} if steps is None else {"steps": steps}))
    out = prepare_out_dir(out)
    bars: dict[str, Callable] = {}
    with Progress(*_columns(), console=console) as bar:

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                task = bar.add_task(phase, total=total)
                bars[phase] = lambda d, task=task: bar.update(task, completed=d)
            bars[phase](done)

        train_bundled_model(config, out, resume=resume, progress=progress, log=bar.console.print)
        if not skip_card:
            task = bar.add_task("model card", total=None)
            finish_bundled_model(out, seeds=_positive("--eval-seeds", eval_seeds),
                                 progress=lambda done, total: bar.update(task, completed=done, total=total),
                                 log=bar.console.print)  # fmt: skip


@toy_app.command("card")
def toy_card(
    model: Annotated[Path, typer.Option("--model", help="A finished bundled-kind folder (from 'dori toy train').")],
    eval_seeds: Annotated[int, typer.Option("--eval-seeds", help="Seeds per prompt for the model card.")] = 10,
) -> None:
    """Re-measure a trained bundled model without retraining: calibrate and benchmark its copy
    detector, choose its guidance by the card's rule, measure it, rewrite MODEL_CARD.md."""
    from dori.models.loading import is_bundled_kind
    from dori.toy.train import finish_bundled_model

    if str(model) == "bundled" or not is_bundled_kind(model):
        raise DoriError(f"{model} is not a folder written by 'dori toy train'; pass --model DIR of a trained bundled model")
    seeds = _positive("--eval-seeds", eval_seeds)
    with Progress(*_columns(), console=console) as bar:
        task = bar.add_task("model card", total=None)
        finish_bundled_model(model, seeds=seeds, log=bar.console.print,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip


@toy_app.command("benchmark")
def toy_benchmark(
    model: ModelOption = "bundled",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the benchmark's draws.")] = 2024,
) -> None:
    """Run the copy-detection benchmark on a bundled-kind model's detector and print its table."""
    from dori.models.loading import is_bundled_kind, resolve_model_path
    from dori.toy.copy_benchmark import benchmark_lines, run_copy_benchmark
    from dori.toy.kit import ToyKit

    if not is_bundled_kind(model):
        raise DoriError(f"{model} is not a model of the bundled kind; the benchmark needs its synthetic training data")
    kit = ToyKit.from_folder(resolve_model_path(model))
    with console.status("copy-detection benchmark"):
        result = run_copy_benchmark(kit.detector, kit.data, seed=seed)
    typer.echo("\n".join(benchmark_lines(result)))
    if not result["passed"]:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (usage errors are
    typer's own message, also exit 2); Ctrl-C exits 130 with a hint to resume."""
    import signal

    def terminated(signum, frame):  # SIGTERM (a job scheduler, `kill`) stops like Ctrl-C, with the same hint
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        _run_app()
    except DoriError as error:
        from dori.runs import discard_unstarted_runs

        discard_unstarted_runs()  # a refused run leaves nothing that would block the corrected command
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit as done:
        if done.code == 130:
            from dori.runs import discard_unstarted_runs

            discarded, started = discard_unstarted_runs()  # a run stopped before its first result is not kept
            if not _resumable(sys.argv[1:3]):
                hint = "interrupted: this command does not resume; run it again"
            elif started and discarded == started:
                hint = "interrupted before any result was written, so nothing was kept; run the same command again"
            else:
                hint = "interrupted: the results written so far are kept; rerun the same command with --resume to continue"
            console.print(hint, highlight=False, soft_wrap=True)
        raise


def _run_app() -> None:
    from dori.runs import release_all

    try:
        app()  # standalone: typer reports usage errors and turns Ctrl-C into exit code 130
    finally:
        release_all()  # the run folders this command locked (the process may live on: tests, notebooks)


def _resumable(words: list[str]) -> bool:
    """Whether the command named by ``words`` (``attack``, ``toy train``...) takes ``--resume``."""
    import inspect

    words = [w for w in words if not w.startswith("-")]
    group, name = (toy_app, words[1:2]) if words[:1] == ["toy"] else (app, words[:1])
    for command in group.registered_commands:
        if [command.name or command.callback.__name__.replace("_", "-")] == name:
            return "resume" in inspect.signature(command.callback).parameters
    return False
