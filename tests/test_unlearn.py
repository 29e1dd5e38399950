"""Adversarial fine-tuning's pieces: the surrogate rules, trigger rounds and the utility batch's
empty captions, on the tiny SD-shaped model built from config."""

from __future__ import annotations

import json

import pytest
import torch

from dori.errors import DoriError
from dori.unlearn import adversarial
from dori.unlearn.adversarial import UnlearnConfig, adversarial_finetune, initial_triggers


def _surrogate_inputs(tiny_sd, prompt_files, sscd_file):
    from dori.references import References, attack_targets, load_prompts

    prompts = load_prompts(str(prompt_files / "mem.csv"), tiny_sd, limit=2)
    refs = References(tiny_sd, images=str(prompt_files / "images"), sscd=str(sscd_file))
    return prompts, refs, attack_targets(tiny_sd, prompts, refs)


def test_own_rule_takes_the_least_similar_generation_or_the_empty_prompts(tiny_sd, prompt_files, sscd_file):
    """The older rule, kept as an option: the least similar of the mitigated model's generations
    from the prompt; where even that one replicates, the least similar empty-prompt generation."""
    from dori.unlearn.surrogates import make_surrogates

    prompts, refs, targets = _surrogate_inputs(tiny_sd, prompt_files, sscd_file)
    seeds = [0, 1, 2]
    own = tiny_sd.generate(tiny_sd.encode(prompts.texts), seeds, steps=2)
    empty = tiny_sd.generate(tiny_sd.encode([""]), seeds, steps=2)
    for tau, source, pool in ((2.0, "prompt", None), (-2.0, "empty prompt", empty)):
        refs.detector.tau = tau  # 2: every generation counts as harmless; -2: every one replicates
        made, info = make_surrogates(tiny_sd, prompts, targets, refs, None, steps=2, guidance=None, tries=len(seeds),
                                     rule="own")  # fmt: skip
        for i, (target, row) in enumerate(zip(targets, info)):
            candidates = own[i * len(seeds) : (i + 1) * len(seeds)] if pool is None else pool
            sims = refs.detector.similarity(refs.detector.embed(candidates), refs.detector.embed(target))[:, 0]
            assert row["source"] == source and row["seed"] == int(sims.argmin())
            assert row["similarity"] == pytest.approx(float(sims.min()), abs=1e-5)
            assert torch.allclose(made[i], candidates[row["seed"]], atol=1e-5)


def test_any_rule_never_picks_a_copy_of_another_memorized_image(tiny_sd, prompt_files, sscd_file):
    """The paper's rule: a generation of the pruned model from the original prompt, below tau
    against every memorized image, not only its own; never the empty prompt. A prompt whose every
    generation copies one is reported with no surrogate."""
    from dori.unlearn.surrogates import make_surrogates

    prompts, refs, targets = _surrogate_inputs(tiny_sd, prompt_files, sscd_file)
    seeds = [0, 1, 2]
    own = tiny_sd.generate(tiny_sd.encode(prompts.texts), seeds, steps=2)
    detector = refs.detector
    own_sims = [detector.similarity(detector.embed(own[i * 3 : i * 3 + 3]), detector.embed(t))[:, 0]
                for i, t in enumerate(targets)]  # fmt: skip
    favourite = int(own_sims[0].argmin())  # what the own rule would pick for the first prompt
    # Make that generation "another memorized image": it now copies a memorized picture exactly.
    refs.planted = own[favourite : favourite + 1].clone()
    features = detector.embed(own)
    to_planted = detector.similarity(features, detector.embed(refs.planted))[:, 0]
    others = torch.cat([to_planted[to_planted < 0.999], *own_sims])
    detector.tau = (float(others.max()) + 1.0) / 2  # above every other similarity, below a copy's 1.0
    made, info = make_surrogates(tiny_sd, prompts, targets, refs, None, steps=2, guidance=None, tries=3)
    assert all(row["source"] == "prompt" for row in info)
    assert info[0]["seed"] != favourite and info[0]["max_any_memorized"] < detector.tau
    for i, row in enumerate(info):
        assert torch.allclose(made[i], own[i * 3 + row["seed"]], atol=1e-5)
    detector.tau = -2.0  # every generation copies: no surrogate, reported, never the empty prompt
    made, info = make_surrogates(tiny_sd, prompts, targets, refs, None, steps=2, guidance=None, tries=3)
    assert [row["source"] for row in info] == ["none", "none"] and not made.any()
    with pytest.raises(DoriError, match="unknown surrogate rule"):
        make_surrogates(tiny_sd, prompts, targets, refs, None, steps=2, guidance=None, rule="nearest")


def _finetune_inputs(model, n_targets=2, n_retain=4):
    generator = torch.Generator().manual_seed(0)
    shape = (3, *model.image_size)
    images = torch.rand(n_targets + n_retain, *shape, generator=generator)
    latents = model.to_latents(images)
    captions = [f"a photo number {i}" for i in range(n_retain)]
    return dict(targets=latents[:n_targets], surrogates=latents[:n_targets].flip(0),
                prompt_emb=model.encode([f"title {i}" for i in range(n_targets)]), retain_latents=latents[n_targets:],
                retain_emb=model.encode(captions), retain_index=torch.arange(n_retain))  # fmt: skip


def test_rounds_collect_fresh_triggers_from_new_starts(tiny_sd, monkeypatch):
    """With rounds, the first step of each round searches ``fresh_steps`` DoRI steps from the
    prompt and new N(0, I) draws; the steps between continue the round's triggers."""
    calls = []
    real = adversarial.dori_attack

    def recording(model, targets, init, config, **kwargs):
        calls.append((init.detach().clone(), config.steps))
        return real(model, targets, init, config, **kwargs)

    monkeypatch.setattr(adversarial, "dori_attack", recording)
    inputs = _finetune_inputs(tiny_sd)
    config = UnlearnConfig(steps=3, retain_batch=2, adv_pairs=1, triggers_per_target=2, refresh_every=2, fresh_steps=2,
                           inner_steps=1, learning_rate=1e-5, seed=3)  # fmt: skip
    assert [config.search(s) for s in range(4)] == [(True, 2), (False, 1), (True, 2), (False, 1)]
    original = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    try:
        states = []
        adversarial_finetune(tiny_sd, **inputs, config=config, on_step=lambda state, _: states.append(state))
    finally:
        tiny_sd.unet.load_state_dict(original)
    assert [steps for _, steps in calls] == [2, 1, 2]
    first, second = (initial_triggers(tiny_sd, inputs["prompt_emb"], 2, seed) for seed in (3, 3 + 7919))
    assert torch.equal(calls[0][0], first) and torch.equal(calls[2][0], second)
    assert torch.equal(calls[1][0], states[0].triggers)  # continued, not restarted
    assert not torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])  # new draws, same prompt start
    warm = UnlearnConfig(inner_steps=3)
    fresh = UnlearnConfig(warm_start=False, fresh_steps=50)
    assert warm.search(5) == (False, 3) and fresh.search(5) == (True, 50)  # without rounds, as before


def test_utility_rows_take_the_empty_caption_at_its_share(tiny_sd, monkeypatch):
    """Pre-training dropped captions; the utility batch does too, at ``empty_caption_prob``."""
    inputs = _finetune_inputs(tiny_sd)
    seen = []
    real = tiny_sd.model_output

    def recording(x_t, t, emb):
        seen.append(emb.detach().clone())
        return real(x_t, t, emb)

    monkeypatch.setattr(tiny_sd, "model_output", recording)
    config = UnlearnConfig(steps=1, retain_batch=16, adv_pairs=1, triggers_per_target=1, inner_steps=0,
                           empty_caption_prob=0.5, learning_rate=1e-5)  # fmt: skip
    original = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    try:
        adversarial_finetune(tiny_sd, **inputs, config=config)
    finally:
        tiny_sd.unet.load_state_dict(original)
    utility_rows = seen[0]  # no attack step (inner_steps 0): the first U-Net call is L_DM's
    assert utility_rows.shape[0] == 16
    empty = tiny_sd.empty_embedding()
    is_empty = torch.tensor([torch.equal(row, empty[0]) for row in utility_rows])
    captions = {tuple(e.flatten()[:8].tolist()) for e in inputs["retain_emb"]}
    assert 0 < int(is_empty.sum()) < 16
    assert all(tuple(row.flatten()[:8].tolist()) in captions for row in utility_rows[~is_empty])
    with pytest.raises(DoriError, match="empty-caption-prob"):
        UnlearnConfig(empty_caption_prob=1.0)


def test_warmup_raises_the_rate_linearly_and_the_optimizer_follows_it(tiny_sd):
    config = UnlearnConfig(steps=3, retain_batch=2, adv_pairs=1, triggers_per_target=1, inner_steps=0,
                           learning_rate=1e-3, warmup_steps=4)  # fmt: skip
    assert [config.rate(s) for s in (0, 1, 3, 10)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    assert UnlearnConfig(learning_rate=1e-3).rate(0) == 1e-3  # no warm-up: the rate from the first step
    rates = []
    original = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    try:
        adversarial_finetune(tiny_sd, **_finetune_inputs(tiny_sd), config=config,
                             on_step=lambda state, optimizer: rates.append(optimizer.param_groups[0]["lr"]))
    finally:
        tiny_sd.unet.load_state_dict(original)
    assert rates == pytest.approx([config.rate(s) for s in range(3)])


def test_preservation_term_holds_the_model_to_the_original_weights(tiny_sd):
    """Zero at the first step (the model is the original); on a resumed run it compares with the
    original's weights passed in, not with the checkpoint the run resumes from."""
    inputs = _finetune_inputs(tiny_sd)
    config = UnlearnConfig(steps=1, retain_batch=4, adv_pairs=1, triggers_per_target=1, inner_steps=0,
                           learning_rate=1e-2, preserve_weight=1.0)  # fmt: skip
    original = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    try:
        first = adversarial_finetune(tiny_sd, **inputs, config=config)
        assert first.history[0]["loss_keep"] == 0.0
        moved = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
        again = UnlearnConfig(**{**config.__dict__, "steps": 2})
        resumed = adversarial_finetune(tiny_sd, **inputs, config=again, state=first, weights=moved,
                                       reference_weights=original)  # fmt: skip
        assert resumed.history[1]["loss_keep"] > 0
        tiny_sd.unet.load_state_dict(moved)
        unanchored = adversarial_finetune(tiny_sd, **inputs, config=again, state=first)
        assert unanchored.history[1]["loss_keep"] == 0.0  # without them, the copy is the resumed weights
    finally:
        tiny_sd.unet.load_state_dict(original)
    assert "loss_keep" not in adversarial_finetune(tiny_sd, **inputs, config=UnlearnConfig(
        steps=1, retain_batch=2, adv_pairs=1, triggers_per_target=1, inner_steps=0, learning_rate=0.0)).history[0]
    tiny_sd.unet.load_state_dict(original)


def test_the_study_fine_tunes_with_the_chosen_setting_and_measures_utility_on_10_seeds(tmp_path):
    """The setting docs/RESULTS.md chose by its rule (surrogates below tau against every memorized
    image, 10% empty captions, warm-started triggers, preservation weight 10), and the 10 seeds per
    held-out caption its alignment bar needs; --quick keeps one."""
    from dori.configs import StudyConfig
    from dori.stages.study import stage_configs

    full = stage_configs(StudyConfig(), tmp_path)["unlearn"]
    assert (full.surrogate_rule, full.empty_caption_prob, full.preserve_weight) == ("any", 0.1, 10.0)
    assert full.warm_start and full.refresh_every == 0 and full.utility_seeds == 10
    assert stage_configs(StudyConfig(quick=True), tmp_path)["unlearn"].utility_seeds == 1


def test_unlearn_with_no_surrogate_for_any_prompt_stops_with_a_clear_error(tiny_sd, prompt_files, sscd_file, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """Every generation of the mitigated model copies a memorized image: nothing to train toward."""
    from dori.configs import MitigateConfig, UnlearnRunConfig
    from dori.measure.similarity import SSCD
    from dori.stages.mitigate import run_mitigate
    from dori.stages.unlearn import run_unlearn

    common = dict(prompts=str(prompt_files / "mem.csv"), images=str(prompt_files / "images"), sscd=str(sscd_file))
    run_mitigate(MitigateConfig(method="wanda", ratio=0.1, seeds=1, steps=2, **common), tiny_sd, tmp_path / "wanda")
    real_init = SSCD.__init__

    def everything_copies(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.tau = -2.0

    monkeypatch.setattr(SSCD, "__init__", everything_copies)
    config = UnlearnRunConfig(mitigation=str(tmp_path / "wanda"), retain_prompts=common["prompts"], steps=1,
                              retain_batch=2, triggers_per_target=1, inner_steps=1, eval_attack_steps=1, seeds=1,
                              eval_steps=2, limit=2, surrogate_tries=2, **common)  # fmt: skip
    with pytest.raises(DoriError, match="no prompt has a surrogate"):
        run_unlearn(config, tiny_sd, tmp_path / "unlearn")
    info = json.loads((tmp_path / "unlearn" / "surrogates.json").read_text())["surrogates"]
    assert [row["source"] for row in info] == ["none", "none"]
