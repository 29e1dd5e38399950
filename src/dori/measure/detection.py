"""Stage 2 of METHOD.md: detect memorized prompts without the training image.

The noise-difference norm (Wen et al., ICLR 2024): ``|| eps(x_t, y) - eps(x_t, y_empty) ||_2`` over
the whole latent, averaged over ``n`` generations and over the chosen denoising steps (the first
step alone, or all). Scored as a detector by ROC-AUC and TPR at 1% FPR.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dori.measure.similarity import ms_ssim
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


# NeMo's check reads the noise map at the second DDIM timestep: the reference code's loop runs one
# DDIM step from x_T and evaluates the next call (its ``early_stopping=1``), t = 961 on SD v1.4.
NEMO_TIMESTEP_INDEX = 1
# ... of a 50-step DDIM schedule (its ``--num_inference_steps``), whatever schedule the images are sampled with.
NEMO_STEPS = 50


@torch.no_grad()
def noise_maps(model: DiffusionModel, emb: torch.Tensor, noise: torch.Tensor, *, steps: int = NEMO_STEPS,
               timestep_index: int = NEMO_TIMESTEP_INDEX) -> torch.Tensor:  # fmt: skip
    """NeMo's noise map per row ``[B, C, H, W]``: conditional only (guidance 0), DDIM from ``noise``
    for ``timestep_index`` steps, then ``eps(x_t, t, y) - x_t`` at that step's timestep, min-max
    normalised per sample and channel. Any neuron mask active around the call acts on every U-Net
    call, the first step's included, as the reference's hooks do. The prediction is taken in epsilon
    space (the reference's raw output on SD v1.x; v-prediction models are converted)."""
    scheduler = model.ddim_scheduler(steps)
    index = min(timestep_index, len(scheduler.timesteps) - 1)
    x_t = noise
    for t in scheduler.timesteps[:index]:
        x_t = scheduler.step(model.model_output(x_t, t, emb), t, x_t).prev_sample
    maps = (model.predict_noise(x_t, scheduler.timesteps[index], emb) - x_t).float()
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-8)


def seed_pairs(n: int) -> torch.Tensor:
    """``[n(n-1)/2, 2]``: the seed pairs in torch.combinations' order."""
    return torch.combinations(torch.arange(n), r=2)


def pair_scores(maps: torch.Tensor) -> list[float]:
    """The multi-scale SSIM of every pair of one prompt's seed maps ``[seeds, C, H, W]``, in
    :func:`seed_pairs` order."""
    pairs = seed_pairs(maps.shape[0])
    return ms_ssim(maps[pairs[:, 0]], maps[pairs[:, 1]]).tolist()


@torch.no_grad()
def pairwise_consistency(
    model: DiffusionModel, emb: torch.Tensor, *, seeds: Sequence[int] = tuple(range(10)), steps: int = NEMO_STEPS,
    batch_size: int = 64,
) -> list[list[float]]:
    """NeMo's noise-pattern consistency: per embedding, the multi-scale SSIM of every pair of seeds'
    noise maps (:func:`noise_maps`), in :func:`seed_pairs` order."""
    noise = model.initial_noise(seeds)
    n = len(seeds)
    out: list[list[float]] = []
    per_batch = max(1, batch_size // n)
    for start in range(0, emb.shape[0], per_batch):
        chunk = emb[start : start + per_batch]
        maps = noise_maps(model, chunk.repeat_interleave(n, dim=0), noise.repeat(chunk.shape[0], 1, 1, 1), steps=steps)
        out.extend(pair_scores(prompt_maps) for prompt_maps in maps.view(chunk.shape[0], n, *maps.shape[1:]))
    return out


def consistency_scores(model: DiffusionModel, emb: torch.Tensor, **kwargs) -> list[float]:
    """Per embedding, the maximum pairwise SSIM of :func:`pairwise_consistency`: memorized when it
    exceeds NeMo's threshold (equivalently, when any seed's best pair does)."""
    return [max(pairs) for pairs in pairwise_consistency(model, emb, **kwargs)]


def flagged_seeds(pair_scores: Sequence[float], n: int, threshold: float) -> list[bool]:
    """The reference's seeds to look at: those whose best pairwise SSIM exceeds the threshold."""
    pairs, scores = seed_pairs(n), torch.tensor(list(pair_scores))
    best = [float(scores[(pairs == i).any(dim=1)].max()) for i in range(n)]
    return [b > threshold for b in best]


def nemo_threshold(pair_scores: Sequence[Sequence[float]]) -> float:
    """NeMo's memorization threshold from ordinary prompts: the mean plus one standard deviation of
    all their pairwise SSIM scores (the reference stores a [prompts, pairs] tensor and takes its
    mean and std; 0.428 on SD v1.4), not of a per-prompt maximum."""
    scores = torch.tensor([s for pairs in pair_scores for s in pairs], dtype=torch.float64)
    return float(scores.mean() + (scores.std() if len(scores) > 1 else 0.0))


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
    if any("ssim_pairs" not in r for r in rows):
        from dori.errors import DoriError

        raise DoriError("these detection scores predate NeMo's multi-scale SSIM check; run dori detect again "
                        "into a new --out folder (without --resume)")  # fmt: skip
    threshold = nemo_threshold([r["ssim_pairs"] for r in rows if r["set"] == "non_memorized"])
    summary["ssim"] = {
        "auc": roc_auc(pos_s, neg_s),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos_s, neg_s),
        "threshold": threshold,
        "threshold_rule": "mean + 1 std of every pairwise multi-scale SSIM over the non-memorized prompts",
        "memorized_flagged": float(sum(s > threshold for s in pos_s) / len(pos_s)),
        "non_memorized_flagged": float(sum(s > threshold for s in neg_s) / len(neg_s)),
    }
    summary["n_memorized"], summary["n_non_memorized"] = len(pos), len(neg)
    return summary
