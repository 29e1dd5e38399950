"""The bundled model's copy detector against its benchmark, the guidance rule, "any memorized
image", and what makes a model of the bundled kind (all cheap: no generation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import Tensor

from dori.errors import DoriError
from dori.measure.replication import summarize
from dori.measure.similarity import ToyCopyDetector, calibrate_toy_detector
from dori.bundled.card import GUIDANCE_GRID, choose_guidance
from dori.toy.copy_benchmark import KINDS, edit, run_copy_benchmark
from dori.toy.data import build_dataset


@pytest.fixture(scope="module")
def field_data():
    return build_dataset(seed=3, n_ordinary=400, n_verbatim=3, n_template=1, copies=2)


def test_every_edit_of_an_image_scores_above_another_render_of_its_caption(field_data):
    detector = ToyCopyDetector(tau=0.5)
    data = field_data
    first = next(i for i, k in enumerate(data.kinds) if k == "ordinary")
    other = next(i for i, c in enumerate(data.captions) if c == data.captions[first] and i != first)
    image, sibling = data.images[first], data.images[other]
    rng = np.random.default_rng(0)
    reference = detector.embed(image[None])
    rival = float(detector.similarity(detector.embed(sibling[None]), reference))
    assert float(detector.similarity(reference, reference)) == pytest.approx(1.0, abs=1e-5)
    for kind in KINDS:
        edited = edit(image.clone(), kind, rng)
        assert not torch.equal(edited, image)
        assert float(detector.similarity(detector.embed(edited[None]), reference)) > rival, kind


def test_detector_ignores_a_one_pixel_shift_and_global_colour_changes(field_data):
    detector = ToyCopyDetector(tau=0.5)
    image = field_data.images[0]
    shifted = torch.roll(image, shifts=1, dims=-1)
    darker = (image * 0.8).clamp(0, 1)
    paler = image.mean(0, keepdim=True) + 0.6 * (image - image.mean(0, keepdim=True))
    feats = detector.embed(torch.stack([image, shifted, darker, paler]))
    sims = detector.similarity(feats[1:], feats[:1]).flatten()
    assert (sims > 0.9).all(), sims  # the old detector scored a one-pixel shift below zero


def test_benchmark_on_field_data_meets_its_bars_with_the_calibrated_threshold(field_data):
    ordinary = field_data.images[[i for i, k in enumerate(field_data.kinds) if k == "ordinary"]]
    detector, _ = calibrate_toy_detector(ordinary, queries=200)
    result = run_copy_benchmark(detector, field_data, n_sources=30, n_pairs=200, seed=5)
    assert result["positives"] == (30 + len(field_data.planted)) * len(KINDS)
    assert set(result["recall_by_edit"]) == set(KINDS)
    assert result["recall"] >= 0.95 and result["false_positive_rate"] <= 0.01 and result["passed"]
    # the same benchmark fails a detector whose threshold sits above every copy (similarities are <= 1)
    strict = run_copy_benchmark(ToyCopyDetector(tau=1.001), field_data, n_sources=30, n_pairs=200, seed=5)
    assert strict["recall"] == 0.0 and not strict["passed"]


def test_guidance_rule_takes_highest_mr_then_similarity_then_lower_scale():
    sweep = [{"guidance": g, "mr": 0.5, "sscd_mean": 0.7} for g in GUIDANCE_GRID]
    assert choose_guidance(sweep) == min(GUIDANCE_GRID)  # full tie: the lower scale
    sweep[3] = {**sweep[3], "sscd_mean": 0.8}
    assert choose_guidance(sweep) == GUIDANCE_GRID[3]  # tie on MR: the higher mean similarity
    sweep[5] = {**sweep[5], "mr": 0.6, "sscd_mean": 0.1}
    assert choose_guidance(sweep) == GUIDANCE_GRID[5]  # MR first


def test_summary_counts_replication_of_any_memorized_image():
    rows = [{"similarities": [0.1, 0.2], "any_planted_similarities": [0.9, 0.2]},
            {"similarities": [0.95, 0.1], "any_planted_similarities": [0.95, 0.1]}]  # fmt: skip
    summary = summarize(rows, tau=0.8)
    assert summary["mr"] == 0.25 and summary["mr_any_planted"] == 0.5
    assert "mr_any_planted" not in summarize([{"similarities": [0.1]}], tau=0.8)


def test_a_folder_written_by_toy_train_is_of_the_bundled_kind_and_gets_the_bundled_study_sizes(tmp_path, tiny_sd_dir):
    from dori.models.loading import is_bundled_kind
    from dori.configs import StudyConfig
    from dori.stages.study import stage_configs

    folder = tmp_path / "retrained"
    folder.mkdir()
    (folder / "dori_model.json").write_text(json.dumps({"toy_data": {"seed": 7}}))
    assert is_bundled_kind("bundled") and is_bundled_kind(folder) and not is_bundled_kind(tiny_sd_dir)
    retrained = stage_configs(StudyConfig(model=str(folder)), tmp_path / "a")
    shipped = stage_configs(StudyConfig(), tmp_path / "b")
    real = stage_configs(StudyConfig(model=str(tiny_sd_dir)), tmp_path / "c")
    assert retrained["replicate"].seeds == shipped["replicate"].seeds == 4
    assert retrained["replicate"].steps == shipped["replicate"].steps == 20
    assert real["replicate"].seeds == 10 and real["replicate"].steps == 50
    (folder / "dori_model.json").write_text("{not json")
    from dori.errors import DoriError

    with pytest.raises(DoriError, match="not valid JSON"):
        is_bundled_kind(folder)


def test_models_trained_before_the_field_style_keep_their_plain_renders(tmp_path):
    from dori.toy.kit import ToyKit

    folder = tmp_path / "old"
    folder.mkdir()
    kwargs = {"seed": 0, "n_ordinary": 20, "n_verbatim": 1, "n_template": 0, "copies": 2}
    (folder / "dori_model.json").write_text(json.dumps({"toy_data": kwargs}))
    assert ToyKit.from_folder(folder).data.style == "plain"
    assert torch.equal(ToyKit.from_folder(folder).data.images, build_dataset(**kwargs, ordinary_style="plain").images)
    assert build_dataset(**kwargs).style == "field"


def test_a_folder_calibrated_by_the_old_detector_is_refused_with_the_command_that_fixes_it(tmp_path):
    from dori.errors import DoriError
    from dori.toy.kit import ToyKit

    (tmp_path / "dori_model.json").write_text(json.dumps({"toy_data": {"seed": 0}}))
    (tmp_path / "copy_detector.json").write_text(json.dumps({"name": "dori-toy-copy", "scale": 0.3, "tau": 0.83,
                                                             "sigma": 1.5}))  # fmt: skip
    with pytest.raises(DoriError, match=r"old copy detector.*dori toy card --model"):
        ToyKit.from_folder(tmp_path).detector


def test_paired_similarity_is_the_diagonal_of_the_full_similarity(field_data):
    detector = ToyCopyDetector(tau=0.5)
    a, b = detector.embed(field_data.images[:12]), detector.embed(field_data.images[12:24])
    assert torch.allclose(detector.paired_similarity(a, b), detector.similarity(a, b).diagonal(), atol=1e-6)


def test_the_noise_estimate_reads_near_zero_on_clean_renders_and_the_noise_it_is_given(field_data):
    from dori.measure.similarity import _opponent, estimate_noise

    images = field_data.images[:64]
    lum = _opponent(images)[0]
    assert float(estimate_noise(lum).max()) < 0.01
    generator = torch.Generator().manual_seed(0)
    for sigma in (0.03, 0.12):
        noisy_lum = lum + sigma * torch.randn(lum.shape, generator=generator)  # unclipped: the estimate's own scale
        assert float(estimate_noise(noisy_lum).median()) == pytest.approx(sigma, rel=0.1)


def _flat_copy_pair() -> tuple[Tensor, Tensor]:
    """A smooth two-colour gradient with one small dark square, and the same under noise 0.12."""
    ramp = torch.linspace(0, 1, 32)
    image = torch.stack([0.3 + 0.4 * ramp[None, :].expand(32, 32), 0.6 - 0.3 * ramp[:, None].expand(32, 32),
                         torch.full((32, 32), 0.5)])  # fmt: skip
    image[:, 20:26, 6:12] = 0.15
    noisy = (image + 0.12 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    return image, noisy


def test_the_noise_floor_raises_a_noisy_flat_copy_and_leaves_clean_renders_as_they_were(field_data):
    image, noisy = _flat_copy_pair()
    floored, plain = ToyCopyDetector(tau=0.5), ToyCopyDetector(tau=0.5, noise_floor=0.0)
    scores = [float(d.paired_similarity(d.embed(noisy[None]), d.embed(image[None]))) for d in (floored, plain)]
    assert scores[0] > scores[1], scores  # how far it moves real titles: the benchmark's noise probe
    # clean renders read almost no noise: their similarities to each other barely move (the gap
    # between a copy and another picture is some 0.3)
    clean = field_data.images[:32]
    moved = [d.similarity(d.embed(clean), d.embed(clean)) for d in (floored, plain)]
    assert (moved[0] - moved[1]).abs().max() < 0.05


def test_a_calibration_written_before_the_noise_floor_and_scales_loads_without_them(tmp_path):
    from dori.toy.kit import ToyKit

    (tmp_path / "dori_model.json").write_text(json.dumps({"toy_data": {"seed": 0}}))
    old = {"name": "dori-toy-copy", "tau": 0.66, "sigma": 1.0, "shift": 3}
    (tmp_path / "copy_detector.json").write_text(json.dumps(old))
    old_detector = ToyKit.from_folder(tmp_path).detector
    assert old_detector.noise_floor == 0.0 and old_detector.scales == (1.0,)
    (tmp_path / "copy_detector.json").write_text(json.dumps(ToyCopyDetector(tau=0.7).to_dict()))
    assert ToyKit.from_folder(tmp_path).detector == ToyCopyDetector(tau=0.7)


def test_the_benchmark_reports_planted_sources_noisy_negatives_and_the_noise_probe(field_data):
    from dori.toy.copy_benchmark import PROBE_SIGMAS, benchmark_lines

    result = run_copy_benchmark(ToyCopyDetector(tau=0.5), field_data, n_sources=10, n_pairs=50, seed=5)
    assert result["negatives"]["noisy_same_caption_pairs"] == result["negatives"]["same_caption_pairs"] > 0
    assert 0.0 <= result["recall_planted_sources"] <= 1.0
    assert list(result["planted_noise_probe"]) == [f"{s:g}" for s in PROBE_SIGMAS]
    for row in result["planted_noise_probe"].values():
        assert row["of"] == len(field_data.planted) and row["found"] + len(row["missed"]) == row["of"]
    # a threshold above every similarity finds nothing, and the lines name what it missed
    strict = run_copy_benchmark(ToyCopyDetector(tau=1.001), field_data, n_sources=10, n_pairs=50, seed=5)
    assert strict["recall_planted_sources"] == 0.0
    assert all(row["found"] == 0 for row in strict["planted_noise_probe"].values())
    assert field_data.planted[0].caption in "\n".join(benchmark_lines(strict))


def test_a_copy_resized_by_ten_percent_is_found_only_when_the_detector_compares_scales(field_data):
    import torch.nn.functional as F

    data = field_data
    first = next(i for i, k in enumerate(data.kinds) if k == "ordinary")
    other = next(i for i, c in enumerate(data.captions) if c == data.captions[first] and i != first)
    image, sibling = data.images[first], data.images[other]
    enlarged = F.interpolate(image[None], size=(35, 35), mode="bilinear", align_corners=False)[0, :, 1:33, 1:33]
    single, scaled = ToyCopyDetector(tau=0.5, scales=(1.0,)), ToyCopyDetector(tau=0.5)
    scores = [float(d.paired_similarity(d.embed(enlarged[None]), d.embed(image[None]))) for d in (single, scaled)]
    rival = float(scaled.paired_similarity(scaled.embed(sibling[None]), scaled.embed(image[None])))
    assert scores[1] > scores[0] and scores[1] > rival, (scores, rival)
    assert scaled.embed(image[None]).shape == (1, 3, 2, 32, 32)
    with pytest.raises(DoriError, match="must include 1.0"):
        ToyCopyDetector(tau=0.5, scales=(0.9, 1.1))
