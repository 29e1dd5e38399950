"""Utility measures: prompt alignment and Frechet distance in a feature space, and for real models
the CLIP score and FID, each from a network the user names by its local path (never downloaded).

- :class:`ClipScorer`: the CLIP score of Hessel et al. (2021) as torchmetrics computes it,
  ``100 * max(cos(image, caption), 0)`` per image, with a transformers ``CLIPModel`` folder (NeMo
  reports it with ViT-B/32).
- :class:`InceptionFeatures`: FID's features from a TorchScript Inception network, the
  ``pt_inception-2015-12-05`` file that StyleGAN3 and clean-fid use (2048-d pool features of
  images resized to 299 x 299 with values 0..255). FID is :func:`frechet_distance` between the
  generations' features and real images' (a folder, or their ``mu`` / ``sigma`` in an ``.npz``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor

from dori.errors import DoriError
from dori.measure.torchscript import check_embeds_an_image, first_line, load_torchscript


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` (as FID does).
    With fewer samples than features the covariances are singular (as for FID on small sets);
    the square root still exists, so scipy's warning about it is silenced."""
    return frechet_from_statistics(*gaussian(features_a), *gaussian(features_b))


def gaussian(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features ``[N, F]`` (float64)."""
    a = features.double().cpu().numpy()
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def frechet_from_statistics(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Frechet distance between two Gaussians given by mean and covariance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        eye = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))



class ClipScorer:
    """The CLIP score with a local CLIP folder (``CLIPModel`` weights, its processor and tokenizer,
    as ``save_pretrained`` writes them; for example openai/clip-vit-base-patch32)."""

    def __init__(self, folder: str | os.PathLike, *, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = Path(folder).expanduser()
        fix = "pass --clip with a CLIP folder saved by transformers (for example openai/clip-vit-base-patch32)"
        if not path.is_dir():
            raise DoriError(f"CLIP folder not found: {path}; {fix}")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a wrong folder
            raise DoriError(f"{path} is not a usable CLIP folder ({first_line(error)}); {fix}") from error
        self.path, self.device, self.batch_size = str(path), torch.device(device), batch_size

    @torch.no_grad()
    def scores(self, images: Tensor, captions: list[str]) -> list[float]:
        """One score per image ``[N, 3, H, W]`` in ``[0, 1]`` against its caption."""
        if len(captions) != images.shape[0]:
            raise DoriError(f"{images.shape[0]} images but {len(captions)} captions")
        out: list[float] = []
        for start in range(0, len(captions), self.batch_size):
            batch = images[start : start + self.batch_size].float().clamp(0, 1)
            inputs = self.processor(text=captions[start : start + self.batch_size], images=list(batch),
                                    do_rescale=False, return_tensors="pt", padding=True, truncation=True)  # fmt: skip
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            image, text = (getattr(x, "pooler_output", x) for x in (image, text))  # a tensor or an output object
            cosine = F.cosine_similarity(image.float(), text.float(), dim=-1)
            out.extend((100 * cosine.clamp_min(0)).tolist())
        return out


class InceptionFeatures:
    """FID's Inception features from a local TorchScript file (see the module docstring)."""

    SIZE = 299

    def __init__(self, file: str | os.PathLike, *, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        fix = "pass --inception with the TorchScript Inception file pt_inception-2015-12-05-6726825d.pt"
        self.model = load_torchscript(file, what="Inception", fix=fix, device=device)
        self.path, self.device, self.batch_size = str(Path(file).expanduser()), torch.device(device), batch_size
        check_embeds_an_image(self.path, self, fix=fix)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Features ``[N, D]`` of images ``[N, 3, H, W]`` in ``[0, 1]``."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = F.interpolate(images[start : start + self.batch_size].float(), size=(self.SIZE, self.SIZE),
                              mode="bilinear", antialias=True).clamp(0, 1) * 255  # fmt: skip
            x = x.to(self.device)
            try:  # the StyleGAN3 / clean-fid file returns its pool features when asked
                features = self.model(x, return_features=True)
            except (RuntimeError, TypeError):
                features = self.model(x)
            out.append(features.float().flatten(1).cpu())
        return torch.cat(out)


def reference_statistics(reference: str | os.PathLike, features: InceptionFeatures,
                         load_image) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """FID's real-image side: ``(mu, sigma, count)`` from an ``.npz`` holding ``mu`` and ``sigma``
    (the pytorch-fid / clean-fid format) or from every image in a folder (COCO 2014 val, say)."""
    path = Path(reference).expanduser()
    fix = "pass --fid-reference with a folder of real images (COCO 2014 val) or an .npz with mu and sigma"
    if path.is_file():
        try:
            with np.load(path) as saved:
                mu, sigma = np.asarray(saved["mu"], dtype=np.float64), np.asarray(saved["sigma"], dtype=np.float64)
        except Exception as error:  # noqa: BLE001 - numpy raises several kinds for a damaged file
            raise DoriError(f"{path} holds no mu and sigma ({first_line(error)}); {fix}") from error
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise DoriError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not a finite [D] and "
                            f"[D, D]; {fix}")  # fmt: skip
        return mu, sigma, -1
    if not path.is_dir():
        raise DoriError(f"FID reference not found: {path}; {fix}")
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if len(files) < 2:
        raise DoriError(f"{path} holds {len(files)} images; FID needs many (thousands); {fix}")
    size = (InceptionFeatures.SIZE, InceptionFeatures.SIZE)
    chunks = [features(torch.cat([load_image(f, size) for f in files[i : i + 64]])) for i in range(0, len(files), 64)]
    mu, sigma = gaussian(torch.cat(chunks))
    return mu, sigma, len(files)
