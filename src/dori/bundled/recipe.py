"""The recipe of the bundled model (``dori toy train``): its settings and the model they build.

Stable Diffusion's own parts at toy size: a diffusers ``UNet2DConditionModel`` in pixel space
(32x32 RGB; a plain block at 32x32, cross-attention blocks at 16x16 and 8x8 and in the mid block,
plain blocks on the way up, so the text reaches the image only through the down and mid blocks'
cross-attention: the sites NeMo searches),
a 2-layer ``CLIPTextModel`` that the fifth recipe never trains (frozen at its seeded random
initialisation; the fourth trained it jointly), fed by SD v1.x's CLIP tokenizer through
a compact id map (only the ids the captions use get a row), a DDPM cosine schedule with
v-prediction (epsilon prediction did not learn global colour in short CPU runs: see
BUNDLED_MODEL_NOTES), DDIM for sampling.

The data has many ordinary images (each seen a few times in training, as on the web) and a few
planted images repeated hundreds of times: only the planted ones are memorized. An earlier model
with cross-attention on the way up and 2,000 ordinary images (each seen about 40 times) carried
its memorized titles through the up blocks, which NeMo never searches, and a 50-step DoRI attack
reproduced its ordinary training images too (MR 0.45): see docs/BUNDLED_MODEL.md.

The fifth recipe differs from the fourth, the shipped model's, in two settings: the
text encoder is not trained (``text_lr_scale=0``), and training takes 5,000 steps instead of 6,000
so that it fits in an hour on 2 cores. Trained jointly, the two-layer encoder learnt each of the 112
training captions as a whole, and on every other seed measured the U-Net then could not read a
held-out combination's position; a frozen random encoder keeps every word's own embedding. The same
search added two options that did not help and stay off: ordinary images shown under partial captions
("a red circle", "a shape, top left"), and the position encoding at every cross-attention block
(docs/BUNDLED_MODEL.md has the measurements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dori.errors import DoriError
from dori.models import position
from dori.models.base import DiffusionModel
from dori.models.loading import clip_tokenizer
from dori.toy.data import TITLES_TM, TITLES_VM, ToyDataset, all_combinations, partial_captions

UNET_LAYOUTS = ("fifth", "sd")


@dataclass(frozen=True)
class ToyTrainConfig:
    """Hyperparameters of the recipe (defaults: the fifth recipe; the shipped model was trained by
    the fourth, ``--recipe fourth``: these defaults with ``steps=6000, text_lr_scale=1.0``). Partial captions
    and the encoding at every cross-attention block are options measured on seed 1 while the fifth
    recipe was sought, and found no fix (docs/BUNDLED_MODEL.md)."""

    seed: int = 0
    steps: int = 5000  # fits in an hour on 2 cores (the fourth recipe: 6,000)
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    empty_caption_prob: float = 0.1
    # Share of ordinary training images shown under a partial caption (dori.toy.data.PARTIAL_FORMS,
    # one form drawn uniformly), so that each attribute word must work on its own.
    partial_caption_prob: float = 0.0  # 0.3 was tried: seed 1 then learnt no position (see docs)
    grad_clip: float = 1.0
    n_ordinary: int = 30000
    n_verbatim: int = len(TITLES_VM)
    n_template: int = len(TITLES_TM)
    copies: int = 1000
    channels: tuple[int, int, int] = (32, 64, 64)
    # "fifth": a plain block at the top resolution, cross-attention at the two lower ones and in the mid block, plain
    # blocks on the way up. "sd" (the SD-layout candidates): cross-attention blocks at every resolution, down, mid and
    # up, as in SD's CrossAttnDownBlock2D / CrossAttnUpBlock2D (GEGLU feed-forward, 4x inner width).
    unet_layout: str = "fifth"
    layers_per_block: int = 1
    attention_heads: int = 4
    # Pixels packed f x f into channels before the U-Net (dori.models.base: "space_to_depth"): 2 makes the
    # 32x32x3 image a 16x16x12 latent, a lossless stand-in for SD's VAE that keeps attention at the top
    # resolution affordable on a CPU.
    space_to_depth: int = 1
    text_width: int = 128
    text_layers: int = 2
    position_encoding: bool = True  # fixed sinusoidal map added after conv_in (dori.models.position)
    # ... and to the input of every cross-attention block (position.KIND_ATTENTION)
    position_at_attention: bool = False  # tried True with 0.3 partial captions: alignment 0.275
    # The text encoder's learning rate as a share of the U-Net's; 0 (the fifth recipe) keeps it frozen
    # at its seeded initialisation, so every word keeps its own embedding (the fourth: 1.0).
    text_lr_scale: float = 0.0
    ordinary_style: str = "field"  # how ordinary images are rendered (dori.toy.data.render_ordinary)
    # Train the U-Net in channels-last memory format: about 5% faster on a CPU, but it sums in another
    # order, so the same seed gives other weights. The fourth recipe's weights were trained without it.
    channels_last: bool = True
    classifier_steps: int = 800
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "copies", "checkpoint_every", "text_width", "text_layers", "layers_per_block",
                     "attention_heads", "space_to_depth"):
            if getattr(self, name) < 1:
                raise DoriError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.unet_layout not in UNET_LAYOUTS:
            raise DoriError(f"unet_layout must be one of {', '.join(UNET_LAYOUTS)}, got {self.unet_layout!r}")
        if 32 % self.space_to_depth:
            raise DoriError(f"space_to_depth must divide the image side (32), got {self.space_to_depth}")
        if self.text_lr_scale < 0:
            raise DoriError(f"text_lr_scale must be at least 0, got {self.text_lr_scale}")
        for name in ("empty_caption_prob", "partial_caption_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise DoriError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def data_kwargs(self) -> dict:
        return {
            "seed": self.seed,
            "n_ordinary": self.n_ordinary,
            "n_verbatim": self.n_verbatim,
            "n_template": self.n_template,
            "copies": self.copies,
            "ordinary_style": self.ordinary_style,
        }


# The named recipes, as overrides of ToyTrainConfig's defaults (the fifth's): ``dori toy train --recipe``.
RECIPES = {"fifth": {}, "fourth": {"steps": 6000, "text_lr_scale": 1.0, "channels_last": False}}
# What a training record written before a parameter existed implies for it: the code then, as a value
# or as a rule on the rest of the record. A parameter not listed here took, before it existed, the value
# that is now its default.
BEFORE_PARAMETER = {
    "text_lr_scale": 1.0,  # the text encoder was trained jointly until the fifth recipe
    # Channels-last training came with partial captions: a record that has those was trained channels-last.
    "channels_last": lambda record: "partial_caption_prob" in record,
}


def recorded_config(record: dict) -> ToyTrainConfig:
    """The recipe a training record (``train_config.json``) describes, with every parameter it lacks
    at :data:`BEFORE_PARAMETER`'s value (or its rule's, on the record) or else the default; entries that
    are not parameters (time, classifier accuracy) are ignored."""
    names = {item.name for item in fields(ToyTrainConfig)}
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in record.items() if name in names}
    before = {k: v(record) if callable(v) else v for k, v in BEFORE_PARAMETER.items() if k not in values}
    return ToyTrainConfig(**{**before, **values})


def recipe_of(config: ToyTrainConfig) -> str | None:
    """The named recipe ``config`` is at its seed, or None."""
    return next((name for name, changes in RECIPES.items() if replace(ToyTrainConfig(seed=config.seed), **changes) == config),
                None)  # fmt: skip


def recipe_command(config: ToyTrainConfig) -> str | None:
    """The command that trains ``config``, or None for a recipe that no named one is."""
    name = recipe_of(config)
    if name is None:
        return None
    return "dori toy train" + ("" if name == "fifth" else f" --recipe {name}") + f" --seed {config.seed} --out DIR"


def scheduler_config() -> dict:
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }


def build_unet(config: ToyTrainConfig) -> UNet2DConditionModel:
    levels = len(config.channels)
    if config.unet_layout == "sd":
        down, up = ("CrossAttnDownBlock2D",) * levels, ("CrossAttnUpBlock2D",) * levels
    else:
        down, up = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1), ("UpBlock2D",) * levels
    f = config.space_to_depth
    return UNet2DConditionModel(
        sample_size=32 // f,
        in_channels=3 * f * f,
        out_channels=3 * f * f,
        block_out_channels=config.channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,  # diffusers: this sets the number of heads
        norm_num_groups=8,
    )


def build_text_encoder(config: ToyTrainConfig, token_map: torch.Tensor) -> CLIPTextModel:
    bos, eos = (int(token_map[i]) for i in (49406, 49407))  # CLIP's start and end tokens
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=int(token_map.max()) + 1,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
            hidden_size=config.text_width,
            intermediate_size=2 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )


def token_map_for(captions: list[str]) -> torch.Tensor:
    """CLIP id -> compact row (row 0 for ids no caption uses)."""
    tokenizer = clip_tokenizer()
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    used = torch.unique(ids)
    table = torch.zeros(len(tokenizer), dtype=torch.long)
    table[used] = torch.arange(1, len(used) + 1)
    return table


def build_model(config: ToyTrainConfig, data: ToyDataset, device: str | torch.device = "cpu") -> DiffusionModel:
    torch.manual_seed(config.seed)
    captions = sorted(set(data.captions)) + data.held_out_captions
    if config.partial_caption_prob > 0:
        captions += sorted({c for combo in all_combinations() for c in partial_captions(combo)})
    token_map = token_map_for(captions)
    return DiffusionModel(
        name=f"dori-bundled-seed{config.seed}",
        unet=build_unet(config),
        text_encoder=build_text_encoder(config, token_map),
        tokenizer=clip_tokenizer(),
        scheduler_config=scheduler_config(),
        token_map=token_map,
        meta=model_meta(config),
        device=device,
    )


def model_meta(config: ToyTrainConfig) -> dict:
    """What ``dori_model.json`` must say for the U-Net to be run as trained."""
    meta = {}
    if config.position_encoding:
        meta["position_encoding"] = position.KIND_ATTENTION if config.position_at_attention else position.KIND
    if config.space_to_depth > 1:
        meta["space_to_depth"] = config.space_to_depth
    return meta


def learning_rate(config: ToyTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
