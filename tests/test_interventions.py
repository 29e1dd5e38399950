"""Property tests of the scoped interventions and the mitigations built on them."""

from __future__ import annotations

import pytest
import torch

from dori.errors import DoriError
from dori.interventions import (
    Mitigation, baked, capture, load_mask, mask_neurons, mask_weights, neuron_scales, save_mask,
)  # fmt: skip
from dori.mitigate.nemo import NemoConfig, nemo_localize, value_activations, value_statistics
from dori.mitigate.wanda import WandaConfig, wanda_mask
from dori.stages import mitigate as mitigate_stage
from dori.stages.mitigate import _utility_under_own_masks


def _value_outputs(model, emb):
    sites = [s.name for s in model.value_sites()]
    with capture(model, sites) as (handle, records):
        model.predict_noise(torch.zeros(emb.shape[0], 4, 8, 8), torch.tensor([500]), emb)
    assert handle.total == len(sites)
    return {name: recs[0] for name, recs in records.items()}


def test_all_ones_mask_changes_nothing(tiny_sd):
    emb = tiny_sd.encode(["a cat"])
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = tiny_sd.predict_noise(x_t, torch.tensor([500]), emb)
    ones = {s.name: torch.ones(s.width) for s in tiny_sd.value_sites()}
    with mask_neurons(tiny_sd, ones) as handle:
        masked = tiny_sd.predict_noise(x_t, torch.tensor([500]), emb)
    assert handle.total == len(ones)
    assert torch.equal(masked, reference)


def test_a_mask_changes_only_the_chosen_channels(tiny_sd):
    emb = tiny_sd.encode(["a cat"])
    site = tiny_sd.value_sites()[2]
    before = _value_outputs(tiny_sd, emb)
    with mask_neurons(tiny_sd, neuron_scales(tiny_sd, {site.name: [1, 3]})) as handle:
        after = _value_outputs(tiny_sd, emb)
    assert handle.calls[site.name] > 0
    assert torch.all(after[site.name][..., [1, 3]] == 0)
    keep = [c for c in range(site.width) if c not in (1, 3)]
    assert torch.equal(after[site.name][..., keep], before[site.name][..., keep])
    assert torch.equal(after[tiny_sd.value_sites()[0].name], before[tiny_sd.value_sites()[0].name])


def test_model_restored_after_an_exception(tiny_sd):
    emb = tiny_sd.encode(["a cat"])
    x_t = torch.randn(1, 4, 8, 8)
    reference = tiny_sd.predict_noise(x_t, torch.tensor([10]), emb)
    mask = neuron_scales(tiny_sd, {s.name: list(range(s.width)) for s in tiny_sd.value_sites()})
    with pytest.raises(RuntimeError, match="boom"):
        with mask_neurons(tiny_sd, mask):
            assert not torch.equal(tiny_sd.predict_noise(x_t, torch.tensor([10]), emb), reference)
            raise RuntimeError("boom")
    assert torch.equal(tiny_sd.predict_noise(x_t, torch.tensor([10]), emb), reference)
    assert all(not s.module._forward_hooks for s in tiny_sd.value_sites())


def test_baked_masks_match_the_hooks(tiny_sd_dir):
    from dori.models import load_model

    model = load_model(tiny_sd_dir)
    emb = model.encode(["a cat"])
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    site = model.value_sites()[0]
    ffn = model.ffn_sites()[0]
    weights = torch.rand(ffn.module.weight.shape, generator=torch.Generator().manual_seed(2)) < 0.1
    for mitigation in (Mitigation("neurons", model.fingerprint(), neurons={site.name: [0, 5]}),
                       Mitigation("weights", model.fingerprint(), weights={ffn.name: weights})):  # fmt: skip
        if mitigation.kind == "neurons":
            ctx = mask_neurons(model, neuron_scales(model, mitigation.neurons))
        else:
            ctx = mask_weights(model, mitigation.weights)
        with ctx as handle:
            hooked = model.predict_noise(x_t, t, emb.expand(2, -1, -1))
        assert handle.total > 0
        with baked(model, mitigation):
            inside = model.predict_noise(x_t, t, emb.expand(2, -1, -1))
        torch.testing.assert_close(inside, hooked, atol=1e-6, rtol=1e-5)


def test_baking_a_biased_site_zeroes_its_bias_rows_and_restores_weight_and_bias(tiny_sd):
    """``bake`` zeroed a biased site's bias but saved and restored only its weight."""
    site = tiny_sd.ffn_sites()[0]  # ff.net.2: a Linear with a bias
    assert site.module.bias is not None
    weight, bias = site.module.weight.detach().clone(), site.module.bias.detach().clone()
    mitigation = Mitigation("neurons", tiny_sd.fingerprint(), neurons={site.name: [0, 3]})
    with pytest.raises(RuntimeError, match="boom"), baked(tiny_sd, mitigation) as changed:
        assert changed == [site.name]
        assert float(site.module.bias[[0, 3]].abs().sum()) == 0 and float(site.module.weight[[0, 3]].abs().sum()) == 0
        raise RuntimeError("boom")  # restored even when the work inside fails
    assert torch.equal(site.module.weight, weight) and torch.equal(site.module.bias, bias)


def test_mask_files_round_trip_and_refuse_another_model(tiny_sd, tiny_sd2_dir, tmp_path):
    from dori.models import load_model

    site = tiny_sd.value_sites()[1]
    save_mask(Mitigation("neurons", tiny_sd.fingerprint(), neurons={site.name: [2]}, method="nemo"), tmp_path / "m")
    loaded = load_mask(tmp_path / "m", tiny_sd)
    assert loaded.neurons == {site.name: [2]} and loaded.method == "nemo"
    with pytest.raises(DoriError, match="made for another model"):
        load_mask(tmp_path / "m", load_model(tiny_sd2_dir))


def test_nemo_selects_and_restores_under_a_calibrated_threshold(tiny_sd):
    prompts = ["a cat", "a dog", "a bird", "a tree"]
    stats = value_statistics(tiny_sd, prompts)
    emb = tiny_sd.encode(["a red barn"])
    assert [a.shape[1] for a in value_activations(tiny_sd, emb)] == [s.width for s in tiny_sd.value_sites()]
    # A threshold below the unmasked score makes the prompt "memorized"; NeMo must then find a
    # selection whose blocked map departs from the unblocked one, or report that it could not.
    from dori.measure.detection import consistency_scores

    score = consistency_scores(tiny_sd, emb, seeds=list(range(4)), steps=5)[0]
    result = nemo_localize(tiny_sd, emb, stats, threshold=score - 1e-4, config=NemoConfig(seeds=4, steps=5))[0]
    assert result.memorized_before and result.memorized_seeds
    # Mitigated or not, a memorized prompt ends with a non-empty selection that refinement only shrinks.
    assert sum(len(v) for v in result.neurons.values()) >= 1
    assert result.initial_size >= sum(len(v) for v in result.neurons.values())
    assert result.mitigated == (result.refined_ssim <= score - 1e-4)
    not_memorized = nemo_localize(tiny_sd, emb, stats, threshold=2.0, config=NemoConfig(seeds=4, steps=5))[0]
    assert not not_memorized.memorized_before and not_memorized.neurons == {} and not not_memorized.mitigated


def test_wanda_prunes_about_ratio_of_each_row_at_most_per_step(tiny_sd):
    emb = tiny_sd.encode(["a red barn", "a blue boat"])
    config = WandaConfig(ratio=0.1, timesteps=2, seeds=1, steps=5)
    mask = wanda_mask(tiny_sd, emb, config=config)
    assert set(mask) == {s.name for s in tiny_sd.ffn_sites()}
    for site in tiny_sd.ffn_sites():
        per_row = mask[site.name].sum(1)
        keep_k = int(0.1 * site.module.in_features)
        assert per_row.max() <= keep_k * config.timesteps
    assert sum(int(m.sum()) for m in mask.values()) > 0


def test_per_prompt_scope_runs_each_known_prompt_under_its_own_neurons(tiny_sd, tmp_path):
    a, b = tiny_sd.value_sites()[0].name, tiny_sd.value_sites()[1].name
    own = {"p0": {a: [1]}, "p1": {b: [2, 3]}, "p2": {a: [1]}}
    union = {a: [1], b: [2, 3]}
    per_prompt = Mitigation("neurons", tiny_sd.fingerprint(), neurons=union, method="nemo", per_prompt=own, scope="prompt")
    groups = per_prompt.groups(["p1", "other", "p0", "p2"])
    assert [(idx, m.neurons) for idx, m in groups] == [([0], {b: [2, 3]}), ([1], union), ([2, 3], {a: [1]})]
    whole = Mitigation("neurons", tiny_sd.fingerprint(), neurons=union, method="nemo", per_prompt=own, scope="union")
    assert [(idx, m.neurons) for idx, m in whole.groups(["p1", "p0"])] == [([0, 1], union)]
    with pytest.raises(DoriError, match="unknown mitigation scope"):
        Mitigation("neurons", tiny_sd.fingerprint(), scope="everything")

    save_mask(per_prompt, tmp_path / "m")
    loaded = load_mask(tmp_path / "m", tiny_sd)
    assert loaded.scope == "prompt" and loaded.per_prompt == own and loaded.neurons == union


def test_each_mask_gives_the_same_outputs_as_one_prompt_at_a_time(tiny_sd):
    from dori.interventions import each_mask, intervene

    texts = ["a cat", "a dog", "a tree"]
    a = tiny_sd.value_sites()[0].name
    own = {"a cat": {a: [0, 1]}, "a tree": {a: [5]}}
    mitigation = Mitigation("neurons", tiny_sd.fingerprint(), neurons={a: [0, 1, 5]}, per_prompt=own, scope="prompt")
    emb = tiny_sd.encode(texts)
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    grouped = torch.zeros(3, 4, 8, 8)
    for group in each_mask(tiny_sd, mitigation, texts):
        grouped[group] = tiny_sd.predict_noise(x[group], t, emb[group])
    for i, text in enumerate(texts):
        alone = Mitigation("neurons", tiny_sd.fingerprint(), neurons=own.get(text, mitigation.neurons))
        with intervene(tiny_sd, alone):
            assert torch.allclose(grouped[i], tiny_sd.predict_noise(x[i : i + 1], t, emb[i : i + 1])[0], atol=1e-6)
    with intervene(tiny_sd, mitigation):  # without per-prompt grouping every prompt gets the union
        assert not torch.allclose(grouped[0], tiny_sd.predict_noise(x[:1], t, emb[:1])[0], atol=1e-6)
    assert not any(m._forward_hooks for m in tiny_sd.unet.modules())  # every mask removed afterwards


def test_utility_is_measured_once_per_model_and_again_under_an_intervention(monkeypatch):
    """The memo decided "an intervention is active" from any forward hook, and the bundled model's
    position encoding is a permanent hook, so it never hit; dori's own hooks are counted now."""
    from dori.interventions import active_interventions, mask_neurons, neuron_scales
    from dori.models import load_model
    from dori.evaluation import _UTILITY_MEMO, utility

    model = load_model("bundled")
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    _UTILITY_MEMO.clear()
    settings = dict(seeds=1, steps=2, guidance=3.0, batch_size=16)
    first = utility(model, **settings)
    assert utility(model, **settings) == first and len(calls) == 1
    site = model.value_sites()[0]
    with mask_neurons(model, neuron_scales(model, {site.name: list(range(site.width))})):
        assert active_interventions(model) == 1
        utility(model, **settings)
    assert len(calls) == 2 and active_interventions(model) == 0


def test_nemo_utility_under_each_prompts_own_neurons_is_the_mean_over_prompts(tiny_sd, monkeypatch):
    from dori.interventions import Mitigation, active_interventions

    sites = [s.name for s in tiny_sd.value_sites()[:2]]
    own = {"a": {sites[0]: [0]}, "b": {sites[0]: [1], sites[1]: [0]}}
    union = {sites[0]: [0, 1], sites[1]: [0]}
    mask = Mitigation("neurons", tiny_sd.fingerprint(), neurons=union, method="nemo", per_prompt=own, scope="prompt")
    # a stand-in utility that reports how many sites are masked while it runs
    monkeypatch.setattr(mitigate_stage, "utility", lambda model, **_: {"alignment": float(active_interventions(model))})
    # on a real model one utility measurement is thousands of images: only the union's is measured
    assert _utility_under_own_masks(tiny_sd, mask, ["a", "a", "b"], {}) is None
    monkeypatch.setattr(mitigate_stage, "is_bundled", lambda model: True)
    assert _utility_under_own_masks(tiny_sd, mask, ["a", "a", "b"], {}) == pytest.approx((1 + 1 + 2) / 3)
    union_only = Mitigation("neurons", tiny_sd.fingerprint(), neurons=union, method="nemo", per_prompt=own, scope="union")
    assert _utility_under_own_masks(tiny_sd, union_only, ["a", "b"], {}) is None


def test_batched_nemo_and_noise_norms_equal_a_one_prompt_loop(tiny_sd):
    """Issue 22: the batched implementations give what a plain one-prompt, one-seed loop gives (the
    comparison benchmarks/bench.py times)."""
    from dori.measure.detection import consistency_scores, noise_difference_norms

    prompts, seeds = ["a red barn", "a cat on a mat", "a blue boat"], [0, 1]
    batched = noise_difference_norms(tiny_sd, prompts, seeds=seeds, steps=3, batch_size=6)["first_step"]
    looped = [sum(noise_difference_norms(tiny_sd, [p], seeds=[s], steps=3, batch_size=1)["first_step"][0] for s in seeds)
              / len(seeds) for p in prompts]  # fmt: skip
    assert batched == pytest.approx(looped, rel=1e-5, abs=1e-6)

    stats = value_statistics(tiny_sd, ["a cat", "a dog", "a bird", "a tree"])
    emb = tiny_sd.encode(prompts)
    scores = consistency_scores(tiny_sd, emb, seeds=list(range(4)), steps=3)
    threshold = float(sorted(scores)[1]) - 1e-4  # two of the three prompts count as memorized
    config = NemoConfig(seeds=4, steps=3)
    together = nemo_localize(tiny_sd, emb, stats, threshold=threshold, config=config)
    alone = [nemo_localize(tiny_sd, emb[i : i + 1], stats, threshold=threshold, config=config)[0] for i in range(len(prompts))]
    assert [r.memorized_before for r in together] == [r.memorized_before for r in alone]
    assert sum(r.memorized_before for r in together) == 2
    assert [r.neurons for r in together] == [r.neurons for r in alone]
