"""What the bundled model knows about itself: its training data, prompt sets, copy detector and
attribute classifier (the SSCD, CLIP-score and FID analogues), all offline.

The data is re-rendered from the seed recorded in ``dori_model.json`` (a few seconds), so the
package ships weights and calibration only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from dori.errors import DoriError
from dori.measure.replication import rate
from dori.measure.similarity import ToyCopyDetector
from dori.measure.utility import frechet_distance
from dori.toy.classifier import AttributeClassifier
from dori.toy.data import COLOURS, POSITIONS, SHAPES, ToyDataset, build_dataset, render_ordinary

DETECTOR_FILE = "copy_detector.json"
CLASSIFIER_FILE = "attribute_classifier.safetensors"
N_NON_MEMORIZED = 20


_RENDERED: dict[str, ToyDataset] = {}  # data settings -> training set (see ToyKit.data)


@dataclass
class ToyKit:
    folder: Path
    data_kwargs: dict

    @classmethod
    def from_folder(cls, folder: str | Path) -> ToyKit:
        folder = Path(folder)
        meta_file = folder / "dori_model.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if "toy_data" not in meta:
            raise DoriError(f"{folder} is not a bundled (toy) model; it has no toy_data in dori_model.json")
        # Models trained before the "field" style rendered their ordinary images plainly.
        return cls(folder, {"ordinary_style": "plain", **meta["toy_data"]})

    @cached_property
    def data(self) -> ToyDataset:
        """The rendered training set, shared by every kit of this process that has the same data
        settings (rendering the bundled model's 44,000 images takes about 10 s). Read-only."""
        key = json.dumps(self.data_kwargs, sort_keys=True)
        if key not in _RENDERED:
            _RENDERED.clear()  # keep one training set in memory, not one per model folder ever loaded
            _RENDERED[key] = build_dataset(**self.data_kwargs)
        return _RENDERED[key]

    @cached_property
    def detector(self) -> ToyCopyDetector:
        file = self.folder / DETECTOR_FILE
        if not file.is_file():
            raise DoriError(f"{file} is missing; run 'dori toy train --out {self.folder} --resume' to calibrate it")
        info = json.loads(file.read_text())
        if "scale" in info:  # written by dori before the fourth bundled model
            raise DoriError(f"{file} holds the old copy detector's calibration; run 'dori toy card --model "
                            f"{self.folder}' to calibrate the current one")  # fmt: skip
        # A calibration written before the noise floor and the scales keeps the detector it was made for.
        return ToyCopyDetector(tau=info["tau"], sigma=info["sigma"], shift=info["shift"],
                               noise_floor=info.get("noise_floor", 0.0), scales=tuple(info.get("scales", (1.0,))))  # fmt: skip

    @cached_property
    def classifier(self) -> AttributeClassifier:
        model = AttributeClassifier()
        model.load_state_dict(load_file(str(self.folder / CLASSIFIER_FILE)))
        return model.eval()

    # ------------------------------------------------------------- prompt sets
    def prompt_set(self, name: str) -> list[dict]:
        """Rows ``{"prompt", "type", "index"}`` of ``memorized`` (VM), ``template`` (TM),
        ``non_memorized`` (20 ordinary training captions), ``ordinary`` (all of them) or ``held_out``."""
        data = self.data
        if name == "memorized":
            return [{"prompt": p.caption, "type": "VM", "index": p.index} for p in data.planted if p.kind == "VM"]
        if name == "template":
            return [{"prompt": p.caption, "type": "TM", "index": p.index} for p in data.planted if p.kind == "TM"]
        if name == "non_memorized":
            captions = data.ordinary_captions
            step = max(1, len(captions) // N_NON_MEMORIZED)
            return [{"prompt": c, "type": "none", "index": None} for c in captions[::step][:N_NON_MEMORIZED]]
        if name == "ordinary":  # every ordinary training caption (NeMo's reference statistics)
            return [{"prompt": c, "type": "none", "index": None} for c in data.ordinary_captions]
        if name == "held_out":
            return [{"prompt": c, "type": "held_out", "index": None} for c in data.held_out_captions]
        raise DoriError(f"unknown bundled prompt set {name!r}; use memorized, template, non_memorized or held_out")

    def references(self, prompt: str) -> Tensor:
        """The training images a generation of ``prompt`` is compared with, as SSCD_orig compares
        an SD generation with its prompt's training image: every training image of a planted
        caption; for an ordinary caption its (first) training image, and for a held-out caption a
        fresh render the model never saw (:meth:`target_image`, the image DoRI's control aims at).

        (Until the fourth bundled model an ordinary caption was compared with the nearest of all
        30,000 ordinary images, whose renders were near-copies of each other.)"""
        data = self.data
        rows = [i for i, c in enumerate(data.captions) if c == prompt]
        if rows and data.kinds[rows[0]] != "ordinary":
            return data.images[torch.tensor(rows)].unique(dim=0)
        return self.target_image(prompt)

    @cached_property
    def planted_images(self) -> Tensor:
        """One image per planted caption ``[P, 3, H, W]`` (a TM caption's first copy): what
        "replicates any memorized image" is measured against."""
        return torch.stack([p.image for p in self.data.planted])

    def target_image(self, prompt: str, *, seed: int = 4321) -> Tensor:
        """One image to attack for ``prompt``, ``[1, 3, H, W]``: its (first) training image, or for
        a held-out caption a fresh render that the model never saw."""
        data = self.data
        if prompt in data.captions:
            return data.images[data.captions.index(prompt)][None]
        if prompt in data.attributes:
            return torch.from_numpy(render_ordinary(*data.attributes[prompt], np.random.default_rng(seed), data.style))[None]
        raise DoriError(f"prompt {prompt!r} is neither a training nor a held-out caption of the bundled model")

    @cached_property
    def ordinary_images(self) -> Tensor:
        data = self.data
        return data.images[torch.tensor([i for i, k in enumerate(data.kinds) if k == "ordinary"])]

    # ------------------------------------------------------------- utility
    def alignment(self, images: Tensor, prompts: list[str]) -> float:
        """Fraction of images whose predicted shape, colour and position all match the caption."""
        truth = torch.tensor([self.labels(p) for p in prompts])
        return rate((self.classifier.predict(images) == truth).all(1))

    def misses(self, images: Tensor, prompts: list[str]) -> dict[str, float]:
        """Per attribute, the fraction of images whose predicted shape, colour or position differs
        from the caption's (an image can miss several)."""
        wrong = self.classifier.predict(images) != torch.tensor([self.labels(p) for p in prompts])
        return {name: rate(wrong[:, i]) for i, name in enumerate(("shape", "colour", "position"))}

    def frechet_distance(self, images: Tensor, prompts: list[str], *, seed: int = 1234) -> float:
        """FD between generations and fresh real renders of the same captions."""
        rng = np.random.default_rng(seed)
        real = torch.stack([torch.from_numpy(render_ordinary(*self.data.attributes[p], rng, self.data.style)) for p in prompts])
        with torch.no_grad():
            return frechet_distance(self.classifier.features(images), self.classifier.features(real))

    def labels(self, prompt: str) -> tuple[int, int, int]:
        """The (shape, colour, position) indices a caption names, as the classifier predicts them."""
        if prompt not in self.data.attributes:
            raise DoriError(f"prompt {prompt!r} names no shape, colour and position; alignment needs an ordinary caption")
        shape, colour, position = self.data.attributes[prompt]
        return SHAPES.index(shape), list(COLOURS).index(colour), list(POSITIONS).index(position)
