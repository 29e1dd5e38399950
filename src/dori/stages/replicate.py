"""``dori replicate``: replication of a prompt set, written row by row, resumable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dori import run_files
from dori.configs import ReplicateConfig
from dori.interventions import each_mask, load_mitigation
from dori.measure.replication import replication, summarize
from dori.models.base import DiffusionModel
from dori.parallel import Shards
from dori.references import References, load_prompts
from dori.report_images import save_grid
from dori.runs import write_json_atomic


Progress = Callable[[int], None]


def run_replicate(config: ReplicateConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                  progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori replicate``: per-prompt similarities and MR, written prompt batch by prompt batch."""
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd, sscd_convention=config.sscd_convention)
    prompts = refs.with_images(prompts, config.missing_images)  # every prompt's training image, checked first
    mitigation = load_mitigation(model, config.mitigation)
    shards = Shards()
    out = shards.open_run(out, "replicate", asdict(config), resume=resume)
    _replicate_batches(config, model, prompts, refs, out, progress, shards, mitigation)
    results = shards.merge(out, "results.jsonl", "id")
    rows = sorted(results.rows, key=lambda r: r["id"])
    summary = {**summarize(rows, refs.detector.tau), "similarity": refs.detector.to_dict(), "prompt_set": prompts.name,
               "mitigation": None if mitigation is None else mitigation.method}  # fmt: skip
    summary["by_type"] = {kind: summarize([r for r in rows if r["type"] == kind], refs.detector.tau)
                          for kind in sorted({r["type"] for r in rows})}  # fmt: skip
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _replicate_batches(config, model, prompts, refs, out, progress, shards, mitigation) -> None:
    (out / "grids").mkdir(exist_ok=True)
    results = shards.results(out, "results.jsonl")
    done = shards.done_keys(out, "results.jsonl", "id")
    todo = shards.mine([(i, p) for i, p in enumerate(prompts.prompts) if i not in done])
    if progress is not None:
        progress(len(done) * config.seeds)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    per_batch = max(1, config.batch_size // config.seeds)
    for group in each_mask(model, mitigation, [p.prompt for _, p in todo]):
        for start in range(0, len(group), per_batch):
            chunk = [todo[k] for k in group[start : start + per_batch]]
            rows, images = replication(
                model, [p.prompt for _, p in chunk], [refs.of(p) for _, p in chunk], refs.detector,
                seeds=seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                progress=progress, planted=refs.planted,
            )  # fmt: skip
            for k, (i, _) in enumerate(chunk):
                save_grid(images[k * len(seeds) : (k + 1) * len(seeds)], out / run_files.PROMPT_GRID.format(i=i),
                          columns=len(seeds))  # fmt: skip
            results.extend([{"id": i, **p.to_dict(), **row.row()} for (i, p), row in zip(chunk, rows)])
