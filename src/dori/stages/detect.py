"""``dori detect``: the detection scores of memorized and ordinary prompts, ROC and TPR at 1% FPR."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dori import run_files
from dori.configs import DetectConfig
from dori.interventions import intervene, load_mitigation
from dori.measure.detection import noise_difference_norms, pairwise_consistency, summarize_detection
from dori.models.base import DiffusionModel
from dori.parallel import Shards
from dori.plots import plot_roc
from dori.references import load_prompts
from dori.runs import write_json_atomic


Progress = Callable[[int], None]


def run_detect(config: DetectConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
               progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori detect``: noise-difference norm and NeMo's SSIM consistency, scored as detectors."""
    sets = {
        "memorized": load_prompts(config.memorized, model, limit=config.limit),
        "non_memorized": load_prompts(config.non_memorized, model, limit=config.limit),
    }
    mitigation = load_mitigation(model, config.mitigation)
    shards = Shards()
    out = shards.open_run(out, "detect", asdict(config), resume=resume)
    with intervene(model, mitigation):
        _detect_batches(config, model, sets, out, progress, shards)
    rows = shards.merge(out, "scores.jsonl", "key", order=lambda r: (r["set"] != "memorized", r["id"])).rows
    summary = summarize_detection(rows)
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
        plot_roc(rows, out / run_files.ROC_PLOT)
    return summary


def _detect_batches(config, model, sets, out, progress, shards) -> None:
    results = shards.results(out, "scores.jsonl")
    done = shards.done_keys(out, "scores.jsonl", "key")
    noise_seeds = list(range(config.generations))
    per_batch = max(1, config.batch_size // max(config.generations, config.consistency_seeds))
    for set_name, prompts in sets.items():
        todo = shards.mine([(i, p) for i, p in enumerate(prompts.prompts) if f"{set_name}/{i}" not in done])
        if progress is not None:
            progress(len(prompts) - len(todo))
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            texts = [p.prompt for _, p in chunk]
            norms = noise_difference_norms(
                model, texts, seeds=noise_seeds, steps=config.steps, guidance=config.guidance,
                first_step_only=not config.all_steps, batch_size=config.batch_size,
            )  # fmt: skip
            ssim_pairs = pairwise_consistency(model, model.encode(texts), seeds=list(range(config.consistency_seeds)),
                                              batch_size=config.batch_size)  # fmt: skip
            rows = []
            for k, (i, p) in enumerate(chunk):
                row = {"key": f"{set_name}/{i}", "set": set_name, "id": i, **p.to_dict(),
                       "noise_first_step": norms["first_step"][k], "ssim_max": max(ssim_pairs[k]),
                       "ssim_pairs": ssim_pairs[k]}  # fmt: skip
                if "all_steps" in norms:
                    row["noise_all_steps"] = norms["all_steps"][k]
                rows.append(row)
            results.extend(rows)
            if progress is not None:
                progress(len(chunk))
