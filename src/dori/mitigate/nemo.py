"""NeMo: localising memorization neurons in the cross-attention value layers.

Hintersdorf et al., "Finding NeMo: Localizing Neurons Responsible for Memorization in Diffusion
Models", NeurIPS 2024. A neuron is one output channel of a value projection ``attn2.to_v`` in the
down and mid blocks; its activation for a prompt is the mean over token positions of
``|to_v(y)|``. Neurons whose activation is an outlier (z-score against non-memorized prompts) are
deactivated until NeMo's SSIM consistency check says the prompt is no longer memorized; the
selection is then pruned layer by layer and neuron by neuron.

All prompts are processed together: each prompt carries its own mask as a per-sample scale, so
every consistency check of a round is one batched U-Net call.
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
from dori.measure.detection import consistency_scores
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
    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    max_rounds: int | None = None  # None: until the check passes or every neuron of the sites is selected
    seeds: int = 10
    steps: int = 50
    batch_size: int = 100


@dataclass
class NemoResult:
    neurons: Selection  # the final selection
    memorized_before: bool
    mitigated: bool  # the SSIM check passes with the selection deactivated
    initial_size: int  # neurons after the initial selection, before refinement


class _Checker:
    """Runs NeMo's SSIM check for many (embedding, selection) pairs in one batched call."""

    def __init__(self, model: DiffusionModel, threshold: float, config: NemoConfig) -> None:
        self.model, self.threshold, self.config = model, threshold, config
        self.sites = [site.name for site in model.value_sites()]
        self.widths = {site.name: site.width for site in model.value_sites()}
        self.seeds = list(range(config.seeds))
        self.calls = 0

    def memorized(self, emb: Tensor, selections: list[Selection]) -> list[bool]:
        out: list[bool] = []
        per_call = max(1, self.config.batch_size // len(self.seeds))
        for start in range(0, len(selections), per_call):
            chunk = selections[start : start + per_call]
            scales = {}
            for name in self.sites:
                rows = torch.ones(len(chunk), self.widths[name], device=self.model.device, dtype=self.model.dtype)
                for r, selection in enumerate(chunk):
                    if selection.get(name):
                        rows[r, selection[name]] = 0
                scales[name] = rows.repeat_interleave(len(self.seeds), dim=0)
            with mask_neurons(self.model, scales) as handle:
                scores = consistency_scores(self.model, emb[start : start + len(chunk)], seeds=self.seeds,
                                            steps=self.config.steps, batch_size=len(chunk) * len(self.seeds))  # fmt: skip
            self.calls += handle.total
            out.extend(score > self.threshold for score in scores)
        return out


def _select(z: list[Tensor], sites: list[str], theta: float, k: int) -> Selection:
    selection = {}
    for name, scores in zip(sites, z):
        chosen = scores > theta
        if k > 0:
            chosen[scores.topk(min(k, len(scores))).indices] = True
        if chosen.any():
            selection[name] = torch.nonzero(chosen).flatten().tolist()
    return selection


def _size(selection: Selection) -> int:
    return sum(len(channels) for channels in selection.values())


def _without(selection: Selection, name: str, channel: int | None = None) -> Selection:
    out = {k: list(v) for k, v in selection.items() if k != name or channel is not None}
    if channel is not None:
        out[name] = [c for c in out[name] if c != channel]
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
    check = _Checker(model, threshold, config)
    sites = check.sites
    if len(sites) != len(stats.mean):
        raise DoriError("the statistics were computed for another set of value sites")
    acts = value_activations(model, emb)
    z = [((a - m.to(a.device)).abs() / s.to(a.device).clamp_min(1e-8)) for a, m, s in zip(acts, stats.mean, stats.std)]
    n = emb.shape[0]
    z_of = [[layer[p] for layer in z] for p in range(n)]

    before = check.memorized(emb, [{} for _ in range(n)])
    selections: list[Selection] = [{} for _ in range(n)]
    theta, k = [config.theta_start] * n, [0] * n
    active = [p for p in range(n) if before[p]]
    every = sum(check.widths.values())
    failed: list[int] = []  # still memorized with every neuron of the sites selected (or out of rounds)
    rounds = 0
    while active and (config.max_rounds is None or rounds < config.max_rounds):
        rounds += 1
        for p in active:
            selections[p] = _select(z_of[p], sites, theta[p], k[p])
        still = check.memorized(emb[active], [selections[p] for p in active])
        next_active = []
        for p, memorized in zip(active, still):
            if not memorized:
                continue
            if _size(selections[p]) == every:
                failed.append(p)
            else:
                theta[p], k[p] = max(config.theta_min, theta[p] - config.theta_step), k[p] + 1
                next_active.append(p)
        active = next_active
        if progress is not None:
            progress(f"initial selection: {len(active)} prompts still memorized")
    failed += active
    initial = [_size(s) for s in selections]
    mitigated = [before[p] and p not in failed for p in range(n)]

    # Refinement 1: layer by layer (reverse order) -- drop a layer's selection if the prompt stays unmemorized.
    candidates = [p for p in range(n) if mitigated[p]]
    for name in reversed(sites):
        trying = [p for p in candidates if name in selections[p]]
        if trying:
            trials = [_without(selections[p], name) for p in trying]
            for p, trial, memorized in zip(trying, trials, check.memorized(emb[trying], trials)):
                if not memorized:
                    selections[p] = trial
    # Refinement 2: neuron by neuron, greedily, all prompts advancing together.
    order = {p: [(name, c) for name in sites for c in selections[p].get(name, [])] for p in candidates}
    for position in range(max((len(v) for v in order.values()), default=0)):
        trying = [p for p in candidates if position < len(order[p])]
        trials = [_without(selections[p], *order[p][position]) for p in trying]
        for p, trial, memorized in zip(trying, trials, check.memorized(emb[trying], trials)):
            if not memorized:
                selections[p] = trial
        if progress is not None:
            progress(f"neuron-by-neuron refinement: position {position + 1}")
    return [NemoResult(selections[p], before[p], mitigated[p], initial[p]) for p in range(n)]


def union(selections: list[Selection]) -> Selection:
    out: dict[str, set[int]] = {}
    for selection in selections:
        for name, channels in selection.items():
            out.setdefault(name, set()).update(channels)
    return {name: sorted(channels) for name, channels in out.items()}
