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
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from dori.errors import DoriError
from dori.models import position
from dori.models.base import DiffusionModel

MODEL_FILE = "dori_model.json"
KIT_FILES = ("attribute_classifier.safetensors", "attribute_classifier.json", "copy_detector.json")
# dori draws its own progress bars; the libraries' per-file bars would only clutter stderr.
hf_logging.disable_progress_bar()
diffusers_logging.disable_progress_bar()


class _KnownKeys:
    """dori reads ``unet/config.json``'s position-encoding notice itself; diffusers' warning about the
    unknown key (meant for users who load the folder without dori) is not shown while dori loads."""

    def filter(self, record) -> bool:
        return position.CONFIG_KEY not in record.getMessage()


@contextmanager
def _notice_read_by_dori():
    logger = diffusers_logging.get_logger("diffusers.configuration_utils")
    known = _KnownKeys()
    logger.addFilter(known)
    try:
        yield
    finally:
        logger.removeFilter(known)

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
    return "toy_data" in _model_meta(resolve_model_path(spec))


def _read_model_json(file: Path, what: str, kind: type):
    """A JSON file of a model folder, of the expected ``kind``, or a clear error naming it."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DoriError(f"{file} ({what}) is not valid JSON; restore it from the model's source") from error
    if not isinstance(value, kind):
        raise DoriError(f"{file} ({what}) holds a JSON {type(value).__name__}, not a JSON "
                        f"{'object' if kind is dict else 'list'}; restore it from the model's source")  # fmt: skip
    return value


def _model_meta(path: Path) -> dict:
    """``dori_model.json``, checked: an object whose known fields have the right types."""
    file = path / MODEL_FILE
    if not file.is_file():
        return {}
    meta = _read_model_json(file, "dori's model description", dict)
    expected = {"name": str, "pixel_space": bool, "tokenizer": str, "token_map": str, "toy_data": dict,
                "default_guidance": (int, float), "position_encoding": str, "space_to_depth": int}  # fmt: skip
    for key, kind in expected.items():
        if key in meta and not isinstance(meta[key], kind):
            raise DoriError(f"{file}: '{key}' has the wrong type ({type(meta[key]).__name__}); restore the file "
                            "from the model's source")  # fmt: skip
    if "token_map" in meta and (path / meta["token_map"]).resolve().parent != (path / "text_encoder").resolve():
        raise DoriError(f"{file}: 'token_map' must name a file in text_encoder/, not {meta['token_map']!r}")
    return meta


def _require(path: Path, component: str, what: str) -> Path:
    folder = path / component
    if not folder.is_dir():
        raise DoriError(
            f"{path} is not a complete diffusion model: the '{component}' folder ({what}) is missing; "
            "pass a folder in the diffusers StableDiffusionPipeline layout"
        )
    return folder


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _load_component(loader, folder: Path, what: str, **kwargs):
    """One component through its library's ``from_pretrained``. Weights in safetensors are read as
    such; pickle-format weights (``*.bin``) only as plain tensors (``weights_only=True``: dori passes
    it to transformers, whatever torch's default; diffusers' loader always uses it): a file holding
    other pickled objects is refused, clearly."""
    import pickle

    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
    if not has_safetensors and pickles:
        kwargs["use_safetensors"] = False
        owner = getattr(loader, "__self__", None)  # the class whose from_pretrained this is
        if isinstance(owner, type) and issubclass(owner, PreTrainedModel):
            kwargs["weights_only"] = True
    try:
        return loader(str(folder), local_files_only=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - a damaged or mismatched component raises many kinds
        chain, link = [], error
        while link is not None and len(chain) < 10:  # the libraries wrap torch's refusal in their own errors
            chain.append(link)
            link = link.__cause__ or link.__context__
        if any(isinstance(e, pickle.UnpicklingError) for e in chain):
            raise DoriError(f"the {what} weights in {folder} ({', '.join(pickles)}) hold pickled objects other "
                            "than tensors, which dori does not load; convert them to safetensors") from error  # fmt: skip
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DoriError(f"could not load the {what} from {folder}: {first}") from error


def _check_fit(unet, text_encoder, vae, tokenizer, token_map, path: Path, pack: int = 1) -> None:
    """Components that do not fit each other fail here, at load, not in the middle of a run. ``pack``
    is a pixel-space model's ``space_to_depth``."""
    width, cross = text_encoder.config.hidden_size, unet.config.cross_attention_dim
    if width != cross:
        raise DoriError(f"{path}: the text encoder's width ({width}) is not the U-Net's cross-attention width "
                        f"({cross}); text_encoder/ and unet/ come from different models")  # fmt: skip
    channels = 3 * pack * pack if vae is None else vae.config.latent_channels
    if vae is not None:
        where = f"the VAE's latents ({channels} channels)"
    elif pack > 1:
        where = f"pixel space packed {pack}x{pack} into channels ({channels} channels, dori_model.json's space_to_depth)"
    else:
        where = "pixel space (3 channels)"
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        pair = "unet/ and vae/" if vae is not None else "unet/ and dori_model.json"
        raise DoriError(f"{path}: the U-Net takes {unet.config.in_channels} channels and returns "
                        f"{unet.config.out_channels}, but the model works in {where}; {pair} come from "
                        "different models")  # fmt: skip
    rows = text_encoder.config.vocab_size
    ids = len(tokenizer) if token_map is None else int(token_map.max()) + 1
    if ids > rows:
        raise DoriError(f"{path}: the tokenizer gives {ids} token ids but the text encoder has {rows} embedding "
                        "rows; tokenizer/ and text_encoder/ come from different models")  # fmt: skip
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        raise DoriError(f"{path}: the tokenizer pads to {tokenizer.model_max_length} tokens but the text encoder has "
                        f"{positions} positions; tokenizer/ and text_encoder/ come from different models")  # fmt: skip


def load_model(
    spec: str | os.PathLike = "bundled",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    gradient_checkpointing: bool = False,
) -> DiffusionModel:
    """Load ``'bundled'`` or a local model folder (Stable Diffusion or a dori model folder).
    ``gradient_checkpointing``: see :meth:`DiffusionModel.enable_gradient_checkpointing`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DoriError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = resolve_model_path(spec)
    meta = _model_meta(path)
    pixel_space = bool(meta.get("pixel_space", False))

    with _notice_read_by_dori():
        unet = _load_component(UNet2DConditionModel.from_pretrained, _require(path, "unet", "the U-Net"), "U-Net")
    text_encoder = _load_component(
        CLIPTextModel.from_pretrained, _require(path, "text_encoder", "the text encoder"), "text encoder"
    )
    scheduler_file = _require(path, "scheduler", "the noise schedule") / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise DoriError(f"{scheduler_file} is missing; the scheduler folder must hold scheduler_config.json")
    scheduler_config = _read_model_json(scheduler_file, "the noise schedule", dict)
    try:
        from diffusers import DDIMScheduler

        DDIMScheduler.from_config(scheduler_config, clip_sample=False).set_timesteps(2)
    except Exception as error:  # noqa: BLE001 - a bad schedule raises many kinds inside diffusers
        raise DoriError(f"{scheduler_file} does not describe a usable noise schedule ({error}); restore it from "
                        "the model's source") from error  # fmt: skip

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
    pack = int(meta.get("space_to_depth", 1))
    if pack < 1:
        raise DoriError(f"{path / MODEL_FILE}: 'space_to_depth' must be at least 1, got {pack}; restore the file "
                        "from the model's source")  # fmt: skip
    _check_fit(unet, text_encoder, vae, tokenizer, token_map, path, pack)

    model = DiffusionModel(
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
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _token_map(file: Path, vocab_size: int) -> torch.Tensor:
    """CLIP id -> row of a compact embedding table; ids never seen in training map to row 0."""
    if not file.is_file():
        raise DoriError(f"{file} (the token-id map named in {MODEL_FILE}) is missing; restore it from the model's source")
    used = _read_model_json(file, "the token-id map", list)
    if not all(isinstance(i, int) and 0 <= i < vocab_size for i in used) or len(set(used)) != len(used):
        raise DoriError(f"{file} must list distinct token ids in 0..{vocab_size - 1}; restore it from the model's source")
    table = torch.zeros(vocab_size, dtype=torch.long)
    table[torch.tensor(used, dtype=torch.long)] = torch.arange(1, len(used) + 1)
    return table


def save_model(model: DiffusionModel, out_dir: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Save a model folder that :func:`load_model` reads back (weights as safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    if model.meta.get("position_encoding") in position.KINDS:
        position.mark_config(out / "unet")
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
    from dori.runs import with_user_mode

    with_user_mode(*(f for f in out.rglob("*") if f.is_file()))  # the libraries' safetensors files are 0o600
    return out
