"""The fine-tuning loop every U-Net-training mitigation shares (ESD, Concept Ablation, SISS).

A method gives one function, ``step_loss(step, generator, rank, world)``, that returns this
process's share of the step's objective: a scalar loss (its gradient is taken here) or, for
methods that combine several gradients (SISS), the gradients themselves, one per trained
parameter. The loop owns the rest, the same way for every method:

- AdamW over the chosen parameters only (with ``weight_decay`` 0: Adam) (the others stay frozen and get no gradient);
- mixed precision for a bfloat16 model (:meth:`DiffusionModel.fp32_weights`: float32 master
  weights and optimizer state, autocast forwards); float16 is refused (no loss scale here);
- data parallel under ``accelerate launch`` (``shards``): every process draws the same step from
  the shared per-step generator and takes its share of the batch, the gradients are summed, and
  every process applies the same step;
- the gradient norm clipped to ``grad_clip`` (0: not clipped); a non-finite loss or weight stops with a clear error;
- ``on_step(state, optimizer)`` after every step, where the stage writes its checkpoint, and a
  resume from ``state`` / ``optimizer_state`` reproduces the uninterrupted run (every draw of step
  ``k`` comes from ``Generator().manual_seed(seed * 1_000_003 + k)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dori.errors import DoriError
from dori.models.base import DiffusionModel

StepLoss = Callable[[int, torch.Generator, int, int], tuple[Tensor | list[Tensor], dict]]


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def parameter_group(model: DiffusionModel, which: str) -> list[tuple[str, nn.Parameter]]:
    """The U-Net parameters a method trains: ``full`` (all), ``xattn`` (every parameter of the
    cross-attention layers ``attn2``: ESD-x), ``kv`` (the cross-attention key and value projections:
    Concept Ablation's ``crossattn_kv``)."""
    named = list(model.unet.named_parameters())
    if which == "full":
        return named
    if which == "xattn":
        return [(n, p) for n, p in named if ".attn2." in n]
    if which == "kv":
        return [(n, p) for n, p in named if ".attn2.to_k." in n or ".attn2.to_v." in n]
    raise DoriError(f"unknown parameter group {which!r}; use full, xattn or kv")


def refuse_float16(model: DiffusionModel) -> None:
    """These loops keep no loss scale, so a float16 model is refused (callers check it before any work)."""
    if model.dtype == torch.float16:
        raise DoriError("these fine-tuning methods train in float32 or bfloat16 (float16 needs a loss scale, which "
                        "they do not keep); use --dtype bfloat16")  # fmt: skip


def train_unet(
    model: DiffusionModel,
    params: str,
    step_loss: StepLoss,
    *,
    steps: int,
    learning_rate: float,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    seed: int = 0,
    state: TrainState | None = None,
    optimizer_state: dict | None = None,
    on_step: Callable[[TrainState, torch.optim.Optimizer], None] | None = None,
    shards=None,
) -> TrainState:
    """Train ``model.unet``'s ``params`` group in place for ``steps`` steps (see the module docstring)."""
    rank, world = (shards.rank, shards.world) if shards is not None else (0, 1)
    refuse_float16(model)
    state = state or TrainState()
    with model.fp32_weights():
        group = parameter_group(model, params)
        if not group:
            raise DoriError(f"this U-Net has no parameters in the group {params!r}")
        model.unet.requires_grad_(False)
        trained: Sequence[nn.Parameter] = [p for _, p in group]
        for p in trained:
            p.requires_grad_(True)
        model.unet.train()
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        try:
            for step in range(state.step, steps):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
                objective, logs = step_loss(step, generator, rank, world)
                optimizer.zero_grad(set_to_none=True)
                if isinstance(objective, Tensor):
                    if not torch.isfinite(objective):
                        raise DoriError(f"fine-tuning produced a non-finite loss at step {step}; lower --lr")
                    grads = torch.autograd.grad(objective, trained, allow_unused=True)
                else:
                    grads = objective
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(trained, grads)]
                if shards is not None and world > 1:
                    shards.sum_(grads)
                for p, g in zip(trained, grads):
                    p.grad = g.to(p.dtype)
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trained, grad_clip)
                optimizer.step()
                if not all(torch.isfinite(p).all() for p in trained):
                    raise DoriError(f"fine-tuning produced non-finite weights at step {step}; lower --lr")
                state = TrainState(step + 1, state.history + [{"step": step + 1, **logs}])
                if on_step is not None:
                    on_step(state, optimizer)
        finally:
            for p in trained:  # no gradient left on the model (the caller may keep using it)
                p.grad = None
            model.unet.eval().requires_grad_(False)
    return state
