"""NeMo: localising memorization neurons in the cross-attention value layers.

Hintersdorf et al., "Finding NeMo: Localizing Neurons Responsible for Memorization in Diffusion
Models", NeurIPS 2024; the behaviour follows the authors' code point by point
(ml-research/localizing_memorization_in_diffusion_models, ``3_detect_memorized_neurons.py`` and
``utils/activation_detection.py``; docs/NEMO_WANDA.md lists every point and its test).

A neuron is one output channel of a value projection ``attn2.to_v`` in the down and mid blocks; its
activation for a prompt is the mean over token positions of ``|to_v(y)|``.

1. The check. Each seed's noise map (:func:`dori.measure.detection.noise_maps`, the second DDIM
   timestep) is compared with every other seed's by multi-scale SSIM; the seeds whose best pair
   exceeds the threshold are the prompt's memorized seeds (none: the prompt is not memorized).
   A selection *still memorizes* when, on those seeds, the blocked model's map is more similar to
   the unblocked model's map of the same seed than the threshold (maximum over the seeds).
2. Initial selection: neurons with ``z = |a - mu| / sigma > theta`` plus the ``k`` neurons of each
   layer with the largest raw activation; from theta 5 and k 0, each round that still memorizes
   lowers theta by 0.25 and raises k by 1. The schedule gives up when theta reaches 1 (or k the
   widest layer) and then refines against the SSIM it last reached instead of the threshold.
3. Refinement: layers in reverse order, a layer's whole selection dropped if the SSIM stays
   strictly below the threshold; then neuron by neuron, layers in reverse order and neurons in the
   selection's own order (theta's in ascending index, then top-k's by activation).

All prompts are processed together: each prompt carries its own mask as a per-sample scale, so a
round of every prompt's trials is one batched pair of U-Net calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dori.errors import DoriError
from dori.interventions import mask_neurons
from dori.measure.detection import NEMO_STEPS, flagged_seeds, noise_maps, pair_scores
from dori.measure.similarity import ms_ssim
from dori.models.base import DiffusionModel

Selection = dict[str, list[int]]  # site -> channels


@dataclass(frozen=True)
class ValueStatistics:
    """Per-neuron mean and std of the token-averaged absolute value activation."""

    sites: tuple[str, ...]
    mean: tuple[Tensor, ...]
    std: tuple[Tensor, ...]


@torch.no_grad()
def value_activations(model: DiffusionModel, emb: Tensor) -> list[Tensor]:
    """``[B, width]`` per value site: mean over tokens of ``|to_v(emb)|`` (no U-Net pass needed)."""
    emb = emb.to(model.device, model.dtype)
    return [site.module(emb).abs().mean(dim=1).float() for site in model.value_sites()]


@torch.no_grad()
def value_statistics(model: DiffusionModel, prompts: list[str], *, batch_size: int = 256) -> ValueStatistics:
    acts = [value_activations(model, model.encode(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)]
    per_site = [torch.cat([a[j] for a in acts]) for j in range(len(acts[0]))]
    return ValueStatistics(
        tuple(site.name for site in model.value_sites()),
        tuple(a.mean(0) for a in per_site),
        tuple(a.std(0) for a in per_site),
    )


def save_statistics(stats: ValueStatistics, path: str | os.PathLike) -> None:
    torch.save((list(stats.mean), list(stats.std)), str(path))


def load_statistics(path: str | os.PathLike, model: DiffusionModel) -> ValueStatistics:
    """NeMo's file format: a tuple of per-site mean tensors and per-site std tensors (e.g.
    ``nemo_sd14_value_stats.pt``); loaded with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DoriError(f"statistics file not found: {path}")
    try:
        means, stds = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DoriError(f"{path} is not a NeMo statistics file (a tuple of mean and std tensors)") from error
    sites = model.value_sites()
    widths = [site.width for site in sites]
    try:
        means = [torch.as_tensor(m).float().flatten() for m in means]
        stds = [torch.as_tensor(s).float().flatten() for s in stds]
    except (TypeError, ValueError, RuntimeError) as error:
        raise DoriError(f"{path} is not a NeMo statistics file (a tuple of mean and std tensors)") from error
    if not all(bool(torch.isfinite(t).all()) for t in (*means, *stds)):
        raise DoriError(f"{path} holds NaN or infinite statistics; compute them again (--reference-prompts SET)")
    if [len(m) for m in means] != widths or [len(s) for s in stds] != widths:
        raise DoriError(f"{path} holds statistics for value layers of widths {[len(m) for m in means]}, "
                        f"this model's are {widths}; compute them for this model instead")  # fmt: skip
    return ValueStatistics(tuple(s.name for s in sites), tuple(m.float() for m in means), tuple(s.float() for s in stds))


@dataclass(frozen=True)
class NemoConfig:
    """NeMo's search, with the reference code's defaults."""

    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    k_start: int = 0
    seeds: int = 10
    steps: int = NEMO_STEPS  # the schedule whose second timestep the check reads (961 on SD v1.4)
    batch_size: int = 100

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise DoriError(f"NeMo compares pairs of seeds: seeds must be at least 2, got {self.seeds}")
        if self.theta_step <= 0 or self.theta_start < self.theta_min:
            raise DoriError("NeMo's theta schedule must fall from theta_start to theta_min by a positive step")


@dataclass
class NemoResult:
    neurons: Selection  # the final selection (each neuron once, in the search's order)
    memorized_before: bool  # some seed's best pairwise SSIM exceeds the threshold
    mitigated: bool  # memorized before, and the final selection's SSIM is at most the threshold
    initial_size: int  # neurons after the initial selection, before refinement
    initial_ssim: float | None = None  # blocked-versus-unblocked SSIM of the initial selection
    refined_ssim: float | None = None  # the same for the final selection
    refinement_threshold: float | None = None  # the threshold, or the SSIM reached where the schedule gave up
    rounds: int = 0  # rounds of the initial selection
    memorized_seeds: list[int] | None = None  # the seeds whose best pair exceeds the threshold


class _Checker:
    """The reference's blocked-versus-unblocked check, for many (prompt, selection) trials at once."""

    def __init__(self, model: DiffusionModel, emb: Tensor, config: NemoConfig) -> None:
        self.model, self.emb, self.config = model, emb, config
        self.sites = [site.name for site in model.value_sites()]
        self.widths = {site.name: site.width for site in model.value_sites()}
        self.noise = model.initial_noise(list(range(config.seeds)))
        self.vanilla: Tensor | None = None  # [P, seeds, C, H, W]
        self.flagged: list[list[int]] = []

    def maps(self, prompts: list[int], seeds: list[int], selections: list[Selection] | None) -> Tensor:
        """Noise maps of ``prompts[i]`` at ``seeds[i]`` with ``selections[i]`` deactivated."""
        out = []
        for start in range(0, len(prompts), self.config.batch_size):
            rows = range(start, min(start + self.config.batch_size, len(prompts)))
            emb = self.emb[[prompts[r] for r in rows]]
            noise = self.noise[[seeds[r] for r in rows]]
            scales = {}
            if selections is not None:
                for name in self.sites:
                    scale = torch.ones(len(rows), self.widths[name], device=self.model.device, dtype=self.model.dtype)
                    for i, r in enumerate(rows):
                        if selections[r].get(name):
                            scale[i, selections[r][name]] = 0
                    scales[name] = scale
            with mask_neurons(self.model, scales):
                out.append(noise_maps(self.model, emb, noise, steps=self.config.steps))
        return torch.cat(out)

    def baseline(self, threshold: float) -> list[bool]:
        """The unblocked maps of every prompt and seed, and each prompt's memorized seeds."""
        n, seeds = self.emb.shape[0], self.config.seeds
        maps = self.maps([p for p in range(n) for _ in range(seeds)], list(range(seeds)) * n, None)
        self.vanilla = maps.view(n, seeds, *maps.shape[1:])
        self.flagged = [[s for s, hit in enumerate(flagged_seeds(pair_scores(prompt_maps), seeds, threshold)) if hit]
                        for prompt_maps in self.vanilla]  # fmt: skip
        return [bool(f) for f in self.flagged]

    def ssim(self, prompts: list[int], selections: list[Selection]) -> list[float]:
        """Per trial, the maximum over the prompt's memorized seeds of the multi-scale SSIM between
        the blocked and the unblocked map of the same seed."""
        rows = [(i, s) for i, p in enumerate(prompts) for s in self.flagged[p]]
        if not rows:
            return []
        blocked = self.maps([prompts[i] for i, _ in rows], [s for _, s in rows], [selections[i] for i, _ in rows])
        vanilla = torch.stack([self.vanilla[prompts[i], s] for i, s in rows])
        scores = ms_ssim(vanilla, blocked)
        best = [float("-inf")] * len(prompts)
        for (i, _), score in zip(rows, scores.tolist()):
            best[i] = max(best[i], score)
        return best


def _select(z: list[Tensor], acts: list[Tensor], sites: list[str], theta: float, k: int) -> Selection:
    """The reference's initial selection: per layer, the neurons with z-score above ``theta`` in
    ascending index, then the ``k`` largest raw activations in descending order (a neuron may
    appear twice, as in the reference's lists)."""
    selection = {}
    for name, scores, act in zip(sites, z, acts):
        chosen = torch.nonzero(scores > theta).flatten().tolist()
        chosen += act.abs().topk(min(k, len(act))).indices.tolist()
        if chosen:
            selection[name] = chosen
    return selection


def _size(selection: Selection) -> int:
    return sum(len(set(channels)) for channels in selection.values())


def _without(selection: Selection, name: str, channel: int | None = None) -> Selection:
    """A copy of ``selection`` without layer ``name``, or without the first occurrence of one of
    its channels (the reference's ``list.remove``)."""
    out = {k: list(v) for k, v in selection.items()}
    if channel is None:
        out.pop(name, None)
    else:
        out[name].remove(channel)
        if not out[name]:
            del out[name]
    return out


def nemo_localize(
    model: DiffusionModel,
    emb: Tensor,
    stats: ValueStatistics,
    threshold: float,
    config: NemoConfig = NemoConfig(),
    *,
    progress: Callable[[str], None] | None = None,
) -> list[NemoResult]:
    """NeMo's neuron selection for each embedding in ``emb`` ``[P, L, D]`` (all prompts batched)."""
    check = _Checker(model, emb, config)
    sites = check.sites
    if len(sites) != len(stats.mean):
        raise DoriError("the statistics were computed for another set of value sites")
    say = progress or (lambda message: None)
    acts = value_activations(model, emb)
    z = [((a - m.to(a.device)).abs() / s.to(a.device).clamp_min(1e-8)) for a, m, s in zip(acts, stats.mean, stats.std)]
    n = emb.shape[0]
    z_of = [[layer[p] for layer in z] for p in range(n)]
    acts_of = [[layer[p] for layer in acts] for p in range(n)]
    k_cap = max(check.widths.values())  # the reference's 1280: SD v1.4's widest value layer

    before = check.baseline(threshold)
    selections: list[Selection] = [{} for _ in range(n)]
    initial_ssim: list[float | None] = [None] * n
    limit: list[float | None] = [None] * n  # the threshold refinement compares against
    rounds = [0] * n
    theta, k = [config.theta_start] * n, [config.k_start] * n
    active = [p for p in range(n) if before[p]]
    while active:
        for p in active:
            selections[p] = _select(z_of[p], acts_of[p], sites, theta[p], k[p])
        scores = check.ssim(active, [selections[p] for p in active])
        still = []
        for p, score in zip(active, scores):
            rounds[p] += 1
            initial_ssim[p] = score
            if score > threshold:
                if theta[p] > config.theta_min:
                    theta[p] -= config.theta_step
                k[p] += 1
            if theta[p] <= config.theta_min or k[p] >= k_cap:
                limit[p] = score  # the schedule gave up (or ended with this round): refine against its SSIM
            elif score <= threshold:
                limit[p] = threshold
            else:
                still.append(p)
        active = still
        say(f"initial selection: {len(active)} prompts still memorized")
    initial = [_size(s) for s in selections]

    # Refinement 1: layer by layer, in reverse order.
    candidates = [p for p in range(n) if before[p]]
    for name in reversed(sites):
        trying = [p for p in candidates if name in selections[p]]
        trials = [_without(selections[p], name) for p in trying]
        for p, trial, score in zip(trying, trials, check.ssim(trying, trials)):
            if score < limit[p]:
                selections[p] = trial
    # Refinement 2: neuron by neuron, layers in reverse order, each layer's neurons in list order.
    order = {p: [(name, c) for name in reversed(sites) for c in selections[p].get(name, [])] for p in candidates}
    for position in range(max((len(v) for v in order.values()), default=0)):
        trying = [p for p in candidates if position < len(order[p])]
        trials = [_without(selections[p], *order[p][position]) for p in trying]
        for p, trial, score in zip(trying, trials, check.ssim(trying, trials)):
            if score < limit[p]:
                selections[p] = trial
        say(f"neuron-by-neuron refinement: position {position + 1}")
    final = check.ssim(candidates, [selections[p] for p in candidates])
    refined: list[float | None] = [None] * n
    for p, score in zip(candidates, final):
        refined[p] = score
    results = []
    for p in range(n):
        neurons = {name: list(dict.fromkeys(channels)) for name, channels in selections[p].items()}
        results.append(NemoResult(neurons, before[p], before[p] and refined[p] <= threshold, initial[p],
                                  initial_ssim[p], refined[p], limit[p], rounds[p], check.flagged[p]))  # fmt: skip
    return results


def union(selections: list[Selection]) -> Selection:
    out: dict[str, set[int]] = {}
    for selection in selections:
        for name, channels in selection.items():
            out.setdefault(name, set()).update(channels)
    return {name: sorted(channels) for name, channels in out.items()}
