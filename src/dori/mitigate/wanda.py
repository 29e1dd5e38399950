"""Wanda-style weight pruning of memorization (Chavhan et al., "Memorized images in diffusion
models share a subspace that can be located and deleted", 2024), as the authors' ConceptPrune code
does it (ruchikachavhan/concept-prune: ``wanda/wanda.py``, ``neuron_receivers/wanda_receiver.py``,
``neuron_receivers/base_receiver.py``, ``wanda/save_union_over_time.py``; docs/NEMO_WANDA.md).

For each site, the input activations ``X`` are recorded over the first ``timesteps`` U-Net calls
while sampling from the memorized prompts and, as the base, from the empty prompt, through the
default pipeline: classifier-free guidance 7.5 with both halves of the batch passing the hook, the
guided trajectory, PNDM, one image per prompt at seed 0. Token vectors are normalised to unit
length and the column L2 norms accumulated per call. With ``S = |W| * ||X_col||``, each output row
keeps as candidates its top ``int(ratio * in_features)`` input columns by the memorized score;
those where ``S_mem > S_base`` are pruned; the union over the calls is the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dori.interventions import WeightMask, capture
from dori.models.base import DiffusionModel


# ``--ratio auto`` walks this ladder: the paper's 1% (Chavhan et al.) up to half of each row.
WANDA_LADDER = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50)
# The defender's seeds for ``--ratio auto`` start here: disjoint from every evaluation's (0, 1, ...).
DEFENDER_FIRST_SEED = 1000
# Candidates per row of SD v1.4's feed-forward sites (``ff.net.2``, 1280, 2560 and 5120 inputs) at
# ConceptPrune's 1%: a narrower model keeps fewer at the same ratio (the locality stage compares both).
SD14_FFN_IN_FEATURES = (1280, 2560, 5120)
SD14_FFN_CANDIDATES = tuple(int(0.01 * width) for width in SD14_FFN_IN_FEATURES)  # (12, 25, 51)


@dataclass(frozen=True)
class WandaConfig:
    """Wanda's recording, with ConceptPrune's defaults (the DoRI paper states no others)."""

    ratio: float = 0.01  # skill_ratio
    timesteps: int = 10  # the first U-Net calls whose union is the mask
    seeds: int = 1  # one image per prompt, seeds 0..seeds-1
    steps: int = 50
    batch_size: int = 64
    guidance: float = 7.5  # the diffusers pipeline's default; both halves pass the hook
    scheduler: str = "pndm"  # the pipeline's default scheduler on SD ("ddim" for dori's own sampler)

    def __post_init__(self) -> None:
        if self.scheduler not in ("pndm", "ddim"):
            raise ValueError(f"Wanda records with the 'pndm' or 'ddim' scheduler, got {self.scheduler!r}")


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
            model.sample_latents(all_emb[rows], noise[rows], steps=config.steps, guidance=config.guidance,
                                 callback=advance, stop_after=config.timesteps, scheduler=config.scheduler)  # fmt: skip
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
    """One mask per group of embeddings (each ``[P_i, L, D]``: a prompt set, or one trigger)."""
    scores = wanda_scores(model, groups, sites=sites, config=config, progress=progress)
    return [scores.mask(model, i, config.ratio) for i in range(len(groups))]


@dataclass(frozen=True)
class WandaScores:
    """The recorded column norms of each group and of the empty-prompt base: recorded once, they
    give the mask at any ratio (the ratio only decides how many candidates each row keeps)."""

    sites: list[str]
    base: list[dict[str, Tensor]]  # the base rescaled to each group's size
    memorized: list[dict[str, Tensor]]
    timesteps: int

    def mask(self, model: DiffusionModel, group: int, ratio: float) -> WeightMask:
        return _prune(model, self.sites, self.memorized[group], self.base[group], ratio, self.timesteps)

    def mask_with_candidates(self, model: DiffusionModel, group: int, candidates: int) -> WeightMask:
        """The mask with ``candidates`` per row at every site, whatever its width (to compare a
        narrow model with SD at SD's count, :data:`SD14_FFN_CANDIDATES`)."""
        return _prune(model, self.sites, self.memorized[group], self.base[group], None, self.timesteps,
                      candidates=candidates)  # fmt: skip


def wanda_scores(
    model: DiffusionModel,
    groups: Sequence[Tensor],
    *,
    sites: Sequence[str] | None = None,
    config: WandaConfig = WandaConfig(),
    progress: Callable[[int], None] | None = None,
) -> WandaScores:
    """Record the column norms for each group of embeddings and for the base.

    The base is the empty prompt repeated ``P_i`` times with the same seeds: its column norms are
    exactly ``sqrt(P_i)`` times those of one copy, so it is recorded once and rescaled."""
    sites = [s.name for s in model.ffn_sites()] if sites is None else list(sites)
    base = column_norms(model, model.empty_embedding()[:1], sites, config, progress)
    memorized, scaled = [], []
    for emb in groups:
        memorized.append(column_norms(model, emb, sites, config, progress))
        scaled.append({name: norms * emb.shape[0] ** 0.5 for name, norms in base.items()})
    return WandaScores(sites, scaled, memorized, config.timesteps)


def first_clean_ratio(ladder: Sequence[float], mr_at: Callable[[float], float]) -> tuple[float, list[dict], bool]:
    """The defender's rule for ``--ratio auto``: walk ``ladder`` upwards and stop at the first
    ratio whose mitigated model replicates none of the memorized prompts (``mr_at(ratio) == 0``,
    measured by the caller with the defender's own seeds). Returns (ratio, the rungs measured,
    satisfied); where no rung satisfies the rule, the largest ratio and ``False``."""
    if not ladder or list(ladder) != sorted(ladder):
        raise ValueError(f"the ladder must be a non-empty increasing list, got {list(ladder)}")
    rungs = []
    for ratio in ladder:
        mr = float(mr_at(ratio))
        rungs.append({"ratio": ratio, "mr": mr})
        if mr == 0.0:
            return ratio, rungs, True
    return ladder[-1], rungs, False


def candidates_per_row(in_features: int, ratio: float) -> int:
    """ConceptPrune's candidate count per output row: ``int(ratio * in_features)`` (none where it
    is below 1)."""
    return int(ratio * in_features)


def _prune(model: DiffusionModel, sites: Sequence[str], memorized: dict[str, Tensor], base: dict[str, Tensor],
           ratio: float | None, timesteps: int, *, candidates: int | None = None) -> WeightMask:  # fmt: skip
    mask = {}
    for site in model.sites(list(sites)):
        weight = site.module.weight.detach().abs().float()
        keep_k = candidates_per_row(weight.shape[1], ratio) if candidates is None else min(candidates, weight.shape[1])
        pruned = torch.zeros_like(weight, dtype=torch.bool)
        for t in range(timesteps):
            score_mem = weight * memorized[site.name][t]
            score_base = weight * base[site.name][t]
            if keep_k == 0:
                continue
            top = score_mem.topk(keep_k, dim=1).indices
            chosen = torch.zeros_like(pruned).scatter_(1, top, True)
            pruned |= chosen & (score_mem > score_base)
        mask[site.name] = pruned
    return mask


def wanda_scores_for(model: DiffusionModel, groups: list[torch.Tensor], sites: str, batch_size: int):
    """Wanda's recorded scores on the ``ffn`` or ``value`` sites (each ratio's mask comes from them)."""
    from dori.mitigate.wanda import WandaConfig, wanda_scores

    names = [s.name for s in (model.ffn_sites() if sites == "ffn" else model.value_sites())]
    return wanda_scores(model, groups, sites=names, config=WandaConfig(batch_size=batch_size))


def wanda_mitigation(model: DiffusionModel, mask):
    from dori.interventions import Mitigation

    return Mitigation("weights", model.fingerprint(), weights=mask, method="wanda")


def mask_size(mitigation) -> dict:
    """How many weights a Wanda mask prunes, in all and per site."""
    total = sum(m.numel() for m in mitigation.weights.values())
    return {"pruned_weights": mitigation.size(), "sparsity": mitigation.size() / total,
            "per_site": {name: int(m.sum()) for name, m in mitigation.weights.items()}}  # fmt: skip
