"""The run layer of the measuring commands: load what a run needs, batch the work, write results
as they come (atomically), resume, summarise. Library functions do the computing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dori.configs import DetectConfig, ReplicateConfig
from dori.errors import DoriError
from dori.measure.detection import consistency_scores, noise_difference_norms, roc_auc, roc_curve, tpr_at_fpr
from dori.measure.replication import replication, summarize
from dori.models.base import DiffusionModel
from dori.prompts import Prompt, PromptSet, load_prompt_set, training_image_path
from dori.report_images import save_grid
from dori.runs import ResultsFile, open_run, write_json_atomic

Progress = Callable[[int], None]


def toy_kit_for(model: DiffusionModel):
    """The bundled model's own data and instruments, or ``None`` for other models."""
    if "toy_data" not in model.meta:
        return None
    from dori.toy.kit import ToyKit

    return ToyKit.from_folder(model.source)


def load_prompts(spec: str, model: DiffusionModel, *, kind: str | None = None, limit: int | None = None) -> PromptSet:
    return load_prompt_set(spec, model_folder=model.source if "toy_data" in model.meta else None).only(kind).head(limit)


class References:
    """Training images and the copy detector for a model: the bundled model knows its own;
    a real model needs ``--images DIR`` and ``--sscd PATH``."""

    def __init__(self, model: DiffusionModel, *, images: str | None, sscd: str | None,
                 sscd_convention: str = "resize320") -> None:  # fmt: skip
        self.kit = toy_kit_for(model)
        self.images_dir = images
        if sscd is not None:
            from dori.measure.similarity import SSCD

            self.detector = SSCD(sscd, convention=sscd_convention, device=model.device)
        elif self.kit is not None:
            self.detector = self.kit.detector
        else:
            raise DoriError("this model needs a copy detector: pass --sscd PATH (an SSCD TorchScript file)")
        if self.kit is None and images is None:
            raise DoriError("this model needs its training images: pass --images DIR (files named by prompt index)")
        self.size = model.image_size

    def of(self, prompt: Prompt) -> torch.Tensor:
        if self.images_dir is None:
            return self.kit.references(prompt.prompt)
        return load_image(training_image_path(self.images_dir, prompt), self.size)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A training image as ``[1, 3, H, W]`` in ``[0, 1]`` (any mode converted to RGB)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    except (UnidentifiedImageError, OSError) as error:
        raise DoriError(f"training image {path} is unreadable ({type(error).__name__}); replace the file") from error
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None]


# --------------------------------------------------------------------- replicate


def run_replicate(config: ReplicateConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                  progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori replicate``: per-prompt similarities and MR, written prompt batch by prompt batch."""
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd, sscd_convention=config.sscd_convention)
    out = open_run(out, "replicate", asdict(config), resume=resume)
    (out / "grids").mkdir(exist_ok=True)
    results = ResultsFile(out / "results.jsonl")
    done = results.keys()
    todo = [(i, p) for i, p in enumerate(prompts.prompts) if i not in done]
    if progress is not None:
        progress(len(done) * config.seeds)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    per_batch = max(1, config.batch_size // config.seeds)
    for start in range(0, len(todo), per_batch):
        chunk = todo[start : start + per_batch]
        rows, images = replication(
            model, [p.prompt for _, p in chunk], [refs.of(p) for _, p in chunk], refs.detector,
            seeds=seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
            progress=progress,
        )  # fmt: skip
        for k, (i, _) in enumerate(chunk):
            save_grid(images[k * len(seeds) : (k + 1) * len(seeds)], out / "grids" / f"prompt{i:04d}.png", columns=len(seeds))
        results.extend([{"id": i, **p.to_dict(), **row.row()} for (i, p), row in zip(chunk, rows)])
    rows = sorted(results.rows, key=lambda r: r["id"])
    summary = {**summarize(rows, refs.detector.tau), "similarity": refs.detector.to_dict(), "prompt_set": prompts.name}
    by_type = {}
    for kind in sorted({r["type"] for r in rows}):
        by_type[kind] = summarize([r for r in rows if r["type"] == kind], refs.detector.tau)
    summary["by_type"] = by_type
    write_json_atomic(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------- detect


def run_detect(config: DetectConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
               progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori detect``: noise-difference norm and NeMo's SSIM consistency, scored as detectors."""
    sets = {
        "memorized": load_prompts(config.memorized, model, limit=config.limit),
        "non_memorized": load_prompts(config.non_memorized, model, limit=config.limit),
    }
    out = open_run(out, "detect", asdict(config), resume=resume)
    results = ResultsFile(out / "scores.jsonl")
    done = results.keys("key")
    noise_seeds = list(range(config.generations))
    per_batch = max(1, config.batch_size // max(config.generations, config.consistency_seeds))
    for set_name, prompts in sets.items():
        todo = [(i, p) for i, p in enumerate(prompts.prompts) if f"{set_name}/{i}" not in done]
        if progress is not None:
            progress(len(prompts) - len(todo))
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            texts = [p.prompt for _, p in chunk]
            norms = noise_difference_norms(
                model, texts, seeds=noise_seeds, steps=config.steps, guidance=config.guidance,
                first_step_only=not config.all_steps, batch_size=config.batch_size,
            )  # fmt: skip
            ssim_max = consistency_scores(model, model.encode(texts), seeds=list(range(config.consistency_seeds)),
                                          steps=config.steps, batch_size=config.batch_size)  # fmt: skip
            rows = []
            for k, (i, p) in enumerate(chunk):
                row = {"key": f"{set_name}/{i}", "set": set_name, "id": i, **p.to_dict(),
                       "noise_first_step": norms["first_step"][k], "ssim_max": ssim_max[k]}  # fmt: skip
                if "all_steps" in norms:
                    row["noise_all_steps"] = norms["all_steps"][k]
                rows.append(row)
            results.extend(rows)
            if progress is not None:
                progress(len(chunk))
    summary = summarize_detection(results.rows)
    write_json_atomic(out / "summary.json", summary)
    plot_roc(results.rows, out / "roc.png")
    return summary


def _scores(rows: list[dict], field: str) -> tuple[list[float], list[float]]:
    pos = [r[field] for r in rows if r["set"] == "memorized"]
    neg = [r[field] for r in rows if r["set"] == "non_memorized"]
    return pos, neg


def summarize_detection(rows: list[dict]) -> dict:
    pos, neg = _scores(rows, "noise_first_step")
    summary = {"noise_norm": {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg), "variant": "first_step",
                              "memorized_mean": float(torch.tensor(pos).mean()),
                              "non_memorized_mean": float(torch.tensor(neg).mean())}}  # fmt: skip
    if rows and "noise_all_steps" in rows[0]:
        pos_all, neg_all = _scores(rows, "noise_all_steps")
        summary["noise_norm_all_steps"] = {"auc": roc_auc(pos_all, neg_all), "tpr_at_1pct_fpr": tpr_at_fpr(pos_all, neg_all)}
    pos_s, neg_s = _scores(rows, "ssim_max")
    neg_t = torch.tensor(neg_s)
    threshold = float(neg_t.mean() + (neg_t.std() if len(neg_s) > 1 else 0.0))
    summary["ssim"] = {
        "auc": roc_auc(pos_s, neg_s),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos_s, neg_s),
        "threshold": threshold,
        "memorized_flagged": float(sum(s > threshold for s in pos_s) / len(pos_s)),
        "non_memorized_flagged": float(sum(s > threshold for s in neg_s) / len(neg_s)),
    }
    summary["n_memorized"], summary["n_non_memorized"] = len(pos), len(neg)
    return summary


def plot_roc(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fields = [("noise_first_step", "noise-difference norm (first step)"), ("noise_all_steps", "noise norm (all steps)"),
              ("ssim_max", "SSIM consistency (NeMo)")]  # fmt: skip
    for field, label in fields:
        if rows and field in rows[0]:
            pos, neg = _scores(rows, field)
            fpr, tpr = roc_curve(pos, neg)
            ax.plot(fpr, tpr, label=f"{label}, AUC {roc_auc(pos, neg):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
