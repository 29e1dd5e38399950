"""Image files: PNG grids of generations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from dori.runs import atomic_path


def to_pil(image: Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


PAD = 2
MIN_CELL = 96


def cell_size(height: int, width: int) -> tuple[int, int]:
    """The size of one tile in a grid of ``height x width`` images (small images are upscaled)."""
    scale = max(1, math.ceil(MIN_CELL / max(height, width)))
    return height * scale, width * scale


def cell_box(row: int, column: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of one tile in a grid made by :func:`grid`."""
    cell_h, cell_w = cell_size(height, width)
    left, top = PAD + column * (cell_w + PAD), PAD + row * (cell_h + PAD)
    return left, top, left + cell_w, top + cell_h


def grid(images: Tensor, *, columns: int) -> Image.Image:
    """Tile ``[N, 3, H, W]`` images into rows of ``columns``; small images are upscaled (nearest)."""
    n, _, height, width = images.shape
    rows = math.ceil(n / columns)
    cell_h, cell_w = cell_size(height, width)
    canvas = Image.new("RGB", (columns * (cell_w + PAD) + PAD, rows * (cell_h + PAD) + PAD), (255, 255, 255))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas.paste(to_pil(image).resize((cell_w, cell_h), Image.NEAREST), cell_box(r, c, height, width)[:2])
    return canvas


def grid_cell(path: str | Path, row: int, column: int, height: int, width: int) -> Image.Image | None:
    """One tile cut back out of a saved grid (``None`` if the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return image.crop(cell_box(row, column, height, width)).copy()


def save_grid(images: Tensor, path: str | Path, *, columns: int) -> Path:
    with atomic_path(path) as tmp:
        grid(images, columns=columns).save(tmp, format="PNG")
    return Path(path)


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and a rename, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
