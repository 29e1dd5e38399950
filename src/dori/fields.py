"""The pieces every command's config (:mod:`dori.configs`) is built from: fields that are also
command-line options (:func:`opt`), the option groups several commands share, and the checks of
their numbers. (No torch import here: ``dori --help`` stays fast.)"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from dori.errors import DoriError

# Help texts that several commands share.
MODEL_HELP = "'bundled' or a local model folder (diffusers layout)."
MITIGATION_HELP = "A folder written by 'dori mitigate'."
# None: the model's own default (7.0; a bundled model: its card's rule).
GUIDANCE_HELP = ("Classifier-free guidance (default: the model's own: 7.0 for SD, the card's rule for the bundled "
                 "model).")  # fmt: skip
REFERENCE_HELP = "NeMo: non-memorized prompts for statistics and threshold."
IMAGES_HELP = "Training images, files named by prompt index (real models)."
SSCD_HELP = "SSCD TorchScript file (real models)."
BATCH_HELP = "Images per U-Net batch."


def opt(default=MISSING, *, help: str = "", flag: str | None = None, cli: bool = True):  # noqa: A002 - typer's word
    """A config field that is also a command-line option: its help text and flag (default: the
    field's name with dashes) live here, and ``dori.options`` builds the option from them, so no
    option is written twice. ``cli=False``: settable from Python only."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


@dataclass(frozen=True, kw_only=True)
class Selection:
    """What every prompt-set stage shares: which prompts, where their training images and copy
    detector come from (real models), and the U-Net batch size."""

    type: str | None = opt(None, help="Keep only prompts of this type (VM, TM).")
    limit: int | None = opt(None, help="Only the first N prompts.")
    images: str | None = opt(None, help=IMAGES_HELP)
    sscd: str | None = opt(None, help=SSCD_HELP)
    batch_size: int = opt(64, help=BATCH_HELP)
    missing_images: str = opt("error", help=("Real models: 'error' stops before any work if a prompt has no training "
                                             "image in --images (listing them); 'skip' leaves those prompts out."))

    def _check_selection(self) -> None:
        if self.missing_images not in ("error", "skip"):
            raise DoriError(f"--missing-images must be error or skip, got {self.missing_images!r}")


@dataclass(frozen=True, kw_only=True)
class UtilityOptions:
    """How a real model's utility is measured (``dori.evaluation.utility``): the CLIP score and FID
    of the first ``utility_prompts`` COCO captions (sd14:coco), each from a network the user names.
    The bundled kind has its own instruments and takes none of these."""

    clip: str | None = opt(None, help="Real models: a local CLIP folder (transformers CLIPModel, e.g. ViT-B/32) "
                                      "for the CLIP score.")  # fmt: skip
    inception: str | None = opt(None, help="Real models: the TorchScript Inception file for FID "
                                           "(pt_inception-2015-12-05-6726825d.pt).")  # fmt: skip
    fid_reference: str | None = opt(None, help="Real models: real images for FID: a folder (COCO 2014 val) or an "
                                               ".npz with mu and sigma.")  # fmt: skip
    utility_prompts: int = opt(1000, help="Real models: COCO captions (sd14:coco) for CLIP score and FID.")


def _check_utility(config) -> None:
    if config.inception is not None and config.fid_reference is None:
        raise DoriError("--inception needs --fid-reference: a folder of real images (COCO 2014 val) or an .npz "
                        "with mu and sigma")  # fmt: skip
    if config.fid_reference is not None and config.inception is None:
        raise DoriError("--fid-reference needs --inception FILE (the TorchScript Inception network FID uses)")
    _check_positive(config, "utility_prompts")


# Options that must not be negative (besides the counts that _check_positive covers).
NON_NEGATIVE = ("guidance", "learning_rate", "adv_weight", "preserve_weight", "empty_caption_prob")
# The smallest value of the integer options that _check_positive does not cover.
MINIMUM = {"limit": 1, "first_seed": 0, "seed": 0, "attack_seed": 0, "control_limit": 0, "inner_steps": 0,
           "refresh_every": 0, "warmup_steps": 0, "fresh_steps": 0, "eval_attack_steps": 0, "nemo_seeds": 2}  # fmt: skip
SEED_OPTIONS = ("first_seed", "seed", "attack_seed")
MAX_SEED = 2**31 - 1  # seeds derived from these (seed * 1_000_003 + i) stay within torch's generator range
MAX_COUNT = 1_000_000  # any count above this is a typo, and its lists would not fit in memory


def flag_of(item) -> str:
    """The command-line flag of a config field (``--lr`` for ``learning_rate``; a boolean's first form)."""
    return (item.metadata.get("flag") or "--" + item.name.replace("_", "-")).split("/")[0]


def carried(target: type, source, *, renamed: dict[str, str] | None = None, **values):
    """``target`` (a dataclass) built from the fields it shares with ``source``, so a run config's
    settings pass to the algorithm's config without being copied one by one. ``renamed`` maps a
    target field to the source field of another name it takes; ``values`` are set as given."""
    renamed = renamed or {}
    shared = {item.name: getattr(source, renamed.get(item.name, item.name)) for item in fields(target)
              if hasattr(source, renamed.get(item.name, item.name))}  # fmt: skip
    return target(**{**shared, **values})


def check_range(flag: str, value: int, low: int | None, high: int) -> int:
    """An integer option within ``low..high``, or a one-line error that states the bound."""
    if low is not None and value < low:
        raise DoriError(f"{flag} must be at least {low}, got {value}")
    if value > high:
        raise DoriError(f"{flag} must be at most {high}, got {value}")
    return value


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """A word option among ``choices``, or a one-line error that lists them."""
    if value not in choices:
        raise DoriError(f"unknown {flag} {value!r}; use {' or '.join(choices)}")


def _check_numbers(config) -> None:
    """Every number of a config is finite (NaN and infinity would flow into the results as if
    they were measurements), the non-negative ones are not below zero, and every integer lies in
    its range (seeds within MAX_SEED, counts within MAX_COUNT)."""
    for item in fields(config):
        value = getattr(config, item.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        flag = flag_of(item)
        if item.type in ("int", "int | None") and not isinstance(value, int):
            raise DoriError(f"{flag} must be a whole number, got {value!r}")
        if not math.isfinite(value):
            raise DoriError(f"{flag} must be a finite number, got {value}")
        if item.name in NON_NEGATIVE and value < 0:
            raise DoriError(f"{flag} must be at least 0, got {value}")
        if isinstance(value, int):
            high = MAX_SEED if item.name in SEED_OPTIONS else MAX_COUNT
            check_range(flag, value, MINIMUM.get(item.name), high)  # the counts' minimum: _check_positive


def _check_positive(config, *names: str) -> None:
    """The counts among ``names`` are at least 1 (the message names the command-line flag)."""
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name in names and value < 1:
            raise DoriError(f"{flag_of(item)} must be at least 1, got {value}")


def parse_ratio(value: float | str) -> float | str:
    """A Wanda ratio: ``"auto"`` or a number in (0, 1] (``"0.05"`` from the command line too)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise DoriError(f"--ratio must be auto or a number in (0, 1], got {value!r}") from None
    if not 0 < ratio <= 1:  # also refuses nan
        raise DoriError(f"--ratio must be auto or a number in (0, 1], got {value!r}")
    return ratio
