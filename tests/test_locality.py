"""The non-locality analysis (``dori locality``) on the tiny SD backend, and its statistics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dori.configs import LocalityConfig
from dori.errors import DoriError
from dori.locality import iou, mean_pairwise_iou, pairwise_distances, verdicts
from dori.stages.locality import run_locality


def test_distance_and_iou_statistics():
    points = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    d = pairwise_distances(points)
    assert d["n"] == 3 and d["l2_mean"] == pytest.approx(4 / 3) and d["cosine_mean"] == pytest.approx(0.0, abs=1e-12)
    orthogonal = pairwise_distances(torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    assert orthogonal["cosine_mean"] == pytest.approx(1.0)
    assert iou(set(), set()) == 1.0 and iou({1, 2}, {2, 3}) == pytest.approx(1 / 3) and iou({1}, set()) == 0.0
    a = torch.tensor([[True, False], [True, True]])
    b = torch.tensor([[True, True], [False, True]])
    assert iou(a, b) == pytest.approx(2 / 4)
    assert iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0
    assert mean_pairwise_iou([{1}, {1}, {2}]) == pytest.approx(1 / 3)


def _views(nemo: list[float], wanda: list[float]) -> dict:
    return {"embedding": {"mean": {"success_rate": 1.0, "trigger_l2_over_non_memorized_l2": 1.5, "moved_over_init_spread": 0.5}},
            "activation": {"ratio_median": 1.0, "n_sites": 2, "sites_adv_above_mem": 1},
            "weight_agreement": {"nemo": {"sites": [{"adv": v} for v in nemo]},
                                 "wanda": {"sites": [{"adv": v} for v in wanda]}}}  # fmt: skip


def test_weight_agreement_verdict_judges_nemo_and_wanda_each_against_the_paper():
    paper_like = verdicts(_views(nemo=[0.4, 0.8], wanda=[0.3, 0.5, 0.9]))["weight_agreement"]
    assert "NeMo 0.60" in paper_like and "partial agreement, as the paper says" in paper_like
    assert "Wanda 0.57, below 0.6 at 2/3 sites: low agreement, as the paper says" in paper_like
    unlike = verdicts(_views(nemo=[0.9, 0.9], wanda=[0.7, 0.5, 0.9]))["weight_agreement"]
    assert "NeMo 0.90" in unlike and "higher than the paper" in unlike
    assert "at 1/3 sites: high agreement, unlike the paper" in unlike


def test_wanda_masks_share_an_exactly_rescaled_base(tiny_sd):
    """Several masks against one base recorded once equal masks against a base of as many rows."""
    from dori.mitigate.wanda import WandaConfig, _prune, column_norms, wanda_masks

    config = WandaConfig(ratio=0.2, timesteps=2, seeds=2, steps=4)
    sites = [s.name for s in tiny_sd.ffn_sites()]
    emb = tiny_sd.encode(["a cat", "a dog", "a tree"])
    groups = [emb[:1], emb]
    masks = wanda_masks(tiny_sd, groups, sites=sites, config=config)
    for group, mask in zip(groups, masks):
        base = column_norms(tiny_sd, tiny_sd.empty_embedding().expand(group.shape[0], -1, -1), sites, config)
        direct = _prune(tiny_sd, sites, column_norms(tiny_sd, group, sites, config), base, config.ratio,
                        config.timesteps)  # fmt: skip
        assert all(torch.equal(mask[name], direct[name]) for name in sites)
    assert any(m.any() for mask in masks for m in mask.values())


def test_a_mask_at_a_candidate_count_is_the_mask_at_the_ratio_that_gives_it(tiny_sd):
    """SD's candidates per row on a narrower model: the same recorded scores, pruned with ``k``
    candidates per row, as the ratio ``k / width`` prunes them (ConceptPrune's ``int(ratio * in)``)."""
    from dori.mitigate.wanda import SD14_FFN_CANDIDATES, WandaConfig, wanda_scores

    assert SD14_FFN_CANDIDATES == (12, 25, 51)
    site = tiny_sd.ffn_sites()[0]
    width = site.module.in_features
    scores = wanda_scores(tiny_sd, [tiny_sd.encode(["a cat"])], sites=[site.name],
                          config=WandaConfig(timesteps=2, seeds=1, steps=4))  # fmt: skip
    for k in (1, 3, width // 2):
        by_count = scores.mask_with_candidates(tiny_sd, 0, k)[site.name]
        by_ratio = scores.mask(tiny_sd, 0, (k + 0.5) / width)[site.name]  # int(ratio * width) == k
        assert torch.equal(by_count, by_ratio)
        assert int(by_count.sum(1).max()) <= k * 2  # at most k per row at each of the 2 recorded calls
    assert scores.mask_with_candidates(tiny_sd, 0, 10 * width)[site.name].shape == site.module.weight.shape


@pytest.fixture(scope="module")
def locality_run(tiny_sd, prompt_files, sscd_file, tmp_path_factory):
    from dori.mitigate.nemo import save_statistics, value_statistics

    folder = tmp_path_factory.mktemp("locality")
    save_statistics(value_statistics(tiny_sd, ["a cat", "a dog", "a tree"]), folder / "stats.pt")
    config = LocalityConfig(prompts=str(prompt_files / "mem.csv"), images=str(prompt_files / "images"),
                            sscd=str(sscd_file), non_memorized=str(prompt_files / "non.txt"), targets=2, inits=3,
                            steps=2, attack_batch=2, seeds=1, eval_steps=2, agreement_triggers=2,
                            stats=str(folder / "stats.pt"), threshold=0.0, tsne=True)  # fmt: skip
    return config, run_locality(config, tiny_sd, folder / "run"), folder / "run"


def test_locality_writes_the_three_views(locality_run, tiny_sd):
    config, summary, out = locality_run
    assert {"embedding", "activation", "weight_agreement", "verdicts", "seconds"} <= set(summary)
    assert json.loads((out / "summary.json").read_text())["inits"] == 3
    per_target = summary["embedding"]["per_target"]
    assert len(per_target) == 2 and per_target[0]["prompt"] == "a red barn"
    assert per_target[0]["non_memorized_prompts"]["n"] == 3 and per_target[0]["inits"]["n"] == 3
    saved = load_file(str(out / "triggers.safetensors"))
    assert saved["triggers"].shape == saved["inits"].shape == (6, *tiny_sd.embedding_shape)
    assert not torch.equal(saved["triggers"], saved["inits"])  # the attack moved them
    sites = {s.name for s in tiny_sd.value_sites()} | {s.name for s in tiny_sd.ffn_sites()}
    assert {r["site"] for r in summary["activation"]["sites"]} == sites
    assert all(r["mem"] > 0 for r in summary["activation"]["sites"])
    nemo, wanda = summary["weight_agreement"]["nemo"], summary["weight_agreement"]["wanda"]
    assert {r["site"] for r in nemo["sites"]} == {s.name for s in tiny_sd.value_sites()}
    assert all(0 <= r["adv"] <= 1 and 0 <= r["mem"] <= 1 for r in nemo["sites"] + wanda["sites"])
    assert len(wanda["weights_mem"]) == 4 and len(nemo["neurons_adv"]) == sum(summary["weight_agreement"]["triggers_per_target"])
    widths = {s.name: s.module.in_features for s in tiny_sd.ffn_sites()}
    assert wanda["candidates_per_row"] == {name: int(config.ratio * width) for name, width in widths.items()}
    assert [c["candidates"] for c in wanda["candidate_sweep"]] == [12, 25, 51]  # SD v1.4's, at 1%
    assert all({r["site"] for r in c["sites"]} == set(widths) for c in wanda["candidate_sweep"])
    for name in ("embedding_projection_0.png", "embedding_projection_1.png", "activation_discrepancy.png",
                 "agreement_nemo.png", "agreement_wanda.png", "trigger_generations.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name


def test_locality_resumes_from_its_triggers(locality_run, tiny_sd):
    config, summary, out = locality_run
    again = run_locality(config, tiny_sd, out, resume=True)
    assert again["embedding"] == summary["embedding"] and again["activation"] == summary["activation"]
    assert again["weight_agreement"] == summary["weight_agreement"]
    with pytest.raises(DoriError, match="--resume"):
        run_locality(config, tiny_sd, out)


def test_locality_refuses_bad_settings(tiny_sd, prompt_files, sscd_file, tmp_path):
    common = dict(prompts=str(prompt_files / "mem.csv"), images=str(prompt_files / "images"), sscd=str(sscd_file),
                  non_memorized=str(prompt_files / "non.txt"))  # fmt: skip
    with pytest.raises(DoriError, match="inits must be at least 2"):
        LocalityConfig(inits=1, **common)
    with pytest.raises(DoriError, match="--targets 9 exceeds"):
        run_locality(LocalityConfig(targets=9, **common), tiny_sd, tmp_path / "x")
    assert not (tmp_path / "x").exists()
