"""mitigate and attack run folders on the tiny SD backend, and the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from dori.configs import AttackRunConfig, MitigateConfig, ReplicateConfig
from dori.errors import DoriError
from dori.stages.attack import run_attack
from dori.stages.mitigate import run_mitigate
from dori.stages.replicate import run_replicate


def _common(prompt_files, sscd_file):
    return dict(prompts=str(prompt_files / "mem.csv"), images=str(prompt_files / "images"), sscd=str(sscd_file))


def test_wanda_mitigation_then_attack_and_replicate_on_it(tiny_sd, prompt_files, sscd_file, tmp_path):
    config = MitigateConfig(method="wanda", ratio=0.1, seeds=2, steps=3, **_common(prompt_files, sscd_file))
    summary = run_mitigate(config, tiny_sd, tmp_path / "wanda")
    for key in ("method", "mr_before", "mr_after", "sscd_mean_before", "sscd_mean_after", "utility_before",
                "utility_after", "sparsity"):  # fmt: skip
        assert key in summary
    assert summary["pruned_weights"] > 0 and 0 < summary["sparsity"] < 1
    assert (tmp_path / "wanda" / "mask.safetensors").exists()
    assert (tmp_path / "wanda" / "mitigated_weights.safetensors").exists()

    attack = AttackRunConfig(mitigation=str(tmp_path / "wanda"), steps=2, steps_curve="0,1", seeds=2, eval_steps=2,
                             attack_batch=2, control=False, **_common(prompt_files, sscd_file))  # fmt: skip
    result = run_attack(attack, tiny_sd, tmp_path / "attack")
    assert set(result["steps_curve"]) == {"0", "1", "2"} and result["mitigation"] == "wanda"
    assert {"mr", "sscd_mean", "sscd_std"} <= set(result)
    assert (tmp_path / "attack" / "steps_curve.png").exists()
    assert (tmp_path / "attack" / "attack_embeddings.safetensors").exists()
    # A resumed attack reads its finished parts back and gives the same numbers.
    assert run_attack(attack, tiny_sd, tmp_path / "attack", resume=True) == result

    replicate = ReplicateConfig(mitigation=str(tmp_path / "wanda"), seeds=2, steps=2, **_common(prompt_files, sscd_file))
    assert run_replicate(replicate, tiny_sd, tmp_path / "rep")["mitigation"] == "wanda"


def test_nemo_mitigation_with_explicit_statistics_and_threshold(tiny_sd, prompt_files, sscd_file, tmp_path):
    from dori.mitigate.nemo import load_statistics, save_statistics, value_statistics

    save_statistics(value_statistics(tiny_sd, ["a cat", "a dog", "a tree"]), tmp_path / "stats.pt")
    config = MitigateConfig(method="nemo", stats=str(tmp_path / "stats.pt"), threshold=0.0, seeds=2, steps=3,
                            limit=2, **_common(prompt_files, sscd_file))  # fmt: skip
    summary = run_mitigate(config, tiny_sd, tmp_path / "nemo")
    neurons = json.loads((tmp_path / "nemo" / "neurons.json").read_text())
    assert set(neurons) == {"0", "1"} and len(summary["neurons_per_prompt"]) == 2
    mask = json.loads((tmp_path / "nemo" / "mask.json").read_text())
    assert summary["scope"] == mask["scope"] == "prompt" and len(mask["per_prompt"]) == 2
    attack = AttackRunConfig(mitigation=str(tmp_path / "nemo"), steps=1, steps_curve="0", seeds=2, eval_steps=2,
                             attack_batch=2, control=False, limit=2, **_common(prompt_files, sscd_file))  # fmt: skip
    result = run_attack(attack, tiny_sd, tmp_path / "attack")
    assert result["mitigation"] == "nemo" and set(result["steps_curve"]) == {"0", "1"}
    torch.save(([torch.zeros(3)], [torch.ones(3)]), tmp_path / "bad.pt")
    with pytest.raises(DoriError, match="statistics for value layers"):
        load_statistics(tmp_path / "bad.pt", tiny_sd)


def test_cli_generate_on_a_saved_sd_folder_and_errors(tiny_sd_dir, tmp_path, capsys):
    run = [sys.executable, "-m", "dori", "generate", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--prompt", "a dog",
           "--seeds", "2", "--steps", "2", "--out", str(tmp_path / "gen")]  # fmt: skip
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "gen").glob("prompt*_seed*.png"))) == 4 and (tmp_path / "gen" / "grid.png").exists()

    # The errors in-process (the entry point itself is checked above): one line, exit 2.
    from test_errors import run_cli

    code, err = run_cli(run[3:5] + [str(tmp_path / "nowhere")] + run[6:], capsys)
    assert code == 2 and "model folder not found" in err and "Traceback" not in err
    code, err = run_cli(run[3:-4] + ["--seeds", "0", "--out", str(tmp_path / "g2")], capsys)
    assert code == 2 and "--seeds must be at least 1" in err


def test_unlearn_fine_tunes_saves_a_loadable_model_and_resumes(tiny_sd_dir, prompt_files, sscd_file, tmp_path):
    from dori.configs import UnlearnRunConfig
    from dori.models import load_model
    from dori.stages.unlearn import run_unlearn

    model = load_model(tiny_sd_dir)
    common = _common(prompt_files, sscd_file)
    run_mitigate(MitigateConfig(method="wanda", ratio=0.1, seeds=1, steps=2, **common), model, tmp_path / "wanda")
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    config = UnlearnRunConfig(mitigation=str(tmp_path / "wanda"), retain_prompts=common["prompts"], steps=2,
                              retain_batch=2, triggers_per_target=2, inner_steps=1, eval_attack_steps=1, seeds=2,
                              eval_steps=2, checkpoint_every=1, limit=2, **common)  # fmt: skip
    summary = run_unlearn(config, model, tmp_path / "unlearn")
    for key in ("mr_attack_before", "mr_attack_after", "mr_prompt_after", "utility_before", "utility_after",
                "fd_before", "fd_after", "seconds"):  # fmt: skip
        assert key in summary
    assert len(summary["history"]) == 2
    changed = any(not torch.equal(v, original[k]) for k, v in model.unet.state_dict().items())
    assert changed  # the U-Net was trained
    tuned = load_model(tmp_path / "unlearn" / "model")
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in tuned.unet.state_dict().items())
    from dori.interventions import load_mask

    with pytest.raises(DoriError, match="made for another model"):  # masks of the original do not apply
        load_mask(tmp_path / "wanda", tuned)
    # Resuming the finished run starts from its last checkpoint: no further training, same numbers.
    again = run_unlearn(config, load_model(tiny_sd_dir), tmp_path / "unlearn", resume=True)
    assert again["history"] == summary["history"]
    assert {k: again[k] for k in ("mr_attack_after", "mr_prompt_after")} == {
        k: summary[k] for k in ("mr_attack_after", "mr_prompt_after")}
    # Issue 23, class 5: a damaged checkpoint or result file is a clear error naming the file to delete.
    run = tmp_path / "unlearn"
    checkpoint = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    with pytest.raises(DoriError, match=r"checkpoint.pt is damaged \(not a readable checkpoint\); delete it"):
        run_unlearn(config, load_model(tiny_sd_dir), run, resume=True)
    saved = torch.load(io.BytesIO(checkpoint), weights_only=True)
    saved["unet"] = {k: v[..., :1] for k, v in saved["unet"].items()}
    torch.save(saved, run / "checkpoint.pt")
    with pytest.raises(DoriError, match="checkpoint.pt does not fit this model or run"):
        run_unlearn(config, load_model(tiny_sd_dir), run, resume=True)
    (run / "before.json").write_text('{"attack": ')
    with pytest.raises(DoriError, match=r"before.json is damaged \(not valid JSON\)"):
        run_unlearn(config, load_model(tiny_sd_dir), run, resume=True)


def test_unlearn_without_a_mitigation_runs_nemo_itself_on_the_bundled_model(tmp_path):
    """The documented default ("NeMo, run here"): it called NeMo with one argument missing."""
    from dori.configs import UnlearnRunConfig
    from dori.models import load_model
    from dori.stages.unlearn import run_unlearn

    config = UnlearnRunConfig(prompts="bundled:memorized", limit=1, steps=1, retain_batch=2, triggers_per_target=1,
                              inner_steps=1, eval_attack_steps=1, seeds=1, utility_seeds=1, eval_steps=2)  # fmt: skip
    summary = run_unlearn(config, load_model("bundled"), tmp_path / "unlearn")
    assert (tmp_path / "unlearn" / "neurons.json").exists() and len(summary["history"]) == 1


def test_unlearn_without_a_mitigation_on_a_real_model_names_the_missing_flag(tiny_sd, prompt_files, sscd_file, tmp_path):
    from dori.configs import UnlearnRunConfig
    from dori.stages.unlearn import run_unlearn

    config = UnlearnRunConfig(retain_prompts=str(prompt_files / "mem.csv"), steps=1, **_common(prompt_files, sscd_file))
    with pytest.raises(DoriError, match="needs --mitigation DIR"):
        run_unlearn(config, tiny_sd, tmp_path / "unlearn")
    assert not (tmp_path / "unlearn").exists()  # refused before anything was written
