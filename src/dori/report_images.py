"""Image files: PNG grids of generations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def grid(images: Tensor, *, columns: int, pad: int = 2, min_cell: int = 96) -> Image.Image:
    """Tile ``[N, 3, H, W]`` images into rows of ``columns``; small images are upscaled (nearest)."""
    n, _, height, width = images.shape
    scale = max(1, math.ceil(min_cell / max(height, width)))
    rows = math.ceil(n / columns)
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = to_pil(image).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return canvas


def save_grid(images: Tensor, path: str | Path, *, columns: int) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    grid(images, columns=columns).save(tmp, format="PNG")
    tmp.replace(path)
    return path
