"""Load a TorchScript network from a local file and check, at load, that it embeds an image.

SSCD (:mod:`dori.measure.similarity`) and FID's Inception (:mod:`dori.measure.utility`) both come
as TorchScript files the user names. A wrong file (missing, damaged, or a network that does not
map one image to one finite vector) is a one-line error naming the fix, at load, not mid-run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dori.errors import DoriError


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:120]


def load_torchscript(path: str | os.PathLike, *, what: str, fix: str,
                     device: str | torch.device = "cpu") -> torch.jit.ScriptModule:  # fmt: skip
    """``torch.jit.load`` of ``path`` in eval mode, or a :class:`DoriError` ending in ``fix``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DoriError(f"{what} file not found: {path}; {fix}")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as error:  # noqa: BLE001 - torch raises several kinds for a damaged archive
        raise DoriError(f"{path} is not a TorchScript file ({first_line(error)}); {fix}") from error


def check_embeds_an_image(path: str | os.PathLike, embed: Callable[[Tensor], Tensor], *, fix: str) -> None:
    """Run one plain grey image through ``embed``; it must return ``[1, D]`` finite values."""
    try:
        with torch.no_grad():
            out = embed(torch.full((1, 3, 64, 64), 0.5))
    except Exception as error:  # noqa: BLE001 - whatever the scripted code raises
        raise DoriError(f"{path} does not run on an image ({first_line(error)}); {fix}") from error
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DoriError(f"{path} returns {shape} for one image, not [1, D] vectors; {fix}")
    if not bool(torch.isfinite(out).all()):
        raise DoriError(f"{path} returns NaN or infinite values for a plain grey image; {fix}")
