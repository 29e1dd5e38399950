"""A fixed 2-D sinusoidal position encoding added to the U-Net's first feature map and, as an option
of the recipe (off by default), to the input of every cross-attention block.

Only the bundled model uses it (``dori_model.json``: ``"position_encoding": "sinusoidal"`` or
``"sinusoidal+attention"``). Its
text reaches the image only through the cross-attention of the down and mid blocks, where a
small convolutional network cannot yet tell which quadrant a pixel lies in, so without it the
model learnt colour and shape from its captions but placed the shape at random (see
docs/BUNDLED_MODEL.md). The encoding has no weights: it is recomputed from the feature map's
size, so model folders stay plain diffusers folders plus one flag.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

KIND = "sinusoidal"  # added to the first feature map only (the fourth bundled model)
# Also added to the input of every cross-attention block (an option of the recipe, off by default), where the text
# meets the image: its queries then know where they are, so "top left" can be routed to a quadrant directly.
KIND_ATTENTION = "sinusoidal+attention"
KINDS = (KIND, KIND_ATTENTION)
_MARK = "_dori_position_encoding"
# Written into ``unet/config.json`` of every model folder that uses the encoding. Plain diffusers
# (``UNet2DConditionModel.from_pretrained``) does not know the key and prints it, with this text,
# in its "config attributes ... will be ignored" warning, so nobody gets the other model silently.
CONFIG_KEY = "dori_position_encoding"
NOTICE = ("this U-Net adds a fixed 2-D sinusoidal position encoding to the output of conv_in (and to the input of "
          "each cross-attention block where dori_model.json says 'sinusoidal+attention'), which plain diffusers "
          "does not: its images are wrong without it; load the folder with dori.models.load_model")  # fmt: skip


def mark_config(unet_folder) -> None:
    """Add :data:`CONFIG_KEY` to a saved U-Net's ``config.json`` (see there)."""
    import json
    from pathlib import Path

    file = Path(unet_folder) / "config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    config[CONFIG_KEY] = NOTICE
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sinusoidal_2d(channels: int, height: int, width: int) -> Tensor:
    """``[1, channels, height, width]``: half the channels encode the row, half the column, each
    as sin/cos pairs at periods of 2, 4, 8, ... times the side (the slowest is monotonic across
    the image, so it tells left from right and top from bottom)."""
    if channels % 4:
        raise ValueError(f"position encoding needs a multiple of 4 channels, got {channels}")
    per_axis = channels // 2
    k = torch.arange(per_axis // 2, dtype=torch.float64)

    def axis(n: int) -> Tensor:
        pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # pixel centres in (0, 1)
        angle = math.pi * pos[:, None] * (2.0**k)[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # [n, per_axis]

    rows = axis(height).T[:, :, None].expand(per_axis, height, width)
    cols = axis(width).T[:, None, :].expand(per_axis, height, width)
    return torch.cat([rows, cols], dim=0)[None].float()


_CACHE: dict[tuple, Tensor] = {}


def _encoding_like(x: Tensor) -> Tensor:
    key = (x.shape[1], x.shape[2], x.shape[3], x.device, x.dtype)
    if key not in _CACHE:
        _CACHE[key] = sinusoidal_2d(*key[:3]).to(x.device, x.dtype)
    return _CACHE[key]


def _conv_in_hook(_module: nn.Module, _args, output: Tensor) -> Tensor:
    return output + _encoding_like(output)


def _attention_hook(_module: nn.Module, args: tuple, kwargs: dict):
    if args:
        return (args[0] + _encoding_like(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + _encoding_like(kwargs["hidden_states"])}


def add_position_encoding(unet: nn.Module, kind: str = KIND) -> None:
    """Add the encoding to the output of ``unet.conv_in`` and, for :data:`KIND_ATTENTION`, to the
    input of every cross-attention transformer as well (idempotent; copies keep it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown position encoding {kind!r}; use one of {KINDS}")
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if not getattr(unet.conv_in, _MARK, False):
        unet.conv_in.register_forward_hook(_conv_in_hook)
        setattr(unet.conv_in, _MARK, True)
    if kind == KIND_ATTENTION:
        for module in unet.modules():
            if isinstance(module, Transformer2DModel) and not getattr(module, _MARK, False):
                module.register_forward_pre_hook(_attention_hook, with_kwargs=True)
                setattr(module, _MARK, True)
