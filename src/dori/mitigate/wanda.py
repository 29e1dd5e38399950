"""Wanda-style weight pruning of memorization (Chavhan et al., "Memorized images in diffusion
models share a subspace that can be located and deleted", 2024).

For each site, the input activations ``X`` are recorded over the first ``timesteps`` denoising steps
while sampling from the memorized prompts and, as the base, from the empty prompt. Token vectors
are normalised to unit length and the column L2 norms accumulated per step. With
``S = |W| * ||X_col||``, each output row keeps as candidates its top ``ratio`` input columns by the
memorized score; those where ``S_mem > S_base`` are pruned; the union over the steps is the mask.

Choices where the sources are silent (parameters): sampling for the recording runs conditional
only (no classifier-free guidance), with the same seeds for memorized and empty prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dori.interventions import WeightMask, capture
from dori.models.base import DiffusionModel


@dataclass(frozen=True)
class WandaConfig:
    ratio: float = 0.01
    timesteps: int = 10
    seeds: int = 4
    steps: int = 50
    batch_size: int = 64


@torch.no_grad()
def column_norms(
    model: DiffusionModel, emb: Tensor, sites: Sequence[str], config: WandaConfig,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """``{site: [timesteps, in_features]}``: column L2 norms of the row-normalised inputs."""
    seeds = list(range(config.seeds))
    widths = {site.name: site.module.in_features for site in model.sites(list(sites))}
    sums = {name: torch.zeros(config.timesteps, width, device=model.device) for name, width in widths.items()}
    step = [0]

    def reduce(name: str, x: Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
        sums[name][step[0]] += x.pow(2).sum(0)

    def advance(info) -> None:
        step[0] = min(info.index + 1, config.timesteps - 1)

    all_emb = emb.repeat_interleave(len(seeds), dim=0)
    noise = model.initial_noise(seeds).repeat(emb.shape[0], 1, 1, 1)
    with capture(model, list(sites), what="input", reduce=reduce):
        for start in range(0, len(all_emb), config.batch_size):
            rows = slice(start, min(start + config.batch_size, len(all_emb)))
            step[0] = 0
            model.sample_latents(all_emb[rows], noise[rows], steps=config.steps, guidance=1.0,
                                 callback=advance, stop_after=config.timesteps)  # fmt: skip
            if progress is not None:
                progress(rows.stop - rows.start)
    return {name: total.sqrt() for name, total in sums.items()}


def wanda_mask(
    model: DiffusionModel,
    emb: Tensor,
    *,
    sites: Sequence[str] | None = None,
    config: WandaConfig = WandaConfig(),
    progress: Callable[[int], None] | None = None,
) -> WeightMask:
    """The weights to prune for the memorized prompts' embeddings ``emb`` ``[P, L, D]``."""
    return wanda_masks(model, [emb], sites=sites, config=config, progress=progress)[0]


def wanda_masks(
    model: DiffusionModel,
    groups: Sequence[Tensor],
    *,
    sites: Sequence[str] | None = None,
    config: WandaConfig = WandaConfig(),
    progress: Callable[[int], None] | None = None,
) -> list[WeightMask]:
    """One mask per group of embeddings (each ``[P_i, L, D]``: a prompt set, or one trigger).

    The base is the empty prompt repeated ``P_i`` times with the same seeds: its column norms are
    exactly ``sqrt(P_i)`` times those of one copy, so it is recorded once and rescaled."""
    sites = [s.name for s in model.ffn_sites()] if sites is None else list(sites)
    base = column_norms(model, model.empty_embedding()[:1], sites, config, progress)
    masks = []
    for emb in groups:
        memorized = column_norms(model, emb, sites, config, progress)
        scaled = {name: norms * emb.shape[0] ** 0.5 for name, norms in base.items()}
        masks.append(_prune(model, sites, memorized, scaled, config))
    return masks


def _prune(model: DiffusionModel, sites: Sequence[str], memorized: dict[str, Tensor], base: dict[str, Tensor],
           config: WandaConfig) -> WeightMask:  # fmt: skip
    mask = {}
    for site in model.sites(list(sites)):
        weight = site.module.weight.detach().abs().float()
        keep_k = max(1, int(round(config.ratio * weight.shape[1])))
        pruned = torch.zeros_like(weight, dtype=torch.bool)
        for t in range(config.timesteps):
            score_mem = weight * memorized[site.name][t]
            score_base = weight * base[site.name][t]
            top = score_mem.topk(keep_k, dim=1).indices
            chosen = torch.zeros_like(pruned).scatter_(1, top, True)
            pruned |= chosen & (score_mem > score_base)
        mask[site.name] = pruned
    return mask
