"""Wanda's ratio as a defender picks it (``--ratio auto``) and the trade-off sweep (issue 24)."""

from __future__ import annotations

import json

import pytest

from dori.configs import MitigateConfig, WandaSweepConfig
from dori.errors import DoriError
from dori.mitigate.wanda import DEFENDER_FIRST_SEED, WANDA_LADDER, first_clean_ratio
from dori.evaluation import evaluate_under
from dori.stages.attack import attack_and_measure
from dori.stages import mitigate as mitigate_stage
from dori.stages.mitigate import run_mitigate


def _common(prompt_files, sscd_file):
    return dict(prompts=str(prompt_files / "mem.csv"), images=str(prompt_files / "images"), sscd=str(sscd_file))


def test_first_clean_ratio_stops_at_the_smallest_rung_that_replicates_nothing():
    asked = []

    def mr_at(ratio):
        asked.append(ratio)
        return {0.01: 1.0, 0.02: 0.4, 0.05: 0.0, 0.1: 0.0}.get(ratio, 0.0)

    ratio, rungs, satisfied = first_clean_ratio(WANDA_LADDER, mr_at)
    assert (ratio, satisfied) == (0.05, True)
    assert asked == [0.01, 0.02, 0.05]  # nothing above the chosen rung is measured
    assert [r["mr"] for r in rungs] == [1.0, 0.4, 0.0]
    # MR 0.02 is not "replicates none": the rule does not round.
    assert first_clean_ratio([0.1, 0.2], lambda r: 0.02 if r == 0.1 else 0.0)[0] == 0.2


def test_first_clean_ratio_reports_an_unsatisfied_ladder_and_refuses_a_bad_one():
    ratio, rungs, satisfied = first_clean_ratio([0.01, 0.5], lambda r: 0.5)
    assert (ratio, satisfied, len(rungs)) == (0.5, False, 2)
    with pytest.raises(ValueError):
        first_clean_ratio([0.5, 0.01], lambda r: 0.0)


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), ("0.05", 0.05), (0.2, 0.2)])
def test_ratio_accepts_auto_or_a_fraction(text, expected):
    assert MitigateConfig(method="wanda", prompts="p", ratio=text).ratio == expected


@pytest.mark.parametrize("bad", ["nan", "0", "1.5", "half", "-0.1"])
def test_ratio_refuses_anything_else(bad):
    with pytest.raises(DoriError, match="--ratio must be auto"):
        MitigateConfig(method="wanda", prompts="p", ratio=bad)


def test_auto_ratio_measures_on_the_defender_seeds_and_keeps_the_smallest_clean_ratio(
        tiny_sd, prompt_files, sscd_file, tmp_path, monkeypatch):  # fmt: skip
    """A stub measure on the defender's seeds: replication stops once at least 40 weights are pruned."""
    real = evaluate_under
    defender_calls = []

    def stub(model, mitigation, prompts, refs, **settings):
        if settings.get("first_seed", 0) != DEFENDER_FIRST_SEED:
            return real(model, mitigation, prompts, refs, **settings)
        defender_calls.append(mitigation.size())
        return {"mr": 0.0 if mitigation.size() >= 40 else 1.0}, [], None

    monkeypatch.setattr(mitigate_stage, "evaluate_under", stub)
    config = MitigateConfig(method="wanda", ratio="auto", seeds=1, steps=2, utility_seeds=1, **_common(prompt_files, sscd_file))
    summary = run_mitigate(config, tiny_sd, tmp_path / "auto")
    assert summary["ratio_rule"] == "auto" and summary["auto_satisfied"]
    chosen = summary["ratio"]
    measured = [r["ratio"] for r in summary["ladder_mr"]]
    assert measured == list(WANDA_LADDER[: WANDA_LADDER.index(chosen) + 1])
    assert defender_calls[-1] >= 40 and all(size < 40 for size in defender_calls[:-1])
    assert summary["pruned_weights"] == defender_calls[-1]  # the saved mask is the chosen one
    fixed = run_mitigate(MitigateConfig(method="wanda", ratio=chosen, seeds=1, steps=2, utility_seeds=1,
                                           **_common(prompt_files, sscd_file)), tiny_sd, tmp_path / "fixed")  # fmt: skip
    assert fixed["pruned_weights"] == summary["pruned_weights"] and fixed["ratio_rule"] == "fixed"


def test_sweep_rows_follow_the_ladder_and_a_resume_finishes_without_redoing_rows(
        tiny_sd, prompt_files, sscd_file, tmp_path, monkeypatch):  # fmt: skip
    from dori.stages import wanda_sweep as sweep

    config = WandaSweepConfig(ladder="0.05,0.2,0.5", seeds=1, steps=2, utility_seeds=1, attack_steps=1, attack_batch=2,
                              limit=2, **_common(prompt_files, sscd_file))  # fmt: skip
    out = tmp_path / "sweep"
    real = attack_and_measure
    attacked = []

    def interrupted(*args, label, **kwargs):
        if label == "ratio_0.5":
            raise KeyboardInterrupt
        attacked.append(label)
        return real(*args, label=label, **kwargs)

    monkeypatch.setattr(sweep, "attack_and_measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_wanda_sweep(config, tiny_sd, out)
    assert [json.loads(line)["ratio"] for line in (out / "results.jsonl").read_text().splitlines()] == [0.05, 0.2]
    assert not (out / "summary.json").exists()

    attacked.clear()
    monkeypatch.setattr(sweep, "attack_and_measure", lambda *a, label, **k: (attacked.append(label), real(*a, label=label, **k))[1])
    summary = sweep.run_wanda_sweep(config, tiny_sd, out, resume=True)
    assert attacked == ["ratio_0.5"]
    rows = summary["rows"]
    assert [r["ratio"] for r in rows] == [0.05, 0.2, 0.5]
    sizes = [r["pruned_weights"] for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # a larger ratio prunes at least as much
    assert all(0 <= r["mr"] <= 1 and 0 <= r["mr_dori"] <= 1 for r in rows)
    assert (out / "sweep.png").exists()
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("ratio,pruned_weights")
    with pytest.raises(DoriError, match="increasing"):
        WandaSweepConfig(ladder="0.5,0.1", **_common(prompt_files, sscd_file))


def test_dori_fails_only_from_a_ratio_on_which_every_larger_ratio_also_fails():
    from dori.stages.wanda_sweep import _fails_from

    rows = lambda values: [{"ratio": r, "mr_dori": v} for r, v in zip([0.01, 0.1, 0.5], values)]  # noqa: E731
    assert _fails_from(rows([1.0, 0.0, 0.0])) == 0.1
    assert _fails_from(rows([0.0, 0.3, 0.0])) == 0.5  # a failure below a success does not count
    assert _fails_from(rows([1.0, 1.0, 0.2])) is None
