"""Typed configs, one per stage, validated on creation. They are written next to every result,
and the command line takes its defaults from them. (No torch import here: ``dori --help`` stays fast.)"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from dori.errors import DoriError


@dataclass(frozen=True, kw_only=True)
class Selection:
    """What every prompt-set stage shares: which prompts, where their training images and copy
    detector come from (real models), and the U-Net batch size."""

    type: str | None = None  # keep only prompts of this type (VM, TM)
    limit: int | None = None  # only the first N prompts
    images: str | None = None  # training images named by prompt index (real models)
    sscd: str | None = None  # an SSCD TorchScript file (real models)
    batch_size: int = 64


# ``dori study``'s stages in the order they run; the default runs all but the optional ones.
STUDY_STAGES = ("detect", "replicate", "nemo", "wanda", "nemo_dori", "wanda_dori", "wanda_sweep", "locality", "unlearn")
STUDY_OPTIONAL_STAGES = ("wanda_sweep",)  # Wanda's trade-off curve: several minutes more on 2 cores
STUDY_DEFAULT_STAGES = tuple(s for s in STUDY_STAGES if s not in STUDY_OPTIONAL_STAGES)


# Options that must not be negative (besides the counts that _check_positive covers).
NON_NEGATIVE = ("guidance", "learning_rate", "adv_weight")
# The smallest value of the integer options that _check_positive does not cover.
MINIMUM = {"limit": 1, "first_seed": 0, "seed": 0, "attack_seed": 0, "control_limit": 0, "inner_steps": 1,
           "fresh_steps": 0, "eval_attack_steps": 0}  # fmt: skip
SEED_OPTIONS = ("first_seed", "seed", "attack_seed")
MAX_SEED = 2**31 - 1  # seeds derived from these (seed * 1_000_003 + i) stay within torch's generator range
MAX_COUNT = 1_000_000  # any count above this is a typo, and its lists would not fit in memory
OPTION_NAMES = {"learning_rate": "lr"}  # where the command-line flag differs from the field


def check_range(flag: str, value: int, low: int | None, high: int) -> int:
    """An integer option within ``low..high``, or a one-line error that states the bound."""
    if low is not None and value < low:
        raise DoriError(f"{flag} must be at least {low}, got {value}")
    if value > high:
        raise DoriError(f"{flag} must be at most {high}, got {value}")
    return value


def _check_numbers(config) -> None:
    """Every number of a config is finite (NaN and infinity would flow into the results as if
    they were measurements), the non-negative ones are not below zero, and every integer lies in
    its range (seeds within MAX_SEED, counts within MAX_COUNT)."""
    for item in fields(config):
        value = getattr(config, item.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        flag = "--" + OPTION_NAMES.get(item.name, item.name).replace("_", "-")
        if item.type in ("int", "int | None") and not isinstance(value, int):
            raise DoriError(f"{flag} must be a whole number, got {value!r}")
        if not math.isfinite(value):
            raise DoriError(f"{flag} must be a finite number, got {value}")
        if item.name in NON_NEGATIVE and value < 0:
            raise DoriError(f"{flag} must be at least 0, got {value}")
        if isinstance(value, int):
            high = MAX_SEED if item.name in SEED_OPTIONS else MAX_COUNT
            check_range(flag, value, MINIMUM.get(item.name), high)  # the counts' minimum: _check_positive


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise DoriError(f"{name.replace('_', '-')} must be at least 1, got {value}")


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


@dataclass(frozen=True, kw_only=True)
class ReplicateConfig(Selection):
    prompts: str
    model: str = "bundled"
    mitigation: str | None = None
    seeds: int = 10
    first_seed: int = 0
    steps: int = 50
    guidance: float | None = None  # None: the model's own default (7.0; a bundled model: its card's rule)
    sscd_convention: str = "resize320"

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_positive(seeds=self.seeds, steps=self.steps, batch_size=self.batch_size)


@dataclass(frozen=True)
class DetectConfig:
    memorized: str
    non_memorized: str
    model: str = "bundled"
    mitigation: str | None = None
    generations: int = 4
    consistency_seeds: int = 10
    steps: int = 50
    guidance: float | None = None  # None: the model's own default (7.0; a bundled model: its card's rule)
    all_steps: bool = False
    limit: int | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_positive(generations=self.generations, steps=self.steps, batch_size=self.batch_size)
        if self.consistency_seeds < 2:
            raise DoriError(f"consistency-seeds must be at least 2 (pairs of seeds), got {self.consistency_seeds}")


@dataclass(frozen=True, kw_only=True)
class MitigateConfig(Selection):
    method: str
    prompts: str
    model: str = "bundled"
    reference_prompts: str | None = None  # NeMo statistics / threshold set (default: the model's own)
    stats: str | None = None  # a NeMo statistics file (e.g. nemo_sd14_value_stats.pt)
    threshold: float | None = None  # NeMo's SSIM threshold (default: mean + 1 std on the reference set)
    sites: str = "ffn"  # Wanda: ffn or value
    # Wanda: fraction of each row's weights considered, or "auto": the smallest ratio on
    # mitigate.wanda.WANDA_LADDER whose mitigated model replicates none of the prompts on the
    # defender's own seeds (mitigate.wanda.DEFENDER_FIRST_SEED on; disjoint from the evaluation's).
    ratio: float | str = 0.01
    scope: str = "prompt"  # NeMo: each prompt under its own neurons ("prompt") or all under the union ("union")
    seeds: int = 10  # generations per prompt for MR before / after
    utility_seeds: int = 4
    steps: int = 50
    guidance: float | None = None  # None: the model's own default (7.0; a bundled model: its card's rule)
    baseline: str | None = None  # a 'dori replicate' run of the same prompts and settings: its numbers are "before"

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.method not in ("nemo", "wanda"):
            raise DoriError(f"unknown method {self.method!r}; use nemo or wanda")
        if self.sites not in ("ffn", "value"):
            raise DoriError(f"unknown site set {self.sites!r}; use ffn or value")
        object.__setattr__(self, "ratio", parse_ratio(self.ratio))
        if self.scope not in ("prompt", "union"):
            raise DoriError(f"unknown scope {self.scope!r}; use prompt (each prompt under its own neurons) or union")
        _check_positive(seeds=self.seeds, utility_seeds=self.utility_seeds, steps=self.steps, batch_size=self.batch_size)


@dataclass(frozen=True, kw_only=True)
class WandaSweepConfig(Selection):
    """``dori wanda-sweep``: for each Wanda ratio on ``ladder``, MR without the attack, MR after
    ``attack_steps`` DoRI steps, and held-out utility (issue 24's trade-off curve)."""

    prompts: str
    model: str = "bundled"
    sites: str = "ffn"
    ladder: str = "0.01,0.02,0.05,0.1,0.2,0.5"  # mitigate.wanda.WANDA_LADDER
    seeds: int = 10  # generations per prompt (evaluation seeds 0 ..)
    utility_seeds: int = 4
    steps: int = 50  # DDIM steps of every generation
    guidance: float | None = None
    attack_steps: int = 50
    learning_rate: float = 0.1
    attack_batch: int = 8
    attack_seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.sites not in ("ffn", "value"):
            raise DoriError(f"unknown site set {self.sites!r}; use ffn or value")
        ratios = self.ratios()
        if ratios != sorted(set(ratios)):
            raise DoriError(f"--ladder must list distinct ratios in increasing order, got {self.ladder!r}")
        _check_positive(seeds=self.seeds, utility_seeds=self.utility_seeds, steps=self.steps,
                        attack_steps=self.attack_steps, attack_batch=self.attack_batch, batch_size=self.batch_size)  # fmt: skip

    def ratios(self) -> list[float]:
        parts = [p for p in self.ladder.split(",") if p.strip()]
        ratios = [parse_ratio(p) for p in parts]
        if not ratios or "auto" in ratios:
            raise DoriError(f"--ladder must be comma-separated numbers in (0, 1], got {self.ladder!r}")
        return ratios

    def attack(self) -> AttackRunConfig:
        """The DoRI run at each ratio, measured before (step 0: the prompt's own embedding) and after."""
        return AttackRunConfig(prompts=self.prompts, model=self.model, steps=self.attack_steps,
                               learning_rate=self.learning_rate, attack_batch=self.attack_batch, steps_curve="0",
                               control=False, seeds=self.seeds, eval_steps=self.steps, guidance=self.guidance,
                               attack_seed=self.attack_seed, type=self.type, limit=self.limit, images=self.images,
                               sscd=self.sscd, batch_size=self.batch_size)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AttackRunConfig(Selection):
    prompts: str
    model: str = "bundled"
    mitigation: str | None = None
    init: str = "prompt"  # prompt, random or other
    other_prompts: str | None = None
    steps: int = 50
    learning_rate: float = 0.1
    attack_batch: int = 8
    steps_curve: str = "0,1,10,25,50"
    control: bool = True
    control_limit: int = 10  # targets per control set (the control is measured at step 0 and the last step)
    seeds: int = 10
    eval_steps: int = 50
    guidance: float | None = None  # None: the model's own default (7.0; a bundled model: its card's rule)
    attack_seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.init not in ("prompt", "random", "other"):
            raise DoriError(f"unknown --init {self.init!r}; use prompt, random or other")
        if self.steps < 0:
            raise DoriError(f"steps must be >= 0, got {self.steps}")
        _check_positive(seeds=self.seeds, attack_batch=self.attack_batch, eval_steps=self.eval_steps,
                        batch_size=self.batch_size)  # fmt: skip
        curve = self.curve()
        if any(s < 0 or s > self.steps for s in curve):
            raise DoriError(f"--steps-curve values must lie in 0..{self.steps}, got {self.steps_curve}")

    def curve(self) -> list[int]:
        try:
            values = sorted({int(v) for v in self.steps_curve.split(",") if v.strip()} | {self.steps})
        except ValueError as error:
            raise DoriError(f"--steps-curve must be comma-separated integers, got {self.steps_curve!r}") from error
        return values


@dataclass(frozen=True, kw_only=True)
class UnlearnRunConfig(Selection):
    prompts: str
    model: str = "bundled"
    mitigation: str | None = None  # surrogates come from this mitigated model (default: NeMo, run here)
    retain_prompts: str | None = None  # real models: non-memorized pairs for L_DM (with --images)
    steps: int = 150
    learning_rate: float = 2e-4
    retain_batch: int = 32
    triggers_per_target: int = 3
    inner_steps: int = 5
    warm_start: bool = True
    fresh_steps: int = 50
    adv_weight: float = 1.0
    eval_attack_steps: int = 50
    seeds: int = 10
    utility_seeds: int = 4
    eval_steps: int = 50
    guidance: float | None = None  # None: the model's own default (7.0; a bundled model: its card's rule)
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_positive(steps=self.steps, retain_batch=self.retain_batch, triggers_per_target=self.triggers_per_target,
                        seeds=self.seeds, utility_seeds=self.utility_seeds, eval_steps=self.eval_steps,
                        checkpoint_every=self.checkpoint_every, batch_size=self.batch_size)  # fmt: skip
        if self.learning_rate <= 0:
            raise DoriError(f"learning rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True, kw_only=True)
class LocalityConfig(Selection):
    """``dori locality``: Y_mem is the whole prompt set; the first ``targets`` of its images are
    attacked from ``inits`` random initialisations each (the triggers, Y_adv)."""

    prompts: str
    model: str = "bundled"
    mitigation: str | None = None  # attack (and check the triggers) against this mitigated model
    non_memorized: str | None = None  # distances among these prompts' embeddings (default: the model's own set)
    targets: int = 1
    inits: int = 100
    steps: int = 50
    learning_rate: float = 0.1
    attack_batch: int = 2  # (noise, timestep) pairs per trigger per step; 8 for a plain attack
    seeds: int = 2  # generations per trigger that decide whether it succeeded
    eval_steps: int = 50
    guidance: float | None = None  # None: the model's own default (7.0; a bundled model: its card's rule)
    agreement_triggers: int = 10  # successful triggers per target given to NeMo and Wanda
    wanda_sites: str = "ffn"
    ratio: float = 0.01
    reference_prompts: str | None = None  # NeMo statistics / threshold (as in dori mitigate)
    stats: str | None = None
    threshold: float | None = None
    tsne: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_positive(targets=self.targets, inits=self.inits, seeds=self.seeds, attack_batch=self.attack_batch,
                        eval_steps=self.eval_steps, agreement_triggers=self.agreement_triggers,
                        batch_size=self.batch_size)  # fmt: skip
        if self.steps < 0:
            raise DoriError(f"steps must be >= 0, got {self.steps}")
        if self.inits < 2:
            raise DoriError(f"inits must be at least 2 (distances need pairs), got {self.inits}")
        if self.wanda_sites not in ("ffn", "value"):
            raise DoriError(f"unknown site set {self.wanda_sites!r}; use ffn or value")
        if not 0 < self.ratio <= 1:
            raise DoriError(f"ratio must be in (0, 1], got {self.ratio}")
