"""A fixed 2-D sinusoidal position encoding added to the U-Net's first feature map.

Only the bundled model uses it (``dori_model.json``: ``"position_encoding": "sinusoidal"``). Its
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

KIND = "sinusoidal"
_MARK = "_dori_position_encoding"
# Written into ``unet/config.json`` of every model folder that uses the encoding. Plain diffusers
# (``UNet2DConditionModel.from_pretrained``) does not know the key and prints it, with this text,
# in its "config attributes ... will be ignored" warning, so nobody gets the other model silently.
CONFIG_KEY = "dori_position_encoding"
NOTICE = ("this U-Net adds a fixed 2-D sinusoidal position encoding to the output of conv_in, which plain diffusers "
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


def add_position_encoding(unet: nn.Module) -> None:
    """Add the encoding to the output of ``unet.conv_in`` (idempotent; copies keep it)."""
    conv_in = unet.conv_in
    if getattr(conv_in, _MARK, False):
        return
    cache: dict[tuple, Tensor] = {}

    def hook(_module: nn.Module, _args, output: Tensor) -> Tensor:
        key = (output.shape[1], output.shape[2], output.shape[3], output.device, output.dtype)
        if key not in cache:
            cache[key] = sinusoidal_2d(*key[:3]).to(output.device, output.dtype)
        return output + cache[key]

    conv_in.register_forward_hook(hook)
    setattr(conv_in, _MARK, True)
