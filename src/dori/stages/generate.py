"""``dori generate``: images streamed to disk batch by batch, into a folder that appears complete
or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.models.base import DiffusionModel
from dori.report_images import save_grid, to_pil
from dori.runs import prepare_out_dir, write_json_atomic, write_manifest

GRID_SEEDS, GRID_PROMPTS = 16, 64  # grid.png: at most this many seeds (columns) and prompts (rows)


def run_generate(model: DiffusionModel, emb: torch.Tensor, prompts: list[str], seeds: list[int], out: Path,
                 config: dict, *, steps: int, guidance: float | None, batch_size: int,
                 progress: Callable[[int], None] | None = None, clip=None) -> dict:  # fmt: skip
    """One PNG per prompt and seed, ``grid.png``, ``images.json`` and the manifest in ``out``;
    with ``clip`` (a :class:`dori.measure.utility.ClipScorer`) each image's CLIP score against its
    prompt goes into ``images.json`` and their mean into ``summary.json`` (``clip_score``).

    Images stream to a hidden folder beside ``out``, batch by batch (memory stays at one batch),
    and the folder takes its name only when every image is written: a refused or interrupted run
    leaves nothing behind (generate does not resume), a finished one is complete."""
    staging = prepare_out_dir(out.parent / f".{out.name}.partial-{os.getpid()}")
    n_seeds = len(seeds)
    grid_columns, grid_rows = min(n_seeds, GRID_SEEDS), min(len(prompts), GRID_PROMPTS)
    shown = torch.zeros(grid_rows * grid_columns, 3, *model.image_size)
    files = []
    try:
        for rows, images in model.generate_chunks(emb, seeds, steps=steps, guidance=guidance, batch_size=batch_size):
            if not torch.isfinite(images).all():
                raise DoriError("the model generated NaN or infinite pixels; check its weights and --dtype "
                                "(float16 can overflow on CPU; use float32)")  # fmt: skip
            indices = [divmod(n, n_seeds) for n in range(rows.start, rows.stop)]
            scores = clip.scores(images, [prompts[i] for i, _ in indices]) if clip is not None else None
            for k, ((i, j), image) in enumerate(zip(indices, images)):
                name = f"prompt{i:03d}_seed{seeds[j]}.png"
                to_pil(image).save(staging / name)
                files.append({"prompt": prompts[i], "seed": seeds[j], "file": name,
                              **({} if scores is None else {"clip_score": scores[k]})})  # fmt: skip
                if i < grid_rows and j < grid_columns:
                    shown[i * grid_columns + j] = image
            if progress is not None:
                progress(rows.stop - rows.start)
        save_grid(shown, staging / "grid.png", columns=grid_columns)
        write_json_atomic(staging / "images.json", files)
        if clip is not None:
            mean = sum(f["clip_score"] for f in files) / len(files)
            write_json_atomic(staging / "summary.json", {"clip_score": mean, "clip": clip.path, "images": len(files)})
        write_manifest(staging, "generate", config)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DoriError(f"{out} was filled by something else while generating; choose a new --out")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    whole = (grid_rows, grid_columns) == (len(prompts), n_seeds)
    note = "" if whole else f" (the grid shows the first {grid_columns} seeds of the first {grid_rows} prompts)"
    result = {"images": len(files), "grid_note": note}
    if clip is not None:
        result["clip_score"] = sum(f["clip_score"] for f in files) / len(files)
    return result
