"""The shipped bundled model: the interface, and that it really memorizes its planted pairs."""

from __future__ import annotations

import json

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
    assert len(bundled.ffn_sites()) == 7
    assert bundled.prediction_type == "v_prediction"


def test_planted_captions_replicate_and_ordinary_ones_do_not(bundled, kit):
    from dori.measure.replication import replication, summarize

    planted = [r["prompt"] for r in kit.prompt_set("memorized")]
    rows, _ = replication(bundled, planted, [kit.references(p) for p in planted], kit.detector, seeds=[100, 101])
    assert summarize([r.row() for r in rows], kit.detector.tau)["mr"] >= 0.9
    ordinary = [r["prompt"] for r in kit.prompt_set("non_memorized")]
    rows, _ = replication(bundled, ordinary, [kit.references(p) for p in ordinary], kit.detector, seeds=[100])
    assert summarize([r.row() for r in rows], kit.detector.tau)["mr"] <= 0.05


def test_generation_is_deterministic_on_cpu(bundled):
    emb = bundled.encode(["a red circle, top left"])
    assert torch.equal(bundled.generate(emb, [5], steps=10), bundled.generate(emb, [5], steps=10))


def test_quick_study_end_to_end(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dori", "study", "--quick", "--out", str(tmp_path / "study")],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    expected = {"memorized", "non_memorized", "non_memorized+dori", "nemo", "nemo+dori", "wanda", "wanda+dori",
                "adv_ft", "adv_ft+dori"}  # fmt: skip
    assert set(summary["table"]) == expected
    for row in summary["table"].values():
        assert {"sscd_mean", "sscd_std", "mr", "utility"} <= set(row)
        assert 0.0 <= row["mr"] <= 1.0
    assert {"auc", "tpr_at_1pct_fpr"} <= set(summary["detection"])
    report = (tmp_path / "study" / "report.html").read_text()
    # --quick: 3 targets x 7 strip images (training image .. fine-tuning + DoRI), ROC and two MR-vs-steps plots
    assert report.count("<img") == 3 * 7 + 3 and "not run</span>" not in report
