"""Typed configs, one per stage, validated on creation. They are written next to every result,
and the command line takes its defaults from them. (No torch import here: ``dori --help`` stays fast.)"""

from __future__ import annotations

from dataclasses import dataclass

from dori.errors import DoriError
from dori.fields import (BATCH_HELP, GUIDANCE_HELP, IMAGES_HELP, MITIGATION_HELP, MODEL_HELP, REFERENCE_HELP, SSCD_HELP,
                         Selection, UtilityOptions, _check_numbers, _check_positive, _check_utility, carried,
                         check_choice, opt, parse_ratio)  # fmt: skip

# dori mitigate --method: pruning (a mask over the weights) and fine-tuning (a new model).
PRUNING_METHODS = ("nemo", "wanda")
FINETUNING_METHODS = ("esd", "ca", "siss")
MITIGATION_METHODS = PRUNING_METHODS + FINETUNING_METHODS
# The fine-tuning methods' word options (dori.unlearn.erasure says what each means).
LR_RULES = ("reference", "scaled")
SISS_TIMESTEPS = ("last", "uniform")
SISS_KEEP = ("own", "empty")

# ``dori study``'s stages in the order they run; the default runs all but the optional ones.
STUDY_STAGES = ("detect", "replicate", "nemo", "wanda", "nemo_dori", "wanda_dori", "wanda_sweep", "esd", "esd_dori",
                "ca", "ca_dori", "siss", "siss_dori", "locality", "unlearn")  # fmt: skip
# Not in the default study: Wanda's trade-off curve, and the fine-tuning mitigations (several minutes each on 2 cores).
STUDY_OPTIONAL_STAGES = ("wanda_sweep", "esd", "esd_dori", "ca", "ca_dori", "siss", "siss_dori")
STUDY_DEFAULT_STAGES = tuple(s for s in STUDY_STAGES if s not in STUDY_OPTIONAL_STAGES)


@dataclass(frozen=True, kw_only=True)
class ReplicateConfig(Selection):
    prompts: str = opt(help="Prompt set: bundled:NAME, sd14:NAME, or a .csv/.jsonl/.txt file.")
    model: str = opt("bundled", help=MODEL_HELP)
    mitigation: str | None = opt(None, help=MITIGATION_HELP)
    seeds: int = opt(10, help="Generations per prompt.")
    first_seed: int = opt(0)
    steps: int = opt(50, help="DDIM steps.")
    guidance: float | None = opt(None, help=GUIDANCE_HELP)
    sscd_convention: str = opt("resize320", help="resize320 (NeMo) or center224 (Wen et al.).")

    def __post_init__(self) -> None:
        _check_numbers(self)
        self._check_selection()
        _check_positive(self, "seeds", "steps", "batch_size")


@dataclass(frozen=True)
class DetectConfig:
    memorized: str = opt(help="Memorized prompt set.")
    non_memorized: str = opt(help="Non-memorized prompt set.")
    model: str = opt("bundled", help=MODEL_HELP)
    mitigation: str | None = opt(None, help=MITIGATION_HELP)
    generations: int = opt(4, help="Generations per prompt for the noise norm.")
    consistency_seeds: int = opt(10, help="Seeds for NeMo's SSIM check.")
    steps: int = opt(50)
    guidance: float | None = opt(None, help=GUIDANCE_HELP)
    all_steps: bool = opt(False, help="Also average the noise norm over all steps.")
    limit: int | None = opt(None, help="Only the first N prompts.")
    batch_size: int = opt(64, help="Images per U-Net batch.")

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_positive(self, "generations", "steps", "batch_size")
        if self.consistency_seeds < 2:
            raise DoriError(f"consistency-seeds must be at least 2 (pairs of seeds), got {self.consistency_seeds}")


@dataclass(frozen=True, kw_only=True)
class MitigateConfig(Selection, UtilityOptions):
    method: str = opt(help="nemo or wanda (pruning); esd, ca or siss (fine-tuning: the model in DIR/model).")
    prompts: str = opt(help="The memorized prompts to mitigate.")
    model: str = opt("bundled", help=MODEL_HELP)
    reference_prompts: str | None = opt(None, help=REFERENCE_HELP)  # default: the model's own set
    stats: str | None = opt(None, help="NeMo: a statistics file (e.g. nemo_sd14_value_stats.pt).")
    # NeMo's SSIM threshold (default: mean + 1 std on the reference set).
    threshold: float | None = opt(None, help="NeMo: SSIM threshold (0.428 for SD v1.4).")
    nemo_seeds: int = opt(10, help="NeMo: seeds of its memorization check (the reference's 10).")
    sites: str = opt("ffn", help="Wanda: ffn or value sites.")
    # Wanda: fraction of each row's weights considered, or "auto": the smallest ratio on
    # mitigate.wanda.WANDA_LADDER whose mitigated model replicates none of the prompts on the
    # defender's own seeds (mitigate.wanda.DEFENDER_FIRST_SEED on; disjoint from the evaluation's).
    ratio: float | str = opt(0.01, help=("Wanda: top fraction of each row considered, or 'auto': the smallest of "
                                         "0.01, 0.02, 0.05, 0.1, 0.2, 0.5 that stops replication on the defender's "
                                         "own seeds."))
    scope: str = opt("prompt", help=("NeMo: 'prompt' runs each prompt under its own neurons (as NeMo evaluates); "
                                     "'union' runs all prompts under all neurons."))
    seeds: int = opt(10, help="Generations per prompt for MR before / after.")
    utility_seeds: int = opt(4)
    steps: int = opt(50)
    guidance: float | None = opt(None, help=GUIDANCE_HELP)
    # The fine-tuning methods (dori.unlearn.erasure): None takes the paper's setting.
    finetune_steps: int | None = opt(None, help="esd / ca / siss: fine-tuning steps (default: the paper's).")
    learning_rate: float | None = opt(None, flag="--lr", help=("esd / ca / siss: learning rate (default: the "
                                                               "reference's, by --lr-rule)."))  # fmt: skip
    lr_rule: str = opt("reference", help=("esd / ca / siss: 'reference' takes the reference code's learning rate "
                                          "for SD as it is; 'scaled' multiplies it by the model's pre-training "
                                          "rate over SD's 1e-4."))  # fmt: skip
    siss_timesteps: str = opt("last", help=("siss: 'last' trains at t = T - 1 only, as the reference code does; "
                                            "'uniform' draws t over all timesteps, as the paper writes the loss."))  # fmt: skip
    siss_keep: str = opt("own", help=("siss: 'own' keeps the prompt's own generations that are not copies, as the "
                                      "reference does; 'empty' keeps the empty prompt's, for a model that copies "
                                      "its prompts in every seed."))  # fmt: skip
    ca_augment: bool = opt(True, flag="--ca-augment/--no-ca-augment",
                           help=("ca: flip, resize and prefix the anchor images as the reference does "
                                 "('a far away', 'zoomed in' ...)."))  # fmt: skip
    anchor: str | None = opt(None, help=("ca: the anchor caption, or a file with one per prompt (default on the "
                                         "bundled kind: the title's object, 'an album cover')."))  # fmt: skip
    checkpoint_every: int = opt(25, help="esd / ca / siss: steps between checkpoints.")
    # A 'dori replicate' run of the same prompts and settings: its numbers are "before" (the study passes it).
    baseline: str | None = opt(None, cli=False)

    def __post_init__(self) -> None:
        _check_numbers(self)
        self._check_selection()
        if self.method not in MITIGATION_METHODS:
            raise DoriError(f"unknown method {self.method!r}; use {', '.join(MITIGATION_METHODS)}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise DoriError(f"--lr must be positive, got {self.learning_rate}")
        check_choice("--lr-rule", self.lr_rule, LR_RULES)
        check_choice("--siss-timesteps", self.siss_timesteps, SISS_TIMESTEPS)
        check_choice("--siss-keep", self.siss_keep, SISS_KEEP)
        _check_positive(self, "checkpoint_every", *(("finetune_steps",) if self.finetune_steps is not None else ()))
        if self.sites not in ("ffn", "value"):
            raise DoriError(f"unknown site set {self.sites!r}; use ffn or value")
        object.__setattr__(self, "ratio", parse_ratio(self.ratio))
        if self.scope not in ("prompt", "union"):
            raise DoriError(f"unknown scope {self.scope!r}; use prompt (each prompt under its own neurons) or union")
        _check_positive(self, "seeds", "utility_seeds", "steps", "batch_size")
        _check_utility(self)


@dataclass(frozen=True, kw_only=True)
class WandaSweepConfig(Selection, UtilityOptions):
    """``dori wanda-sweep``: for each Wanda ratio on ``ladder``, MR without the attack, MR after
    ``attack_steps`` DoRI steps, and held-out utility (the trade-off curve)."""

    prompts: str = opt(help="The memorized prompts.")
    model: str = opt("bundled", help=MODEL_HELP)
    sites: str = opt("ffn", help="ffn or value sites.")
    # Mitigate.wanda.WANDA_LADDER.
    ladder: str = opt("0.01,0.02,0.05,0.1,0.2,0.5", help="Comma-separated Wanda ratios, increasing.")
    seeds: int = opt(10, help="Generations per prompt.")  # generations per prompt (evaluation seeds 0 ..)
    utility_seeds: int = opt(4)
    steps: int = opt(50, help="DDIM steps of every generation.")
    guidance: float | None = opt(None, help=GUIDANCE_HELP)
    attack_steps: int = opt(50, help="DoRI steps at each ratio.")
    learning_rate: float = opt(0.1, flag="--lr")
    attack_batch: int = opt(8, help="(noise, t) pairs per step.")
    attack_seed: int = opt(0)

    def __post_init__(self) -> None:
        _check_numbers(self)
        self._check_selection()
        if self.sites not in ("ffn", "value"):
            raise DoriError(f"unknown site set {self.sites!r}; use ffn or value")
        ratios = self.ratios()
        if ratios != sorted(set(ratios)):
            raise DoriError(f"--ladder must list distinct ratios in increasing order, got {self.ladder!r}")
        _check_positive(self, "seeds", "utility_seeds", "steps", "attack_steps", "attack_batch", "batch_size")
        _check_utility(self)

    def ratios(self) -> list[float]:
        parts = [p for p in self.ladder.split(",") if p.strip()]
        ratios = [parse_ratio(p) for p in parts]
        if not ratios or "auto" in ratios:
            raise DoriError(f"--ladder must be comma-separated numbers in (0, 1], got {self.ladder!r}")
        return ratios

    def attack(self) -> AttackRunConfig:
        """The DoRI run at each ratio, measured before (step 0: the prompt's own embedding) and after."""
        return carried(AttackRunConfig, self, renamed={"steps": "attack_steps", "eval_steps": "steps"}, steps_curve="0",
                       control=False)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AttackRunConfig(Selection):
    prompts: str = opt(help="Memorized prompts whose images to bring back.")
    model: str = opt("bundled", help=MODEL_HELP)
    mitigation: str | None = opt(None, help=MITIGATION_HELP)
    init: str = opt("prompt", help="prompt, random or other.")
    other_prompts: str | None = opt(None, help="Prompts for --init other.")
    steps: int = opt(50, help="Adam steps.")
    learning_rate: float = opt(0.1, flag="--lr")
    attack_batch: int = opt(8, help="(noise, t) pairs per step.")
    steps_curve: str = opt("0,1,10,25,50", help="Step counts at which to measure MR.")
    control: bool = opt(True, help="Also attack non-memorized targets.", flag="--control/--no-control")
    # Targets per control set (the control is measured at step 0 and the last step).
    control_limit: int = opt(10, cli=False)
    seeds: int = opt(10, help="Generations per embedding.")
    eval_steps: int = opt(50, help="DDIM steps of the evaluation's generations.")
    guidance: float | None = opt(None, help=GUIDANCE_HELP)
    attack_seed: int = opt(0)

    def __post_init__(self) -> None:
        _check_numbers(self)
        self._check_selection()
        if self.init not in ("prompt", "random", "other"):
            raise DoriError(f"unknown --init {self.init!r}; use prompt, random or other")
        if self.steps < 0:
            raise DoriError(f"steps must be >= 0, got {self.steps}")
        _check_positive(self, "seeds", "attack_batch", "eval_steps", "batch_size")
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
class UnlearnRunConfig(Selection, UtilityOptions):
    prompts: str = opt(help="The memorized prompts to remove.")
    model: str = opt("bundled", help=MODEL_HELP)
    mitigation: str | None = opt(None, help="Surrogates from this mitigated model (default: NeMo, run here).")
    # Real models: non-memorized pairs for L_DM (with --images).
    retain_prompts: str | None = opt(None, help="Real models: non-memorized pairs (with --images).")
    steps: int = opt(150, help="Fine-tuning steps.")
    learning_rate: float = opt(2e-4, flag="--lr")
    retain_batch: int = opt(32)
    triggers_per_target: int = opt(3, flag="--triggers")
    inner_steps: int = opt(5, help="Attack steps per fine-tuning step (warm start).")
    warm_start: bool = opt(True, help="Continue triggers, or a fresh search every step.", flag="--warm-start/--fresh")
    fresh_steps: int = opt(50, help="Attack steps of a fresh trigger search (--fresh, or each round's).")
    refresh_every: int = opt(0, help="Collect fresh triggers every N steps (0: never; see --fresh-steps).")
    adv_weight: float = opt(1.0)
    warmup_steps: int = opt(0, help="Steps over which the learning rate rises linearly from 0.")
    # A departure from the paper, chosen by the rule in docs/RESULTS.md: at weight 1 the bundled model
    # kept 93% of its held-out alignment (FD 1.9x), at 10 99% (FD 1.2x); 0 gives the paper's objective.
    preserve_weight: float = opt(10.0, help="Weight of a term holding the U-Net's outputs on the retained captions "
                                            "and the empty caption to the original's (0: the paper's loss).")
    # Pre-training's caption dropout (the bundled recipe's 10%; SD's own fine-tuning used 10% too).
    empty_caption_prob: float = opt(0.1, help="Share of utility rows under the empty caption.")
    surrogate_rule: str = opt("any", help="any: below tau against every memorized image; own: the older rule.")
    surrogate_tries: int = opt(8, help="Generations per prompt to pick a surrogate from.")
    eval_attack_steps: int = opt(50, help="Steps of the evaluation's DoRI attack.")
    seeds: int = opt(10, help="Generations per prompt in the evaluation.")
    utility_seeds: int = opt(4)
    eval_steps: int = opt(50, help="Sampling steps in the evaluation.")
    guidance: float | None = opt(None, cli=False)  # the model's own default
    checkpoint_every: int = opt(25)
    seed: int = opt(0)

    def __post_init__(self) -> None:
        _check_numbers(self)
        self._check_selection()
        _check_positive(self, "steps", "retain_batch", "triggers_per_target", "seeds", "utility_seeds", "eval_steps",
                        "checkpoint_every", "batch_size", "surrogate_tries")  # fmt: skip
        _check_utility(self)
        if self.learning_rate <= 0:
            raise DoriError(f"learning rate must be positive, got {self.learning_rate}")
        if self.surrogate_rule not in ("any", "own"):
            raise DoriError(f"unknown --surrogate-rule {self.surrogate_rule!r}; use any or own")
        if self.empty_caption_prob >= 1:
            raise DoriError(f"--empty-caption-prob must be below 1, got {self.empty_caption_prob}")


@dataclass(frozen=True, kw_only=True)
class LocalityConfig(Selection):
    """``dori locality``: Y_mem is the whole prompt set (and ``more_prompts``); the first ``targets``
    of its images are attacked from ``inits`` random initialisations each (the triggers, Y_adv).
    Under a NeMo or Wanda ``mitigation`` the triggers are searched under its mask and only that
    method's views are measured; without one, both methods'."""

    prompts: str = opt(help="Memorized prompts (Y_mem); the first --targets are attacked.")
    model: str = opt("bundled", help=MODEL_HELP)
    mitigation: str | None = opt(None, help=MITIGATION_HELP)  # triggers are searched and checked under it
    # Distances among these prompts' embeddings (default: the model's own set).
    non_memorized: str | None = opt(None, help="Prompts whose embeddings give the distance scale.")
    # More memorized prompts for Y_mem only: not attacked, so they need no training image.
    more_prompts: str | None = opt(None, help="More memorized prompts that join Y_mem (not attacked), e.g. "
                                              "bundled:template.")  # fmt: skip
    targets: int = opt(1, help="Memorized images to attack.")
    inits: int = opt(100, help="Random initialisations (triggers) per target.")
    steps: int = opt(50, help="Attack steps.")
    learning_rate: float = opt(0.1, flag="--lr")
    # (noise, timestep) pairs per trigger per step; 8 for a plain attack.
    attack_batch: int = opt(2, help="(noise, t) pairs per trigger per step.")
    # Generations per trigger that decide whether it succeeded.
    seeds: int = opt(2, help="Generations per trigger for its success check.")
    eval_steps: int = opt(50, help="DDIM steps of the success check's generations.")
    guidance: float | None = opt(None, help=GUIDANCE_HELP)
    agreement_triggers: int = opt(10, help="Triggers per target given to NeMo and Wanda.")
    wanda_sites: str = opt("ffn", help="ffn or value.")
    ratio: float = opt(0.01, cli=False)
    reference_prompts: str | None = opt(None, help=REFERENCE_HELP)  # NeMo statistics / threshold (as in dori mitigate)
    stats: str | None = opt(None, help="NeMo: a statistics file.")
    threshold: float | None = opt(None, help="NeMo: SSIM threshold.")
    nemo_seeds: int = opt(10, help="NeMo: seeds of its memorization check (the reference's 10).")
    tsne: bool = opt(True, help="Also a t-SNE projection (besides PCA).", flag="--tsne/--no-tsne")
    seed: int = opt(0)

    def __post_init__(self) -> None:
        _check_numbers(self)
        self._check_selection()
        _check_positive(self, "targets", "inits", "seeds", "attack_batch", "eval_steps", "agreement_triggers",
                        "batch_size")  # fmt: skip
        if self.steps < 0:
            raise DoriError(f"steps must be >= 0, got {self.steps}")
        if self.inits < 2:
            raise DoriError(f"inits must be at least 2 (distances need pairs), got {self.inits}")
        if self.wanda_sites not in ("ffn", "value"):
            raise DoriError(f"unknown site set {self.wanda_sites!r}; use ffn or value")
        if not 0 < self.ratio <= 1:
            raise DoriError(f"ratio must be in (0, 1], got {self.ratio}")


@dataclass(frozen=True, kw_only=True)
class StudyConfig(UtilityOptions):
    """``dori study``: every stage on one model, at sizes set by the model's kind (see ``seeds``)."""

    model: str = opt("bundled", help=MODEL_HELP)
    memorized: str = opt("bundled:memorized")
    non_memorized: str = opt("bundled:non_memorized")
    # Real models: the memorized prompts of this type only (the paper's table: VM).
    type: str | None = opt(None, help="Keep only memorized prompts of this type (VM, TM).")
    # Real models: NeMo's published statistics and threshold (SD v1.4: nemo_sd14_value_stats.pt, 0.428);
    # what is not given comes from the non-memorized prompts, as 'dori mitigate --reference-prompts' does.
    anchor: str | None = opt(None, help="Real models: Concept Ablation's anchor caption, or a file with one per prompt.")
    stats: str | None = opt(None, help="Real models: NeMo's statistics file (default: from --non-memorized).")
    threshold: float | None = opt(None, help="Real models: NeMo's SSIM threshold (0.428 for SD v1.4; default: from "
                                             "--non-memorized).")  # fmt: skip
    stages: str = opt(",".join(STUDY_DEFAULT_STAGES),
                      help=f"Comma-separated stages, from {', '.join(STUDY_STAGES)} (wanda_sweep, Wanda's trade-off "
                           "curve, is not in the default).")  # fmt: skip
    quick: bool = opt(False, help="Reduced settings (for tests and a first look).")
    images: str | None = opt(None, help=IMAGES_HELP)
    sscd: str | None = opt(None, help=SSCD_HELP)
    batch_size: int = opt(64, help=BATCH_HELP)
    missing_images: str = opt("error", help="Real models: error or skip (see dori replicate --help).")
    # Generations per prompt and DDIM steps in every evaluation. None: the paper's 10 and 50 for a
    # real model; 4 and 20 for a model of the bundled kind (wherever it was loaded from), so that
    # its whole study runs in minutes on 2 CPU cores (its model card reports 10 seeds at 50 steps).
    # On the bundled model the study's
    # locality stage also starts from 32 random inits per target (the command's default: 100), and
    # fine-tuning warm-starts its triggers with 3 attack steps per step (the command's default: 5).
    lr_rule: str = opt("reference", help=("The esd / ca / siss stages' learning rates: reference (as their code "
                                          "has them for SD) or scaled (times the model's pre-training rate over "
                                          "SD's 1e-4)."))  # fmt: skip
    siss_keep: str = opt("own", help=("The siss stage's kept images: own (the prompt's own non-copies, as its "
                                      "reference) or empty (the empty prompt's, for a model that always copies)."))  # fmt: skip
    seeds: int | None = opt(None, help="Generations per prompt (default: 10; bundled model 4).")
    sampling_steps: int | None = opt(None, help="DDIM steps (default: 50; bundled model 20).")

    def __post_init__(self) -> None:
        _check_utility(self)
        Selection._check_selection(self)
        for name in ("seeds", "sampling_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DoriError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        check_choice("--lr-rule", self.lr_rule, LR_RULES)
        check_choice("--siss-keep", self.siss_keep, SISS_KEEP)
        unknown = set(self.stage_list()) - set(STUDY_STAGES)
        if unknown:
            raise DoriError(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STUDY_STAGES)}")

    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]
