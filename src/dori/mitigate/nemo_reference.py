"""NeMo's reference: the activation statistics of ordinary prompts and the SSIM threshold, from a
statistics file, a prompt set, or the bundled model's own ordinary captions (cached per model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dori.errors import DoriError
from dori.interventions import active_interventions
from dori.models.base import DiffusionModel
from dori.references import is_bundled, load_prompts
from dori.runs import atomic_path

if TYPE_CHECKING:
    from dori.mitigate.nemo import NemoConfig


def cached_value_statistics(model: DiffusionModel, reference: str, say: Callable[[str], None]):
    """NeMo's reference statistics over ``reference``, computed once per (model, prompt set) and
    cached under ``$DORI_CACHE`` (default ``~/.cache/dori``)."""
    import hashlib
    import os

    from dori.mitigate.nemo import load_statistics, save_statistics, value_statistics

    texts = load_prompts(reference, model).texts
    key = hashlib.sha256("\n".join([model.fingerprint(), *texts]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DORI_CACHE", Path.home() / ".cache" / "dori")) / f"nemo_stats_{key}.pt"
    if cache.is_file():
        try:
            return load_statistics(cache, model)
        except DoriError:  # a damaged cache is only a cache: computed again below and replaced
            say(f"nemo: the cached statistics {cache} are unreadable; computing them again")
    say(f"nemo: value statistics over {reference} ({len(texts)} prompts)")
    stats = value_statistics(model, texts)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            save_statistics(stats, tmp)
    except (OSError, DoriError):
        pass  # an unwritable cache only costs the recomputation next time
    return stats


def check_nemo_inputs(model: DiffusionModel, *, reference_prompts: str | None, stats: str | None,
                      threshold: float | None) -> str | None:  # fmt: skip
    """Whether NeMo's statistics and threshold can be had from what was given, checked without
    computing anything (a stage that runs NeMo late calls this first, so a missing flag stops it
    before it has written anything). Returns the reference prompt set, if any."""
    reference = reference_prompts or ("bundled:ordinary" if is_bundled(model) else None)
    if stats is not None and not Path(stats).expanduser().is_file():
        raise DoriError(f"statistics file not found: {stats}; pass the NeMo statistics file with --stats")
    if stats is None and reference is None:
        raise DoriError("NeMo needs reference statistics: pass --stats FILE or --reference-prompts SET")
    if threshold is None and reference is None:
        raise DoriError("NeMo needs an SSIM threshold: pass --threshold (0.428 for SD v1.4) or --reference-prompts SET")
    return reference


def nemo_reference(model: DiffusionModel, *, reference_prompts: str | None, stats: str | None,
                   threshold: float | None, config: NemoConfig, say: Callable[[str], None]):  # fmt: skip
    """NeMo's two inputs: the value statistics and the SSIM threshold (the reference's rule: mean +
    1 std of every pairwise multi-scale SSIM over the reference prompts, at guidance 0 as in its
    check; its calibration script samples at guidance 7 with the conditional and unconditional
    halves swapped, which dori does not copy), from files or flags where given. ``config`` is the
    :class:`dori.mitigate.nemo.NemoConfig` the search runs with: the threshold uses its seeds and schedule."""
    from dori.measure.detection import nemo_threshold, pairwise_consistency
    from dori.mitigate.nemo import load_statistics

    reference = check_nemo_inputs(model, reference_prompts=reference_prompts, stats=stats, threshold=threshold)
    statistics = load_statistics(stats, model) if stats is not None else cached_value_statistics(model, reference, say)
    if threshold is None:
        texts = load_prompts(reference, model).texts
        key = (model.fingerprint(), tuple(texts), config.seeds, config.steps, config.batch_size)
        memo = active_interventions(model) == 0  # a hooked model is not the model the fingerprint names
        if memo and key in _THRESHOLDS:
            return statistics, _THRESHOLDS[key]
        say("nemo: calibrating the SSIM threshold")
        threshold = nemo_threshold(pairwise_consistency(model, model.encode(texts), seeds=list(range(config.seeds)),
                                                        steps=config.steps, batch_size=config.batch_size))  # fmt: skip
        if memo:
            _THRESHOLDS[key] = threshold
    return statistics, threshold


# Calibrated thresholds, remembered for the process: a study's NeMo and locality stages calibrate
# the same one (same weights, reference prompts, seeds, schedule and batch), so it is computed once.
_THRESHOLDS: dict[tuple, float] = {}


def nemo_for_run(model: DiffusionModel, config, say: Callable[[str], None]):
    """NeMo's search config and its two inputs for a command's ``config`` (any object with
    ``nemo_seeds``, ``batch_size``, ``reference_prompts``, ``stats`` and ``threshold``, as ``dori
    mitigate``'s and ``dori locality``'s have): (NemoConfig, statistics, threshold)."""
    from dori.mitigate.nemo import NemoConfig

    nemo_config = NemoConfig(seeds=config.nemo_seeds, batch_size=max(config.batch_size, 10))  # its own 50-step schedule
    stats, threshold = nemo_reference(model, reference_prompts=config.reference_prompts, stats=config.stats,
                                      threshold=config.threshold, config=nemo_config, say=say)  # fmt: skip
    return nemo_config, stats, threshold
