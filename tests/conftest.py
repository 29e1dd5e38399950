"""Shared fixtures: tiny random Stable-Diffusion-shaped folders built from config, offline."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

import pytest
import torch
from PIL import Image


# NeMo's statistics cache must not touch the user's home during tests.
os.environ.setdefault("DORI_CACHE", tempfile.mkdtemp(prefix="dori-cache-"))


def save_tiny_sd(folder, *, v2: bool = False, prediction_type: str = "epsilon"):
    """Build tiny SD-shaped components from config and ``save_pretrained`` them (the diffusers
    StableDiffusionPipeline layout), so tests load them exactly as a user's SD folder loads."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dori.models.loading import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4) if v2 else 2,
        use_linear_projection=v2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77)  # fmt: skip
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
    )  # fmt: skip
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), v2=True, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    from dori.models import load_model

    return load_model(tiny_sd_dir)


class _Embedder(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "tiny_sscd.pt"
    torch.jit.script(_Embedder()).save(str(path))
    return path


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = [";Caption;URL;type;Index"]
    for i, text in enumerate(["a red barn", "a blue boat", "a green tree", "an old clock"]):
        lines.append(f"{i};{text};;VM;{1000 + i}")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{1000 + i}.png")
    (folder / "mem.csv").write_text("\n".join(lines) + "\n")
    (folder / "non.txt").write_text("a cat\na dog\na bird\n")
    return folder
