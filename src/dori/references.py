"""What a run compares against, and the one place that tells the bundled kind of model from a
real one: prompt sets (named sets resolve inside the bundled model's folder), the training images
each prompt should not replicate, the copy detector (the bundled model's own, or SSCD from a file),
the targets of an attack, the control sets, and the retained pairs of fine-tuning."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.models.base import DiffusionModel
from dori.prompts import Prompt, PromptSet, find_training_image, load_prompt_set, training_image_path


def is_bundled(model: DiffusionModel) -> bool:
    """Whether ``model`` is of the bundled kind (its folder records the synthetic data it learnt)."""
    return "toy_data" in model.meta


def toy_kit_for(model: DiffusionModel):
    """The bundled model's own data and instruments, or ``None`` for other models."""
    if not is_bundled(model):
        return None
    from dori.toy.kit import ToyKit

    return ToyKit.from_folder(model.source)


def load_prompts(spec: str, model: DiffusionModel, *, kind: str | None = None, limit: int | None = None) -> PromptSet:
    """A prompt set; prompts longer than the text encoder's window are marked ``truncated`` (the
    mark goes into every result row) and named in a warning on stderr."""
    prompts = load_prompt_set(spec, model_folder=model.source if is_bundled(model) else None).only(kind).head(limit)
    cut = model.truncated(prompts.texts)
    if not any(cut):
        return prompts
    first = next(p.prompt for p, c in zip(prompts.prompts, cut) if c)
    print(f"warning: {sum(cut)} prompt(s) of {prompts.name} are longer than the text encoder's {model.max_length} "
          f"tokens and are cut at the end, as Stable Diffusion cuts them (the first: {first[:60]!r}...); their result "
          "rows say 'truncated': true", file=sys.stderr)  # fmt: skip
    marked = tuple(dataclasses.replace(p, truncated=c) for p, c in zip(prompts.prompts, cut))
    return dataclasses.replace(prompts, prompts=marked)


class References:
    """Training images and the copy detector for a model: the bundled model knows its own;
    a real model needs ``--images DIR`` and ``--sscd PATH``."""
    def __init__(self, model: DiffusionModel, *, images: str | None, sscd: str | None,
                 sscd_convention: str = "resize320") -> None:  # fmt: skip
        self.kit = toy_kit_for(model)
        self.images_dir = images
        if sscd is not None:
            from dori.measure.similarity import SSCD

            self.detector = SSCD(sscd, convention=sscd_convention, device=model.device)
        elif self.kit is not None:
            self.detector = self.kit.detector
        else:
            raise DoriError("this model needs a copy detector: pass --sscd PATH (an SSCD TorchScript file)")
        if self.kit is None and images is None:
            raise DoriError("this model needs its training images: pass --images DIR (files named by prompt index)")
        self.size = model.image_size
        # every memorized training image, for "replicates any memorized image" (bundled model only)
        self.planted = None if self.kit is None else self.kit.planted_images

    def with_images(self, prompts: PromptSet, missing: str = "error") -> PromptSet:
        """Real models: every prompt needs its training image in ``--images`` (many LAION URLs are
        dead, so a downloaded folder often lacks some). All are checked before any work:
        ``missing="error"`` stops with the count and the first indices; ``"skip"`` leaves those
        prompts out with a warning on stderr."""
        if self.images_dir is None:
            return prompts
        folder = Path(self.images_dir).expanduser()
        if not folder.is_dir():
            raise DoriError(f"training-image folder not found: {folder}; pass --images DIR with files named by index")
        absent = [p for p in prompts.prompts if p.index is None or find_training_image(folder, p) is None]
        if not absent:
            return prompts
        if any(p.index is None for p in absent):
            listing = "they have no Index to name the file by: give a CSV or JSONL with an Index column"
        else:
            listing = "index " + ", ".join(str(p.index) for p in absent[:5]) + (", ..." if len(absent) > 5 else "")
        what = f"{len(absent)} of {len(prompts)} prompts of {prompts.name} have no training image in {folder} ({listing})"
        if len(absent) == len(prompts):
            raise DoriError(f"{what}; add the files (named by the prompt's Index) or pass the folder that holds them")
        if missing == "error":
            raise DoriError(f"{what}; add the files (named by the prompt's Index), or pass --missing-images skip to "
                            "leave those prompts out")  # fmt: skip
        print(f"warning: {what}; they are left out (--missing-images skip)", file=sys.stderr)
        return dataclasses.replace(prompts, prompts=tuple(p for p in prompts.prompts if p not in absent))

    def of(self, prompt: Prompt) -> torch.Tensor:
        if self.images_dir is None:
            return self.kit.references(prompt.prompt)
        return load_image(training_image_path(self.images_dir, prompt), self.size)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A training image as ``[1, 3, H, W]`` in ``[0, 1]`` (any mode converted to RGB)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        # PIL reports a damaged PNG chunk as SyntaxError, an oversized one as DecompressionBombError
        raise DoriError(f"training image {path} is unreadable ({type(error).__name__}); replace the file") from error
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def attack_targets(model: DiffusionModel, prompts: PromptSet, refs: References) -> list[torch.Tensor]:
    """The image each prompt's attack aims at, ``[1, 3, H, W]`` each."""
    if refs.kit is not None and refs.images_dir is None:
        return [refs.kit.target_image(p.prompt) for p in prompts.prompts]
    return [refs.of(p)[:1] for p in prompts.prompts]


def control_sets(model: DiffusionModel) -> list[str]:
    """Targets the model did not memorize: the bundled model's non-memorized training images and
    held-out images. (For other models pass a non-memorized set to ``dori attack`` directly.)"""
    return ["bundled:non_memorized", "bundled:held_out"] if is_bundled(model) else []


def encode_unique(model: DiffusionModel, captions: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct caption encoded once: ``(embeddings [U, L, D], index [len(captions)])`` with
    ``embeddings[index[i]]`` the embedding of ``captions[i]``."""
    unique = sorted(set(captions))
    position = {c: i for i, c in enumerate(unique)}
    emb = torch.cat([model.encode(unique[i : i + chunk]) for i in range(0, len(unique), chunk)])
    return emb, torch.tensor([position[c] for c in captions])


def retained_pairs(model: DiffusionModel, config, refs: References) -> tuple[torch.Tensor, list[str]]:
    """Non-memorized training pairs for L_DM: the bundled model's ordinary pairs, or
    ``--retain-prompts`` with their images for a real model."""
    if config.retain_prompts is None:
        if refs.kit is None:
            raise DoriError("fine-tuning a real model needs retained pairs: pass --retain-prompts SET with --images DIR")
        data = refs.kit.data
        rows = [i for i, k in enumerate(data.kinds) if k == "ordinary"]
        return data.images[torch.tensor(rows)], [data.captions[i] for i in rows]
    retain = refs.with_images(load_prompts(config.retain_prompts, model), config.missing_images)
    return torch.cat([refs.of(p)[:1] for p in retain.prompts]), retain.texts
