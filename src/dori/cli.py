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
    AttackRunConfig,
    DetectConfig,
    LocalityConfig,
    MitigateConfig,
    ReplicateConfig,
    StudyConfig,
    UnlearnRunConfig,
    WandaSweepConfig,
)
from dori.errors import DoriError
from dori.fields import MAX_COUNT, Selection, check_range
from dori.options import common_option, config_command, field_option

app = typer.Typer(
    help="dori: find, attack and remove memorized training images in text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The bundled model: train it, measure it.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
console = Console(stderr=True)

ModelOption = field_option(ReplicateConfig, "model")
DeviceOption, DtypeOption, ResumeOption = (common_option(name) for name in ("device", "dtype", "resume"))
ImagesOption, SscdOption, BatchOption = (field_option(Selection, name) for name in ("images", "sscd", "batch_size"))


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
    return check_range(name, value, 1, MAX_COUNT)


def _load(model: str, device: str = "cpu", dtype: str = "float32", gradient_checkpointing: bool = False):
    from dori.models.loading import load_model
    from dori.parallel import device_for

    with console.status(f"loading model {model}"):
        return load_model(model, device=device_for(device), dtype=dtype, gradient_checkpointing=gradient_checkpointing)


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
    clip: Annotated[str | None, typer.Option("--clip", help="Score each image against its prompt with this local "
                                             "CLIP folder (CLIP score in images.json and summary.json).")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Generate images from prompts or saved embeddings: one PNG per row and seed, and a grid."""
    from dori.fields import MAX_SEED
    from dori.stages.generate import run_generate

    for flag, value in (("--seeds", seeds), ("--steps", steps), ("--batch-size", batch_size)):
        check_range(flag, value, 1, MAX_COUNT)
    check_range("--first-seed", first_seed, 0, MAX_SEED)
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise DoriError(f"--guidance must be a finite number of at least 0, got {guidance}")
    if bool(prompt) == (embeddings is not None):
        raise DoriError("give either --prompt TEXT (repeat for several) or --embeddings FILE")
    if clip is not None and embeddings is not None:
        raise DoriError("--clip scores images against their prompts, and --embeddings have none; use --prompt")
    diffusion = _load(model, device, dtype)
    scorer = None
    if clip is not None:
        from dori.measure.utility import ClipScorer

        scorer = ClipScorer(clip, device=diffusion.device)
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
              "key": key, "seeds": seed_list, "steps": steps, "guidance": guidance, "clip": clip}  # fmt: skip
    with progress_bar("generating", len(prompt) * seeds) as advance:
        written = run_generate(diffusion, emb, prompt, seed_list, out, config, steps=steps, guidance=guidance,
                               batch_size=batch_size, progress=advance, clip=scorer)  # fmt: skip
    console.print(f"wrote {written['images']} images and grid.png to {out}{written['grid_note']}")
    if scorer is not None:
        console.print(f"CLIP score {written['clip_score']:.2f} (mean over the images; each in images.json)")


@config_command(app, ReplicateConfig)
def replicate(config: ReplicateConfig, *, out: Path, resume: bool, **load) -> None:
    """Measure replication: SSCD_orig (mean, median, max) and MR per prompt and over the set."""
    from dori.references import load_prompts
    from dori.stages.replicate import run_replicate

    diffusion = _load(config.model, **load)
    n = len(load_prompts(config.prompts, diffusion, kind=config.type, limit=config.limit))
    with progress_bar("replicate", n * config.seeds) as advance:
        summary = run_replicate(config, diffusion, out, resume=resume, progress=advance)
    console.print(f"MR {summary['mr']:.3f}, SSCD_orig {summary['sscd_mean']:.3f} +- {summary['sscd_std']:.3f} "
                  f"(median {summary['sscd_median']:.3f}) over {summary['n_prompts']} prompts x {summary['n_seeds']} seeds "
                  f"-> {out}/summary.json")  # fmt: skip


@config_command(app, DetectConfig)
def detect(config: DetectConfig, *, out: Path, resume: bool, **load) -> None:
    """Detect memorized prompts: noise-difference norm and NeMo's multi-scale SSIM check, with ROC-AUC and TPR@1%FPR."""
    from dori.references import load_prompts
    from dori.stages.detect import run_detect

    diffusion = _load(config.model, **load)
    n = sum(len(load_prompts(s, diffusion, limit=config.limit)) for s in (config.memorized, config.non_memorized))
    with progress_bar("detect", n) as advance:
        summary = run_detect(config, diffusion, out, resume=resume, progress=advance)
    nn, ss = summary["noise_norm"], summary["ssim"]
    console.print(f"noise norm AUC {nn['auc']:.3f}, TPR@1%FPR {nn['tpr_at_1pct_fpr']:.3f}; SSIM AUC {ss['auc']:.3f}, "
                  f"TPR@1%FPR {ss['tpr_at_1pct_fpr']:.3f}, threshold {ss['threshold']:.3f} -> {out}/summary.json")  # fmt: skip


@config_command(app, MitigateConfig, out_help="Run folder (mask, mitigated weights, summary).")
def mitigate(config: MitigateConfig, *, out: Path, resume: bool, **load) -> None:
    """Apply a mitigation the paper attacks: NeMo or Wanda (a mask), ESD, Concept Ablation or SISS (a fine-tuned model)."""
    from dori.stages.mitigate import run_mitigate

    diffusion = _load(config.model, **load)
    with console.status("mitigating") as status:
        summary = run_mitigate(config, diffusion, out, resume=resume, progress=status.update)
    if summary.get("ratio_rule") == "auto":
        ladder = ", ".join(f"{r['ratio']:g}: {r['mr']:.2f}" for r in summary["ladder_mr"])
        console.print(f"wanda: ratio {summary['ratio']:g} chosen (defender's MR by ratio {ladder})")
    console.print(f"{config.method}: MR {summary['mr_before']:.3f} -> {summary['mr_after']:.3f}, similarity "
                  f"{summary['sscd_mean_before']:.3f} -> {summary['sscd_mean_after']:.3f}, utility "
                  f"{summary['utility_before']} -> {summary['utility_after']} -> {out}/summary.json")  # fmt: skip


@config_command(app, AttackRunConfig)
def attack(config: AttackRunConfig, *, out: Path, resume: bool, **load) -> None:
    """The DoRI attack: optimise conditioning embeddings that bring memorized images back."""
    from dori.references import control_sets, load_prompts
    from dori.stages.attack import run_attack

    diffusion = _load(config.model, **load)
    n = len(load_prompts(config.prompts, diffusion, kind=config.type, limit=config.limit))
    n_control = sum(len(load_prompts(s, diffusion, limit=config.control_limit)) for s in control_sets(diffusion))
    total = n * config.seeds * len(config.curve()) + (n_control * config.seeds * 2 if config.control else 0)
    with progress_bar("attack + evaluation", total) as advance:
        summary = run_attack(config, diffusion, out, resume=resume, progress=advance)
    curve = ", ".join(f"{k}: {v:.2f}" for k, v in summary["steps_curve"].items())
    console.print(f"DoRI MR {summary['mr']:.3f}, similarity {summary['sscd_mean']:.3f} +- {summary['sscd_std']:.3f}; "
                  f"MR by steps {curve}")  # fmt: skip
    for name, result in summary.get("control", {}).items():
        console.print(f"control {name}: MR {result['mr']:.3f}, similarity {result['sscd_mean']:.3f}")
    console.print(f"-> {out}/summary.json")


@config_command(app, WandaSweepConfig, name="wanda-sweep",
                out_help="Run folder (results.jsonl, sweep.csv, sweep.png, summary.json).")  # fmt: skip
def wanda_sweep(config: WandaSweepConfig, *, out: Path, resume: bool, **load) -> None:
    """How hard must Wanda prune before DoRI fails? MR, MR after DoRI and utility at each ratio."""
    from dori.stages.wanda_sweep import run_wanda_sweep

    diffusion = _load(config.model, **load)
    with console.status("wanda sweep") as status:
        summary = run_wanda_sweep(config, diffusion, out, resume=resume, progress=status.update)
    for row in summary["rows"]:
        utility = "–" if row["utility"] is None else f"{row['utility']:.2f}"
        console.print(f"ratio {row['ratio']:<5g}: MR {row['mr']:.2f}, after DoRI {row['mr_dori']:.2f}, utility {utility}")
    console.print(f"-> {out}/summary.json, {out}/sweep.png")


@config_command(app, LocalityConfig, out_help="Run folder (summary.json, triggers, plots).")
def locality(config: LocalityConfig, *, out: Path, resume: bool, **load) -> None:
    """Non-locality: where the triggers of one image lie, what they activate, which weights they select."""
    from dori.stages.locality import run_locality

    diffusion = _load(config.model, **load)
    with console.status("locality") as status:
        summary = run_locality(config, diffusion, out, resume=resume, progress=status.update)
    for view, sentence in summary["verdicts"].items():
        console.print(f"{view}: {sentence}")
    console.print(f"{summary['seconds']:.0f} s -> {out}/summary.json")


@config_command(app, UnlearnRunConfig, out_help="Run folder (checkpoints, fine-tuned model in out/model).")
def unlearn(config: UnlearnRunConfig, *, out: Path, resume: bool, **load) -> None:
    """Adversarial fine-tuning: remove memorization for real, then attack the result again."""
    from dori.stages.unlearn import run_unlearn

    diffusion = _load(config.model, **load)
    with console.status("unlearning") as status:
        summary = run_unlearn(config, diffusion, out, resume=resume, progress=status.update)
    console.print(f"DoRI MR {summary['mr_attack_before']:.3f} -> {summary['mr_attack_after']:.3f}; plain prompts MR "
                  f"{summary['mr_prompt_after']:.3f}; utility {summary['utility_before']} -> {summary['utility_after']}; "
                  f"{summary['seconds']:.0f} s -> {out}/summary.json (model: {summary['model']})")  # fmt: skip


@config_command(app, StudyConfig, out_help="Study folder (stages/, summary.json, report.html).")
def study(config: StudyConfig, *, out: Path, resume: bool, **load) -> None:
    """The whole study: detect, replicate, NeMo / Wanda, DoRI on each, the control, adversarial fine-tuning, report."""
    from dori.stages.study import run_study

    diffusion = _load(config.model, **load)
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
    recipe: Annotated[str, typer.Option("--recipe", help=("fifth (text encoder frozen, 5000 steps) or fourth (text "
                                                          "encoder trained jointly, 6000 steps: the shipped weights)."))] = "fifth",
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: the recipe's).")] = None,
    eval_seeds: Annotated[int, typer.Option("--eval-seeds", help="Seeds per prompt for the model card.")] = 10,
    skip_card: Annotated[bool, typer.Option("--skip-card", help="Train only; no calibration or card.")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Train the bundled model by dori's recipe, calibrate its copy detector, write its model card.

    On a GPU (``--device cuda``) the same recipe trains in minutes. A run's weights are bit-identical
    only on the same kind of machine (processor instruction set or GPU, thread count, library
    versions), which the model folder records."""
    from dori.parallel import device_for
    from dori.runs import prepare_out_dir
    from dori.bundled.recipe import RECIPES, ToyTrainConfig
    from dori.bundled.train import finish_bundled_model, train_bundled_model

    if recipe not in RECIPES:
        raise DoriError(f"unknown --recipe {recipe!r}; use {' or '.join(RECIPES)}")
    config = ToyTrainConfig(seed=seed, **{**RECIPES[recipe], **({} if steps is None else {"steps": steps})})
    where = device_for(device)
    out = prepare_out_dir(out)
    bars: dict[str, Callable] = {}
    with Progress(*_columns(), console=console) as bar:

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                task = bar.add_task(phase, total=total)
                bars[phase] = lambda d, task=task: bar.update(task, completed=d)
            bars[phase](done)

        train_bundled_model(config, out, resume=resume, progress=progress, log=bar.console.print, device=where)
        if not skip_card:
            task = bar.add_task("model card", total=None)
            finish_bundled_model(out, seeds=_positive("--eval-seeds", eval_seeds),
                                 progress=lambda done, total: bar.update(task, completed=done, total=total),
                                 log=bar.console.print, device=where)  # fmt: skip


@toy_app.command("card")
def toy_card(
    model: Annotated[Path, typer.Option("--model", help="A finished bundled-kind folder (from 'dori toy train').")],
    eval_seeds: Annotated[int, typer.Option("--eval-seeds", help="Seeds per prompt for the model card.")] = 10,
    device: DeviceOption = "cpu",
) -> None:
    """Re-measure a trained bundled model without retraining: detector, guidance, measurements, MODEL_CARD.md."""
    from dori.models.loading import is_bundled_kind
    from dori.parallel import device_for
    from dori.bundled.train import finish_bundled_model
    if str(model) == "bundled" or not is_bundled_kind(model):
        raise DoriError(f"{model} is not a folder written by 'dori toy train'; pass --model DIR of a trained bundled model")
    seeds, where = _positive("--eval-seeds", eval_seeds), device_for(device)
    with Progress(*_columns(), console=console) as bar:
        task = bar.add_task("model card", total=None)
        finish_bundled_model(model, seeds=seeds, log=bar.console.print, device=where,
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
    from dori.runs import forget_started_runs, release_all

    forget_started_runs()
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
