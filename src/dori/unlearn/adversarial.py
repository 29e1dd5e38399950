"""Adversarial fine-tuning that removes memorization (Kowalczuk et al., "Finding DoRI", stage 6).

Every step, the DoRI attack (:func:`dori.attack.dori_attack`, the same function ``dori attack``
uses) searches triggers ``y_adv`` for the memorized images against the *current* model; the U-Net
is then trained on

    L = L_DM + adv_weight * L_adv + preserve_weight * L_keep,
    L_adv = || target(s, eps, t) - f_theta(noised surrogate s, t, y_adv) ||^2,
    L_keep = || f_theta(x_t, t, c) - f_original(x_t, t, c) ||^2   (on L_DM's own rows),

where ``L_DM`` is the ordinary diffusion loss on retained (non-memorized) training pairs, a share
``empty_caption_prob`` of them under the empty caption as in pre-training, and ``s`` is a harmless
surrogate image for each memorized one (:mod:`dori.unlearn.surrogates`). The paper's loss is
``L_DM + L_adv`` (``preserve_weight`` 0). ``L_keep`` is a departure from it: it holds the U-Net's
output on the retained captions and the empty caption to the frozen original's (a copy of the
U-Net in the model's dtype). Every loss is in the model's own output space (epsilon or v). The
whole U-Net trains (LoRA was reported not to work); the text encoder stays frozen; AdamW, with an
optional linear warm-up of the learning rate.

Triggers per target: one starts from the prompt's embedding, the others from N(0, I). With
``warm_start`` (default) each step continues the previous step's triggers for ``inner_steps`` Adam
steps instead of a fresh ``fresh_steps``-step search; ``warm_start=False`` restarts every step from
the initial points (the expensive variant, for comparison). With ``refresh_every`` N, the triggers
are collected afresh every N steps (``fresh_steps`` DoRI steps from the prompt and new N(0, I)
draws, the paper's "each step first collects triggers" at the scale of a round) and continued for
``inner_steps`` in between. On the bundled model, rounds of 20 steps held fixed triggers that the
model learnt to refuse while DoRI from a new random start still found copies; the warm start,
which moves its triggers every step, did not leave them (docs/RESULTS.md).

Data-parallel: given ``shards`` (:class:`dori.parallel.Shards` under ``accelerate launch``), each
process searches every ``world``-th trigger and takes every ``world``-th retained pair of the same
global batch (all draws come from the shared per-step generator), the gradients are summed over
the processes, and every process applies the same AdamW step, so the weights stay identical on all
of them and equal (up to float summation order) to a one-process run.

Half precision (a model loaded with ``dtype`` float16 or bfloat16): the U-Net trains with float32
master weights and autocast forward passes (:meth:`DiffusionModel.fp32_weights`), the triggers and
the attack's Adam state stay float32, and float16 scales the loss (``torch.amp.GradScaler``; a step
whose gradients overflow is skipped and the scale lowered, as usual). Gradient checkpointing, where
the model has it on, applies to both the attack and the fine-tuning backward passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dori.attack import AttackConfig, dori_attack
from dori.errors import DoriError
from dori.models.base import DiffusionModel


@dataclass(frozen=True)
class UnlearnConfig:
    steps: int = 150
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    retain_batch: int = 32
    adv_pairs: int = 2  # (noise, t) pairs per trigger, in the attack and in L_adv
    triggers_per_target: int = 3
    inner_steps: int = 5  # attack steps per fine-tuning step when warm-starting
    warm_start: bool = True
    fresh_steps: int = 50  # attack steps per fine-tuning step without warm start
    attack_learning_rate: float = 0.1
    adv_weight: float = 1.0
    grad_clip: float = 1.0
    # Rounds: every ``refresh_every`` steps the triggers are collected afresh, ``fresh_steps`` DoRI
    # steps from the prompt and new N(0, I) draws (the paper's "each step first collects triggers");
    # in between they continue for ``inner_steps`` (0: held fixed). 0 turns rounds off.
    refresh_every: int = 0
    # The learning rate rises linearly over the first ``warmup_steps`` steps (a fresh Adam's first
    # steps move every weight by about the full rate, whatever its gradient).
    warmup_steps: int = 0
    # Share of the utility rows shown under the empty caption, as pre-training dropped captions.
    empty_caption_prob: float = 0.0
    # A departure from the paper: weight of a preservation term that holds the U-Net's output on the
    # utility rows (training captions, and the empty caption at its share) to the frozen original's.
    preserve_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "retain_batch", "adv_pairs", "triggers_per_target"):
            if getattr(self, name) < 1:
                raise DoriError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("inner_steps", "fresh_steps", "refresh_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise DoriError(f"{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.empty_caption_prob < 1:
            raise DoriError(f"empty-caption-prob must be in [0, 1), got {self.empty_caption_prob}")
        for name in ("adv_weight", "preserve_weight"):
            if getattr(self, name) < 0:
                raise DoriError(f"{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")

    def rate(self, step: int) -> float:
        """Step ``step``'s learning rate."""
        if not self.warmup_steps:
            return self.learning_rate
        return self.learning_rate * min(1.0, (step + 1) / self.warmup_steps)

    def search(self, step: int) -> tuple[bool, int]:
        """Step ``step``'s trigger search: (start afresh?, attack steps)."""
        if self.refresh_every:
            return (True, self.fresh_steps) if step % self.refresh_every == 0 else (False, self.inner_steps)
        return (False, self.inner_steps) if self.warm_start else (True, self.fresh_steps)


@dataclass
class UnlearnState:
    step: int
    triggers: Tensor  # [T * k, L, D]
    history: list[dict]
    loss_scale: dict | None = None  # float16 only: the gradient scaler's state (GradScaler.state_dict)


def initial_triggers(model: DiffusionModel, prompt_emb: Tensor, k: int, seed: int) -> Tensor:
    """``[T * k, L, D]``: per target, its prompt embedding then ``k - 1`` N(0, I) draws (round ``r``
    of a run with rounds draws with ``seed + 7919 * r``)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for emb in prompt_emb.float():
        rows.append(emb[None].to(model.device))
        if k > 1:
            rows.append(torch.randn(k - 1, *emb.shape, generator=generator).to(model.device))
    return torch.cat(rows)


def adversarial_finetune(
    model: DiffusionModel,
    *,
    targets: Tensor,
    surrogates: Tensor,
    prompt_emb: Tensor,
    retain_latents: Tensor,
    retain_emb: Tensor,
    retain_index: Tensor,
    config: UnlearnConfig = UnlearnConfig(),
    state: UnlearnState | None = None,
    optimizer_state: dict | None = None,
    weights: dict | None = None,
    on_step: Callable[[UnlearnState, torch.optim.Optimizer], None] | None = None,
    shards=None,
    reference_weights: dict | None = None,
) -> UnlearnState:
    """Fine-tune ``model.unet`` in place. ``targets`` / ``surrogates`` ``[T, C, h, w]`` are latents of
    the memorized images and their surrogates, ``prompt_emb`` ``[T, L, D]`` their prompts'
    embeddings; the retained pairs are ``retain_latents[i]`` with ``retain_emb[retain_index[i]]``.
    ``on_step`` sees the state after every step (checkpointing, progress); ``shards`` splits each
    step over processes (see the module docstring). Resuming: ``state``, ``optimizer_state`` and
    ``weights`` (the U-Net's state dict) of a checkpoint; the weights are loaded after a
    half-precision model's U-Net is made float32, so they come back unrounded; with a preservation
    term, ``reference_weights`` are the original U-Net's (without them the term holds the model to
    the weights it starts from)."""
    with model.fp32_weights():
        if weights is not None:
            model.unet.load_state_dict(weights)
        return _finetune(model, targets, surrogates, prompt_emb, retain_latents, retain_emb, retain_index, config,
                         state, optimizer_state, on_step, shards, reference_weights)  # fmt: skip


def _finetune(model, targets, surrogates, prompt_emb, retain_latents, retain_emb, retain_index, config, state,
              optimizer_state, on_step, shards, reference_weights) -> UnlearnState:  # fmt: skip
    rank, world = (shards.rank, shards.world) if shards is not None else (0, 1)
    k = config.triggers_per_target
    n_targets = targets.shape[0]
    if surrogates.shape != targets.shape or prompt_emb.shape[0] != n_targets:
        raise DoriError("one surrogate and one prompt embedding per memorized target are needed")
    if world > min(n_targets * k, config.retain_batch):
        raise DoriError(f"{world} processes but only {n_targets * k} triggers and {config.retain_batch} retained pairs "
                        "per step; launch fewer processes or raise --triggers-per-target / --retain-batch")  # fmt: skip
    state = state or UnlearnState(0, initial_triggers(model, prompt_emb, k, config.seed), [])
    empty = model.empty_embedding().to(model.device) if config.empty_caption_prob > 0 else None
    unet = model.unet
    # The frozen original for the preservation term (a copy of the weights as fine-tuning starts;
    # a resumed run passes the original's in ``reference_weights``).
    reference = None
    if config.preserve_weight > 0:
        reference = copy.deepcopy(unet).to(model.dtype).eval().requires_grad_(False)  # exact: the weights were in it
        if reference_weights is not None:
            reference.load_state_dict(reference_weights)
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scaler = torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)
    if state.loss_scale and scaler.is_enabled():
        scaler.load_state_dict(state.loss_scale)
    target_rows = targets.repeat_interleave(k, dim=0)
    surrogate_rows = surrogates.repeat_interleave(k, dim=0).repeat_interleave(config.adv_pairs, dim=0)
    try:
        for step in range(state.step, config.steps):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            fresh, attack_steps = config.search(step)
            attack = AttackConfig(steps=attack_steps, learning_rate=config.attack_learning_rate, batch=config.adv_pairs)
            round_seed = config.seed + 7919 * (step // config.refresh_every if config.refresh_every else 0)
            begin = initial_triggers(model, prompt_emb, k, round_seed) if fresh else state.triggers
            seeds = [config.seed * 7919 + step * 1009 + i for i in range(len(begin))]
            mine = list(range(rank, len(begin), world))  # this process's triggers
            unet.requires_grad_(False)  # the attack differentiates the embedding only
            found = dori_attack(model, target_rows[mine], begin[mine], attack, seeds=[seeds[i] for i in mine]).embeddings
            unet.requires_grad_(True)
            triggers = found if shards is None else shards.assemble(mine, found, len(begin))

            # One global batch, drawn identically by every process; each process takes its share.
            pick = torch.randint(len(retain_latents), (config.retain_batch,), generator=generator)
            noise = torch.randn((config.retain_batch, *retain_latents.shape[1:]), generator=generator)
            t = torch.randint(model.num_train_timesteps, (config.retain_batch,), generator=generator)
            adv_noise = torch.randn(surrogate_rows.shape, generator=generator)
            adv_t = torch.randint(model.num_train_timesteps, (len(surrogate_rows),), generator=generator)
            drop = torch.rand(config.retain_batch, generator=generator) < config.empty_caption_prob
            part = slice(rank, None, world)
            x0 = retain_latents[pick[part]].to(model.device, model.dtype)
            emb = retain_emb[retain_index[pick[part]]].to(model.device, model.dtype)
            if empty is not None:
                emb = torch.where(drop[part].to(model.device).view(-1, 1, 1), empty.to(model.dtype), emb)
            loss_dm, drift = model.diffusion_loss_and_drift(x0, emb, noise[part].to(model.device, model.dtype),
                                                            t[part].to(model.device), reference)  # fmt: skip
            loss_dm = loss_dm.sum() / config.retain_batch
            loss_keep = torch.zeros((), device=model.device) if drift is None else drift.sum() / config.retain_batch
            adv_mine = torch.tensor(mine, dtype=torch.long).repeat_interleave(config.adv_pairs) * config.adv_pairs
            adv_mine = adv_mine + torch.arange(config.adv_pairs).repeat(len(mine))
            adv_emb = found.to(model.dtype).repeat_interleave(config.adv_pairs, dim=0)
            adv_noise_mine, adv_t_mine = adv_noise[adv_mine].to(model.device, model.dtype), adv_t[adv_mine].to(model.device)
            loss_adv = model.diffusion_loss(surrogate_rows[adv_mine].to(model.device, model.dtype), adv_emb,
                                            adv_noise_mine, adv_t_mine).sum() / len(surrogate_rows)  # fmt: skip

            loss = loss_dm + config.adv_weight * loss_adv + config.preserve_weight * loss_keep
            for group in optimizer.param_groups:
                group["lr"] = config.rate(step)
            if not torch.isfinite(loss):
                raise DoriError(f"fine-tuning produced a non-finite loss at step {step}; the last good checkpoint "
                                "is kept; lower --lr and resume")  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if shards is not None and world > 1:
                shards.sum_([p.grad for p in unet.parameters() if p.grad is not None])
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if not all(torch.isfinite(p).all() for p in unet.parameters()):
                raise DoriError(f"fine-tuning produced non-finite weights at step {step}; the last good checkpoint "
                                "is kept; lower --lr and resume")  # fmt: skip
            # The memorized images' own diffusion loss under the triggers: how well the attack still works.
            with torch.no_grad():
                attack_loss = model.diffusion_loss(target_rows[torch.tensor(mine)].repeat_interleave(config.adv_pairs, dim=0)
                                                   .to(model.device, model.dtype), adv_emb, adv_noise_mine,
                                                   adv_t_mine).sum() / len(surrogate_rows)  # fmt: skip
            logged = torch.stack([loss_dm.detach(), loss_adv.detach(), attack_loss, loss_keep.detach()]).float()
            if shards is not None and world > 1:
                shards.sum_([logged])
            state = UnlearnState(step + 1, triggers.detach(), state.history + [
                {"step": step + 1, "loss_dm": logged[0].item(), "loss_adv": logged[1].item(),
                 "attack_loss_on_memorized": logged[2].item(),
                 **({"loss_keep": logged[3].item()} if reference is not None else {})}],
                                 scaler.state_dict() if scaler.is_enabled() else None)  # fmt: skip
            if on_step is not None:
                on_step(state, optimizer)
    finally:
        optimizer.zero_grad(set_to_none=True)  # no gradient left on the model (the caller may keep using it)
        unet.eval().requires_grad_(False)
    return state

