"""The DoRI attack (Kowalczuk et al., "Finding DoRI", arXiv 2507.16880): a white-box search over
the text conditioning embedding ``y`` that minimises the ordinary diffusion loss on a memorized
image ``x0``:

    L(y) = E_{eps, t} || target(x0, eps, t) - f_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y) ||^2

(``target`` is the noise for epsilon models, the velocity for v-models). Adam, learning rate 0.1,
50 steps, 8 fresh (eps, t) pairs per step with t uniform over the training timesteps; no bound and
no early stop by default (both optional). Any intervention that is active around the call (a NeMo
or Wanda mask) stays applied and frozen; the model's weights receive no gradient.

Many targets and many initialisations optimise together: row ``i`` of the batch has its own
target latent, its own initial embedding and its own random stream (``seeds[i]``), so a batch gives
the same embeddings as one-by-one runs with the same seeds. The fine-tuning defence and the
locality analysis call this same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dori.errors import DoriError
from dori.models.base import DiffusionModel


@dataclass(frozen=True)
class AttackConfig:
    steps: int = 50
    learning_rate: float = 0.1
    batch: int = 8  # (noise, timestep) pairs per target per step
    bound: str | None = None  # None, "l2" or "linf": a constraint around the initial embedding
    radius: float = 0.0
    early_stop_loss: float | None = None  # freeze a row once its step loss falls below this

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise DoriError(f"attack steps must be >= 0, got {self.steps}")
        if self.batch < 1:
            raise DoriError(f"attack batch must be at least 1, got {self.batch}")
        if self.bound not in (None, "l2", "linf"):
            raise DoriError(f"unknown bound {self.bound!r}; use l2 or linf")
        if self.bound is not None and self.radius <= 0:
            raise DoriError("a bounded attack needs --radius > 0")


@dataclass
class AttackResult:
    embeddings: Tensor  # [N, L, D], detached
    losses: Tensor  # [steps, N]: each row's loss at each step
    snapshots: dict[int, Tensor]  # step -> embeddings after that many steps (as asked)


def _project(emb: Tensor, init: Tensor, bound: str | None, radius: float) -> Tensor:
    if bound is None:
        return emb
    delta = emb - init
    if bound == "linf":
        return init + delta.clamp(-radius, radius)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return init + delta * (radius / norms).clamp(max=1.0)


def dori_attack(
    model: DiffusionModel,
    targets: Tensor,
    init: Tensor,
    config: AttackConfig = AttackConfig(),
    *,
    seeds: Sequence[int] | None = None,
    snapshot_steps: Sequence[int] = (),
    callback: Callable[[int, Tensor], None] | None = None,
) -> AttackResult:
    """Optimise one embedding per row: ``targets`` ``[N, C, h, w]`` (latents of the images to
    bring back), ``init`` ``[N, L, D]``. Row ``i`` draws its noise and timesteps from
    ``torch.Generator().manual_seed(seeds[i])`` (default ``i``)."""
    n = init.shape[0]
    if targets.shape[0] != n:
        raise DoriError(f"{targets.shape[0]} targets but {n} initial embeddings; give one per target")
    if not torch.isfinite(init).all():
        raise DoriError("the initial embeddings contain NaN or inf; pass finite embeddings")
    seeds = list(range(n)) if seeds is None else list(seeds)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    init = init.detach().to(model.device, torch.float32)
    targets = targets.detach().to(model.device, model.dtype)
    emb = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([emb], lr=config.learning_rate)
    x0 = targets.repeat_interleave(config.batch, dim=0)
    frozen = torch.zeros(n, dtype=torch.bool, device=model.device)
    losses, snapshots = [], {}
    if 0 in snapshot_steps:
        snapshots[0] = emb.detach().clone()
    for step in range(config.steps):
        noise = torch.stack([torch.randn(targets.shape[1:], generator=g) for g in generators for _ in range(config.batch)])
        t = torch.cat([torch.randint(model.num_train_timesteps, (config.batch,), generator=g) for g in generators])
        per_pair = model.diffusion_loss(x0, emb.to(model.dtype).repeat_interleave(config.batch, dim=0),
                                        noise.to(model.device, model.dtype), t.to(model.device))  # fmt: skip
        per_row = per_pair.view(n, config.batch).mean(1)
        if not torch.isfinite(per_row).all():
            raise DoriError(f"the attack's loss became non-finite at step {step}; lower the learning rate")
        (grad,) = torch.autograd.grad(per_row.sum(), emb)
        emb.grad = grad.masked_fill(frozen.view(-1, 1, 1), 0.0)
        before = emb.detach().clone()
        optimizer.step()
        with torch.no_grad():
            emb.copy_(torch.where(frozen.view(-1, 1, 1), before, _project(emb, init, config.bound, config.radius)))
            if config.early_stop_loss is not None:
                frozen |= per_row.detach() < config.early_stop_loss
        losses.append(per_row.detach().cpu())
        if step + 1 in snapshot_steps:
            snapshots[step + 1] = emb.detach().clone()
        if callback is not None:
            callback(step, per_row.detach())
    return AttackResult(emb.detach(), torch.stack(losses) if losses else torch.zeros(0, n), snapshots)


def initial_embeddings(
    model: DiffusionModel,
    prompts: Sequence[str],
    mode: str = "prompt",
    *,
    seed: int = 0,
    others: Sequence[str] | None = None,
    per_prompt: int = 1,
) -> Tensor:
    """Starting points ``[len(prompts) * per_prompt, L, D]`` (prompt-major): ``prompt`` (the
    prompt's own embedding), ``random`` (N(0, I), seeded) or ``other`` (the embeddings of
    ``others``, cycled)."""
    count = len(prompts) * per_prompt
    if mode == "prompt":
        return model.encode(list(prompts)).float().repeat_interleave(per_prompt, dim=0)
    if mode == "random":
        length, width = model.embedding_shape
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, length, width, generator=generator).to(model.device)
    if mode == "other":
        if not others:
            raise DoriError("--init other needs a set of other prompts (--other-prompts)")
        texts = [others[i % len(others)] for i in range(count)]
        return model.encode(texts).float()
    raise DoriError(f"unknown initialisation {mode!r}; use prompt, random or other")


def load_embeddings(path, model: DiffusionModel, key: str | None = None) -> Tensor:
    """Conditioning embeddings ``[N, L, D]`` from a safetensors file written by dori (``dori attack``
    saves ``step_K`` for each step count, ``dori locality`` saves ``triggers``); checked for shape
    and finiteness. Without ``key`` the file must hold one tensor, or the highest ``step_K``."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise DoriError(f"embedding file not found: {file}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise DoriError(f"{file} is not a safetensors file ({error}); pass a file written by dori attack") from error
    if key is None:
        steps = sorted((k for k in tensors if k.startswith("step_") and k[5:].isdigit()), key=lambda k: int(k[5:]))
        if steps:
            key = steps[-1]
        elif len(tensors) == 1:
            key = next(iter(tensors))
        elif "triggers" in tensors:
            key = "triggers"
        else:
            raise DoriError(f"{file} holds {', '.join(sorted(tensors))}; choose one with --key")
    if key not in tensors:
        raise DoriError(f"{file} has no tensor {key!r}; it holds {', '.join(sorted(tensors))}")
    emb = tensors[key]
    if emb.dim() == 2:
        emb = emb[None]
    if emb.dim() != 3 or tuple(emb.shape[1:]) != tuple(model.embedding_shape):
        raise DoriError(f"{file}:{key} has shape {list(emb.shape)}, this model's embeddings are "
                        f"[N, {model.embedding_shape[0]}, {model.embedding_shape[1]}]; use embeddings made for this model")  # fmt: skip
    if not torch.isfinite(emb).all():
        raise DoriError(f"{file}:{key} contains NaN or inf; regenerate the embeddings")
    largest = float(emb.abs().max()) if emb.numel() else 0.0
    if largest > EMBEDDING_LIMIT:
        raise DoriError(f"{file}:{key} holds values up to {largest:.3g}, beyond {EMBEDDING_LIMIT:g} (text embeddings "
                        "are of order 1 to 100; such values overflow the model); regenerate the embeddings")  # fmt: skip
    return emb.to(model.device, model.dtype)


# The largest magnitude accepted in a loaded embedding: CLIP's hidden states stay within about 100;
# values far beyond overflow attention in half precision and saturate it in single precision.
EMBEDDING_LIMIT = 1e4
