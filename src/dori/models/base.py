"""The one model interface every dori algorithm talks to, whatever the backend.

A :class:`DiffusionModel` wraps diffusers / transformers components: a ``UNet2DConditionModel``, a
frozen text encoder with its tokenizer, the training noise schedule, and a VAE for latent models
(``None`` for pixel-space models such as the bundled one). Stable Diffusion v1.x / v2.x and the
bundled model are both instances of this class, so the same algorithm code runs on either.

A pixel-space model may work on its pixels packed ``f x f`` into channels (``dori_model.json``:
``"space_to_depth": f``; the sixth bundled recipe packs 32x32x3 into 16x16x12): a lossless stand-in
for SD's VAE, so that the U-Net's top resolution, where SD's has its first cross-attention
blocks, is small enough for a CPU.

Conventions: images are ``float32`` in ``[0, 1]``, shape ``[N, 3, H, W]``, returned on the CPU;
embeddings (the conditioning ``encoder_hidden_states``) are ``[B, L, D]``; timesteps are integer
training timesteps in ``[0, num_train_timesteps)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from torch import Tensor, nn

from dori.errors import DoriError
from dori.models import position


@dataclass(frozen=True)
class Site:
    """A named linear layer of the U-Net whose output channels are neurons."""

    name: str
    module: nn.Linear
    width: int


@dataclass(frozen=True)
class StepInfo:
    """What :meth:`DiffusionModel.generate` hands its per-step callback.

    ``noise_cond`` / ``noise_uncond`` are epsilon-space predictions (converted from the model's own
    parameterisation) for the rows ``rows`` of the whole batch; ``noise_uncond`` is ``None`` when
    sampling runs without classifier-free guidance.
    """

    index: int
    timestep: int
    rows: slice
    latents: Tensor
    noise_cond: Tensor
    noise_uncond: Tensor | None


# The most rows one U-Net call takes on a CPU; larger calls run in chunks (DiffusionModel.model_output).
# 64, measured with ``benchmarks/bench.py --only rows`` on the bundled model (2 cores, two runs): as
# chunks of 64, 128 rows take 0.88-0.91x the time forward and 0.77-0.90x forward and backward, 256
# rows 0.56-0.62x and 0.39-0.42x.
CPU_MAX_ROWS = 64


def _unet_position(name: str) -> int:
    """Order sites as the signal flows through the U-Net: down blocks, mid block, up blocks."""
    for rank, prefix in enumerate(("down_blocks.", "mid_block.", "up_blocks.")):
        if name.startswith(prefix):
            return rank
    return 3


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a module's floating-point weights to ``dtype`` in place (``Module.float`` / ``half`` /
    ``bfloat16``: diffusers' ``.to(dtype)`` warns about float32 modules even when it has none)."""
    if next(module.parameters()).dtype == dtype:
        return module
    return {torch.float32: module.float, torch.float16: module.half, torch.bfloat16: module.bfloat16}[dtype]()


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a frozen component to ``device`` / ``dtype``."""
    return cast(module.to(device), dtype).eval().requires_grad_(False)


class DiffusionModel:
    """A text-to-image diffusion model behind dori's interface (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        scheduler_config: dict,
        vae: nn.Module | None = None,
        token_map: Tensor | None = None,
        source: str | None = None,
        meta: dict | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.name = name
        self.source = source  # the folder it was loaded from, if any
        self.meta = dict(meta or {})  # dori_model.json of a dori model folder
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _placed(unet, self.device, dtype)
        if self.meta.get("position_encoding") in position.KINDS:
            position.add_position_encoding(self.unet, self.meta["position_encoding"])
        self.text_encoder = _placed(text_encoder, self.device, dtype)
        self.vae = None if vae is None else _placed(vae, self.device, dtype)
        self.tokenizer = tokenizer
        self.token_map = None if token_map is None else token_map.to(self.device)
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._empty: Tensor | None = None
        # Rows per U-Net call on a CPU (see model_output); None: every call whole (GPUs).
        self.max_rows: int | None = CPU_MAX_ROWS if self.device.type == "cpu" else None
        self._whole = 0  # > 0 while a hook must see each call's whole batch (whole_batches)

    # ----------------------------------------------------------------- shape facts
    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def default_guidance(self) -> float:
        """The guidance scale this model samples at unless told otherwise (``dori_model.json``'s
        ``default_guidance``; 7.0, Stable Diffusion's evaluation setting, for other models)."""
        return float(self.meta.get("default_guidance", 7.0))

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def space_to_depth(self) -> int:
        """How many pixels a side each latent position packs (1: none; always 1 with a VAE)."""
        return int(self.meta.get("space_to_depth", 1)) if self.vae is None else 1

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return self.space_to_depth
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(height), int(width))

    @property
    def image_size(self) -> tuple[int, int]:
        _, height, width = self.latent_shape
        return (height * self.vae_scale_factor, width * self.vae_scale_factor)

    @property
    def embedding_shape(self) -> tuple[int, int]:
        return tuple(self.empty_embedding().shape[1:])

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the U-Net's activations block by block in the backward pass instead of
        keeping them (diffusers' ``enable_gradient_checkpointing``, non-reentrant, so gradients
        reach the embedding when the weights are frozen). It acts only where a gradient is taken
        (the attack, locality, fine-tuning): sampling is unchanged. Less memory, one more forward
        per backward; the results are the same up to float rounding."""
        self.unet.enable_gradient_checkpointing()

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.unet, "is_gradient_checkpointing", False))

    @contextmanager
    def fp32_weights(self) -> Iterator[None]:
        """Mixed precision for training the U-Net of a half-precision model (``--dtype float16`` /
        ``bfloat16``): inside, the U-Net's weights are float32 (so are their gradients and the
        optimizer's state) and every forward pass is autocast to the model's dtype; on exit they
        are cast back. Updating half-precision weights directly would lose most of AdamW's small
        steps to rounding. A float32 model, or a nested use, changes nothing."""
        if self.dtype == torch.float32 or next(self.unet.parameters()).dtype == torch.float32:
            yield
            return
        self.unet.float()
        try:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield
        finally:
            cast(self.unet, self.dtype)

    def fingerprint(self) -> str:
        """A short id of the architecture and weights (mask files record it)."""
        digest = hashlib.sha256(self.name.encode())
        for key, tensor in sorted(self.unet.state_dict().items()):
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------- text side
    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """CLIP token ids ``[B, L]``, padded and truncated to the tokenizer's length (77)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return batch.input_ids.to(self.device)

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        """Which prompts are longer than the text encoder's window and lose their end in
        :meth:`tokenize` (SD: 77 tokens, start and end tokens included)."""
        lengths = self.tokenizer(list(prompts), truncation=False, verbose=False).input_ids
        return [len(ids) > self.max_length for ids in lengths]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """The conditioning embedding ``[B, L, D]`` of each prompt (the DoRI attack's variable)."""
        ids = self.tokenize(prompts)
        if self.token_map is not None:
            ids = self.token_map[ids]
        return self.text_encoder(ids)[0].to(self.dtype)

    def empty_embedding(self) -> Tensor:
        """The embedding of the empty prompt, ``[1, L, D]`` (cached)."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    # ----------------------------------------------------------------- noise
    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t.to(self.device).long()]
        return abar.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` per sample."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def model_output(self, x_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """The U-Net's raw output in its own parameterisation (epsilon or v).

        On a CPU a call of more than :attr:`max_rows` rows runs in near-equal chunks of at most
        that many rows: the same numbers, bit for bit (on a CPU the U-Net computes each row of a
        batch of 8 or more rows alone, forward and backward), in less time (:data:`CPU_MAX_ROWS`).
        Calls that train the U-Net's weights (whose gradient sums over the rows), calls whose
        embedding is broadcast over the rows and calls inside :meth:`whole_batches` stay whole."""
        t = t.to(self.device)
        rows = x_t.shape[0]
        if t.dim() == 0:
            t = t.expand(rows)
        if (self.max_rows is None or rows <= self.max_rows or self._whole or emb.shape[0] != rows
                or self._trains_weights()):  # fmt: skip
            return self.unet(x_t, t, encoder_hidden_states=emb).sample
        bounds = torch.linspace(0, rows, -(-rows // self.max_rows) + 1).round().long().tolist()
        return torch.cat([self.unet(x_t[a:b], t[a:b], encoder_hidden_states=emb[a:b]).sample
                          for a, b in zip(bounds, bounds[1:])])  # fmt: skip

    def _trains_weights(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.unet.parameters())

    @contextmanager
    def whole_batches(self) -> Iterator[None]:
        """Every U-Net call runs on its whole batch while inside: for hooks that see a call's
        batch as one (recordings, per-sample masks)."""
        self._whole += 1
        try:
            yield
        finally:
            self._whole -= 1

    def output_to_noise(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a raw model output to epsilon space."""
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            abar = self._abar(t.expand(x_t.shape[0]) if t.dim() == 0 else t, x_t)
            return abar.sqrt() * output + (1 - abar).sqrt() * x_t
        raise DoriError(f"prediction type {self.prediction_type!r} is not supported; use epsilon or v_prediction")

    def predict_noise(self, x_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """The predicted noise ``eps_theta(x_t, t, emb)`` (differentiable in ``emb``)."""
        return self.output_to_noise(self.model_output(x_t, t, emb), x_t, t)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the U-Net is trained to output for ``add_noise(x0, noise, t)``."""
        if self.prediction_type == "epsilon":
            return noise
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def diffusion_loss(self, x0: Tensor, emb: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The model's own training loss per sample, ``[B]`` (mean squared error over the latent)."""
        return self.diffusion_loss_and_drift(x0, emb, noise, t)[0]

    def diffusion_loss_and_drift(self, x0: Tensor, emb: Tensor, noise: Tensor, t: Tensor,
                                 reference: torch.nn.Module | None = None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """:meth:`diffusion_loss` and, from the same forward pass, the squared distance per sample
        between this U-Net's output and ``reference``'s (a frozen U-Net, no gradient) on the same
        noised input: the preservation term of adversarial fine-tuning. ``None`` without one."""
        x_t = self.add_noise(x0, noise, t)
        output = self.model_output(x_t, t, emb)
        loss = _squared_error(output, self.training_target(x0, noise, t))
        if reference is None:
            return loss, None
        with torch.no_grad():
            held = reference(x_t, t.to(self.device).expand(x_t.shape[0]), encoder_hidden_states=emb).sample
        return loss, _squared_error(output, held)

    # ----------------------------------------------------------------- image <-> latent
    def to_latents(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` to the U-Net's space (VAE mean times scaling factor, or ``2x - 1``,
        packed by :attr:`space_to_depth`)."""
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x if self.space_to_depth == 1 else torch.nn.functional.pixel_unshuffle(x, self.space_to_depth)
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def from_latents(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`to_latents`: images in ``[0, 1]`` (float32, CPU)."""
        if self.vae is not None:
            with torch.no_grad():
                latents = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        elif self.space_to_depth > 1:
            latents = torch.nn.functional.pixel_shuffle(latents, self.space_to_depth)
        return ((latents.float() + 1) / 2).clamp(0, 1).cpu()

    # ----------------------------------------------------------------- sampling
    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """One latent of N(0, I) per seed, each from its own CPU generator (batch-independent)."""
        shape = self.latent_shape
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    def ddim_scheduler(self, steps: int) -> DDIMScheduler:
        if not 1 <= steps <= self.num_train_timesteps:
            raise DoriError(f"the sampling steps must be 1..{self.num_train_timesteps} (this model's training "
                            f"timesteps), got {steps}; lower --steps")  # fmt: skip
        scheduler = DDIMScheduler.from_config(self.scheduler_config, clip_sample=False)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def pndm_scheduler(self, steps: int) -> PNDMScheduler:
        """PNDM as Stable Diffusion's pipeline configures it (``skip_prk_steps=True``) on this model's schedule."""
        self.ddim_scheduler(steps)  # the same check of ``steps``
        scheduler = PNDMScheduler.from_config(self.scheduler_config, skip_prk_steps=True)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def generate(
        self,
        emb: Tensor,
        seeds: Sequence[int],
        *,
        steps: int = 50,
        guidance: float | None = None,
        batch_size: int = 64,
        callback: Callable[[StepInfo], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """DDIM sampling with classifier-free guidance for every embedding and every seed.

        Returns ``[B * len(seeds), 3, H, W]`` images in ``[0, 1]``, prompt-major (all seeds of
        prompt 0 first). Each image's starting noise comes from its own seed, so one batch gives the
        same images as one-by-one calls. ``guidance <= 1`` samples from the conditional model only; ``None`` uses
        :attr:`default_guidance`.
        ``progress`` is called with the number of images finished after each chunk.
        """
        images = []
        for _, chunk in self.generate_chunks(emb, seeds, steps=steps, guidance=guidance, batch_size=batch_size,
                                             callback=callback):  # fmt: skip
            images.append(chunk)
            if progress is not None:
                progress(chunk.shape[0])
        return torch.cat(images)

    @torch.no_grad()
    def generate_chunks(
        self,
        emb: Tensor,
        seeds: Sequence[int],
        *,
        steps: int = 50,
        guidance: float | None = None,
        batch_size: int = 64,
        callback: Callable[[StepInfo], None] | None = None,
    ) -> Iterator[tuple[slice, Tensor]]:
        """:meth:`generate` one batch at a time: yields ``(rows, images)``, ``rows`` indexing the
        prompt-major order of :meth:`generate`. Memory stays at one batch however many images are
        asked for (``dori generate`` writes each batch to disk as it comes)."""
        if steps < 1:
            raise DoriError(f"steps must be at least 1, got {steps}")
        if len(seeds) == 0:
            raise DoriError("no seeds given: pass at least one seed")
        guidance = self.default_guidance if guidance is None else guidance
        emb = emb.to(self.device, self.dtype)
        n_seeds, total = len(seeds), emb.shape[0] * len(seeds)
        for start in range(0, total, batch_size):
            rows = slice(start, min(start + batch_size, total))
            index = torch.arange(rows.start, rows.stop)
            noise = self.initial_noise([seeds[i] for i in (index % n_seeds).tolist()])
            latents = self._sample(emb[index // n_seeds], noise, steps, guidance, rows, callback)
            yield rows, self.from_latents(latents)

    def guided_outputs(self, latents: Tensor, t: Tensor, emb: Tensor, guidance: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """One denoising call with classifier-free guidance: (guided, conditional, unconditional)
        raw outputs; the unconditional one is ``None`` when ``guidance <= 1``."""
        if guidance <= 1.0:
            out = self.model_output(latents, t, emb)
            return out, out, None
        empty = self.empty_embedding().expand_as(emb)
        t_batch = t.expand(latents.shape[0]) if t.dim() == 0 else t
        out = self.model_output(torch.cat([latents, latents]), torch.cat([t_batch, t_batch]), torch.cat([empty, emb]))
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond), out_cond, out_uncond

    def step_info(self, index: int, t: Tensor, rows: slice, latents: Tensor, out_cond: Tensor,
                  out_uncond: Tensor | None) -> StepInfo:  # fmt: skip
        t_batch = t.expand(latents.shape[0])
        return StepInfo(
            index=index,
            timestep=int(t),
            rows=rows,
            latents=latents,
            noise_cond=self.output_to_noise(out_cond, latents, t_batch),
            noise_uncond=None if out_uncond is None else self.output_to_noise(out_uncond, latents, t_batch),
        )

    def _sample(self, emb, latents, steps, guidance, rows, callback) -> Tensor:
        return self.sample_latents(emb, latents, steps=steps, guidance=guidance, rows=rows, callback=callback)

    def sample_latents(
        self,
        emb: Tensor,
        latents: Tensor,
        *,
        steps: int,
        guidance: float | None,
        rows: slice | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        stop_after: int | None = None,
        scheduler: str = "ddim",
    ) -> Tensor:
        """The DDIM loop on one batch of starting latents; ``stop_after`` ends it after that many
        U-Net calls (the stages that record only the first denoising steps use it). ``scheduler="pndm"``
        samples with PNDM as diffusers' Stable Diffusion pipeline does by default (PLMS, no Runge-Kutta
        warm-up: ``steps + 1`` calls), for the Wanda recording that follows ConceptPrune's code."""
        scheduler = self.ddim_scheduler(steps) if scheduler == "ddim" else self.pndm_scheduler(steps)
        guidance = self.default_guidance if guidance is None else guidance
        rows = slice(0, latents.shape[0]) if rows is None else rows
        for index, t in enumerate(scheduler.timesteps[:stop_after]):
            output, out_cond, out_uncond = self.guided_outputs(latents, t, emb, guidance)
            if callback is not None:
                callback(self.step_info(index, t, rows, latents, out_cond, out_uncond))
            latents = scheduler.step(output, t, latents).prev_sample
        return latents

    # ----------------------------------------------------------------- named sites
    def module(self, name: str) -> nn.Module:
        """The U-Net submodule called ``name``; an unknown name is a clear error."""
        modules = dict(self.unet.named_modules())
        if name not in modules:
            known = ", ".join(site.name for site in self.value_sites() + self.ffn_sites())
            raise DoriError(f"the U-Net has no module named {name!r}; known sites: {known}")
        return modules[name]

    def _sites(self, suffix: str, prefixes: tuple[str, ...]) -> list[Site]:
        found = [
            Site(name, module, int(module.out_features))
            for name, module in self.unet.named_modules()
            if name.endswith(suffix) and name.startswith(prefixes) and isinstance(module, nn.Linear)
        ]
        return sorted(found, key=lambda site: _unet_position(site.name))

    def value_sites(self, blocks: tuple[str, ...] = ("down_blocks.", "mid_block.")) -> list[Site]:
        """Cross-attention value projections (``attn2.to_v``) of ``blocks``: by default the down and mid
        blocks (NeMo's sites)."""
        return self._sites("attn2.to_v", blocks)

    def ffn_sites(self) -> list[Site]:
        """The second feed-forward linear (``ff.net.2``) of every transformer block (Wanda's sites)."""
        return self._sites("ff.net.2", ("down_blocks.", "mid_block.", "up_blocks."))

    def sites(self, names: Sequence[str]) -> list[Site]:
        """Sites by name, in the given order (an unknown name is a clear error)."""
        out = []
        for name in names:
            module = self.module(name)
            if not isinstance(module, nn.Linear):
                raise DoriError(f"module {name!r} is a {type(module).__name__}, not a linear layer; pick a linear site")
            out.append(Site(name, module, int(module.out_features)))
        return out


def _squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample over the latent, ``[B]``, in float32."""
    return (a - b).float().pow(2).flatten(1).mean(1)
