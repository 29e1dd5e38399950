"""Stage 2 of METHOD.md: detect memorized prompts without the training image.

The noise-difference norm (Wen et al., ICLR 2024): ``|| eps(x_t, y) - eps(x_t, y_empty) ||_2`` over
the whole latent, averaged over ``n`` generations and over the chosen denoising steps (the first
step alone, or all). Scored as a detector by ROC-AUC and TPR at 1% FPR.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dori.measure.similarity import ssim
from dori.models.base import DiffusionModel, StepInfo


@torch.no_grad()
def noise_difference_norms(
    model: DiffusionModel,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 50,
    guidance: float | None = None,
    first_step_only: bool = True,
    batch_size: int = 64,
) -> dict[str, list[float]]:
    """Per-prompt scores ``{"first_step": [...], "all_steps": [...]}`` (``all_steps`` only when
    the whole trajectory is sampled, i.e. ``first_step_only=False``)."""
    emb = model.encode(prompts)
    n_rows = len(prompts) * len(seeds)
    per_step: list[torch.Tensor] = []

    def record(info: StepInfo) -> None:
        if info.index >= len(per_step):
            per_step.append(torch.zeros(n_rows))
        diff = (info.noise_cond - info.noise_uncond).float().flatten(1).norm(dim=1).cpu()
        per_step[info.index][info.rows] = diff

    sample_steps = 1 if first_step_only else steps
    if first_step_only:
        # One U-Net call is all the first-step score needs: sample a 1-step chain of the
        # full schedule's first timestep.
        _first_step(model, emb, seeds, steps, guidance, batch_size, record)
    else:
        model.generate(emb, seeds, steps=steps, guidance=guidance, batch_size=batch_size, callback=record)
    norms = torch.stack(per_step[:sample_steps]).view(sample_steps, len(prompts), len(seeds))
    out = {"first_step": norms[0].mean(1).tolist()}
    if not first_step_only:
        out["all_steps"] = norms.mean((0, 2)).tolist()
    return out


def _first_step(model, emb, seeds, steps, guidance, batch_size, callback) -> None:
    timestep = model.ddim_scheduler(steps).timesteps[0]
    all_emb = emb.repeat_interleave(len(seeds), dim=0)
    noise = model.initial_noise(seeds).repeat(emb.shape[0], 1, 1, 1)
    for start in range(0, len(all_emb), batch_size):
        rows = slice(start, min(start + batch_size, len(all_emb)))
        # The norm needs both branches whatever the guidance; the scale itself does not enter it.
        _, cond, uncond = model.guided_outputs(noise[rows], timestep, all_emb[rows], 2.0)
        callback(model.step_info(0, timestep, rows, noise[rows], cond, uncond))


@torch.no_grad()
def consistency_scores(
    model: DiffusionModel, emb: torch.Tensor, *, seeds: Sequence[int] = tuple(range(10)), steps: int = 50,
    batch_size: int = 64,
) -> list[float]:
    """NeMo's noise-pattern consistency: per embedding, the maximum pairwise SSIM between the
    seeds' first-step maps ``eps(x_T, T, y) - x_T`` (conditional only, guidance 0), each map
    min-max normalised per sample and channel. High for memorized prompts."""
    timestep = model.ddim_scheduler(steps).timesteps[0]
    noise = model.initial_noise(seeds)
    n = len(seeds)
    first, second = torch.triu_indices(n, n, offset=1)
    scores = []
    per_batch = max(1, batch_size // n)
    for start in range(0, emb.shape[0], per_batch):
        chunk = emb[start : start + per_batch]
        x_t = noise.repeat(chunk.shape[0], 1, 1, 1)
        maps = (model.predict_noise(x_t, timestep, chunk.repeat_interleave(n, dim=0)) - x_t).float()
        low = maps.amin(dim=(2, 3), keepdim=True)
        high = maps.amax(dim=(2, 3), keepdim=True)
        maps = ((maps - low) / (high - low).clamp_min(1e-8)).view(chunk.shape[0], n, *maps.shape[1:])
        for prompt_maps in maps:
            scores.append(float(ssim(prompt_maps[first], prompt_maps[second]).max()))
    return scores


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def tpr_at_fpr(positive: Sequence[float], negative: Sequence[float], fpr: float = 0.01) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is <= ``fpr``."""
    neg = np.sort(np.asarray(negative, float))[::-1]
    allowed = int(np.floor(fpr * len(neg)))
    threshold = neg[allowed] if allowed < len(neg) else -np.inf  # scores must exceed this
    return float((np.asarray(positive, float) > threshold).mean())


def roc_curve(positive: Sequence[float], negative: Sequence[float]) -> tuple[list[float], list[float]]:
    scores = np.unique(np.concatenate([positive, negative]))[::-1]
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    fpr = [0.0] + [float((neg >= s).mean()) for s in scores]
    tpr = [0.0] + [float((pos >= s).mean()) for s in scores]
    return fpr, tpr


def scores_by_set(rows: list[dict], field: str) -> tuple[list[float], list[float]]:
    pos = [r[field] for r in rows if r["set"] == "memorized"]
    neg = [r[field] for r in rows if r["set"] == "non_memorized"]
    return pos, neg


def summarize_detection(rows: list[dict]) -> dict:
    pos, neg = scores_by_set(rows, "noise_first_step")
    summary = {"noise_norm": {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg), "variant": "first_step",
                              "memorized_mean": float(torch.tensor(pos).mean()),
                              "non_memorized_mean": float(torch.tensor(neg).mean())}}  # fmt: skip
    if rows and "noise_all_steps" in rows[0]:
        pos_all, neg_all = scores_by_set(rows, "noise_all_steps")
        summary["noise_norm_all_steps"] = {"auc": roc_auc(pos_all, neg_all), "tpr_at_1pct_fpr": tpr_at_fpr(pos_all, neg_all)}
    pos_s, neg_s = scores_by_set(rows, "ssim_max")
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
