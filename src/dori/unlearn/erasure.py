"""Fine-tuning mitigations the paper attacks: concept erasure (ESD), Concept Ablation (CA) and data
unlearning (SISS). Each is one objective on the shared loop (:func:`dori.unlearn.training.train_unet`),
written from its paper; where a paper is silent the choice is a parameter of :class:`ErasureConfig`.

- **ESD-x** (Gandikota et al., ICCV 2023, "Erasing Concepts from Diffusion Models"): ``x_t`` is the
  model's own sample from the concept prompt (``start_guidance`` 3, DDIM ``sample_steps`` 50,
  stopped at a random step), and the prediction for the concept is trained towards the frozen
  model's negatively guided one, ``eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t))`` (``eta`` 1). Only
  the cross-attention layers train (ESD-x, for a specific concept); 1000 steps of batch 1, lr 1e-5.
- **Concept Ablation**, model-based (Kumari et al., ICCV 2023): images of an anchor prompt ``c*``
  are generated once by the pretrained model; the prediction for the memorized prompt on them is
  trained towards the current model's (stop-gradient) prediction for the anchor, plus the
  anchor's own diffusion loss as regularisation (weight ``regularization`` 1). The cross-attention
  key and value projections train (``crossattn_kv``); 400 steps of batch 4, lr 2e-6.
- **SISS** (Alberti et al., ICLR 2025, "Data Unlearning in Diffusion Models"): each sample is drawn
  from the defensive mixture ``(1 - lambda) q(x_t | x) + lambda q(x_t | a)`` of a kept image ``x``
  and the forgotten one ``a`` (``lambda`` 0.5, one forward pass), and the importance-weighted kept
  loss is descended while the importance-weighted forgotten loss is ascended. As in the authors'
  SD code, the forget term's gradient is rescaled to a fixed norm; here the rule is relative,
  ``forget_scale`` (0.1) times the kept term's gradient norm (their advice: about 10%). The kept
  images are what the model makes for the same prompt that is not a copy, as in their SD setting
  (the least similar of 8 generations, else an empty-prompt one); conditioning is the memorized
  prompt; the whole U-Net trains; 35 steps of 16 samples, lr 1e-5.

The learning rates are the papers' for SD v1.4, whose pre-training rate was 1e-4. A model that
records its own pre-training rate (the bundled kind: ``train_config.json``) scales them by
``its rate / 1e-4``, so every method takes the same fraction of that model's own rate as on SD.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from dori.errors import DoriError
from dori.models.base import DiffusionModel
from dori.unlearn.training import StepLoss, parameter_group

METHODS = ("esd", "ca", "siss")
# The papers' SD settings: steps, samples per step, learning rate (for SD v1.4), trained parameters.
PAPER = {
    "esd": dict(steps=1000, batch=1, learning_rate=1e-5, params="xattn"),
    "ca": dict(steps=400, batch=4, learning_rate=2e-6, params="kv"),
    "siss": dict(steps=35, batch=16, learning_rate=1e-5, params="full"),
}
SD_PRETRAINING_LR = 1e-4


@dataclass(frozen=True)
class ErasureConfig:
    method: str
    steps: int | None = None  # None: the paper's (PAPER)
    batch: int | None = None
    learning_rate: float | None = None  # None: the paper's, scaled to the model (module docstring)
    params: str | None = None
    eta: float = 1.0  # ESD: negative guidance
    start_guidance: float = 3.0  # ESD: guidance of the model's own samples
    sample_steps: int = 50  # ESD: DDIM steps of those samples
    regularization: float = 1.0  # CA: weight of the anchor's own diffusion loss
    lam: float = 0.5  # SISS: the mixture's weight on the forgotten image
    forget_scale: float = 0.1  # SISS: the forget gradient's norm over the kept gradient's
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DoriError(f"unknown fine-tuning method {self.method!r}; use {', '.join(METHODS)}")

    def resolved(self, model: DiffusionModel) -> ErasureConfig:
        """Every ``None`` filled from :data:`PAPER`; the learning rate scaled to ``model``."""
        paper = PAPER[self.method]
        lr = self.learning_rate if self.learning_rate is not None else paper["learning_rate"] * lr_scale(model)
        return replace(self, steps=self.steps or paper["steps"], batch=self.batch or paper["batch"],
                       learning_rate=lr, params=self.params or paper["params"])  # fmt: skip


def lr_scale(model: DiffusionModel) -> float:
    """``pre-training learning rate / SD's 1e-4`` for a model whose folder records it, else 1."""
    if model.source is None:
        return 1.0
    file = Path(model.source) / "train_config.json"
    if not file.is_file():
        return 1.0
    rate = json.loads(file.read_text(encoding="utf-8")).get("learning_rate")
    return float(rate) / SD_PRETRAINING_LR if rate else 1.0


def _rows(generator: torch.Generator, count: int, batch: int, rank: int, world: int) -> Tensor:
    """The step's ``batch`` draws from ``count`` items, and this process's share of them."""
    return torch.randint(count, (batch,), generator=generator)[rank::world]


def _noise(model: DiffusionModel, n: int, generator: torch.Generator) -> Tensor:
    return torch.randn((n, *model.latent_shape), generator=generator).to(model.device, model.dtype)


def esd_loss(model: DiffusionModel, emb: Tensor, config: ErasureConfig) -> StepLoss:
    """ESD's objective (module docstring); ``emb`` ``[P, L, D]`` are the concepts' embeddings. The
    frozen model is a copy of ``model`` as it is now: build the objective before a resumed run
    loads its checkpoint."""
    frozen = copy.deepcopy(model.unet).eval().requires_grad_(False)
    empty = model.empty_embedding()
    scheduler = model.ddim_scheduler(config.sample_steps)

    def frozen_noise(x, t, e):
        return model.output_to_noise(frozen(x, t, encoder_hidden_states=e).sample, x, t)

    def step_loss(step: int, generator: torch.Generator, rank: int, world: int):
        rows = torch.randint(len(emb), (config.batch,), generator=generator)
        stop = int(torch.randint(config.sample_steps, (1,), generator=generator))
        noise = _noise(model, config.batch, generator)
        mine = slice(rank, None, world)
        c = emb[rows[mine]].to(model.device, model.dtype)
        with torch.no_grad():
            x = model.sample_latents(c, noise[mine], steps=config.sample_steps, guidance=config.start_guidance,
                                     stop_after=stop)  # fmt: skip
            t = scheduler.timesteps[stop].expand(len(x)).to(model.device)
            e0, ep = frozen_noise(x, t, empty.expand_as(c)), frozen_noise(x, t, c)
            target = e0 - config.eta * (ep - e0)
        error = (model.predict_noise(x, t, c) - target).float().pow(2).flatten(1).mean(1)
        loss = error.sum() / config.batch
        return loss, {"loss": loss.item() * world}

    return step_loss


def ca_loss(model: DiffusionModel, emb: Tensor, anchor_emb: Tensor, anchor_latents: Tensor,
            config: ErasureConfig) -> StepLoss:  # fmt: skip
    """Concept Ablation's objective (module docstring): prompt ``i`` (``emb[i]``) is ablated onto
    its anchor ``anchor_emb[i]``, whose images are ``anchor_latents[i]`` ``[n, C, h, w]``."""

    def step_loss(step: int, generator: torch.Generator, rank: int, world: int):
        rows = torch.randint(len(emb), (config.batch,), generator=generator)
        picks = torch.randint(anchor_latents.shape[1], (config.batch,), generator=generator)
        noise = _noise(model, config.batch, generator)
        t = torch.randint(model.num_train_timesteps, (config.batch,), generator=generator).to(model.device)
        mine = slice(rank, None, world)
        x0 = anchor_latents[rows[mine], picks[mine]].to(model.device, model.dtype)
        c, anchor = emb[rows[mine]].to(model.device, model.dtype), anchor_emb[rows[mine]].to(model.device, model.dtype)
        x_t = model.add_noise(x0, noise[mine], t[mine])
        with torch.no_grad():
            target = model.predict_noise(x_t, t[mine], anchor)
        ablation = (model.predict_noise(x_t, t[mine], c) - target).float().pow(2).flatten(1).mean(1)
        regular = model.diffusion_loss(x0, anchor, noise[mine], t[mine])
        loss = (ablation.sum() + config.regularization * regular.sum()) / config.batch
        return loss, {"loss": ablation.sum().item() / config.batch * world,
                      "regularization": regular.sum().item() / config.batch * world}  # fmt: skip

    return step_loss


def siss_loss(model: DiffusionModel, emb: Tensor, forget: Tensor, keep: Tensor, config: ErasureConfig) -> StepLoss:
    """SISS's objective (module docstring): prompt ``i`` (``emb[i]``) forgets ``forget[i]`` and
    keeps ``keep[i]`` ``[n, C, h, w]`` (latents). Under data parallel each process rescales its own
    share's forget gradient by its own norms before the shares are summed (one process: exact)."""
    trained = [p for _, p in parameter_group(model, config.params)]
    lam = torch.tensor(config.lam, dtype=torch.float64)

    def step_loss(step: int, generator: torch.Generator, rank: int, world: int):
        rows = torch.randint(len(emb), (config.batch,), generator=generator)
        picks = torch.randint(keep.shape[1], (config.batch,), generator=generator)
        noise = _noise(model, config.batch, generator)
        t = torch.randint(model.num_train_timesteps, (config.batch,), generator=generator).to(model.device)
        from_forget = torch.rand(config.batch, generator=generator) < config.lam
        mine = slice(rank, None, world)
        a = forget[rows[mine]].to(model.device, model.dtype)
        x = keep[rows[mine], picks[mine]].to(model.device, model.dtype)
        abar = model.alphas_cumprod[t[mine]].view(-1, 1, 1, 1)
        source = torch.where(from_forget[mine].view(-1, 1, 1, 1).to(model.device), a, x)
        x_t = (abar.sqrt() * source.float() + (1 - abar).sqrt() * noise[mine].float()).to(model.dtype)
        pred = model.predict_noise(x_t, t[mine], emb[rows[mine]].to(model.device, model.dtype)).float()
        eps_x = (x_t.float() - abar.sqrt() * x.float()) / (1 - abar).sqrt()
        eps_a = (x_t.float() - abar.sqrt() * a.float()) / (1 - abar).sqrt()
        # log q(x_t | x) - log q(x_t | a), the Gaussians' exponents; the weights in log space
        d_x = eps_x.pow(2).flatten(1).sum(1).double() / 2
        d_a = eps_a.pow(2).flatten(1).sum(1).double() / 2
        w_x = torch.exp(-torch.logaddexp(torch.log1p(-lam), torch.log(lam) + d_x - d_a)).float()
        w_a = torch.exp(-torch.logaddexp(torch.log1p(-lam) + d_a - d_x, torch.log(lam))).float()
        loss_x = (w_x * (pred - eps_x).pow(2).flatten(1).mean(1)).sum() / config.batch
        loss_a = (w_a * (pred - eps_a).pow(2).flatten(1).mean(1)).sum() / config.batch
        g_x = torch.autograd.grad(loss_x, trained, retain_graph=True, allow_unused=True)
        g_a = torch.autograd.grad(loss_a, trained, allow_unused=True)
        g_x = [torch.zeros_like(p) if g is None else g for p, g in zip(trained, g_x)]
        g_a = [torch.zeros_like(p) if g is None else g for p, g in zip(trained, g_a)]
        norm_x = torch.sqrt(sum(g.float().pow(2).sum() for g in g_x))
        norm_a = torch.sqrt(sum(g.float().pow(2).sum() for g in g_a)).clamp_min(1e-12)
        scale = config.forget_scale * norm_x / norm_a
        grads = [gx - scale * ga for gx, ga in zip(g_x, g_a)]
        return grads, {"loss_keep": loss_x.item() * world, "loss_forget": loss_a.item() * world}

    return step_loss


def anchor_for(prompt: str) -> str:
    """The bundled kind's generic anchor: the memorized title's object without its name
    (``"Aurora Hollow album cover"`` -> ``"an album cover"``)."""
    words = prompt.split()
    kind = " ".join(words[2:]) if len(words) > 2 else prompt
    return ("an " if kind[:1].lower() in "aeiou" else "a ") + kind


def generate_latents(model: DiffusionModel, emb: Tensor, count: int, *, steps: int, guidance: float | None,
                     first_seed: int, batch_size: int, progress: Callable[[int], None] | None = None) -> Tensor:  # fmt: skip
    """``[P, count, C, h, w]``: ``count`` generations per embedding, as latents (CA's anchor images)."""
    images = model.generate(emb, list(range(first_seed, first_seed + count)), steps=steps, guidance=guidance,
                            batch_size=batch_size, progress=progress)  # fmt: skip
    latents = torch.cat([model.to_latents(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    return latents.view(emb.shape[0], count, *latents.shape[1:]).cpu()
