"""Utility on real models (issue 26, item 3): the CLIP score from a local CLIP folder, FID from a
TorchScript Inception file and real images, in ``dori generate``, the stages and the study. Tiny
random stand-ins built from config: the numbers are checked against a direct computation, not
for meaning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dori.cli import app
from dori.errors import DoriError
from dori.measure.utility import ClipScorer, InceptionFeatures, frechet_distance, reference_statistics
from dori.references import load_image


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dori.models.loading import clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(folder)
    return folder


class _Inception(torch.nn.Module):
    """Stands in for pt_inception-2015-12-05: 0..255 images in, ``[N, 6]`` features out."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255, 1).flatten(1)
        return torch.cat([pooled, pooled.pow(2)], dim=1)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.jit.script(_Inception()).save(str(path))
    return path


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_clip_score_is_hundred_times_the_clamped_cosine_of_clip_features(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    captions = ["a red barn", "a blue boat", "an old clock"]
    scores = ClipScorer(clip_dir, batch_size=2).scores(images, captions)
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=captions, images=list(images), do_rescale=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    expected = (100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).clamp_min(0)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(0 <= s <= 100 for s in scores)


def test_fid_features_reference_statistics_and_their_errors(inception_file, real_images, tmp_path):
    features = InceptionFeatures(inception_file)
    size = (InceptionFeatures.SIZE, InceptionFeatures.SIZE)
    real = torch.cat([load_image(f, size) for f in sorted(real_images.iterdir())])
    mu, sigma, count = reference_statistics(real_images, features, load_image)
    assert count == 12 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    mu2, sigma2, _ = reference_statistics(tmp_path / "stats.npz", features, load_image)
    assert np.allclose(mu, mu2) and np.allclose(sigma, sigma2)
    assert frechet_distance(features(real), features(real)) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(features(real), features(real * 0.5)) > 0.01

    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    for call, message in [
        (lambda: InceptionFeatures(tmp_path / "missing.pt"), "Inception file not found"),
        (lambda: InceptionFeatures(tmp_path / "junk.pt"), "is not a TorchScript file"),
        (lambda: reference_statistics(tmp_path / "bad.npz", features, load_image), "are not a finite"),
        (lambda: reference_statistics(tmp_path / "nowhere", features, load_image), "FID reference not found"),
        (lambda: ClipScorer(tmp_path), "is not a usable CLIP folder"),
    ]:
        with pytest.raises(DoriError, match=message):
            call()


def test_generate_scores_its_images_with_a_clip_folder(tiny_sd_dir, clip_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--prompt", "a dog",
                                 "--seeds", "2", "--steps", "2", "--clip", str(clip_dir), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "images.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 4 and all(0 <= r["clip_score"] <= 100 for r in rows)
    assert summary["clip_score"] == pytest.approx(sum(r["clip_score"] for r in rows) / 4)
    assert "CLIP score" in result.output
    refused = runner.invoke(app, ["generate", "--model", str(tiny_sd_dir), "--embeddings", str(tmp_path / "e.st"),
                                  "--clip", str(clip_dir), "--out", str(tmp_path / "gen2")])  # fmt: skip
    assert refused.exit_code != 0 and not (tmp_path / "gen2").exists()


def test_mitigate_on_a_real_model_reports_clip_score_and_fid(tiny_sd, prompt_files, sscd_file, clip_dir,
                                                            inception_file, real_images, tmp_path):  # fmt: skip
    from dori.configs import MitigateConfig
    from dori.stages.mitigate import run_mitigate

    common = dict(method="wanda", ratio=0.05, prompts=str(prompt_files / "mem.csv"), model=str(tiny_sd.source),
                  images=str(prompt_files / "images"), sscd=str(sscd_file), seeds=1, utility_seeds=1, steps=2,
                  limit=2)  # fmt: skip
    with pytest.raises(DoriError, match="--inception needs --fid-reference"):
        MitigateConfig(**common, inception=str(inception_file))
    config = MitigateConfig(**common, clip=str(clip_dir), inception=str(inception_file),
                            fid_reference=str(real_images), utility_prompts=3)  # fmt: skip
    summary = run_mitigate(config, tiny_sd, tmp_path / "wanda")
    before, after = summary["utility_detail_before"], summary["utility_detail_after"]
    assert summary["utility_before"] == before["clip_score"] and 0 <= before["clip_score"] <= 100
    assert summary["fd_before"] == before["fid"] and before["fid"] >= 0 and after["fid"] >= 0
    assert before["prompts"] == "sd14:coco (first 3)" and before["fid_reference_images"] == 12
    # no option given: no utility, and the study says which flags would give it
    bare = run_mitigate(MitigateConfig(**common), tiny_sd, tmp_path / "bare")
    assert bare["utility_before"] is None and bare["utility_detail_before"] is None


def test_real_model_options_are_refused_on_the_bundled_kind(tmp_path):
    from dori.configs import MitigateConfig
    from dori.models import load_model
    from dori.stages.mitigate import run_mitigate

    config = MitigateConfig(method="wanda", prompts="bundled:memorized", clip=str(tmp_path))
    with pytest.raises(DoriError, match="--clip: the bundled kind measures utility with its own classifier"):
        run_mitigate(config, load_model("bundled"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
