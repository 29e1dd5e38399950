"""NeMo and Wanda point by point against their authors' code (issue 36; docs/NEMO_WANDA.md).

NeMo: ml-research/localizing_memorization_in_diffusion_models (commit c8de0c6 as read;
``utils/activation_detection.py``, ``3_detect_memorized_neurons.py``, ``2_compute_pairwise_ssim.py``).
Wanda: ruchikachavhan/concept-prune (``wanda/wanda.py``, ``neuron_receivers/``).
Each test states the behaviour the reference code specifies and checks dori's on a tiny SD-shaped
model built from config.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

import dori.mitigate.nemo as nemo
from dori.interventions import mask_neurons
from dori.measure.detection import flagged_seeds, nemo_threshold, noise_maps, pairwise_consistency, seed_pairs
from dori.measure.similarity import ms_ssim, ms_ssim_settings
from dori.mitigate.nemo import NemoConfig, nemo_localize, value_activations, value_statistics
from dori.mitigate.wanda import WandaConfig, _prune, column_norms

SD14_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     steps_offset=1, set_alpha_to_one=False, clip_sample=False)  # fmt: skip


@pytest.fixture(scope="module")
def stats(tiny_sd):
    return value_statistics(tiny_sd, ["a cat", "a dog", "a bird", "a tree", "a house", "a car"])


# ------------------------------------------------------------------------------------------ NeMo


def test_ms_ssim_is_torchmetrics_with_the_references_arguments():
    # activation_detection.py: multiscale_structural_similarity_index_measure(a, b, reduction='none',
    # kernel_size=11, betas=(0.33, 0.33, 0.33)) on SD's 4x64x64 latents.
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 4, 64, 64, generator=g), torch.rand(5, 4, 64, 64, generator=g)
    b = 0.7 * a + 0.3 * b
    assert ms_ssim_settings(64, 64) == (11, (0.33, 0.33, 0.33))
    expected = tm_ms_ssim(a, b, reduction="none", kernel_size=11, betas=(0.33, 0.33, 0.33))
    assert torch.equal(ms_ssim(a, b), expected)
    # kernel_size only feeds torchmetrics' size check (its Gaussian window comes from sigma), so the
    # smaller value dori passes on 32x32 maps computes the reference's measure.
    assert torch.equal(tm_ms_ssim(a, b, reduction="none", kernel_size=7, betas=(0.33,) * 3), expected)
    assert ms_ssim_settings(32, 32) == (7, (0.33, 0.33, 0.33))


def test_the_map_is_read_at_the_second_ddim_timestep_with_the_mask_on_both_calls(tiny_sd):
    # compute_noise_diff(early_stopping=1): one DDIM step from x_T, then noise_pred - latents at the
    # next timestep, 961 on SD v1.4 (50 steps); the blocking hooks stay on for both U-Net calls.
    sd14 = DDIMScheduler(**SD14_SCHEDULE)
    sd14.set_timesteps(50)
    assert [int(t) for t in sd14.timesteps[:2]] == [981, 961]

    seen = []
    hook = tiny_sd.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(int(args[1][0])),
                                                  with_kwargs=True)  # fmt: skip
    emb, noise = tiny_sd.encode(["a red barn"]), tiny_sd.initial_noise([0])
    site = tiny_sd.value_sites()[0]
    try:
        with mask_neurons(tiny_sd, {site.name: torch.zeros(site.width)}) as handle:
            maps = noise_maps(tiny_sd, emb, noise, steps=50)
    finally:
        hook.remove()
    timesteps = tiny_sd.ddim_scheduler(50).timesteps
    assert seen == [int(timesteps[0]), int(timesteps[1])]
    assert handle.calls[site.name] == 2
    # The map itself: eps at the second timestep minus the latent after the first DDIM step.
    scheduler = tiny_sd.ddim_scheduler(50)
    with mask_neurons(tiny_sd, {site.name: torch.zeros(site.width)}):
        x1 = scheduler.step(tiny_sd.model_output(noise, timesteps[0], emb), timesteps[0], noise).prev_sample
        raw = tiny_sd.predict_noise(x1, timesteps[1], emb) - x1
    low, high = raw.amin((2, 3), keepdim=True), raw.amax((2, 3), keepdim=True)
    assert torch.allclose(maps, (raw - low) / (high - low), atol=1e-5)


def test_memorized_seeds_are_those_whose_best_pair_passes_and_the_threshold_pools_every_pair():
    # calculate_max_pairwise_ssim: per seed, the max over the pairs it belongs to; the seeds to
    # look at are those above the threshold. The README: threshold = mean + std of the saved
    # [prompts, pairs] tensor, i.e. of every pair, not of each prompt's maximum.
    pairs = seed_pairs(4)
    assert pairs.tolist() == torch.combinations(torch.arange(4), r=2).tolist()
    scores = [0.1, 0.9, 0.2, 0.3, 0.1, 0.2]  # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert flagged_seeds(scores, 4, 0.5) == [True, False, True, False]
    assert flagged_seeds(scores, 4, 0.95) == [False] * 4
    per_prompt = [[0.1, 0.2, 0.3], [0.5, 0.6, 0.9]]
    flat = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.6, 0.9], dtype=torch.float64)
    assert nemo_threshold(per_prompt) == pytest.approx(float(flat.mean() + flat.std()))
    assert nemo_threshold(per_prompt) != pytest.approx(float(torch.tensor([0.3, 0.9]).mean() + torch.tensor([0.3, 0.9]).std()))


def test_still_memorized_means_the_blocked_map_resembles_the_unblocked_one_on_memorized_seeds(tiny_sd):
    # The search compares, seed by seed, the blocked model's map with the unblocked model's map of
    # the same seed (MS-SSIM), and takes the maximum over the memorized seeds only.
    emb = tiny_sd.encode(["a red barn"])
    config = NemoConfig(seeds=4, steps=5)
    check = nemo._Checker(tiny_sd, emb, config)
    pairs = pairwise_consistency(tiny_sd, emb, seeds=list(range(4)), steps=5)[0]
    threshold = sorted(pairs)[-2] - 1e-6  # the best pair's two seeds, and maybe more, are memorized
    assert check.baseline(threshold) == [True]
    assert check.flagged[0] == [i for i, hit in enumerate(flagged_seeds(pairs, 4, threshold)) if hit]
    assert check.ssim([0], [{}]) == [pytest.approx(1.0)]  # nothing blocked: identical maps
    every = {s.name: list(range(s.width)) for s in tiny_sd.value_sites()}
    noise = tiny_sd.initial_noise(list(range(4)))
    vanilla = noise_maps(tiny_sd, emb.expand(4, -1, -1), noise, steps=5)
    with mask_neurons(tiny_sd, {s.name: torch.zeros(s.width) for s in tiny_sd.value_sites()}):
        blocked = noise_maps(tiny_sd, emb.expand(4, -1, -1), noise, steps=5)
    by_hand = ms_ssim(vanilla, blocked)[check.flagged[0]].max()
    assert check.ssim([0], [every])[0] == pytest.approx(float(by_hand), abs=1e-5)


def test_top_k_adds_the_largest_raw_activations_after_the_theta_neurons():
    # initial_neuron_selection: indices with z > theta (ascending), then activations.abs().topk(k)
    # (raw activation, not z-score), appended in topk's order, duplicates kept.
    z = [torch.tensor([0.0, 6.0, 0.0, 9.0])]
    acts = [torch.tensor([0.5, 0.1, 3.0, 2.0])]
    assert nemo._select(z, acts, ["s"], 5.0, 0) == {"s": [1, 3]}
    assert nemo._select(z, acts, ["s"], 5.0, 2) == {"s": [1, 3, 2, 3]}
    assert nemo._select(z, acts, ["s"], 10.0, 1) == {"s": [2]}
    assert nemo._without({"s": [1, 3, 2, 3]}, "s", 3) == {"s": [1, 2, 3]}  # list.remove: first occurrence


def _scripted(monkeypatch, scores):
    """Replace the check by a script: ``scores(prompt, selection, phase)`` -> SSIM; records every trial."""
    trials = []
    phase = ["initial"]

    def ssim(self, prompts, selections):
        out = []
        for p, selection in zip(prompts, selections):
            trials.append((phase[0], {k: list(v) for k, v in selection.items()}))
            out.append(scores(p, selection, phase[0]))
        return out

    def say(text):
        if text.startswith("initial selection: 0"):
            phase[0] = "refine"

    monkeypatch.setattr(nemo._Checker, "ssim", ssim)
    monkeypatch.setattr(nemo._Checker, "baseline", lambda self, threshold: self.flagged.extend([[0]]) or [True])
    return trials, say


def test_the_theta_k_schedule_gives_up_at_theta_one_and_refines_against_the_last_ssim(tiny_sd, stats, monkeypatch):
    # 3_detect_memorized_neurons.py: theta 5 -> -0.25 and k 0 -> +1 per failing round; stop when
    # theta == 1 (the round that set it is the last: theta 1.25, k 15), then still refine with the
    # threshold set to the SSIM reached.
    chosen = []
    real_select = nemo._select

    def spy(z, acts, sites, theta, k):
        chosen.append((theta, k))
        return real_select(z, acts, sites, theta, k)

    monkeypatch.setattr(nemo, "_select", spy)
    trials, say = _scripted(monkeypatch, lambda p, selection, phase: 0.9 if phase == "initial" else 0.95)
    result = nemo_localize(tiny_sd, tiny_sd.encode(["a red barn"]), stats, 0.5, NemoConfig(seeds=4, steps=5),
                           progress=say)[0]  # fmt: skip
    assert chosen == [(5.0 - 0.25 * i, i) for i in range(16)]
    assert result.rounds == 16 and result.refinement_threshold == 0.9 and not result.mitigated
    assert any(phase == "refine" for phase, _ in trials)  # refinement ran after the schedule gave up


def test_the_schedule_stops_at_the_first_round_that_passes(tiny_sd, stats, monkeypatch):
    chosen = []
    real_select = nemo._select
    monkeypatch.setattr(nemo, "_select", lambda *a: chosen.append(a[3:]) or real_select(*a))
    trials, say = _scripted(monkeypatch, lambda p, selection, phase: 0.3 if len(chosen) >= 3 else 0.9)
    result = nemo_localize(tiny_sd, tiny_sd.encode(["a red barn"]), stats, 0.5, NemoConfig(seeds=4, steps=5),
                           progress=say)[0]  # fmt: skip
    assert chosen == [(5.0, 0), (4.75, 1), (4.5, 2)]
    assert result.rounds == 3 and result.refinement_threshold == 0.5


def test_refinement_takes_layers_in_reverse_then_neurons_in_list_order(tiny_sd, stats, monkeypatch):
    # neuron_refinement: 1) reversed(list(enumerate(layers))), a non-empty layer dropped when the
    # SSIM stays below the threshold; 2) layers reversed again, each layer's neurons in list order.
    sites = [s.name for s in tiny_sd.value_sites()]
    start = {sites[0]: [3, 1], sites[2]: [0, 2, 0], sites[-1]: [5]}
    monkeypatch.setattr(nemo, "_select", lambda *a: {k: list(v) for k, v in start.items()})

    def scores(p, selection, phase):
        if phase == "initial":
            return 0.1
        return 0.1 if sites[2] in selection else 0.9  # only sites[2]'s neurons matter

    trials, say = _scripted(monkeypatch, scores)
    result = nemo_localize(tiny_sd, tiny_sd.encode(["a red barn"]), stats, 0.5, NemoConfig(seeds=4, steps=5),
                           progress=say)[0]  # fmt: skip
    refine = [selection for phase, selection in trials if phase == "refine"]
    assert refine[:3] == [{sites[0]: [3, 1], sites[2]: [0, 2, 0]}, {sites[0]: [3, 1]}, {sites[2]: [0, 2, 0]}]
    neuron_trials = refine[3:-1]  # the last is the final measurement
    assert [t.get(sites[2]) for t in neuron_trials] == [[2, 0], [0], None]
    assert result.neurons == {sites[2]: [0]} and result.mitigated


def test_k_stops_at_the_widest_layer_when_theta_cannot_fall(tiny_sd, stats, monkeypatch):
    # The reference also stops when k reaches 1280, SD v1.4's widest value layer.
    widest = max(s.width for s in tiny_sd.value_sites())
    trials, say = _scripted(monkeypatch, lambda p, selection, phase: 0.9)
    result = nemo_localize(tiny_sd, tiny_sd.encode(["a red barn"]), stats, 0.5,
                           NemoConfig(seeds=4, steps=5, theta_start=1e9, theta_step=1.0, theta_min=0.0),
                           progress=say)[0]  # fmt: skip
    assert result.rounds == widest


def test_the_real_search_is_deterministic_and_batch_independent(tiny_sd, stats):
    emb = tiny_sd.encode(["a red barn", "a blue boat"])
    pairs = pairwise_consistency(tiny_sd, emb, seeds=list(range(4)), steps=5)
    threshold = min(max(p) for p in pairs) - 1e-4
    config = NemoConfig(seeds=4, steps=5)
    first = nemo_localize(tiny_sd, emb, stats, threshold, config)
    again = nemo_localize(tiny_sd, emb, stats, threshold, config)
    alone = [nemo_localize(tiny_sd, emb[i : i + 1], stats, threshold, config)[0] for i in range(2)]
    assert [r.neurons for r in first] == [r.neurons for r in again] == [r.neurons for r in alone]
    for r in first:
        assert r.memorized_before and r.initial_ssim is not None
        assert r.mitigated == (r.refined_ssim <= threshold)


def test_value_activation_is_the_token_mean_of_the_absolute_value_output(tiny_sd):
    # 1_compute_activations_statistics.py: layer(text_embeddings)[0].abs().mean(dim=0).
    emb = tiny_sd.encode(["a red barn"])
    site = tiny_sd.value_sites()[0]
    assert torch.allclose(value_activations(tiny_sd, emb)[0][0], site.module(emb)[0].abs().mean(0))


# ----------------------------------------------------------------------------------------- Wanda


def test_wanda_records_both_guided_halves_on_pndms_first_calls_at_seed_0(tiny_sd):
    # base_receiver.observe_activation: torch.manual_seed(0); model(prompt) -> the diffusers
    # pipeline's defaults: guidance 7.5 (the hook sees the unconditional and conditional halves),
    # PNDM (51 calls for 50 steps), one image; wanda.py uses the first ``timesteps`` calls.
    config = WandaConfig(timesteps=3, steps=50)
    assert (config.guidance, config.seeds, config.scheduler, config.timesteps, WandaConfig().timesteps) == (
        7.5, 1, "pndm", 3, 10)
    sd_pndm = PNDMScheduler(**{k: v for k, v in SD14_SCHEDULE.items() if k != "clip_sample"}, skip_prk_steps=True)
    sd_pndm.set_timesteps(50)
    assert len(sd_pndm.timesteps) == 51 and [int(t) for t in sd_pndm.timesteps[:3]] == [981, 961, 961]

    seen, rows = [], []
    site = tiny_sd.ffn_sites()[0]
    hooks = [tiny_sd.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[1].tolist()),
                                                    with_kwargs=True),
             site.module.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))]  # fmt: skip
    try:
        column_norms(tiny_sd, tiny_sd.encode(["a red barn", "a blue boat"]), [site.name], config)
    finally:
        for hook in hooks:
            hook.remove()
    expected = [int(t) for t in tiny_sd.pndm_scheduler(50).timesteps[:3]]
    assert [calls[0] for calls in seen] == expected and all(len(calls) == 4 for calls in seen)
    assert rows == [4, 4, 4]  # 2 prompts x 1 seed x (unconditional + conditional) per call


def test_wanda_keeps_int_ratio_times_inputs_per_row(tiny_sd):
    # wanda.py: sorted_idx[:, :int(sparsity_ratio * metric.shape[1])]; none when that is 0.
    site = tiny_sd.ffn_sites()[0]
    width = site.module.in_features
    g = torch.Generator().manual_seed(0)
    memorized = {site.name: torch.rand(1, width, generator=g) + 1}
    base = {site.name: torch.zeros(1, width)}
    for ratio in (0.1, 0.25, 0.5):
        mask = _prune(tiny_sd, [site.name], memorized, base, ratio, 1)[site.name]
        assert (mask.sum(1) == int(ratio * width)).all()
    assert int(_prune(tiny_sd, [site.name], memorized, base, 0.9 / width, 1)[site.name].sum()) == 0


def test_the_threshold_is_calibrated_once_per_model_and_settings(tiny_sd, tmp_path, monkeypatch):
    """A study's NeMo and locality stages calibrate the same threshold: the second asks the memo,
    unless the model is hooked or a setting differs."""
    import dori.measure.detection as detection
    from dori.mitigate.nemo_reference import nemo_reference

    monkeypatch.setenv("DORI_CACHE", str(tmp_path))
    reference = tmp_path / "ref.txt"
    reference.write_text("a cat\na dog\na bird\n")
    calls = []
    real = detection.pairwise_consistency
    monkeypatch.setattr(detection, "pairwise_consistency", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = NemoConfig(seeds=3, steps=5, batch_size=10)
    ask = lambda c: nemo_reference(tiny_sd, reference_prompts=str(reference), stats=None, threshold=None, config=c,
                                   say=lambda m: None)[1]  # noqa: E731
    first = ask(config)
    assert ask(config) == first and len(calls) == 1
    with mask_neurons(tiny_sd, {tiny_sd.value_sites()[0].name: torch.zeros(tiny_sd.value_sites()[0].width)}):
        ask(config)  # a hooked model is another model
    assert len(calls) == 2
    ask(NemoConfig(seeds=4, steps=5, batch_size=10))
    assert len(calls) == 3
