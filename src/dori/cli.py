"""The ``dori`` command: a thin layer over the library (loading, files, progress bars, errors)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


@contextmanager
def progress_bar(description: str, total: int):
    """Yield ``advance(n)`` for a rich progress bar on stderr."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise DoriError(f"{name} must be at least 1, got {value}")
    return value


def _load(model: str, device: str, dtype: str):
    from dori.models.loading import load_model

    with console.status(f"loading model {model}"):
        return load_model(model, device=device, dtype=dtype)


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", help="A prompt; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: ModelOption = "bundled",
    seeds: Annotated[int, typer.Option("--seeds", help="Images per prompt (seeds first-seed .. first-seed+N-1).")] = 4,
    first_seed: Annotated[int, typer.Option("--first-seed")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 7.0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Generate images: one PNG per prompt and seed, and a grid (rows = prompts)."""
    from dori.report_images import save_grid, to_pil
    from dori.runs import prepare_out_dir, write_json_atomic, write_manifest

    _positive("--seeds", seeds)
    _positive("--steps", steps)
    _positive("--batch-size", batch_size)
    if not prompt:
        raise DoriError("no prompt given; pass --prompt TEXT (repeat for several)")
    out = prepare_out_dir(out)
    diffusion = _load(model, device, dtype)
    seed_list = list(range(first_seed, first_seed + seeds))
    config = {"model": model, "prompts": prompt, "seeds": seed_list, "steps": steps, "guidance": guidance}
    write_manifest(out, "generate", config)
    with progress_bar("generating", len(prompt) * seeds) as advance:
        images = diffusion.generate(
            diffusion.encode(prompt), seed_list, steps=steps, guidance=guidance, batch_size=batch_size,
            progress=advance,
        )  # fmt: skip
    files = []
    for i, p in enumerate(prompt):
        for j, seed in enumerate(seed_list):
            name = f"prompt{i:03d}_seed{seed}.png"
            to_pil(images[i * seeds + j]).save(out / name)
            files.append({"prompt": p, "seed": seed, "file": name})
    save_grid(images, out / "grid.png", columns=seeds)
    write_json_atomic(out / "images.json", files)
    console.print(f"wrote {len(files)} images and grid.png to {out}")


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
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console) as bar:  # fmt: skip

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                task = bar.add_task(phase, total=total)
                bars[phase] = lambda d, task=task: bar.update(task, completed=d)
            bars[phase](done)

        train_bundled_model(config, out, resume=resume, progress=progress, log=bar.console.print)
        if not skip_card:
            eval_total = 50 * _positive("--eval-seeds", eval_seeds)
            task = bar.add_task("model card", total=eval_total)
            finish_bundled_model(out, seeds=eval_seeds, progress=lambda n: bar.advance(task, n),
                                 log=bar.console.print)  # fmt: skip


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except DoriError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted; rerun with --resume to continue")
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if isinstance(error, click.exceptions.Exit):
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
