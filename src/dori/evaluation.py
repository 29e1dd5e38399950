"""Measurements every stage shares: replication of a prompt set (under a mitigation, each prompt
under its own mask where it has one) and the held-out utility, remembered per model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dori.interventions import active_interventions, each_mask, put_rows
from dori.measure.replication import replication, summarize
from dori.models.base import DiffusionModel
from dori.prompts import PromptSet
from dori.references import References, toy_kit_for


Progress = Callable[[int], None]


def evaluate_replication(model: DiffusionModel, prompts: PromptSet, refs: References, *, seeds: int, steps: int,
                         guidance: float, batch_size: int, embeddings: torch.Tensor | None = None,
                         targets: list[torch.Tensor] | None = None, progress: Progress | None = None,
                         first_seed: int = 0) -> tuple[dict, list[dict], torch.Tensor]:  # fmt: skip
    """Replication of ``prompts`` (or of ``embeddings``, one per prompt) under whatever
    intervention is active, seeds ``first_seed .. first_seed + seeds - 1``: (summary, per-prompt
    rows, images)."""
    references = targets if targets is not None else [refs.of(p) for p in prompts.prompts]
    rows, images = replication(model, prompts.texts, references, refs.detector,
                               seeds=list(range(first_seed, first_seed + seeds)), steps=steps,
                               guidance=guidance, embeddings=embeddings, batch_size=batch_size, progress=progress,
                               planted=refs.planted)  # fmt: skip
    rows = [{"id": i, **p.to_dict(), **r.row()} for i, (p, r) in enumerate(zip(prompts.prompts, rows))]
    return summarize(rows, refs.detector.tau), rows, images


def evaluate_under(model: DiffusionModel, mitigation, prompts: PromptSet, refs: References, *,
                   embeddings: torch.Tensor | None = None, targets: list[torch.Tensor] | None = None,
                   **settings) -> tuple[dict, list[dict], torch.Tensor]:  # fmt: skip
    """:func:`evaluate_replication` under ``mitigation``, each prompt under its own mask where the
    mitigation has per-prompt masks (NeMo, scope "prompt"); rows and images in prompt order."""
    seeds = settings["seeds"]
    rows: list[dict] = [{}] * len(prompts)
    images = torch.zeros(len(prompts) * seeds, 3, *model.image_size)
    for group in each_mask(model, mitigation, prompts.texts):
        _, part_rows, part_images = evaluate_replication(
            model, prompts.pick(group), refs, embeddings=None if embeddings is None else embeddings[group],
            targets=None if targets is None else [targets[i] for i in group], **settings,
        )  # fmt: skip
        for k, i in enumerate(group):
            rows[i] = {**part_rows[k], "id": i}
        put_rows(images, part_images, group, seeds)
    return summarize(rows, refs.detector.tau), rows, images


_UTILITY_MEMO: dict[tuple, dict] = {}


def utility(model: DiffusionModel, *, seeds: int, steps: int, guidance: float, batch_size: int) -> dict | None:
    """Prompt alignment and FD on held-out captions (bundled model); ``None`` where the model has
    no attribute classifier (a CLIP-score evaluator for SD is not shipped).

    The unmitigated model's numbers are remembered for the process (keyed by its weights'
    fingerprint and the settings), so a study measures them once, not once per stage."""
    kit = toy_kit_for(model)
    if kit is None:
        return None
    hooked = active_interventions(model) > 0  # dori's own hooks only: the position encoding is part of the model
    key = (model.fingerprint(), seeds, steps, guidance)
    if not hooked and key in _UTILITY_MEMO:
        return dict(_UTILITY_MEMO[key])
    prompts = [row["prompt"] for row in kit.prompt_set("held_out")]
    images = model.generate(model.encode(prompts), list(range(seeds)), steps=steps, guidance=guidance,
                            batch_size=batch_size)  # fmt: skip
    captions = [p for p in prompts for _ in range(seeds)]
    result = {"alignment": kit.alignment(images, captions), "fd": kit.frechet_distance(images, captions),
              "prompts": "bundled:held_out", "seeds": seeds}  # fmt: skip
    if not hooked:
        _UTILITY_MEMO[key] = dict(result)
    return result
