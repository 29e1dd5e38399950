"""Fine-tuning mitigations the paper attacks: concept erasure (ESD), Concept Ablation (CA) and data
unlearning (SISS). Each is one objective on the shared loop (:func:`dori.unlearn.training.train_unet`),
written from its paper and matched to its authors' code point by point (docs/ERASURE.md lists the
points, the reference file of each and its test). Every loss is taken on the U-Net's raw output, in
the model's own parameterisation, as the references do; targets built in noise space are converted
linearly (:meth:`DiffusionModel.training_target`). On an epsilon model nothing is converted.

- **ESD-x** (Gandikota et al., ICCV 2023; ``rohitgandikota/erasing``, ``train-scripts/train-esd.py``):
  a step draws ``k`` uniform in ``0..sample_steps-1``, samples ``x`` with the model being trained
  from the concept prompt (guidance ``start_guidance`` 3, DDIM ``sample_steps`` 50) as the
  reference's sampler does with ``till_T=k`` (:func:`esd_timesteps`), and gives the U-Net
  ``t`` uniform in ``[round(k T / steps), round((k + 1) T / steps))``; the prediction for the concept
  is trained towards the frozen model's negatively guided one,
  ``o*(x, t) - eta (o*(x, t, c) - o*(x, t))`` (``eta`` 1). Only the cross-attention layers train;
  1000 steps of batch 1, Adam at 1e-5 with no weight decay and no gradient clipping.
- **Concept Ablation**, model-based, its memorization setting (Kumari et al., ICCV 2023;
  ``nupurkmr9/concept-ablation``, ``diffusers/train.py``, ``utils.py``, ``compvis/``): images of an
  anchor prompt ``c*`` are generated once by the pretrained model and filtered as the reference
  filters them (the stage: an image that copies the memorized one is dropped, and an anchor whose
  images copy more than 30% of the time is not used); the prediction for the memorized prompt on
  them is trained towards the current model's (stop-gradient) prediction for the anchor, plus the
  anchor's own diffusion loss on a separate anchor image, noise and timestep as regularisation
  (weight ``regularization`` 1, diffusers' prior weight). As in the reference, each anchor image is
  flipped, resized and pasted or cropped, the memorized prompt gets "a far away" / "very small" or
  "zoomed in" / "close up" before it when the image was shrunk or enlarged (:func:`ca_augment`),
  and the ablation term is masked to the image, summed over channels. The start token's key and value pass no
  gradient (:func:`dori.interventions.freeze_start_token`). The whole U-Net trains (the memorization setting's
  ``freeze_model: all`` / ``full-weight``); 400 steps of batch 4, AdamW at 2e-6 (CompVis: 5e-7 x
  batch 4), weight decay 0.01, clip 1.
- **SISS** (Alberti et al., ICLR 2025; ``claserken/SISS``, ``delete_sd.py`` and
  ``losses/ddpm_deletion_loss.py``): each sample is drawn from the defensive mixture
  ``(1 - lambda) q(x_t | x) + lambda q(x_t | a)`` of a kept image ``x`` and the forgotten one ``a``,
  both noised with the same noise at ``t = T - 1`` (the reference's ``randint(999, 1000)``;
  ``siss_timesteps="uniform"`` draws t over all timesteps, as the paper's objective is written), and
  the importance-weighted kept loss is descended while the importance-weighted forgotten loss is
  ascended. The forget term's gradient is rescaled to ``forget_scale`` (0.1) times the kept term's
  gradient norm, where the reference rescales it to an absolute norm of 750 (which depends on its
  loss summing over SD's 16,384 latent values, so it does not carry over to another model); then
  the whole gradient is clipped to norm 1, as in the reference. The kept images are the model's own
  generations for the same prompt that are not copies (the stage keeps every one of 8 that its
  detector does not call a copy of the memorized image; a prompt with none is reported and not
  trained; ``siss_keep="empty"`` takes them from the empty prompt's generations instead, each a copy
  of none of the training images the run knows, for a model that copies its prompts in every
  seed); conditioning is the memorized prompt; the whole U-Net trains; 35 steps of 16 samples,
  AdamW at 1e-5 (weight decay 0.01).

The learning rates are the references' for SD v1.4 (``lr_rule="reference"``, the default).
``lr_rule="scaled"`` multiplies them by ``the model's pre-training rate / SD's 1e-4`` for a model
that records its own rate (the bundled kind: ``train_config.json``), so that every method takes the
same fraction of that model's own rate as on SD; dori used that rule before it matched the
references.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from dori.configs import LR_RULES, SISS_KEEP, SISS_TIMESTEPS
from dori.errors import DoriError
from dori.fields import check_choice
from dori.interventions import freeze_start_token
from dori.models.base import DiffusionModel
from dori.unlearn.training import StepLoss, parameter_group

METHODS = ("esd", "ca", "siss")
# The references' SD settings: steps, samples per step, learning rate (for SD v1.4), trained
# parameters, AdamW's weight decay and the gradient-norm clip (0: none).
PAPER = {
    "esd": dict(steps=1000, batch=1, learning_rate=1e-5, params="xattn", weight_decay=0.0, grad_clip=0.0),
    "ca": dict(steps=400, batch=4, learning_rate=2e-6, params="full", weight_decay=0.01, grad_clip=1.0),
    "siss": dict(steps=35, batch=16, learning_rate=1e-5, params="full", weight_decay=0.01, grad_clip=1.0),
}
SD_PRETRAINING_LR = 1e-4
ANCHOR_IMAGES = 8  # CA: anchor images generated per prompt before fine-tuning
ANCHOR_MAX_COPIES = 0.3  # CA: an anchor whose images copy more often than this is not used (utils.py)
KEEP_TRIES = 8  # SISS: generations per prompt; every one that is not a copy is kept
# LR_RULES, SISS_TIMESTEPS and SISS_KEEP (dori.configs): SISS's kept images are "own", the prompt's own
# non-copies (the reference's), or "empty", the empty prompt's (for a model that copies a prompt in every seed)
# CA's target-prompt prefixes (utils.py): the first two for an anchor image shrunk below 0.6 of the
# side, the last two for one enlarged and cropped
CA_PREFIXES = ("a far away ", "very small ", "zoomed in ", "close up ")


@dataclass(frozen=True)
class ErasureConfig:
    method: str
    steps: int | None = None  # None: the reference's (PAPER)
    batch: int | None = None
    learning_rate: float | None = None  # None: the reference's, by ``lr_rule``
    params: str | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None  # 0: no clipping
    lr_rule: str = "reference"  # or "scaled" (module docstring)
    eta: float = 1.0  # ESD: negative guidance
    start_guidance: float = 3.0  # ESD: guidance of the model's own samples
    sample_steps: int = 50  # ESD: DDIM steps of those samples
    regularization: float = 1.0  # CA: weight of the anchor's own diffusion loss
    ca_augment: bool = True  # CA: the reference's flip, resize and prefix augmentation (ca_augment)
    lam: float = 0.5  # SISS: the mixture's weight on the forgotten image
    forget_scale: float = 0.1  # SISS: the forget gradient's norm over the kept gradient's
    siss_timesteps: str = "last"  # SISS: "last" (t = T - 1, the reference's code) or "uniform"
    siss_keep: str = "own"  # SISS: where the kept images come from (SISS_KEEP)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DoriError(f"unknown fine-tuning method {self.method!r}; use {', '.join(METHODS)}")
        check_choice("--lr-rule", self.lr_rule, LR_RULES)
        check_choice("--siss-timesteps", self.siss_timesteps, SISS_TIMESTEPS)
        check_choice("--siss-keep", self.siss_keep, SISS_KEEP)

    def resolved(self, model: DiffusionModel) -> ErasureConfig:
        """Every ``None`` filled from :data:`PAPER`; the learning rate by ``lr_rule``."""
        paper = PAPER[self.method]
        scale = lr_scale(model) if self.lr_rule == "scaled" else 1.0
        lr = self.learning_rate if self.learning_rate is not None else paper["learning_rate"] * scale
        pick = lambda name: paper[name] if getattr(self, name) is None else getattr(self, name)  # noqa: E731
        return replace(self, steps=pick("steps"), batch=pick("batch"), learning_rate=lr, params=pick("params"),
                       weight_decay=pick("weight_decay"), grad_clip=pick("grad_clip"))  # fmt: skip


def lr_scale(model: DiffusionModel) -> float:
    """``pre-training learning rate / SD's 1e-4`` for a model whose folder records it, else 1."""
    if model.source is None:
        return 1.0
    file = Path(model.source) / "train_config.json"
    if not file.is_file():
        return 1.0
    rate = json.loads(file.read_text(encoding="utf-8")).get("learning_rate")
    return float(rate) / SD_PRETRAINING_LR if rate else 1.0


def _noise(model: DiffusionModel, n: int, generator: torch.Generator) -> Tensor:
    return torch.randn((n, *model.latent_shape), generator=generator).to(model.device, model.dtype)


def esd_timesteps(k: int, steps: int, train_timesteps: int, generator: torch.Generator) -> tuple[int, Tensor]:
    """The reference's pairing of ESD's sample and timestep for the draw ``k`` (``0..steps-1``):
    its DDIM sampler, run with ``till_T=k``, stops after the step of index ``k - 1`` (``k`` 0 or 1:
    it runs to the end), that is after ``steps + 1 - k`` of its ``steps`` U-Net calls; the U-Net
    then gets ``t`` uniform in ``[round(k T / steps), round((k + 1) T / steps))``, about two grid
    steps noisier than the sample. Returns ``(calls, t)``."""
    calls = steps if k <= 1 else steps + 1 - k
    low, high = round(k / steps * train_timesteps), round((k + 1) / steps * train_timesteps)
    return calls, torch.randint(low, high, (1,), generator=generator)


def esd_loss(model: DiffusionModel, emb: Tensor, config: ErasureConfig) -> StepLoss:
    """ESD's objective (module docstring); ``emb`` ``[P, L, D]`` are the concepts' embeddings. The
    frozen model is a copy of ``model`` as it is now: build the objective before a resumed run
    loads its checkpoint."""
    frozen = copy.deepcopy(model.unet).eval().requires_grad_(False)
    empty = model.empty_embedding()

    def step_loss(step: int, generator: torch.Generator, rank: int, world: int):
        rows = torch.randint(len(emb), (config.batch,), generator=generator)
        k = int(torch.randint(config.sample_steps, (1,), generator=generator))
        calls, t = esd_timesteps(k, config.sample_steps, model.num_train_timesteps, generator)
        noise = _noise(model, config.batch, generator)
        mine = slice(rank, None, world)
        c = emb[rows[mine]].to(model.device, model.dtype)
        with torch.no_grad():
            x = model.sample_latents(c, noise[mine], steps=config.sample_steps, guidance=config.start_guidance,
                                     stop_after=calls)  # fmt: skip
            t = t.expand(len(x)).to(model.device)
            o0 = frozen(x, t, encoder_hidden_states=empty.expand_as(c)).sample
            op = frozen(x, t, encoder_hidden_states=c).sample
            target = o0 - config.eta * (op - o0)  # in the model's own output space, as the reference
        error = (model.model_output(x, t, c) - target).float().pow(2).flatten(1).mean(1)
        loss = error.sum() / config.batch
        return loss, {"loss": loss.item() * world}

    return step_loss


def _draw(generator: torch.Generator, valid: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """``batch`` (row, pick) pairs: rows uniform among those with a valid image (``valid``
    ``[P, n]`` bool), each pick uniform among its row's valid images."""
    usable = valid.any(1).nonzero().flatten()
    rows = usable[torch.randint(len(usable), (batch,), generator=generator)]
    return rows, _pick(generator, valid, rows)


def _pick(generator: torch.Generator, valid: Tensor, rows: Tensor) -> Tensor:
    """One valid image of each of ``rows``, uniform among that row's valid images."""
    counts = valid[rows].sum(1)
    nth = (torch.rand(len(rows), generator=generator) * counts).long().clamp_max(counts - 1)
    order = torch.cumsum(valid[rows].long(), 1) - 1  # each valid image's place among its row's valid ones
    return ((order == nth[:, None]) & valid[rows]).long().argmax(1)


def ca_augment(images: Tensor, generator: torch.Generator, latent_side: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's augmentation of its anchor images (``utils.py`` ``CustomDiffusionDataset``,
    ``aug`` on and ``--hflip`` as in the README's memorization example), for ``images`` ``[n, 3, S, S]``
    in ``[0, 1]``. Each image is flipped with probability 0.5, then resized to a side drawn uniformly in
    ``[S // 3, S]`` (probability 0.66) or ``[1.2 S, 1.4 S)``: a smaller image is pasted at a random
    place on a grey canvas (0 in the model's ``[-1, 1]``) and the loss mask covers it, less one
    latent cell on each side; a larger one is cropped at a random place, the mask all ones. The
    prefix index into :data:`CA_PREFIXES` is 0 or 1 for a side below 0.6 S, 2 or 3 above S, -1
    otherwise. Returns ``(images, mask [n, 1, h, h], prefix [n])``."""
    n, _, size, width = images.shape
    if size != width:
        raise DoriError(f"Concept Ablation's augmentation needs square images, got {size}x{width}")
    f = size // latent_side  # pixels per latent cell
    out = torch.full_like(images, 0.5)
    mask = torch.zeros(n, 1, latent_side, latent_side)
    prefix = torch.full((n,), -1, dtype=torch.long)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    for i in range(n):
        image = images[i].flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else images[i]
        if float(torch.rand(1, generator=generator)) < 0.66:
            scale = draw(size // 3, size + 1)
        else:
            scale = draw(int(1.2 * size), int(1.4 * size))
        outer, inner = (scale, size) if scale > size else (size, scale)
        top, left = draw(0, outer - inner + 1), draw(0, outer - inner + 1)
        resized = torch.nn.functional.interpolate(image[None].float(), size=(scale, scale), mode="bilinear",
                                                  antialias=True, align_corners=False)[0].clamp(0, 1)  # fmt: skip
        if scale > size:
            out[i] = resized[:, top : top + size, left : left + size]
            mask[i] = 1
        else:
            out[i, :, top : top + scale, left : left + scale] = resized
            mask[i, :, top // f + 1 : (top + scale) // f - 1, left // f + 1 : (left + scale) // f - 1] = 1
        if scale < 0.6 * size:
            prefix[i] = draw(0, 2)
        elif scale > size:
            prefix[i] = 2 + draw(0, 2)
    return out, mask, prefix


def ca_loss(model: DiffusionModel, emb: Tensor, anchor_emb: Tensor, anchor_images: Tensor, config: ErasureConfig,
            valid: Tensor | None = None, prefixed: Tensor | None = None) -> StepLoss:  # fmt: skip
    """Concept Ablation's objective (module docstring): prompt ``i`` (``emb[i]``) is ablated onto
    its anchor ``anchor_emb[i]``, whose images are ``anchor_images[i]`` ``[n, 3, S, S]`` in ``[0, 1]``;
    ``valid`` ``[P, n]`` marks the images that passed the replication filter (default: all). With
    ``config.ca_augment`` each image is augmented as the reference does (:func:`ca_augment`) and the
    prompt gets the drawn prefix (``prefixed[i, j]``: the embedding of ``CA_PREFIXES[j] + prompt``);
    without it the image is the reference's unaugmented one, its mask inset by one cell too. The
    ablation term is the reference's masked loss, summed over channels and averaged over the masked
    cells. The regularization term takes its own anchor image (flipped with probability 0.5), noise
    and timestep, as the reference's prior batch does."""
    valid = torch.ones(anchor_images.shape[:2], dtype=torch.bool) if valid is None else valid.bool()
    if config.ca_augment and prefixed is None:
        raise ValueError("ca_augment needs the prefixed prompts' embeddings")
    side = model.latent_shape[1]

    def step_loss(step: int, generator: torch.Generator, rank: int, world: int):
        rows, picks = _draw(generator, valid, config.batch)
        noise = _noise(model, config.batch, generator)
        t = torch.randint(model.num_train_timesteps, (config.batch,), generator=generator).to(model.device)
        prior_picks = _pick(generator, valid, rows)
        prior_noise = _noise(model, config.batch, generator)
        prior_t = torch.randint(model.num_train_timesteps, (config.batch,), generator=generator).to(model.device)
        images = anchor_images[rows, picks].float()
        prior = anchor_images[rows, prior_picks].float()
        if config.ca_augment:
            images, mask, prefix = ca_augment(images, generator, side)
            flips = torch.rand(config.batch, generator=generator) < 0.5
            prior = torch.where(flips.view(-1, 1, 1, 1), prior.flip(-1), prior)
        else:  # the reference without aug: the image at its own size, the mask inset by one cell
            mask, prefix = torch.zeros(config.batch, 1, side, side), torch.full((config.batch,), -1)
            mask[:, :, 1 : side - 1, 1 : side - 1] = 1
        mine = slice(rank, None, world)
        x0, prior = model.to_latents(images[mine]), model.to_latents(prior[mine])
        mask = mask[mine].to(model.device)
        c = emb[rows[mine]]
        if prefix[mine].ge(0).any():
            chosen = prefixed[rows[mine], prefix[mine].clamp_min(0)]
            c = torch.where(prefix[mine].ge(0).view(-1, 1, 1), chosen, c)
        c, anchor = c.to(model.device, model.dtype), anchor_emb[rows[mine]].to(model.device, model.dtype)
        x_t = model.add_noise(x0, noise[mine], t[mine])
        with freeze_start_token(model):
            with torch.no_grad():
                target = model.model_output(x_t, t[mine], anchor)
            error = (model.model_output(x_t, t[mine], c) - target).float().pow(2)
            ablation = (error * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1)
            regular = model.diffusion_loss(prior, anchor, prior_noise[mine], prior_t[mine])
        loss = (ablation.sum() + config.regularization * regular.sum()) / config.batch
        return loss, {"loss": ablation.sum().item() / config.batch * world,
                      "regularization": regular.sum().item() / config.batch * world}  # fmt: skip

    return step_loss


def siss_loss(model: DiffusionModel, emb: Tensor, forget: Tensor, keep: Tensor, config: ErasureConfig,
              valid: Tensor | None = None) -> StepLoss:  # fmt: skip
    """SISS's objective (module docstring): prompt ``i`` (``emb[i]``) forgets ``forget[i]`` and
    keeps ``keep[i]`` ``[n, C, h, w]`` (latents; ``valid`` ``[P, n]`` marks the kept images, the
    model's own non-copies; a prompt with none is not trained). Under data parallel each process
    rescales its own share's forget gradient by its own norms before the shares are summed (one
    process: exact)."""
    valid = torch.ones(keep.shape[:2], dtype=torch.bool) if valid is None else valid.bool()
    trained = [p for _, p in parameter_group(model, config.params)]
    lam = torch.tensor(config.lam, dtype=torch.float64)
    last = model.num_train_timesteps - 1

    def step_loss(step: int, generator: torch.Generator, rank: int, world: int):
        rows, picks = _draw(generator, valid, config.batch)
        noise = _noise(model, config.batch, generator)
        t = torch.randint(model.num_train_timesteps, (config.batch,), generator=generator).to(model.device)
        if config.siss_timesteps == "last":  # the reference's randint(999, 1000)
            t = torch.full_like(t, last)
        from_forget = torch.rand(config.batch, generator=generator) < config.lam
        mine = slice(rank, None, world)
        a = forget[rows[mine]].to(model.device, model.dtype)
        x = keep[rows[mine], picks[mine]].to(model.device, model.dtype)
        abar = model.alphas_cumprod[t[mine]].view(-1, 1, 1, 1)
        # both images noised with the same noise; the mixture takes one of the two per sample
        source = torch.where(from_forget[mine].view(-1, 1, 1, 1).to(model.device), a, x)
        x_t = (abar.sqrt() * source.float() + (1 - abar).sqrt() * noise[mine].float()).to(model.dtype)
        pred = model.model_output(x_t, t[mine], emb[rows[mine]].to(model.device, model.dtype)).float()
        eps_x = (x_t.float() - abar.sqrt() * x.float()) / (1 - abar).sqrt()
        eps_a = (x_t.float() - abar.sqrt() * a.float()) / (1 - abar).sqrt()
        # the targets in the model's own output space (epsilon: eps_x and eps_a themselves)
        target_x = model.training_target(x.float(), eps_x, t[mine])
        target_a = model.training_target(a.float(), eps_a, t[mine])
        # log q(x_t | x) - log q(x_t | a), the Gaussians' exponents; the weights in log space
        d_x = eps_x.pow(2).flatten(1).sum(1).double() / 2
        d_a = eps_a.pow(2).flatten(1).sum(1).double() / 2
        w_x = torch.exp(-torch.logaddexp(torch.log1p(-lam), torch.log(lam) + d_x - d_a)).float()
        w_a = torch.exp(-torch.logaddexp(torch.log1p(-lam) + d_a - d_x, torch.log(lam))).float()
        loss_x = (w_x * (pred - target_x).pow(2).flatten(1).mean(1)).sum() / config.batch
        loss_a = (w_a * (pred - target_a).pow(2).flatten(1).mean(1)).sum() / config.batch
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
