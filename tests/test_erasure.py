"""ESD, Concept Ablation and SISS (issue 25) at tiny size: each lowers its own objective, trains
only the parameters it should, and resumes from a checkpoint to the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from dori.errors import DoriError
from dori.unlearn.erasure import ErasureConfig, anchor_for, ca_loss, esd_loss, siss_loss
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
        anchors = torch.randn(2, 3, 4, 8, 8, generator=g)
        return ca_loss(model, emb, model.encode(["a building", "a vehicle"]), anchors, config)
    return siss_loss(model, emb, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 1, 4, 8, 8, generator=g), config)


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
    if method == "ca":  # crossattn_kv: the key and value projections only
        assert all(".attn2.to_k." in name or ".attn2.to_v." in name for name in changed)
    if method == "siss":  # the whole U-Net
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


def test_paper_settings_scale_with_the_models_own_training_rate_and_anchors(tiny_sd_dir):
    bundled = load_model("bundled")
    assert ErasureConfig("esd").resolved(bundled).learning_rate == pytest.approx(1e-5 * 1e-3 / 1e-4)
    sd = ErasureConfig("siss").resolved(load_model(tiny_sd_dir))
    assert (sd.steps, sd.batch, sd.learning_rate, sd.params) == (35, 16, 1e-5, "full")
    assert anchor_for("Aurora Hollow album cover") == "an album cover" and anchor_for("Nimbus Quarry stamp") == "a stamp"
    with pytest.raises(DoriError, match="unknown fine-tuning method"):
        ErasureConfig("retrain")


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
