"""Copy detectors: how close a generated image is to a training image.

- :class:`SSCD` wraps a published SSCD TorchScript file that the user names (Pizzi et al., CVPR
  2022). Two preprocessing conventions exist in the literature and give different scores:
  ``"resize320"`` (NeMo / the DoRI paper: resize to 320x320, ImageNet mean/std) and ``"center224"``
  (Wen et al.: resize 256, center-crop 224, mean/std 0.5). Replication threshold 0.7.
- :class:`ToyCopyDetector` is the bundled model's analogue. SSCD networks are meaningless at
  32x32, so it is hand-made with SSCD's invariances: blind to colour jitter, gamma, noise, mild
  blur, shifts or crops of a few pixels and resizing by 10%, sensitive to the picture's own structure; each
  image's own noise, estimated from the image (:func:`estimate_noise`), sets how faint a detail
  may be and still count. Its
  threshold is calibrated on the training data (:func:`calibrate_toy_detector`) and checked by a
  benchmark of edited copies and distinct pictures (:mod:`dori.toy.copy_benchmark`).

Also :func:`ms_ssim`, the multi-scale structural similarity of NeMo's noise-pattern check (torchmetrics').
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dori.errors import DoriError
from dori.measure.torchscript import check_embeds_an_image, load_torchscript


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


# The floor under each map's local energy: three standard deviations of the image's own
# band-passed noise, the usual "three sigma" chosen as a rule, not fitted (docs/BUNDLED_MODEL.md
# gives 0 and 5 beside it; the one model it was measured on moves by at most 0.02 between 3 and 5).
NOISE_FLOOR = 3.0


# The scales a generation is compared at: 10% smaller and larger as well as its own. The copy
# benchmark's crop edit already enlarges by up to 32/29 (1.10); SSCD is trained to forgive resizing.
SCALES = (0.9, 1.0, 1.1)


def _rescale(images: Tensor, scale: float) -> Tensor:
    """``images`` ``[N, 3, H, W]`` enlarged (``scale`` > 1, cropped back) or shrunk (edges
    repeated) by ``scale`` about the centre, bilinear."""
    if scale == 1.0:
        return images
    n, c, h, w = images.shape
    theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]], dtype=images.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _opponent(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Luminance (the RGB mean) and the two chroma axes orthogonal to it, each ``[N, H, W]``.
    A hue rotation about the grey axis leaves luminance alone and rotates the chroma plane."""
    r, g, b = images.unbind(-3)
    return (r + g + b) / 3, (r - g) / 2**0.5, (r + g - 2 * b) / 6**0.5


def estimate_noise(channels: Tensor) -> Tensor:
    """``[N]``: the standard deviation of white noise in maps ``[N, H, W]``, by Donoho's rule: the
    median absolute finest-scale diagonal Haar coefficient (2x2 blocks, orthonormal) over 0.6745.
    Edges and smooth shading barely touch the diagonal coefficients, so a clean picture reads near
    0 and a noisy one reads its noise (checked in ``tests/test_copy_detector.py``)."""
    x = channels[..., : channels.shape[-2] // 2 * 2, : channels.shape[-1] // 2 * 2]
    diagonal = (x[..., 0::2, 0::2] - x[..., 1::2, 0::2] - x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 2
    return diagonal.flatten(1).abs().median(1).values / 0.6745


@dataclass(frozen=True)
class ToyCopyDetector:
    """The bundled model's copy detector, built like SSCD to ignore what a copy may change.

    Each image becomes two maps: the band-pass of its luminance (difference of Gaussians at
    ``sigma`` and ``3 * sigma``) divided by its local energy, and the magnitude of the band-passed
    chroma, divided by its local mean. Subtracting local means makes them blind to brightness,
    dividing by local energy to contrast, saturation and gamma, the chroma *magnitude* to hue
    rotation, the band-pass to noise and mild blur. Local energy is floored at ``noise_floor``
    standard deviations of the band-passed noise that :func:`estimate_noise` reads in the image
    itself, so noise in a flat region stays small instead of being raised to the level of the
    picture's edges (a clean image reads almost no noise and is normalised as before; 0 turns the
    floor off, as detectors calibrated before it had). The similarity of a generation ``a`` to a
    training image ``b`` is the highest normalised cross-correlation between ``a``'s central crop,
    at each of ``scales``, and ``b``'s windows shifted by up to ``shift`` pixels each way, so a copy
    moved, cropped or resized by a little still scores near 1. What is left to compare is the picture's own structure: its
    edges, blotches and dots. ``tau`` is calibrated on the training data
    (:func:`calibrate_toy_detector`) and checked by :mod:`dori.toy.copy_benchmark`.
    """

    tau: float
    sigma: float = 1.0
    shift: int = 3
    noise_floor: float = NOISE_FLOOR
    scales: tuple[float, ...] = SCALES
    name: str = "dori-toy-copy"
    convention: str = ("band-pass luminance and chroma energy, local contrast normalised above the image's own "
                       "noise, max over shifts and scales")  # fmt: skip

    def __post_init__(self) -> None:
        if 1.0 not in self.scales:
            raise DoriError(f"the copy detector's scales {self.scales} must include 1.0 (the training image's own)")

    @cached_property
    def _noise_gain(self) -> float:
        """The band-pass's gain on white noise: the noise's standard deviation after band-passing is
        its standard deviation before, times this (computed once per detector)."""
        impulse = torch.zeros(1, 33, 33)  # wider than the blur's taps (radius 4)
        impulse[0, 16, 16] = 1
        return float(self._band(impulse).square().sum().sqrt())

    def _band(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.sigma) - gaussian_blur(x, 3 * self.sigma)

    def embed(self, images: Tensor) -> Tensor:
        """Feature maps ``[N, S, 2, H, W]`` of images ``[N, 3, H, W]`` in [0, 1], one pair of maps
        per scale of :attr:`scales` (the image resampled about its centre)."""
        images = images.float().cpu()
        return torch.stack([self._maps(_rescale(images, scale)) for scale in self.scales], dim=1)

    def _maps(self, images: Tensor) -> Tensor:
        lum, u, v = _opponent(images)
        gain = self._noise_gain
        lum_floor = (self.noise_floor * gain * estimate_noise(lum))[:, None, None]
        # chroma is a magnitude: white noise of deviation s on both axes has mean magnitude s * sqrt(pi / 2)
        chroma_noise = (estimate_noise(u) + estimate_noise(v)) / 2
        chroma_floor = (self.noise_floor * gain * math.sqrt(math.pi / 2) * chroma_noise)[:, None, None]
        detail = self._band(lum)
        detail = detail / (gaussian_blur(detail * detail, 3.0) + 1e-4 + lum_floor**2).sqrt()
        chroma = (self._band(u) ** 2 + self._band(v) ** 2).sqrt()
        chroma = chroma / (gaussian_blur(chroma, 3.0) + 1e-2 + chroma_floor)
        return torch.stack([detail, chroma], dim=1)

    def _window(self, maps: Tensor, dy: int, dx: int) -> Tensor:
        """``[N, 2 * h * w]``: each map's window at offset (dy, dx), zero mean and unit norm per map."""
        h, w = maps.shape[-2] - 2 * self.shift, maps.shape[-1] - 2 * self.shift
        window = maps[..., dy : dy + h, dx : dx + w].flatten(2)
        window = F.normalize(window - window.mean(-1, keepdim=True), dim=-1, eps=1e-6)
        return window.flatten(1) / 2**0.5

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """All pairwise similarities ``[len(a), len(b)]`` of embedded images (1 = identical)."""
        return self._best_over_shifts(a, b, lambda centre, window: centre @ window.T)

    def paired_similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """``[N]``: the similarity of ``a[i]`` to ``b[i]`` only (the diagonal of :meth:`similarity`)."""
        return self._best_over_shifts(a, b, lambda centre, window: (centre * window).sum(1))

    def _best_over_shifts(self, a: Tensor, b: Tensor, correlate) -> Tensor:
        """The best correlation of ``a`` at any of its scales, centrally cropped, with ``b`` at its
        own scale, at any shift."""
        windows = [self._window(b[:, self.scales.index(1.0)], dy, dx)
                   for dy in range(2 * self.shift + 1) for dx in range(2 * self.shift + 1)]  # fmt: skip
        best = None
        for k in range(len(self.scales)):
            centre = self._window(a[:, k], self.shift, self.shift)
            for window in windows:
                value = correlate(centre, window)
                best = value if best is None else torch.maximum(best, value)
        return best

    def to_dict(self) -> dict:
        return {"name": self.name, "tau": self.tau, "sigma": self.sigma, "shift": self.shift,
                "noise_floor": self.noise_floor, "scales": list(self.scales)}  # fmt: skip


def calibrate_toy_detector(
    images: Tensor, *, quantile: float = 0.99, queries: int = 1000, seed: int = 0, chunk: int = 1024,
    sigma: float = 1.0, shift: int = 3, noise_floor: float = NOISE_FLOOR, scales: tuple[float, ...] = SCALES,
) -> tuple[ToyCopyDetector, dict]:
    """Calibrate on distinct training renders: ``tau`` is the ``quantile`` of a render's
    similarity to its nearest *other* render (over the whole set), taken over ``queries`` renders
    drawn with ``seed``. Two different pictures then count as a copy only ``1 - quantile`` of the
    time even when a generation is compared with every training image (SSCD's 0.7 plays the same
    role on real images). The rule is fixed before any generation is scored."""
    n = len(images)
    if n < 2:
        raise DoriError("the copy detector needs at least two training images to calibrate")
    provisional = ToyCopyDetector(tau=1.0, sigma=sigma, shift=shift, noise_floor=noise_floor, scales=scales)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(queries, n)]
    query = provisional.embed(images[picked])
    nearest = torch.full((len(picked),), -float("inf"))
    for start in range(0, n, chunk):
        sims = provisional.similarity(query, provisional.embed(images[start : start + chunk]))
        own = (picked >= start) & (picked < start + chunk)
        sims[own.nonzero()[:, 0], picked[own] - start] = -float("inf")
        nearest = torch.maximum(nearest, sims.max(1).values)
    tau = float(nearest.quantile(quantile))
    stats = {
        "n_images": n,
        "queries": len(picked),
        "quantile": quantile,
        "nearest_other_render": {
            "median": float(nearest.median()),
            "p95": float(nearest.quantile(0.95)),
            "p99": float(nearest.quantile(0.99)),
            "max": float(nearest.max()),
        },
    }
    return ToyCopyDetector(tau=tau, sigma=sigma, shift=shift, noise_floor=noise_floor, scales=scales), stats


SSCD_CONVENTIONS = {
    "resize320": {"resize": 320, "crop": None, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "center224": {"resize": 256, "crop": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


class SSCD:
    """An SSCD TorchScript model from a local path (never downloaded); cosine similarity."""

    name = "sscd"

    def __init__(self, path: str | os.PathLike, *, convention: str = "resize320", tau: float = 0.7,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> None:  # fmt: skip
        if convention not in SSCD_CONVENTIONS:
            raise DoriError(f"unknown SSCD convention {convention!r}; use one of {', '.join(SSCD_CONVENTIONS)}")
        fix = "pass --sscd with the path of sscd_disc_mixup.torchscript.pt"
        self.model = load_torchscript(path, what="SSCD", fix=fix, device=device)
        self.path, self.convention, self.tau = str(Path(path).expanduser()), convention, tau
        self.device, self.batch_size = torch.device(device), batch_size
        # A file that loads but does not embed images (wrong input size, wrong output, NaN) fails here.
        check_embeds_an_image(self.path, lambda x: self.model(self.preprocess(x).to(self.device)), fix=fix)

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


# NeMo's SSIM: torchmetrics' multi-scale SSIM with the reference code's arguments (kernel 11, three
# scales weighted 0.33 each, data range from the inputs, torchmetrics' default "relu" normalisation).
MS_SSIM_KERNEL = 11
MS_SSIM_BETAS = (0.33, 0.33, 0.33)


def ms_ssim_settings(height: int, width: int) -> tuple[int, tuple[float, ...]]:
    """The ``kernel_size`` and scale weights NeMo's multi-scale SSIM passes torchmetrics for
    ``height x width`` maps.

    torchmetrics' Gaussian window comes from sigma 1.5 (11 pixels, reflect-padded by 5) whatever
    ``kernel_size`` says; ``kernel_size`` only feeds its size check. The rule, fixed for every
    model: the reference's three scales wherever the coarsest scale keeps more than 5 pixels (SD's
    64x64 latents, the bundled model's 32x32 images), else as many as do; ``kernel_size`` 11 where
    the check admits it, else the largest odd value it admits (the window stays the same)."""
    side = min(height, width)
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        if side >> (scales - 1) <= 5:
            continue
        divisor = max(1, scales - 1) ** 2
        for kernel in range(MS_SSIM_KERNEL, 0, -2):
            if side >= 2**scales and side // divisor > kernel - 1:
                return kernel, MS_SSIM_BETAS[:scales]
    raise DoriError(f"maps of {height}x{width} are too small for NeMo's multi-scale SSIM (at least 6x6 needed)")


def ms_ssim(a: Tensor, b: Tensor) -> Tensor:
    """NeMo's multi-scale SSIM per pair of maps ``[N, C, H, W]`` -> ``[N]`` (torchmetrics)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    kernel, betas = ms_ssim_settings(*a.shape[-2:])
    return multiscale_structural_similarity_index_measure(a.float(), b.float(), reduction="none",
                                                          kernel_size=kernel, betas=betas)  # fmt: skip
