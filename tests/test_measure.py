"""Detector scores, similarity, and the replicate / detect workflows on a tiny SD folder."""

from __future__ import annotations

import json

import pytest
import torch

from dori.configs import DetectConfig, ReplicateConfig
from dori.errors import DoriError
from dori.measure.detection import roc_auc, tpr_at_fpr
from dori.measure.similarity import calibrate_toy_detector, gaussian_blur, ms_ssim
from dori.stages.detect import run_detect
from dori.stages.replicate import run_replicate


def test_roc_auc_and_tpr():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 3], [2, 2]) == 0.5
    negatives = list(range(100))  # at 1% FPR one negative (99) may pass: the threshold is 98
    assert tpr_at_fpr([98.5, 99.5, 50], negatives) == pytest.approx(2 / 3)
    assert tpr_at_fpr([200], [1, 2, 3]) == 1.0


def test_a_rate_exactly_at_a_bar_meets_it():
    """Rates are counted, not float32 means: 152 of 160 aligned is 0.95 and meets "at least 0.95",
    and 8 of 160 replicating is 0.05 and meets "at most 0.05" (a float32 mean misses both)."""
    from dori.bundled.card import ALIGNMENT_BAR, CONTROL_BAR
    from dori.measure.replication import rate, summarize

    aligned = torch.arange(160) < 152
    assert float(aligned.float().mean()) < ALIGNMENT_BAR <= rate(aligned) == 152 / 160
    row = {"similarities": [0.9] * 8 + [0.1] * 152}
    assert float((torch.tensor(row["similarities"]) > 0.5).float().mean()) > CONTROL_BAR
    assert summarize([row], tau=0.5)["mr"] == 8 / 160 <= CONTROL_BAR
    assert rate(torch.zeros(0, dtype=torch.bool)) != rate(torch.zeros(0, dtype=torch.bool))  # NaN: nothing to count


def test_ms_ssim_identity_and_difference():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ms_ssim(a, a), torch.ones(2))
    assert (ms_ssim(a, a.flip(0)) < 0.5).all()


def test_toy_detector_separates_copies_from_other_images():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 16, 16, generator=g)
    detector, stats = calibrate_toy_detector(images)
    feats = detector.embed(images)
    noisy = detector.embed((images + 0.01 * torch.randn(images.shape, generator=g)).clamp(0, 1))
    assert (detector.similarity(noisy, feats).diag() > detector.tau).all()
    assert stats["nearest_other_render"]["max"] >= detector.tau


def test_gaussian_blur_equals_replicate_padding_and_convolution():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    for shape, radius in (((3, 3, 32, 32), 4), ((2, 4, 24, 40), 5), ((1, 1, 6, 6), 5)):
        images = torch.rand(shape, generator=g)
        taps = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * 1.5**2))
        taps = taps / taps.sum()
        padded = F.pad(images, (radius,) * 4, mode="replicate").flatten(0, 1)[:, None]
        expected = F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1)).view(shape)
        assert torch.allclose(gaussian_blur(images, 1.5, radius), expected, atol=1e-6)


def test_toy_detector_calibration_does_not_depend_on_the_chunk_size():
    images = torch.rand(30, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    whole, whole_stats = calibrate_toy_detector(images, chunk=64)
    chunked, chunked_stats = calibrate_toy_detector(images, chunk=7)
    # similarities lie in [-1, 1]: absolute tolerance
    assert chunked.tau == pytest.approx(whole.tau, abs=1e-5) and chunked.tau > -1
    assert chunked_stats["nearest_other_render"] == pytest.approx(whole_stats["nearest_other_render"], abs=1e-5)
    assert chunked_stats["nearest_other_render"] == pytest.approx(whole_stats["nearest_other_render"], abs=1e-5)


def _replicate_config(prompt_files, sscd_file, **kw):
    return ReplicateConfig(prompts=str(prompt_files / "mem.csv"), seeds=3, steps=2, images=str(prompt_files / "images"),
                           sscd=str(sscd_file), batch_size=6, **kw)  # fmt: skip


def test_replicate_writes_summary_and_resumes(tiny_sd, prompt_files, sscd_file, tmp_path):
    config = _replicate_config(prompt_files, sscd_file)
    full = run_replicate(config, tiny_sd, tmp_path / "full")
    for key in ("mr", "sscd_mean", "sscd_std", "sscd_median", "n_prompts", "n_seeds", "similarity"):
        assert key in full
    assert full["n_prompts"] == 4 and full["n_seeds"] == 3
    assert full["similarity"]["convention"] == "resize320"
    rows = [json.loads(line) for line in (tmp_path / "full" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and all(len(r["similarities"]) == 3 for r in rows)

    # Interrupt after the first batch (2 prompts), then resume: the same final numbers.
    calls = []

    def interrupt(n):
        calls.append(n)
        if len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_replicate(config, tiny_sd, tmp_path / "cut", progress=interrupt)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run_replicate(config, tiny_sd, tmp_path / "cut", resume=True)
    assert resumed == full

    with pytest.raises(DoriError, match="already holds"):
        run_replicate(config, tiny_sd, tmp_path / "full")
    with pytest.raises(DoriError, match=r"other parameters \(seeds\)"):
        run_replicate(_replicate_config(prompt_files, sscd_file).__class__(**{**config.__dict__, "seeds": 2}),
                      tiny_sd, tmp_path / "full", resume=True)  # fmt: skip


def test_replicate_needs_a_detector_and_images(tiny_sd, prompt_files, tmp_path):
    with pytest.raises(DoriError, match="--sscd"):
        run_replicate(ReplicateConfig(prompts=str(prompt_files / "mem.csv")), tiny_sd, tmp_path / "a")
    with pytest.raises(DoriError, match="at least 1"):
        ReplicateConfig(prompts="x", seeds=0)


def test_detect_scores_both_detectors(tiny_sd, prompt_files, tmp_path):
    config = DetectConfig(memorized=str(prompt_files / "mem.csv"), non_memorized=str(prompt_files / "non.txt"),
                          generations=2, consistency_seeds=3, steps=3, all_steps=True)  # fmt: skip
    summary = run_detect(config, tiny_sd, tmp_path / "det")
    assert 0 <= summary["noise_norm"]["auc"] <= 1 and 0 <= summary["ssim"]["auc"] <= 1
    assert set(summary["ssim"]) >= {"auc", "tpr_at_1pct_fpr", "threshold"}
    assert "noise_norm_all_steps" in summary
    assert summary["n_memorized"] == 4 and summary["n_non_memorized"] == 3
    assert (tmp_path / "det" / "roc.png").stat().st_size > 0
