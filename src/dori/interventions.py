"""Scoped, named, reversible, counted interventions on a model's linear sites.

- :func:`mask_neurons`: multiply chosen output channels of named linear sites (0 = deactivate;
  NeMo). A scale may be ``[width]`` for the whole batch or ``[batch, width]`` per sample, so many
  prompts with different masks run in one U-Net call.
- :func:`mask_weights`: zero single weights of named linear sites (Wanda).
- :func:`capture`: record (or reduce) the inputs or outputs of named sites.

Each is a context manager that removes its hooks (and restores the model) in ``finally`` and
counts how often every hook fired (``handle.calls``), so tests can assert that it really acted.
A mask can also be baked into the weights while inside :func:`baked` and saved / loaded with the fingerprint of
the model it belongs to (:func:`save_mask`, :func:`load_mask`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from dori.errors import DoriError
from dori.models.base import DiffusionModel
from dori.runs import save_tensors_atomic, write_json_atomic

SCOPES = ("prompt", "union")
NeuronMask = dict[str, Tensor]  # site -> multipliers [width] or [batch, width]
WeightMask = dict[str, Tensor]  # site -> bool [out, in], True = zeroed


@dataclass
class HookHandle:
    calls: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


_ACTIVE: Counter = Counter()  # id(model) -> forward hooks dori holds on it right now


def active_interventions(model: DiffusionModel) -> int:
    """How many of dori's own hooks are active on ``model`` (the bundled model's permanent
    position encoding is part of the model, not an intervention, and is not counted)."""
    return _ACTIVE[id(model)]


@contextmanager
def _hooks(model: DiffusionModel) -> Iterator[Callable[[torch.nn.Module, Callable], None]]:
    """Yield ``register(module, hook)``; every hook registered through it is counted in the
    registry while inside and removed in ``finally``."""
    handles = []

    def register(module: torch.nn.Module, hook: Callable) -> None:
        handles.append(module.register_forward_hook(hook))
        _ACTIVE[id(model)] += 1

    try:
        yield register
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE[id(model)] -= len(handles)
        if _ACTIVE[id(model)] <= 0:
            del _ACTIVE[id(model)]


def neuron_scales(model: DiffusionModel, channels: dict[str, list[int]], scale: float = 0.0) -> NeuronMask:
    """A ``[width]`` multiplier per site: ``scale`` on the listed channels, 1 elsewhere."""
    out = {}
    for site in model.sites(list(channels)):
        multipliers = torch.ones(site.width, device=model.device, dtype=model.dtype)
        chosen = torch.as_tensor(list(channels[site.name]), dtype=torch.long)
        if len(chosen) and (chosen.min() < 0 or chosen.max() >= site.width):
            raise DoriError(f"channel out of range for {site.name} (width {site.width})")
        multipliers[chosen.to(model.device)] = scale
        out[site.name] = multipliers
    return out


@contextmanager
def mask_neurons(model: DiffusionModel, mask: NeuronMask) -> Iterator[HookHandle]:
    """Multiply the output channels of each named site by ``mask[site]`` while inside."""
    handle = HookHandle()
    per_sample = any(scale.dim() > 1 for scale in mask.values())  # its rows follow the call's batch
    with _hooks(model) as register, model.whole_batches() if per_sample else nullcontext():
        for site in model.sites(list(mask)):
            scale = mask[site.name].to(model.device, model.dtype)

            def hook(module, inputs, output, name=site.name, scale=scale):
                handle.calls[name] += 1
                if scale.dim() == 1:
                    return output * scale
                if scale.shape[0] != output.shape[0]:
                    raise DoriError(f"per-sample mask for {name} has {scale.shape[0]} rows, the batch has {output.shape[0]}")
                return output * scale.view(scale.shape[0], *([1] * (output.dim() - 2)), scale.shape[1])

            register(site.module, hook)
        yield handle


@contextmanager
def mask_weights(model: DiffusionModel, mask: WeightMask) -> Iterator[HookHandle]:
    """Compute each named site with the masked weights set to zero while inside."""
    handle = HookHandle()
    with _hooks(model) as register:
        for site in model.sites(list(mask)):
            zeroed = mask[site.name].to(model.device)
            if zeroed.shape != site.module.weight.shape:
                raise DoriError(f"weight mask for {site.name} has shape {tuple(zeroed.shape)}, "
                                f"the weight has {tuple(site.module.weight.shape)}")  # fmt: skip
            keep = (~zeroed).to(model.dtype)

            def hook(module, inputs, output, name=site.name, keep=keep):
                handle.calls[name] += 1
                return F.linear(inputs[0], module.weight * keep, module.bias)

            register(site.module, hook)
        yield handle


@contextmanager
def freeze_start_token(model: DiffusionModel) -> Iterator[None]:
    """Every cross-attention key and value of the first token (the start token) passes no gradient
    while inside, as Concept Ablation's attention processor does; the values are unchanged."""

    def hook(module, inputs, output):
        return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)

    with _hooks(model) as register:
        for name, module in model.unet.named_modules():
            if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
                register(module, hook)
        yield


@contextmanager
def capture(
    model: DiffusionModel,
    sites: list[str],
    *,
    what: str = "output",
    reduce: Callable[[str, Tensor], None] | None = None,
) -> Iterator[tuple[HookHandle, dict[str, list[Tensor]]]]:
    """Record each named site's ``input`` or ``output`` (detached) at every call.

    With ``reduce(site, tensor)``, nothing is stored: the callback consumes each tensor (for example
    to accumulate column norms), which keeps memory flat over long generations."""
    if what not in ("input", "output"):
        raise ValueError("what must be 'input' or 'output'")
    handle = HookHandle()
    records: dict[str, list[Tensor]] = {name: [] for name in sites}
    with _hooks(model) as register, model.whole_batches():  # one record per call, as the caller asked for it
        for site in model.sites(sites):

            def hook(module, inputs, output, name=site.name):
                handle.calls[name] += 1
                value = (inputs[0] if what == "input" else output).detach()
                if reduce is None:
                    records[name].append(value)
                else:
                    reduce(name, value)

            register(site.module, hook)
        yield handle, records


@contextmanager
def intervene(model: DiffusionModel, mitigation: Mitigation | None) -> Iterator[HookHandle | None]:
    """Apply a loaded mitigation (neurons or weights) while inside; ``None`` is a no-op."""
    if mitigation is None:
        yield None
    elif mitigation.kind == "neurons":
        with mask_neurons(model, neuron_scales(model, mitigation.neurons)) as handle:
            yield handle
    else:
        with mask_weights(model, mitigation.weights) as handle:
            yield handle


def each_mask(model: DiffusionModel, mitigation: Mitigation | None, texts: list[str]) -> Iterator[list[int]]:
    """For each group of ``texts`` that shares one mask (:meth:`Mitigation.groups`): apply that
    mask and yield the group's indices; the caller does the group's work before asking for more."""
    groups = [(list(range(len(texts))), None)] if mitigation is None else mitigation.groups(texts)
    for indices, mask in groups:
        if not indices:
            continue
        with intervene(model, mask):
            yield indices


def put_rows(full: Tensor, part: Tensor, group: list[int], per: int = 1) -> None:
    """Write a group's results back into prompt order: ``part`` holds ``per`` rows (seeds, tries)
    for each prompt of ``group`` in turn; ``full`` holds ``per`` rows for every prompt."""
    index = torch.tensor([i * per + j for i in group for j in range(per)], dtype=torch.long)
    full[index] = part.to(full.device, full.dtype)


# --------------------------------------------------------------------- files


@dataclass
class Mitigation:
    """A mask with the fingerprint of the model it was made for.

    A NeMo mask also keeps each localised prompt's own neurons (``per_prompt``, by prompt text).
    Its ``scope`` says how it is applied: ``"prompt"`` runs each of those prompts under its own
    neurons (how NeMo and the DoRI paper evaluate it) and anything else under the union;
    ``"union"`` runs everything under the union of all of them (the one mask a released model
    would carry). ``neurons`` is always that union."""

    kind: str  # "neurons" or "weights"
    model_fingerprint: str
    neurons: dict[str, list[int]] = field(default_factory=dict)
    weights: WeightMask = field(default_factory=dict)
    method: str = ""
    per_prompt: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    scope: str = "union"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise DoriError(f"unknown mitigation scope {self.scope!r}; use {' or '.join(SCOPES)}")

    def size(self) -> int:
        if self.kind == "neurons":
            return sum(len(v) for v in self.neurons.values())
        return int(sum(int(m.sum()) for m in self.weights.values()))

    @property
    def has_own_masks(self) -> bool:
        """Whether prompts run under their own neurons (NeMo, scope "prompt") rather than one mask."""
        return self.kind == "neurons" and self.scope == "prompt" and bool(self.per_prompt)

    def groups(self, texts: list[str]) -> list[tuple[list[int], Mitigation]]:
        """Which of ``texts`` (by index) run under which single mask, in order of first use."""
        if not self.has_own_masks:
            return [(list(range(len(texts))), self)]
        buckets: dict[str | None, list[int]] = {}
        for i, text in enumerate(texts):
            own = self.per_prompt.get(text)
            buckets.setdefault(None if own is None else json.dumps(own, sort_keys=True), []).append(i)
        return [(indices, self.union() if key is None else
                 Mitigation("neurons", self.model_fingerprint, neurons=json.loads(key), method=self.method))
                for key, indices in buckets.items()]  # fmt: skip

    def union(self) -> Mitigation:
        """The same mask applied to every prompt alike."""
        return Mitigation(self.kind, self.model_fingerprint, neurons=self.neurons, weights=self.weights,
                          method=self.method)


def save_mask(mitigation: Mitigation, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"kind": mitigation.kind, "model": mitigation.model_fingerprint, "method": mitigation.method}
    if mitigation.kind == "neurons":
        write_json_atomic(folder / "mask.json", {**meta, "neurons": mitigation.neurons, "scope": mitigation.scope,
                                                 "per_prompt": mitigation.per_prompt})  # fmt: skip
    else:
        tensors = {name: m.to(torch.uint8).cpu().contiguous() for name, m in mitigation.weights.items()}
        save_tensors_atomic(tensors, folder / "mask.safetensors", metadata=meta)
        write_json_atomic(folder / "mask.json", {**meta, "weights": "mask.safetensors"})
    return folder


def load_mask(folder: str | os.PathLike, model: DiffusionModel) -> Mitigation:
    folder = Path(folder).expanduser()
    file = folder / "mask.json"
    if not file.is_file():
        raise DoriError(f"no mitigation in {folder} (mask.json missing); pass a folder written by 'dori mitigate'")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DoriError(f"{file} is not valid JSON; rerun 'dori mitigate'") from error
    if info.get("model") != model.fingerprint():
        raise DoriError(f"the mask in {folder} was made for another model ({info.get('model')}), not this one "
                        f"({model.fingerprint()}); run 'dori mitigate' on this model")  # fmt: skip
    rerun = f"{file} is damaged ({{}}); rerun 'dori mitigate' into a new folder"
    try:
        kind = info["kind"]
        if kind == "neurons":
            neurons = {name: [int(c) for c in chans] for name, chans in info["neurons"].items()}
            per_prompt = {text: {name: [int(c) for c in chans] for name, chans in own.items()}
                          for text, own in info.get("per_prompt", {}).items()}  # fmt: skip
        elif kind == "weights":
            weights_file = (folder / str(info["weights"])).resolve()
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DoriError(rerun.format(error)) from error
    if kind == "neurons":
        selections = [*neurons.items(), *(item for own in per_prompt.values() for item in own.items())]
        # unknown site names fail here, clearly
        widths = {site.name: site.width for site in model.sites(sorted({name for name, _ in selections}))}
        for name, chans in selections:
            width = widths[name]
            if any(not 0 <= c < width for c in chans):
                raise DoriError(rerun.format(f"a neuron index of {name} lies outside 0..{width - 1}"))
        return Mitigation("neurons", info["model"], neurons=neurons, method=info.get("method", ""),
                          per_prompt=per_prompt, scope=info.get("scope", "union"))  # fmt: skip
    if weights_file.parent != folder.resolve() or not weights_file.is_file():
        raise DoriError(rerun.format(f"its weights file {info['weights']!r} is not a file inside the folder"))
    try:
        loaded = load_file(str(weights_file))
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for a corrupt file
        raise DoriError(rerun.format(f"{weights_file.name} is not a readable safetensors file")) from error
    weights = {}
    for site in model.sites(list(loaded)):
        t = loaded[site.name]
        if t.dtype not in (torch.bool, torch.uint8) or (t.dtype == torch.uint8 and bool((t > 1).any())):
            raise DoriError(rerun.format(f"{site.name} holds {t.dtype} values, not a 0/1 mask"))
        if tuple(t.shape) != tuple(site.module.weight.shape):
            raise DoriError(rerun.format(f"{site.name} has shape {list(t.shape)}, the site's weight "
                                         f"{list(site.module.weight.shape)}"))  # fmt: skip
        weights[site.name] = t.bool()
    return Mitigation("weights", info["model"], weights=weights, method=info.get("method", ""))


@contextmanager
def baked(model: DiffusionModel, mitigation: Mitigation) -> Iterator[list[str]]:
    """Zero the masked rows (neurons, with their biases) or entries (weights) in the model's own
    parameters while inside, and restore weight and bias in ``finally``. Yields the changed sites'
    names (for example to save the mitigated weights)."""
    saved: dict[str, tuple[Tensor, Tensor | None]] = {}
    try:
        with torch.no_grad():
            if mitigation.kind == "neurons":
                for site in model.sites(list(mitigation.neurons)):
                    rows = torch.as_tensor(mitigation.neurons[site.name], dtype=torch.long)
                    _save(saved, site)
                    site.module.weight[rows] = 0
                    if site.module.bias is not None:
                        site.module.bias[rows] = 0
            else:
                for site in model.sites(list(mitigation.weights)):
                    _save(saved, site)
                    site.module.weight[mitigation.weights[site.name].to(model.device)] = 0
        yield list(saved)
    finally:
        with torch.no_grad():
            for name, (weight, bias) in saved.items():
                module = model.module(name)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)


def _save(saved: dict, site) -> None:
    bias = site.module.bias
    saved[site.name] = (site.module.weight.detach().clone(), None if bias is None else bias.detach().clone())


def load_mitigation(model: DiffusionModel, folder: str | None):
    if folder is None:
        return None
    from dori.interventions import load_mask

    return load_mask(folder, model)
