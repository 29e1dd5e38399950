"""The shipped bundled model: the interface, and that it really memorizes its planted pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dori.models import load_model
from dori.toy.kit import ToyKit


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled")


@pytest.fixture(scope="module")
def kit(bundled):
    return ToyKit.from_folder(bundled.source)


def test_interface_and_sites(bundled):
    assert bundled.image_size == (32, 32) and bundled.vae is None
    assert bundled.encode(["Aurora Hollow album cover"]).shape == (1, 77, 128)
    assert len(bundled.value_sites()) == 3 and bundled.value_sites()[-1].name.startswith("mid_block.")
    # no cross-attention on the way up: the text reaches the image only through NeMo's sites
    assert len(bundled.ffn_sites()) == 3 and not any(s.name.startswith("up_blocks.") for s in bundled.ffn_sites())
    assert bundled.prediction_type == "v_prediction"
    assert bundled.meta["position_encoding"] == "sinusoidal" and bundled.unet.conv_in._forward_hooks


def test_the_shipped_card_states_every_rule_the_study_applies_to_it(bundled):
    from dori.bundled.card import study_rule_lines

    card = (Path(bundled.source) / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "\n".join(study_rule_lines()) in card  # a rule added to the code and not to the card fails here


def test_planted_captions_replicate_and_ordinary_ones_do_not(bundled, kit):
    from dori.measure.replication import replication, summarize

    planted = [r["prompt"] for r in kit.prompt_set("memorized")]
    # DDIM 20, the bundled study's sampling (the card measures at 50)
    rows, _ = replication(bundled, planted, [kit.references(p) for p in planted], kit.detector, seeds=[100, 101],
                          steps=20)  # fmt: skip
    assert summarize([r.row() for r in rows], kit.detector.tau)["mr"] >= 0.9
    ordinary = [r["prompt"] for r in kit.prompt_set("non_memorized")]
    rows, _ = replication(bundled, ordinary, [kit.references(p) for p in ordinary], kit.detector, seeds=[100],
                          steps=20)  # fmt: skip
    summary = summarize([r.row() for r in rows], kit.detector.tau)
    assert summary["mr"] <= 0.05
    assert summary["sscd_mean"] <= kit.detector.tau - 0.3  # SD's regime (issue 21), on a seed the card never used


def test_the_shipped_copy_detector_passes_its_benchmark_on_an_unseen_draw(kit):
    from dori.toy.copy_benchmark import run_copy_benchmark

    result = run_copy_benchmark(kit.detector, kit.data, n_sources=60, n_pairs=300, seed=31)
    assert result["passed"], (result["recall_by_edit"], result["false_positive_rate"])


def test_generation_is_deterministic_on_cpu(bundled):
    emb = bundled.encode(["a red circle, top left"])
    assert torch.equal(bundled.generate(emb, [5], steps=10), bundled.generate(emb, [5], steps=10))


def _quick_study(folder, *extra: str):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dori", "study", "--quick", "--out", str(folder), *extra],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "study"
    return folder, _quick_study(folder)


def test_quick_study_end_to_end(quick_study):
    folder, summary = quick_study
    expected = {"memorized", "non_memorized", "non_memorized+dori", "nemo", "nemo+dori", "wanda", "wanda+dori",
                "adv_ft", "adv_ft+dori"}  # fmt: skip
    assert set(summary["table"]) == expected
    for row in summary["table"].values():
        assert {"sscd_mean", "sscd_std", "mr", "utility"} <= set(row)
        assert 0.0 <= row["mr"] <= 1.0
    assert {"auc", "tpr_at_1pct_fpr"} <= set(summary["detection"])
    locality = summary["locality"]
    assert {"embedding", "activation", "weight_agreement"} <= set(locality)
    assert set(locality["activation"]) == set(locality["weight_agreement"]) == {"nemo", "wanda"}  # one run per mask
    assert sum(view.startswith("activation at") for view in locality["verdicts"]) == 2
    assert set(summary["timing"]) >= {"detect", "replicate", "nemo", "wanda", "locality_nemo", "locality_wanda", "unlearn"}
    report = (folder / "report.html").read_text()
    # --quick: 3 targets x 7 strip images (training image .. fine-tuning + DoRI), ROC, two MR-vs-steps
    # plots and four locality plots (a projection under each mask, and the two per-method figures)
    assert report.count("<img") == 3 * 7 + 3 + 4 and "not run</span>" not in report


def test_the_report_renders_every_image_in_headless_chromium(quick_study, tmp_path):
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium package is not installed (apt-get install chromium)")
    folder, _ = quick_study
    page = (folder / "report.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { const all = [...document.images]; "
             "document.body.setAttribute('data-rendered', all.filter(i => i.complete && i.naturalWidth > 0).length "
             "+ '/' + all.length); });</script>")  # fmt: skip
    (tmp_path / "report.html").write_text(page.replace("</body>", probe + "</body>"))
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                           (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    total = page.count("<img")
    assert f'data-rendered="{total}/{total}"' in done.stdout, done.stdout[-500:] + done.stderr[-1500:]


# Stages whose determinism test_interrupt.py already checks (it runs each command twice in fresh
# processes, one run interrupted and resumed, and compares the numbers: detect, the DoRI attack,
# locality, unlearn), and NeMo's search, whose mask the second study reuses (its generations are
# those of replicate; its search has no random draw): the second quick study leaves them out, to
# keep CI within its time.
CHECKED_ELSEWHERE = ("detect", "nemo", "nemo_dori", "wanda_dori", "locality", "unlearn")


def test_the_same_quick_study_twice_gives_the_same_numbers(quick_study, tmp_path):
    """The study's other stages (replication, Wanda with its ratio rule and the defender's own
    measurements) run again in a fresh process and give the same numbers."""
    import shutil

    from dori.configs import STUDY_DEFAULT_STAGES

    folder, first = quick_study
    shutil.copytree(folder / "stages" / "nemo", tmp_path / "again" / "stages" / "nemo")
    shutil.copy(folder / "config.json", tmp_path / "again" / "config.json")  # a study's own folder, resumed
    again = [s for s in STUDY_DEFAULT_STAGES if s not in CHECKED_ELSEWHERE]
    second = _quick_study(tmp_path / "again", "--stages", ",".join(again), "--resume")

    def numbers(summary: dict) -> dict:
        drop = {"timing", "seconds", "stages_run", "locality", "detection", "adv_ft", "adv_ft+dori"}
        return json.loads(json.dumps(summary, sort_keys=True), object_hook=lambda d: {k: v for k, v in d.items() if k not in drop})

    assert second["locality"] is None and second["detection"] is None and "adv_ft" not in second["table"]
    rows = numbers(second)["table"]
    assert set(rows) >= {"memorized", "non_memorized", "wanda"}
    assert rows == {name: numbers(first)["table"][name] for name in rows}


def test_a_study_resumes_with_other_stages_but_not_other_settings(bundled, tmp_path):
    from dori.errors import DoriError
    from dori.configs import StudyConfig
    from dori.stages.study import run_study

    first = run_study(StudyConfig(stages="detect", quick=True), bundled, tmp_path / "study")
    assert first["stages_run"] == ["detect"] and (tmp_path / "study" / "stages" / "detect" / "summary.json").exists()
    with pytest.raises(DoriError, match=r"other parameters \(seeds\)"):
        run_study(StudyConfig(stages="detect", quick=True, seeds=3), bundled, tmp_path / "study", resume=True)
    again = run_study(StudyConfig(stages="detect,replicate", quick=True), bundled, tmp_path / "study", resume=True)
    assert again["detection"] == first["detection"] and "memorized" in {row for row in again["table"]}


def test_a_study_refuses_locality_without_the_masks_it_searches_under(bundled, tmp_path):
    from dori.configs import StudyConfig
    from dori.errors import DoriError
    from dori.stages.study import run_study

    with pytest.raises(DoriError, match="under the nemo stage's mask.*add nemo to --stages"):
        run_study(StudyConfig(stages="replicate,locality", quick=True), bundled, tmp_path / "study")
    with pytest.raises(DoriError, match="add wanda to --stages"):
        run_study(StudyConfig(stages="nemo,locality", quick=True), bundled, tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_the_regime_checks_measure_and_judge_by_their_fixed_rules(bundled, kit):
    """The regime checks at reduced size on the shipped model: numbers, and verdicts that follow
    from the numbers and the rules (not the other way round). (a) is a check; (b) and (c) are
    measurements; the shipping rule combines them with (d)."""
    from dori.mitigate.nemo import NemoConfig
    from dori.bundled.regime import FLOOR_MR, SHIP_NEMO_TITLES, RegimeConfig, regime_checks, regime_lines, ship_verdict

    config = RegimeConfig(seeds=2, steps=4, nemo=NemoConfig(seeds=3), limit=2)
    regime = regime_checks(bundled, kit, config)
    a, b, c = regime["a_nemo_check"], regime["b_nemo_localises"], regime["c_site_floors"]
    assert a["n_planted"] == 4 and "n_ordinary" not in a  # two of each planted set; no ordinary captions (retired)
    assert a["passed"] == (a["planted_flagged"] == 4)
    assert b["value_neurons"] == sum(s.width for s in bundled.value_sites()) and len(b["neurons_per_title"]) == 2
    assert "passed" not in b and "passed" not in c  # measurements, not gates
    for d_passed in (True, False):
        regime["d_card"] = {"checks": {"benchmark": d_passed}, "passed": d_passed}
        ship = ship_verdict(regime)
        assert ship["passed"] == (d_passed and a["passed"] and sum(b["mitigated"]) >= min(SHIP_NEMO_TITLES, 2)
                                  and c["value_zeroed"]["mr"] <= FLOOR_MR)  # fmt: skip
        text = "\n".join(regime_lines(regime))
        assert text.count("**pass**") + text.count("**FAIL**") == 3  # (a), (d) and the shipping rule
        assert ("**FAIL**" in text.split("Shipping rule")[1]) == (not ship["passed"])

def test_the_shipped_folder_records_a_named_recipe_and_its_card_names_that_command():
    """The card's Recipe line is the command of the recipe that trained the shipped weights: the
    folder's training record is a named recipe's defaults at its seed, and the card names that
    command. (Its bits come back only on a machine like the one that trained them, which the
    shipped folder does not record: docs/BUNDLED_MODEL.md, "Reproducing the shipped weights".)"""
    from dori.bundled.recipe import recipe_command, recipe_of, recorded_config
    from dori.models.loading import bundled_model_dir

    folder = bundled_model_dir()
    config = recorded_config(json.loads((folder / "train_config.json").read_text()))
    assert recipe_of(config) is not None
    recipe_line = next(line for line in (folder / "MODEL_CARD.md").read_text().splitlines() if line.startswith("- Recipe:"))
    assert recipe_line.startswith(f"- Recipe: `{recipe_command(config)}` (")


def test_the_shipped_card_is_what_its_recorded_numbers_and_detector_say(tmp_path):
    """MODEL_CARD.md is written from card.json and copy_detector.json alone: rewritten from them it
    comes out the same, so no number on the card was typed or left from an older measurement."""
    import shutil

    from dori.bundled.train import rewrite_card
    from dori.models.loading import bundled_model_dir

    folder = bundled_model_dir()
    for name in ("card.json", "copy_detector.json", "dori_model.json", "attribute_classifier.json", "MODEL_CARD.md"):
        shutil.copy(folder / name, tmp_path / name)
    rewrite_card(tmp_path)  # keeps the recipe-seeds section, which tools/recipe_seeds.py writes
    assert (tmp_path / "MODEL_CARD.md").read_text() == (folder / "MODEL_CARD.md").read_text()
    detector = json.loads((folder / "copy_detector.json").read_text())
    card = json.loads((folder / "card.json").read_text())
    assert card["detector"] == {k: v for k, v in detector.items() if k != "calibration"}
    assert card["copy_benchmark"]["tau"] == detector["tau"]
