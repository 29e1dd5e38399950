"""Stage 1 of METHOD.md: generate n images per prompt and measure how many replicate.

SSCD_orig is the similarity of each generation to the prompt's training image (for several
training images, the most similar one); MR is the fraction of generations above the detector's
replication threshold ``tau``. Given the images of every memorized (planted) training pair,
``mr_any_planted`` also counts a generation that replicates *another* memorized image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dori.errors import DoriError
from dori.models.base import DiffusionModel


def rate(hits: Tensor) -> float:
    """The share of true entries in ``hits``, counted exactly: a float32 mean puts 152 of 160 at
    0.94999999, below a bar of "at least 0.95" that 152 of 160 meets. NaN for no entries."""
    return int(hits.sum()) / hits.numel() if hits.numel() else float("nan")


@dataclass(frozen=True)
class PromptReplication:
    prompt: str
    similarities: list[float]  # one per seed
    tau: float
    any_planted: list[float] | None = None  # per seed, similarity to the nearest memorized image

    @property
    def mr(self) -> float:
        return sum(s > self.tau for s in self.similarities) / len(self.similarities)

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.similarities).mean())

    @property
    def median(self) -> float:
        return float(torch.tensor(self.similarities).median())

    @property
    def max(self) -> float:
        return max(self.similarities)

    def row(self) -> dict:
        row = {"prompt": self.prompt, "mr": self.mr, "sscd_mean": self.mean, "sscd_median": self.median,
               "sscd_max": self.max, "similarities": self.similarities}  # fmt: skip
        if self.any_planted is not None:
            row["any_planted_similarities"] = self.any_planted
        return row


def summarize(rows: Sequence[dict], tau: float) -> dict:
    """Set-level numbers from per-prompt rows (``{"similarities": [...]}``): MR over all
    generations, and SSCD_orig mean / std / median / max over all generations."""
    sims = torch.tensor([s for row in rows for s in row["similarities"]])
    extra = {}
    if rows and all("any_planted_similarities" in row for row in rows):
        nearest = torch.tensor([s for row in rows for s in row["any_planted_similarities"]])
        extra = {"mr_any_planted": rate(nearest > tau), "any_planted_mean": float(nearest.mean())}
    return {
        **extra,
        "mr": rate(sims > tau),
        "sscd_mean": float(sims.mean()),
        "sscd_std": float(sims.std()) if len(sims) > 1 else 0.0,
        "sscd_median": float(sims.median()),
        "sscd_max": float(sims.max()),
        "n_prompts": len(rows),
        "n_seeds": len(rows[0]["similarities"]) if rows else 0,
    }


def replication(
    model: DiffusionModel,
    prompts: Sequence[str],
    references: Sequence[Tensor],
    detector,
    *,
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float | None = None,
    embeddings: Tensor | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    planted: Tensor | None = None,
) -> tuple[list[PromptReplication], Tensor]:
    """Generate ``len(seeds)`` images per prompt (all in batches) and score them against
    ``references[i]`` (``[K_i, 3, H, W]``: the prompt's training image(s)).

    ``embeddings`` replaces the prompts' own embeddings (the attack's triggers); ``planted``
    (``[M, 3, H, W]``, every memorized training image) adds each generation's similarity to the
    nearest of them (``any_planted``). Returns the
    per-prompt results and the images ``[P * S, 3, H, W]``.
    """
    emb = model.encode(prompts) if embeddings is None else embeddings
    images = model.generate(emb, seeds, steps=steps, guidance=guidance, batch_size=batch_size, progress=progress)
    gen_feats = detector.embed(images)
    planted_feats = None if planted is None else detector.embed(planted)
    reference_feats: dict[int, object] = {}  # prompts that share one reference tensor embed it once
    rows = []
    for i, prompt in enumerate(prompts):
        part = slice(i * len(seeds), (i + 1) * len(seeds))
        if id(references[i]) not in reference_feats:
            reference_feats[id(references[i])] = detector.embed(references[i])
        sims = detector.similarity(gen_feats[part], reference_feats[id(references[i])]).max(dim=1).values
        nearest = None if planted_feats is None else detector.similarity(gen_feats[part], planted_feats).max(dim=1).values
        if not torch.isfinite(sims).all() or (nearest is not None and not torch.isfinite(nearest).all()):
            raise DoriError(f"the copy detector scored a generation of {prompt!r} as NaN or infinite (NaN pixels from "
                            "the model, or a broken similarity model); check --sscd FILE and the model's weights")  # fmt: skip
        rows.append(PromptReplication(prompt, [float(s) for s in sims], float(detector.tau),
                                      None if nearest is None else [float(s) for s in nearest]))  # fmt: skip
    return rows, images

