"""ESD, Concept Ablation and SISS at tiny size: each lowers its own objective, trains only the
parameters it should, resumes from a checkpoint to the same weights, and matches its authors' code
point by point (docs/ERASURE.md names the test of each point)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from dori.errors import DoriError
from dori.unlearn.erasure import (CA_PREFIXES, ErasureConfig, _draw, anchor_for, ca_augment, ca_loss, esd_loss,
                                  esd_timesteps, siss_loss)  # fmt: skip
from dori.models import load_model
from dori.unlearn.training import TrainState, parameter_group, train_unet

# eta 20: on a random tiny U-Net the prompt barely moves the prediction, so ESD's target is
# made to differ measurably from it
SETTINGS = {"esd": dict(steps=6, batch=2, learning_rate=1e-3, sample_steps=4, eta=20.0),
            "ca": dict(steps=6, batch=4, learning_rate=3e-3),
            "siss": dict(steps=6, batch=4, learning_rate=3e-3)}  # fmt: skip


def _objective(model, method, config):
    g = torch.Generator().manual_seed(5)
    emb = model.encode(["a red barn", "a blue boat"])
    if method == "esd":
        return esd_loss(model, emb, config)
    if method == "ca":
        anchors = torch.rand(2, 3, 3, *model.image_size, generator=g)
        return ca_loss(model, emb, model.encode(["a building", "a vehicle"]), anchors, config, prefixed=_prefixed(model))
    return siss_loss(model, emb, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 1, 4, 8, 8, generator=g), config)


def _prefixed(model, prompts=("a red barn", "a blue boat")):
    return torch.stack([model.encode([q + p for q in CA_PREFIXES]) for p in prompts])


def _measure(model, step_loss, params) -> dict:
    """The objective's logged terms, summed over four fixed draws (its own loss, before and after)."""
    total: dict = {}
    group = [p for _, p in parameter_group(model, params)]
    for p in group:  # SISS takes its gradients inside the objective
        p.requires_grad_(True)
    for seed in range(4):
        for k, v in step_loss(0, torch.Generator().manual_seed(100 + seed), 0, 1)[1].items():
            total[k] = total.get(k, 0.0) + v
    for p in group:
        p.requires_grad_(False)
    return total


@pytest.mark.parametrize("method", ["esd", "ca", "siss"])
def test_each_method_lowers_its_own_objective_and_trains_only_its_parameters(tiny_sd_dir, method):
    model = load_model(tiny_sd_dir)
    config = ErasureConfig(method, **SETTINGS[method]).resolved(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    step_loss = _objective(model, method, config)
    first = _measure(model, step_loss, config.params)
    train_unet(model, config.params, step_loss, steps=config.steps, learning_rate=config.learning_rate)
    last = _measure(model, step_loss, config.params)
    if method == "siss":  # the model gets worse at the forgotten image relative to the kept one
        assert last["loss_forget"] / last["loss_keep"] > first["loss_forget"] / first["loss_keep"]
    else:
        assert last["loss"] < first["loss"]
    changed = {k for k, v in model.unet.state_dict().items() if not torch.equal(v, before[k])}
    group = {name for name, _ in parameter_group(model, config.params)}
    assert changed and changed <= group
    if method == "esd":  # ESD-x: cross-attention only
        assert all(".attn2." in name for name in changed)
    if method in ("ca", "siss"):  # the whole U-Net (CA's memorization setting: freeze_model all)
        assert any(".attn2." not in name for name in changed)


def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_weights(tiny_sd_dir):
    config = ErasureConfig("esd", **{**SETTINGS["esd"], "steps": 4}).resolved(load_model(tiny_sd_dir))
    straight = load_model(tiny_sd_dir)
    train_unet(straight, config.params, _objective(straight, "esd", config), steps=4, learning_rate=config.learning_rate)

    saved = {}

    def keep(state: TrainState, optimizer) -> None:
        if state.step == 2:
            saved.update(unet=copy.deepcopy(first.unet.state_dict()), optimizer=copy.deepcopy(optimizer.state_dict()),
                         state=copy.deepcopy(state))  # fmt: skip

    first = load_model(tiny_sd_dir)
    train_unet(first, config.params, _objective(first, "esd", config), steps=2, learning_rate=config.learning_rate,
               on_step=keep)  # fmt: skip
    resumed = load_model(tiny_sd_dir)
    objective = _objective(resumed, "esd", config)  # built on the model as given: ESD's frozen copy is the original
    resumed.unet.load_state_dict(saved["unet"])
    train_unet(resumed, config.params, objective, steps=4, learning_rate=config.learning_rate, state=saved["state"],
               optimizer_state=saved["optimizer"])  # fmt: skip
    for key, value in straight.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[key]), key


def test_the_references_settings_are_the_defaults_and_the_scaled_rule_an_option(tiny_sd_dir):
    bundled = load_model("bundled")  # pre-trained at 1e-3, ten times SD's 1e-4
    esd = ErasureConfig("esd").resolved(bundled)
    # train-esd.py: Adam at 1e-5, no weight decay, no clipping
    assert (esd.learning_rate, esd.weight_decay, esd.grad_clip, esd.params) == (1e-5, 0.0, 0.0, "xattn")
    siss = ErasureConfig("siss").resolved(bundled)  # METHOD.md (the paper): lr 1e-5; delete_sd.py: clip 1, AdamW 0.01
    assert (siss.steps, siss.batch, siss.learning_rate, siss.weight_decay, siss.grad_clip) == (35, 16, 1e-5, 0.01, 1.0)
    assert siss.siss_timesteps == "last"
    scaled = ErasureConfig("esd", lr_rule="scaled").resolved(bundled)
    assert scaled.learning_rate == pytest.approx(1e-5 * 1e-3 / 1e-4)
    assert ErasureConfig("esd", lr_rule="scaled").resolved(load_model(tiny_sd_dir)).learning_rate == 1e-5
    assert ErasureConfig("esd", learning_rate=3e-4, grad_clip=2.0).resolved(bundled).grad_clip == 2.0
    assert anchor_for("Aurora Hollow album cover") == "an album cover" and anchor_for("Nimbus Quarry stamp") == "a stamp"
    with pytest.raises(DoriError, match="unknown fine-tuning method"):
        ErasureConfig("retrain")
    with pytest.raises(DoriError, match="unknown --lr-rule 'paper'"):
        ErasureConfig("esd", lr_rule="paper")


def test_no_clipping_means_no_clipping(tiny_sd_dir):
    """ESD's reference never clips: with grad_clip 0 two steps of very different gradient norms are
    plain Adam's; with a clip of 1 they are not."""
    final = {}
    for clip in (0.0, 1.0):
        model = load_model(tiny_sd_dir)
        group = [p for _, p in parameter_group(model, "kv")]
        start = [p.detach().clone() for p in group]
        scales = [100.0, 1.0]
        step_loss = lambda step, g, r, w: ([torch.full_like(p, scales[step]) for p in group], {})  # noqa: E731
        train_unet(model, "kv", step_loss, steps=2, learning_rate=1e-2, weight_decay=0.0, grad_clip=clip)
        final[clip] = [p.detach().clone() for _, p in parameter_group(model, "kv")]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    adam = torch.optim.Adam(params, lr=1e-2)
    for scale in scales:
        for p in params:
            p.grad = torch.full_like(p, scale)
        adam.step()
    assert all(torch.allclose(a, b) for a, b in zip(final[0.0], params))
    assert not all(torch.allclose(a, b) for a, b in zip(final[1.0], params))


def test_esd_pairs_its_sample_and_timestep_as_the_reference_sampler_does():
    g = torch.Generator().manual_seed(0)
    assert esd_timesteps(0, 50, 1000, g)[0] == 50 and esd_timesteps(1, 50, 1000, g)[0] == 50  # till_T 0, 1: to the end
    for k in range(50):
        calls, t = esd_timesteps(k, 50, 1000, g)
        assert 20 * k <= int(t) <= 20 * k + 19
        if k >= 2:  # stopped after index k - 1: the sample sits at the grid point of index k - 2 (20 (k - 2) + 1)
            assert calls == 51 - k and 39 <= int(t) - (20 * (k - 2) + 1) <= 58
    assert esd_timesteps(49, 50, 1000, g)[0] == 2


def _recording(model, monkeypatch):
    """Every (timestep, rows) the U-Net's raw output is asked for, and every sampler stop."""
    seen = {"t": [], "stop": []}
    output, sample = model.model_output, model.sample_latents

    def model_output(x_t, t, emb):
        seen["t"].append(t.flatten().tolist())
        return output(x_t, t, emb)

    def sample_latents(*args, stop_after=None, **kwargs):
        seen["stop"].append(stop_after)
        return sample(*args, stop_after=stop_after, **kwargs)

    monkeypatch.setattr(model, "model_output", model_output)
    monkeypatch.setattr(model, "sample_latents", sample_latents)
    return seen


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sd2_dir"])
def test_esd_takes_its_loss_on_the_raw_output_at_the_references_timesteps(fixture, request, monkeypatch):
    """On an epsilon and on a v model: at step 0 (trained = frozen) the loss is
    ``mean(((1 + eta) (o(x, t, c) - o(x, t)))^2)`` in the model's own output."""
    model = load_model(request.getfixturevalue(fixture))
    config = ErasureConfig("esd", batch=2, sample_steps=4, eta=2.0).resolved(model)
    emb = model.encode(["a red barn", "a blue boat"])
    step_loss = esd_loss(model, emb, config)
    seen = _recording(model, monkeypatch)
    for seed in range(3):
        loss, _ = step_loss(0, torch.Generator().manual_seed(seed), 0, 1)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(2, (2,), generator=g)
        k = int(torch.randint(4, (1,), generator=g))
        calls, t = esd_timesteps(k, 4, model.num_train_timesteps, g)
        assert seen["stop"][-1] == calls and set(seen["t"][-1]) == {int(t)}
        x = torch.randn((2, *model.latent_shape), generator=g)
        with torch.no_grad():
            x = model.sample_latents(emb[rows], x, steps=4, guidance=3.0, stop_after=calls)
            tt = t.expand(2)
            raw = lambda e: model.unet(x, tt, encoder_hidden_states=e).sample  # noqa: E731
            expected = ((1 + 2.0) * (raw(emb[rows]) - raw(model.empty_embedding().expand(2, -1, -1)))).pow(2).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sd2_dir"])
def test_ca_and_siss_take_their_losses_on_the_raw_output(fixture, request, monkeypatch):
    model = load_model(request.getfixturevalue(fixture))
    g = torch.Generator().manual_seed(5)
    emb, anchor = model.encode(["a red barn", "a blue boat"]), model.encode(["a building", "a vehicle"])
    anchors = torch.rand(2, 3, 3, *model.image_size, generator=g)
    forget, keep = torch.randn(2, *model.latent_shape, generator=g), torch.randn(2, 1, *model.latent_shape, generator=g)
    T = model.num_train_timesteps
    # CA (without augmentation): the ablation term against the anchor's raw output on the same noised
    # anchor image, summed over channels and averaged over the mask (the image less one latent cell
    # on each side), as train.py's masked loss
    config = ErasureConfig("ca", batch=4, ca_augment=False).resolved(model)
    _, logs = ca_loss(model, emb, anchor, anchors, config)(0, torch.Generator().manual_seed(1), 0, 1)
    g = torch.Generator().manual_seed(1)
    rows, picks = _draw(g, torch.ones(2, 3, dtype=torch.bool), 4)
    noise = torch.randn((4, *model.latent_shape), generator=g)
    t = torch.randint(T, (4,), generator=g)
    x_t = model.add_noise(model.to_latents(anchors[rows, picks]), noise, t)
    side = model.latent_shape[1]
    mask = torch.zeros(1, 1, side, side)
    mask[..., 1:-1, 1:-1] = 1
    with torch.no_grad():
        raw = lambda e: model.unet(x_t, t, encoder_hidden_states=e).sample  # noqa: E731
        error = (raw(emb[rows]) - raw(anchor[rows])).pow(2)
        expected = ((error * mask).sum((1, 2, 3)) / mask.sum()).mean()
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-4)
    # SISS: t = T - 1 for every sample (the reference's), and the kept loss against v's target on a v model
    config = ErasureConfig("siss", batch=4, params="kv").resolved(model)
    seen = _recording(model, monkeypatch)
    for p in [p for _, p in parameter_group(model, "kv")]:
        p.requires_grad_(True)
    _, logs = siss_loss(model, emb, forget, keep, config)(0, torch.Generator().manual_seed(2), 0, 1)
    assert seen["t"][-1] == [T - 1] * 4
    g = torch.Generator().manual_seed(2)
    rows, picks = _draw(g, torch.ones(2, 1, dtype=torch.bool), 4)
    noise = torch.randn((4, *model.latent_shape), generator=g)
    torch.randint(T, (4,), generator=g)
    from_forget = torch.rand(4, generator=g) < 0.5
    t = torch.full((4,), T - 1)
    x, a = keep[rows, picks], forget[rows]
    x_t = model.add_noise(torch.where(from_forget.view(-1, 1, 1, 1), a, x), noise, t)
    with torch.no_grad():
        out = model.unet(x_t, t, encoder_hidden_states=emb[rows]).sample
    gamma, sigma = model.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - model.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    eps_x = (x_t - gamma * x) / sigma
    # ddpm_deletion_loss.py's importance weight of the kept term, written as the reference writes it
    dist_x = ((x_t - gamma * x) ** 2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)
    dist_a = ((x_t - gamma * a) ** 2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)
    weight_x = 1 / (0.5 + 0.5 * torch.exp(dist_x - dist_a))
    per_sample = (out - model.training_target(x, eps_x, t)).pow(2).flatten(1).mean(1)
    assert logs["loss_keep"] == pytest.approx(float((weight_x * per_sample).mean()), rel=1e-3)


def test_siss_draws_t_over_all_timesteps_when_asked(tiny_sd_dir, monkeypatch):
    model = load_model(tiny_sd_dir)
    config = ErasureConfig("siss", batch=4, params="kv", siss_timesteps="uniform").resolved(model)
    g = torch.Generator().manual_seed(5)
    seen = _recording(model, monkeypatch)
    for p in [p for _, p in parameter_group(model, "kv")]:
        p.requires_grad_(True)
    siss_loss(model, model.encode(["a", "b"]), torch.randn(2, *model.latent_shape, generator=g),
              torch.randn(2, 1, *model.latent_shape, generator=g), config)(0, torch.Generator().manual_seed(0), 0, 1)  # fmt: skip
    assert len(set(seen["t"][-1])) > 1


def test_concept_ablation_needs_an_anchor_on_a_real_model_and_float16_is_refused(tiny_sd, prompt_files, sscd_file,
                                                                               tmp_path):  # fmt: skip
    from dori.configs import MitigateConfig
    from dori.stages.mitigate import run_mitigate

    common = dict(prompts=str(prompt_files / "mem.csv"), model=str(tiny_sd.source), images=str(prompt_files / "images"),
                  sscd=str(sscd_file), seeds=1, steps=2, finetune_steps=1)  # fmt: skip
    with pytest.raises(DoriError, match="Concept Ablation needs an anchor: pass --anchor TEXT"):
        run_mitigate(MitigateConfig(method="ca", **common), tiny_sd, tmp_path / "ca")
    (tmp_path / "anchors.txt").write_text("a building\na vehicle\n")
    with pytest.raises(DoriError, match="holds 2 anchors for 4 prompts"):
        run_mitigate(MitigateConfig(method="ca", anchor=str(tmp_path / "anchors.txt"), **common), tiny_sd, tmp_path / "b")
    half = load_model(tiny_sd.source, dtype="float16")
    with pytest.raises(DoriError, match="use --dtype bfloat16"):
        run_mitigate(MitigateConfig(method="esd", **common), half, tmp_path / "esd")


@pytest.mark.parametrize("method", ["ca", "siss"])
def test_the_stage_makes_its_data_once_saves_the_model_and_restores_the_callers(tiny_sd, prompt_files, sscd_file,
                                                                              tmp_path, method):  # fmt: skip
    from dori.configs import MitigateConfig
    from dori.stages.mitigate import run_mitigate

    config = MitigateConfig(method=method, prompts=str(prompt_files / "mem.csv"), model=str(tiny_sd.source), limit=2,
                            images=str(prompt_files / "images"), sscd=str(sscd_file), seeds=1, steps=2,
                            finetune_steps=2, anchor="a thing" if method == "ca" else None)  # fmt: skip
    weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    summary = run_mitigate(config, tiny_sd, tmp_path / method)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_sd.unet.state_dict().items())
    assert all(p.grad is None for p in tiny_sd.unet.parameters())  # the shared model is left as it was
    assert (tmp_path / method / f"{method}_data.safetensors").is_file() and len(summary["history"]) == 2
    tuned = load_model(summary["model"])
    assert any(not torch.equal(v, weights[k]) for k, v in tuned.unet.state_dict().items())
    assert {"mr_before", "mr_after", "utility_detail_after"} <= set(summary)


def test_concept_ablation_keeps_only_non_copies_of_anchors_that_rarely_copy():
    """utils.py: generated anchor images with SSCD > 0.5 to the memorized image are removed, and a
    paraphrase is kept as anchor only if it replicates at most 30% of the time."""
    from dori.stages.erasure import ANCHOR_MAX_COPIES, usable_images

    copies = torch.tensor([[True, False, False, False, False], [True, True, False, False, False],
                           [False] * 5, [True] * 5])  # fmt: skip
    ca = usable_images(copies, ANCHOR_MAX_COPIES)
    assert ca.tolist() == [[False, True, True, True, True], [False] * 5, [True] * 5, [False] * 5]  # 20% kept, 40% not
    siss = usable_images(copies, 1.0)  # SISS: every non-copy, however many copies the prompt makes
    assert siss.tolist() == (~copies).tolist()


def test_draws_take_only_usable_rows_and_images():
    valid = torch.tensor([[False, True, False], [False, False, False], [True, True, True]])
    g = torch.Generator().manual_seed(0)
    rows, picks = _draw(g, valid, 2000)
    assert set(rows.tolist()) == {0, 2} and bool(valid[rows, picks].all())
    assert set(picks[rows == 2].tolist()) == {0, 1, 2} and set(picks[rows == 0].tolist()) == {1}


def test_concept_ablation_regularizes_on_its_own_draw_and_freezes_the_start_token(tiny_sd_dir, monkeypatch):
    model = load_model(tiny_sd_dir)
    g = torch.Generator().manual_seed(5)
    anchors = torch.rand(2, 3, 3, *model.image_size, generator=g)
    emb, anchor = model.encode(["a red barn", "a blue boat"]), model.encode(["a building", "a vehicle"])
    # only the start token carries anything: every key and value gradient comes from it
    emb[:, 1:], anchor[:, 1:] = 0, 0
    config = ErasureConfig("ca", batch=4, ca_augment=False).resolved(model)
    assert config.params == "full"
    group = parameter_group(model, "full")
    for _, p in group:
        p.requires_grad_(True)
    seen = _recording(model, monkeypatch)
    loss, _ = ca_loss(model, emb, anchor, anchors, config)(0, torch.Generator().manual_seed(0), 0, 1)
    grads = dict(zip([n for n, _ in group], torch.autograd.grad(loss, [p for _, p in group], allow_unused=True)))
    kv = [n for n in grads if ".attn2.to_k." in n or ".attn2.to_v." in n]
    assert kv and all(grads[n] is None or not grads[n].any() for n in kv)
    assert any(g is not None and g.any() for n, g in grads.items() if n not in kv)
    # the anchor target, the ablation, then the regularization at its own timesteps
    assert len(seen["t"]) == 3 and seen["t"][0] == seen["t"][1] and seen["t"][2] != seen["t"][1]


@pytest.mark.parametrize("method", ["ca", "siss"])
def test_a_method_with_nothing_left_to_train_on_says_so(tiny_sd, prompt_files, sscd_file, tmp_path, monkeypatch, method):
    """Every anchor image (CA) or every generation (SISS) a copy: one line that names it, and the
    per-prompt report beside it."""
    import dori.stages.erasure as stage
    from dori.configs import MitigateConfig
    from dori.stages.mitigate import run_mitigate

    real = stage.replication

    def every_image_a_copy(*args, **kwargs):
        rows, images = real(*args, **kwargs)
        return [dataclasses.replace(r, similarities=[1.0] * len(r.similarities)) for r in rows], images

    monkeypatch.setattr(stage, "replication", every_image_a_copy)
    config = MitigateConfig(method=method, prompts=str(prompt_files / "mem.csv"), model=str(tiny_sd.source), limit=2,
                            images=str(prompt_files / "images"), sscd=str(sscd_file), seeds=1, steps=2,
                            finetune_steps=2, anchor="a thing" if method == "ca" else None)  # fmt: skip
    expected = "no anchor passes the replication filter" if method == "ca" else "no prompt has a generation that is not a copy"
    with pytest.raises(DoriError, match=expected):
        run_mitigate(config, tiny_sd, tmp_path / method)
    report = json.loads((tmp_path / method / stage.DATA_REPORT[method]).read_text())
    assert [r["trained"] for r in report] == [False, False] and all(r["copies"] == r["of"] for r in report)
    assert not (tmp_path / method / "summary.json").exists()


def test_concept_ablation_augments_its_anchor_images_as_the_reference_dataset():
    """utils.py ``CustomDiffusionDataset`` (aug on, --hflip): a flip with probability 0.5; a side in
    [S // 3, S] (probability 0.66) pasted on a grey canvas, its mask inset by one latent cell, or in
    [1.2 S, 1.4 S) cropped, its mask all ones; 'a far away' / 'very small' below 0.6 S, 'zoomed in' /
    'close up' above S."""
    S = 32
    image = torch.full((3, S, S), 0.2)
    image[:, :, S // 2 :] = 1.0  # a flip shows
    out, mask, prefix = ca_augment(image.expand(600, -1, -1, -1), torch.Generator().manual_seed(0), S)
    enlarged = mask.flatten(1).all(1)
    assert 0.28 < enlarged.float().mean() < 0.40  # 0.34
    assert set(prefix[enlarged].tolist()) == {2, 3}
    flips, scales = 0, []
    for i in (~enlarged).nonzero().flatten().tolist():
        rows, cols = mask[i, 0].any(1).nonzero().flatten(), mask[i, 0].any(0).nonzero().flatten()
        top, left, scale = int(rows[0]) - 1, int(cols[0]) - 1, int(rows[-1] - rows[0]) + 3
        assert int(cols[-1] - cols[0]) + 3 == scale and S // 3 <= scale <= S
        resized = torch.nn.functional.interpolate(image[None], size=(scale, scale), mode="bilinear", antialias=True)[0]
        pasted = out[i, :, top : top + scale, left : left + scale]
        flipped = torch.allclose(pasted, resized.flip(-1), atol=1e-6)
        assert flipped or torch.allclose(pasted, resized, atol=1e-6)
        flips += flipped
        canvas = out[i].clone()
        canvas[:, top : top + scale, left : left + scale] = 0.5
        assert bool((canvas == 0.5).all())
        assert (prefix[i] in (0, 1)) == (scale < 0.6 * S) and (prefix[i] == -1) == (scale >= 0.6 * S)
        scales.append(scale)
    assert 0.4 < flips / len(scales) < 0.6 and min(scales) == S // 3 and max(scales) == S


def test_concept_ablation_gives_the_prompt_the_drawn_prefix(tiny_sd_dir, monkeypatch):
    model = load_model(tiny_sd_dir)
    prompts = ["a red barn", "a blue boat"]
    emb, anchor, prefixed = model.encode(prompts), model.encode(["a building", "a vehicle"]), _prefixed(model, prompts)
    images = torch.rand(2, 3, 3, *model.image_size, generator=torch.Generator().manual_seed(5))
    config = ErasureConfig("ca", batch=16).resolved(model)
    assert config.ca_augment  # the reference's default
    calls = []
    output = model.model_output
    monkeypatch.setattr(model, "model_output", lambda x, t, e: calls.append(e.clone()) or output(x, t, e))
    ca_loss(model, emb, anchor, images, config, prefixed=prefixed)(0, torch.Generator().manual_seed(3), 0, 1)
    g = torch.Generator().manual_seed(3)  # the step's draws, in its order
    rows, picks = _draw(g, torch.ones(2, 3, dtype=torch.bool), 16)
    torch.randn((16, *model.latent_shape), generator=g), torch.randint(1000, (16,), generator=g)
    torch.rand(16, generator=g)  # the prior's picks
    torch.randn((16, *model.latent_shape), generator=g), torch.randint(1000, (16,), generator=g)
    _, _, prefix = ca_augment(images[rows, picks], g, model.latent_shape[1])
    assert (prefix >= 0).any() and (prefix == -1).any()
    expected = torch.stack([prefixed[r, k] if k >= 0 else emb[r] for r, k in zip(rows.tolist(), prefix.tolist())])
    assert torch.equal(calls[0], anchor[rows]) and torch.equal(calls[1], expected)


def test_siss_can_keep_the_empty_prompts_generations(tiny_sd, prompt_files, sscd_file, tmp_path, monkeypatch):
    import dori.stages.erasure as stage
    from dori.configs import MitigateConfig
    from dori.stages.mitigate import run_mitigate

    seen = []
    real = stage.replication

    def recording(*args, embeddings=None, **kwargs):
        seen.append((embeddings, args[2]))
        return real(*args, embeddings=embeddings, **kwargs)

    monkeypatch.setattr(stage, "replication", recording)
    config = MitigateConfig(method="siss", siss_keep="empty", prompts=str(prompt_files / "mem.csv"),
                            model=str(tiny_sd.source), limit=2, images=str(prompt_files / "images"), sscd=str(sscd_file),
                            seeds=1, steps=2, finetune_steps=1)  # fmt: skip
    summary = run_mitigate(config, tiny_sd, tmp_path / "siss")
    empty = tiny_sd.empty_embedding()
    # the empty prompt's generations made once, each checked against every training image of the
    # set (not only a prompt's own), and kept for both prompts
    embeddings, references = seen[-1]
    assert len(embeddings) == 1 and torch.equal(embeddings, empty)
    assert len(references) == 1 and len(references[0]) == 2
    from safetensors.torch import load_file

    latents = load_file(str(tmp_path / "siss" / "siss_data.safetensors"))["latents"]
    assert latents.shape[0] == 2 and torch.equal(latents[0], latents[1])
    assert [r["kept_from"] for r in summary["data"]] == ["the empty prompt"] * 2
    with pytest.raises(DoriError, match="unknown --siss-keep 'blank'; use own or empty"):
        MitigateConfig(method="siss", prompts="x", siss_keep="blank")
