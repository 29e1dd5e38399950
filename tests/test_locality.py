"""The non-locality analysis (``dori locality``) on the tiny SD backend, and its statistics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dori.configs import LocalityConfig
from dori.errors import DoriError
from dori.locality import (
    PAPER_ACTIVATION_RATIO,
    PAPER_NEMO_IOU,
    PAPER_WANDA_IOU_TRIGGERS,
    activation_verdict,
    agreement_verdict,
    iou,
    mean_pairwise_iou,
    pairwise_distances,
    site_activations,
    true_median,
    verdicts,
)
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


def test_the_median_is_the_true_one():
    assert true_median([0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.5)  # torch.median would give 0.4
    assert true_median([3.0, 1.0, 2.0]) == 2.0 and true_median([]) is None


def test_nemo_activation_verdict_passes_the_papers_own_layers_and_fails_agreeing_triggers():
    low, high = PAPER_ACTIVATION_RATIO["nemo"]
    paper = [low, 1.35, 1.40, 1.45, 1.50, high, 1.30]  # 7 layers in the figure's range
    assert activation_verdict("nemo", paper).endswith("as the paper says")
    # an even count: the true median (1.0) is "higher"; the lower middle (0.95) would not be
    assert activation_verdict("nemo", [0.85, 0.95, 1.05, 1.1]).endswith("as the paper says")
    assert activation_verdict("nemo", [0.88, 0.93, 0.97]).endswith("comparable, short of the paper's higher")
    assert activation_verdict("nemo", [0.5, 0.6, 0.95]).endswith("unlike the paper")
    assert "median trigger/prompt activation-distance ratio 0.60 over NeMo's 3 layers" in activation_verdict("nemo", [0.5, 0.6, 0.95])


def test_wanda_activation_verdict_reports_the_papers_shape():
    low, high = PAPER_ACTIVATION_RATIO["wanda_rest"]
    paper = [PAPER_ACTIVATION_RATIO["wanda_first"], low, 0.62, 0.70, 0.75, 0.80, high]
    text = activation_verdict("wanda", paper)
    assert "at 6 of Wanda's 7 layers" in text and text.endswith("the paper's shape")
    assert activation_verdict("wanda", [0.37, 0.18, 0.17]).endswith("the paper's shape")
    assert activation_verdict("wanda", [1.1, 1.2, 0.5]).endswith("unlike the paper's figure")
    assert activation_verdict("wanda", [0.9, 1.0]).endswith("unlike the paper's figure")  # 1 of 2 is not more than half


def _rows(values: list[float | None], selected: list[bool] | None = None) -> list[dict]:
    return [{"adv": v, "selected": True if selected is None else s} for v, s in zip(values, selected or values)]


def test_weight_agreement_verdict_passes_the_papers_bars_and_fails_higher_agreement():
    paper = agreement_verdict("wanda", _rows(list(PAPER_WANDA_IOU_TRIGGERS)))
    assert "median IoU among triggers 0.57 over the 7 of 7 layers" in paper and paper.endswith("as the paper says")
    assert agreement_verdict("wanda", _rows([0.80, 0.74, 0.78])).endswith("higher than the paper")
    assert agreement_verdict("wanda", _rows([0.60, 0.70, 0.66])).endswith("as the paper says")  # 0.66 <= 0.57 + 0.1
    # NeMo: the one layer where the paper's NeMo selects anything; layers where no trigger selects are left out
    nemo_paper = _rows([PAPER_NEMO_IOU["first"], 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [True] + [False] * 6)
    assert "over the 1 of 7 layers" in agreement_verdict("nemo", nemo_paper)
    assert agreement_verdict("nemo", nemo_paper).endswith("as the paper says")
    assert agreement_verdict("nemo", _rows([0.9, 0.8, 1.0], [True, True, False])).endswith("higher than the paper")
    assert "undefined" in agreement_verdict("nemo", _rows([1.0, None], [False, True]))


def test_verdicts_judge_each_method_at_its_own_layers():
    summary = {"embedding": {"mean": {"success_rate": 1.0, "trigger_l2_over_non_memorized_l2": 1.5, "moved_over_init_spread": 0.5}},
               "activation": {"methods": {"nemo": {"sites": [{"ratio": r} for r in (1.2, 1.3)]},
                                          "wanda": {"sites": [{"ratio": r} for r in (0.5, 0.6, 1.2)]}}},
               "weight_agreement": {"wanda": {"sites": _rows([0.9, 0.9])}}}  # fmt: skip
    judged = verdicts(summary)
    assert set(judged) == {"embedding", "activation at NeMo's layers", "activation at Wanda's layers", "weight agreement (Wanda)"}
    assert judged["embedding"].endswith("scattered, as the paper says")
    assert judged["activation at NeMo's layers"].endswith("as the paper says")
    assert judged["activation at Wanda's layers"].endswith("the paper's shape")
    assert judged["weight agreement (Wanda)"].endswith("higher than the paper")


def test_activations_under_a_nemo_mask_run_each_prompt_under_its_own_neurons(tiny_sd):
    from dori.interventions import Mitigation

    site = tiny_sd.value_sites()[0]
    mask = Mitigation("neurons", tiny_sd.fingerprint(), neurons={site.name: [0, 1, 2]}, method="nemo", scope="prompt",
                      per_prompt={"a cat": {site.name: [0]}, "a dog": {site.name: [1, 2]}})  # fmt: skip
    texts = ["a cat", "a dog", "a tree"]
    emb = tiny_sd.encode(texts)
    plain = site_activations(tiny_sd, emb, [site.name], seed=0, steps=4, batch_size=2)[site.name]
    masked = site_activations(tiny_sd, emb, [site.name], seed=0, steps=4, batch_size=2, mitigation=mask,
                              texts=texts)[site.name]  # fmt: skip
    zero = lambda row, ch: bool((masked[row][..., ch] == 0).all())  # noqa: E731
    assert zero(0, 0) and not zero(0, 1)  # "a cat": its own neuron only
    assert zero(1, 1) and zero(1, 2) and not zero(1, 0)  # "a dog": its own two
    assert zero(2, 0) and zero(2, 1) and zero(2, 2)  # any other prompt: the union
    keep = [c for c in range(masked.shape[-1]) if c > 2]
    assert torch.allclose(masked[..., keep], plain[..., keep])  # the rest as unmasked
    assert not (plain[..., :3] == 0).all()


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
    layers = summary["activation"]["methods"]
    assert [r["site"] for r in layers["nemo"]["sites"]] == [s.name for s in tiny_sd.value_sites()]
    assert [r["site"] for r in layers["wanda"]["sites"]] == [s.name for s in tiny_sd.ffn_sites()]
    assert all(r["mem"] > 0 for m in layers.values() for r in m["sites"])
    assert summary["methods"] == ["nemo", "wanda"] and summary["activation"]["under_mask"] is None
    nemo, wanda = summary["weight_agreement"]["nemo"], summary["weight_agreement"]["wanda"]
    assert {r["site"] for r in nemo["sites"]} == {s.name for s in tiny_sd.value_sites()}
    assert all(0 <= r["adv"] <= 1 and 0 <= r["mem"] <= 1 for r in nemo["sites"] + wanda["sites"])
    assert len(wanda["weights_mem"]) == 4 and len(nemo["neurons_adv"]) == sum(summary["weight_agreement"]["triggers_per_target"])
    widths = {s.name: s.module.in_features for s in tiny_sd.ffn_sites()}
    assert wanda["candidates_per_row"] == {name: int(config.ratio * width) for name, width in widths.items()}
    assert [c["candidates"] for c in wanda["candidate_sweep"]] == [12, 25, 51]  # SD v1.4's, at 1%
    assert all({r["site"] for r in c["sites"]} == set(widths) for c in wanda["candidate_sweep"])
    assert set(summary["verdicts"]) == {"embedding", "activation at NeMo's layers", "activation at Wanda's layers",
                                        "weight agreement (NeMo)", "weight agreement (Wanda)"}  # fmt: skip
    for name in ("embedding_projection_0.png", "embedding_projection_1.png", "activation_discrepancy.png",
                 "weight_agreement.png", "trigger_generations.png"):  # fmt: skip
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


def test_locality_under_a_mask_measures_that_methods_views(locality_run, tiny_sd, tmp_path):
    """Triggers searched under a NeMo mask: NeMo's layers and NeMo's selection only; more prompts
    join Y_mem without being attacked."""
    from dataclasses import replace

    from dori.interventions import Mitigation, save_mask

    config, _, _ = locality_run
    site = tiny_sd.value_sites()[0]
    save_mask(Mitigation("neurons", tiny_sd.fingerprint(), neurons={site.name: [0, 1]}, method="nemo"), tmp_path / "nemo")
    (tmp_path / "more.txt").write_text("a blue kite\na red barn\n")  # one new, one already in the set
    masked = replace(config, mitigation=str(tmp_path / "nemo"), targets=1, more_prompts=str(tmp_path / "more.txt"))
    summary = run_locality(masked, tiny_sd, tmp_path / "run")
    assert summary["methods"] == ["nemo"] and summary["mitigation"] == "nemo"
    assert set(summary["activation"]["methods"]) == {"nemo"} and summary["activation"]["under_mask"] == "nemo"
    assert "wanda" not in summary["weight_agreement"] and "nemo" in summary["weight_agreement"]
    assert summary["memorized_prompts"][-1] == "a blue kite" and summary["memorized_prompts"].count("a red barn") == 1
    assert summary["activation"]["prompts"] == summary["weight_agreement"]["prompts"] == 5
    assert set(summary["verdicts"]) == {"embedding", "activation at NeMo's layers", "weight agreement (NeMo)"}
