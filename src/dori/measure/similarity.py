"""Copy detectors: how close a generated image is to a training image.

- :class:`SSCD` wraps a published SSCD TorchScript file that the user names (Pizzi et al., CVPR
  2022). Two preprocessing conventions exist in the literature and give different scores:
  ``"resize320"`` (NeMo / the DoRI paper: resize to 320x320, ImageNet mean/std) and ``"center224"``
  (Wen et al.: resize 256, center-crop 224, mean/std 0.5). Replication threshold 0.7.
- :class:`ToyCopyDetector` is the bundled model's analogue. SSCD-style networks are meaningless at
  32x32, so it compares images directly: the similarity is the smaller of (a) the normalised
  cross-correlation of high-pass details (edges, textures, the distractor dot) and (b) the pixel
  closeness ``1 - RMSE / scale``, where ``scale`` is the mean RMSE between two unrelated training
  images. A copy must match both the details and the colours; two renders of the same caption
  rarely do. ``tau`` is calibrated on the training data (:func:`calibrate_toy_detector`).

Also :func:`ssim`, the structural similarity used by NeMo's noise-pattern consistency check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dori.errors import DoriError


def gaussian_blur(images: Tensor, sigma: float, radius: int = 4) -> Tensor:
    """Separable Gaussian blur with replicate padding, ``[..., H, W]``.

    Written as two small matrix products (rows, then columns), each matrix holding the kernel
    with its taps clamped at the border: the same numbers as padding and convolving, about 40x
    faster on CPU for batches of small images."""
    offsets = torch.arange(-radius, radius + 1, device=images.device)
    kernel = torch.exp(-(offsets.to(images.dtype) ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    def along(size: int) -> Tensor:
        index = torch.arange(size, device=images.device)
        matrix = torch.zeros(size, size, dtype=images.dtype, device=images.device)
        matrix.index_put_((index[:, None].expand(-1, len(offsets)), (index[:, None] + offsets).clamp(0, size - 1)),
                          kernel.expand(size, -1), accumulate=True)  # fmt: skip
        return matrix

    return along(images.shape[-2]) @ images @ along(images.shape[-1]).T


@dataclass(frozen=True)
class ToyFeatures:
    details: Tensor  # [N, P] unit-norm, zero-mean high-pass residual
    pixels: Tensor  # [N, P] raw pixels

    def __getitem__(self, index) -> ToyFeatures:
        return ToyFeatures(self.details[index], self.pixels[index])

    def __len__(self) -> int:
        return len(self.details)


@dataclass(frozen=True)
class ToyCopyDetector:
    """The bundled model's copy detector (see the module docstring)."""

    scale: float
    tau: float
    sigma: float = 1.5
    name: str = "dori-toy-copy"
    convention: str = "min(highpass-ncc, 1-rmse/scale)"

    def embed(self, images: Tensor) -> ToyFeatures:
        images = images.float().cpu()
        details = (images - gaussian_blur(images, self.sigma)).flatten(1)
        details = F.normalize(details - details.mean(1, keepdim=True), dim=1)
        return ToyFeatures(details, images.flatten(1))

    def similarity(self, a: ToyFeatures, b: ToyFeatures) -> Tensor:
        """All pairwise similarities ``[len(a), len(b)]`` (1 = identical)."""
        correlation = a.details @ b.details.T
        rmse = torch.cdist(a.pixels, b.pixels) / a.pixels.shape[1] ** 0.5
        return torch.minimum(correlation, 1 - rmse / self.scale)

    def to_dict(self) -> dict:
        return {"name": self.name, "scale": self.scale, "tau": self.tau, "sigma": self.sigma}


def calibrate_toy_detector(
    images: Tensor, *, quantile: float = 0.99, sigma: float = 1.5, chunk: int = 2048
) -> tuple[ToyCopyDetector, dict]:
    """Calibrate on distinct training renders: ``tau`` is the ``quantile`` of each render's
    similarity to its nearest *other* render, so two different renders count as a copy only
    ``1 - quantile`` of the time (SSCD's 0.7 plays the same role on real images).

    Works through ``chunk`` rows at a time, so tens of thousands of renders fit in memory."""
    flat = images.float().flatten(1)
    n = len(flat)
    if n < 2:
        raise DoriError("the copy detector needs at least two training images to calibrate")
    total = 0.0
    for start in range(0, n, chunk):
        distances = torch.cdist(flat[start : start + chunk], flat) / flat.shape[1] ** 0.5
        distances[_diagonal(len(distances), start)] = 0.0
        total += float(distances.sum(dtype=torch.float64))
    scale = total / (n * (n - 1))
    provisional = ToyCopyDetector(scale=scale, tau=1.0, sigma=sigma)
    feats = provisional.embed(images)
    nearest = []
    for start in range(0, n, chunk):
        sims = provisional.similarity(feats[start : start + chunk], feats)
        sims[_diagonal(len(sims), start)] = -float("inf")
        nearest.append(sims.max(1).values)
    nearest = torch.cat(nearest)
    tau = float(nearest.quantile(quantile))
    stats = {
        "n_images": n,
        "scale_mean_rmse": scale,
        "quantile": quantile,
        "nearest_other_render": {
            "median": float(nearest.median()),
            "p95": float(nearest.quantile(0.95)),
            "p99": float(nearest.quantile(0.99)),
            "max": float(nearest.max()),
        },
    }
    return ToyCopyDetector(scale=scale, tau=tau, sigma=sigma), stats


def _diagonal(rows: int, start: int) -> tuple[Tensor, Tensor]:
    """Index of each row's own column in a ``[rows, N]`` block that starts at row ``start``."""
    index = torch.arange(rows)
    return index, index + start


SSCD_CONVENTIONS = {
    "resize320": {"resize": 320, "crop": None, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "center224": {"resize": 256, "crop": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


class SSCD:
    """An SSCD TorchScript model from a local path (never downloaded); cosine similarity."""

    name = "sscd"

    def __init__(self, path: str | os.PathLike, *, convention: str = "resize320", tau: float = 0.7,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> None:  # fmt: skip
        path = Path(path).expanduser()
        if convention not in SSCD_CONVENTIONS:
            raise DoriError(f"unknown SSCD convention {convention!r}; use one of {', '.join(SSCD_CONVENTIONS)}")
        if not path.is_file():
            raise DoriError(f"SSCD file not found: {path}; pass --sscd with the path of sscd_disc_mixup.torchscript.pt")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as error:
            raise DoriError(f"{path} is not a TorchScript file: {str(error).splitlines()[0]}") from error
        self.path, self.convention, self.tau = str(path), convention, tau
        self.device, self.batch_size = torch.device(device), batch_size

    def preprocess(self, images: Tensor) -> Tensor:
        spec = SSCD_CONVENTIONS[self.convention]
        images = images.float()
        if spec["crop"] is None:
            images = F.interpolate(images, size=(spec["resize"], spec["resize"]), mode="bilinear", antialias=True)
        else:
            height, width = images.shape[-2:]
            short = min(height, width)
            size = (round(height * spec["resize"] / short), round(width * spec["resize"] / short))
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
            top, left = (size[0] - spec["crop"]) // 2, (size[1] - spec["crop"]) // 2
            images = images[..., top : top + spec["crop"], left : left + spec["crop"]]
        mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        out = [
            F.normalize(self.model(self.preprocess(chunk).to(self.device)).float().cpu(), dim=1)
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(out)

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b.T

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "convention": self.convention, "tau": self.tau}


def ssim(a: Tensor, b: Tensor, *, sigma: float = 1.5, radius: int = 5, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity (Wang et al. 2004, Gaussian window) per pair, ``[N]``."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = gaussian_blur(a, sigma, radius), gaussian_blur(b, sigma, radius)
    var_a = gaussian_blur(a * a, sigma, radius) - mu_a**2
    var_b = gaussian_blur(b * b, sigma, radius) - mu_b**2
    cov = gaussian_blur(a * b, sigma, radius) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)
