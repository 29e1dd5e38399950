"""Load a model folder into the :class:`~dori.models.base.DiffusionModel` interface.

Two layouts, one loader:

- a Stable Diffusion folder in the diffusers ``StableDiffusionPipeline`` layout (``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``), v1.x or v2.x;
- a dori model folder (the bundled model, or any model that ``dori unlearn`` saved): the same
  component folders plus ``dori_model.json``, which names the model, says whether it works in pixel
  space (no ``vae/``), and may point to the shared CLIP tokenizer and a token-id map.

Everything loads with ``local_files_only=True``; nothing ever contacts a hub.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from dori.errors import DoriError
from dori.models.base import DiffusionModel

MODEL_FILE = "dori_model.json"
KIT_FILES = ("attribute_classifier.safetensors", "attribute_classifier.json", "copy_detector.json")
# dori draws its own progress bars; the libraries' per-file bars would only clutter stderr.
hf_logging.disable_progress_bar()
diffusers_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def assets_dir() -> Path:
    return Path(str(resources.files("dori.models") / "assets"))


def bundled_model_dir() -> Path:
    return assets_dir() / "bundled"


def clip_tokenizer() -> CLIPTokenizer:
    """SD v1.x's CLIP tokenizer from the files shipped in the package (no download)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(assets_dir() / "clip_tokenizer"), local_files_only=True)
    # transformers 5 leaves model_max_length unset unless a config says it; CLIP uses 77.
    tokenizer.model_max_length = 77
    return tokenizer


def resolve_model_path(spec: str | os.PathLike) -> Path:
    if str(spec) == "bundled":
        path = bundled_model_dir()
        if not (path / MODEL_FILE).is_file():
            raise DoriError(
                "the bundled model's weights are missing from this installation; "
                "reinstall dori or train them with 'dori toy train --out DIR' and pass --model DIR"
            )
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise DoriError(
            f"model folder not found: {path}; pass 'bundled' or a local Stable Diffusion folder (diffusers layout)"
        )
    if not path.is_dir():
        raise DoriError(f"model path {path} is a file, not a folder; pass the folder that holds unet/ and scheduler/")
    return path


def is_bundled_kind(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a model of the bundled kind (the shipped one, or any folder written
    by ``dori toy train``): its ``dori_model.json`` records the synthetic data it was trained on."""
    meta_file = resolve_model_path(spec) / MODEL_FILE
    if not meta_file.is_file():
        return False
    try:
        return "toy_data" in json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DoriError(f"{meta_file} is not valid JSON ({error}); restore the file or retrain the model") from error


def _require(path: Path, component: str, what: str) -> Path:
    folder = path / component
    if not folder.is_dir():
        raise DoriError(
            f"{path} is not a complete diffusion model: the '{component}' folder ({what}) is missing; "
            "pass a folder in the diffusers StableDiffusionPipeline layout"
        )
    return folder


def _load_component(loader, folder: Path, what: str, **kwargs):
    try:
        return loader(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DoriError(f"could not load the {what} from {folder}: {first}") from error


def load_model(
    spec: str | os.PathLike = "bundled",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> DiffusionModel:
    """Load ``'bundled'`` or a local model folder (Stable Diffusion or a dori model folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DoriError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = resolve_model_path(spec)
    meta = {}
    if (path / MODEL_FILE).is_file():
        meta = json.loads((path / MODEL_FILE).read_text(encoding="utf-8"))
    pixel_space = bool(meta.get("pixel_space", False))

    unet = _load_component(UNet2DConditionModel.from_pretrained, _require(path, "unet", "the U-Net"), "U-Net")
    text_encoder = _load_component(
        CLIPTextModel.from_pretrained, _require(path, "text_encoder", "the text encoder"), "text encoder"
    )
    scheduler_file = _require(path, "scheduler", "the noise schedule") / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise DoriError(f"{scheduler_file} is missing; the scheduler folder must hold scheduler_config.json")
    scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))

    if meta.get("tokenizer") == "clip":
        tokenizer = clip_tokenizer()
    else:
        tokenizer = _load_component(
            CLIPTokenizer.from_pretrained, _require(path, "tokenizer", "the tokenizer"), "tokenizer"
        )
        if tokenizer.model_max_length is None or tokenizer.model_max_length > 10_000:
            tokenizer.model_max_length = int(text_encoder.config.max_position_embeddings)

    vae = None
    if not pixel_space:
        vae = _load_component(AutoencoderKL.from_pretrained, _require(path, "vae", "the VAE"), "VAE")

    token_map = None
    if "token_map" in meta:
        token_map = _token_map(path / meta["token_map"], len(tokenizer))

    return DiffusionModel(
        name=str(meta.get("name", path.name)),
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        vae=vae,
        token_map=token_map,
        source=str(path),
        meta=meta,
        device=device,
        dtype=dtype,
    )


def _token_map(file: Path, vocab_size: int) -> torch.Tensor:
    """CLIP id -> row of a compact embedding table; ids never seen in training map to row 0."""
    used = json.loads(file.read_text(encoding="utf-8"))
    table = torch.zeros(vocab_size, dtype=torch.long)
    table[torch.tensor(used, dtype=torch.long)] = torch.arange(1, len(used) + 1)
    return table


def save_model(model: DiffusionModel, out_dir: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Save a model folder that :func:`load_model` reads back (weights as safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    info = {**model.meta, "name": model.name, "pixel_space": model.vae is None}
    if model.source is not None:  # the bundled model's instruments travel with its weights
        for extra in KIT_FILES:
            src = Path(model.source) / extra
            if src.is_file() and src.resolve() != (out / extra).resolve():
                shutil.copyfile(src, out / extra)
    if model.vae is not None:
        model.vae.save_pretrained(out / "vae", safe_serialization=True)
    if model.token_map is not None:
        used = torch.nonzero(model.token_map).flatten()
        order = torch.argsort(model.token_map[used])
        (out / "text_encoder" / "token_map.json").write_text(json.dumps(used[order].tolist()))
        info["token_map"] = "text_encoder/token_map.json"
        info["tokenizer"] = "clip"
    else:
        model.tokenizer.save_pretrained(out / "tokenizer")
    info.update(meta or {})
    (out / MODEL_FILE).write_text(json.dumps(info, indent=2))
    return out
