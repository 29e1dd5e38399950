"""The catalogue of bad inputs (docs/ERRORS.md): each gives one line that names the problem and the
fix, exit code 2, no traceback, and nothing partial written."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dori import cli
from dori.errors import DoriError


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["dori", *[str(a) for a in args]]
    code = 0
    try:
        cli.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def assert_clear_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2, err  # one message (rich may wrap it)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_sd_dir, prompt_files):
    """A folder of bad inputs, built once."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(tiny_sd_dir, root / "no_vae")
    shutil.rmtree(root / "no_vae" / "vae")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "README.txt").write_text("holiday photos\n")
    shutil.copytree(tiny_sd_dir, root / "corrupt")
    for weights in (root / "corrupt" / "unet").glob("diffusion_pytorch_model.*"):
        weights.write_bytes(b"\x00garbage" * 64)
    (root / "wrong_columns.csv").write_text("a,b\n1,2\n")
    (root / "bad_line.jsonl").write_text('{"caption": "ok", "index": 1}\n{not json\n')
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    images = root / "images"
    shutil.copytree(prompt_files / "images", images)
    (images / "1001.png").unlink()  # missing training image for prompt 1
    broken = root / "broken_images"
    shutil.copytree(prompt_files / "images", broken)
    (broken / "1000.png").write_bytes(b"not a png at all")
    odd = root / "odd_images"
    shutil.copytree(prompt_files / "images", odd)
    Image.fromarray(np.full((7, 40), 200, dtype=np.uint8), mode="L").save(odd / "1000.png")  # grey, odd size
    Image.fromarray(np.zeros((30, 30, 4), dtype=np.uint8), mode="RGBA").save(odd / "1001.png")
    shape = (77, 32)  # the tiny SD text encoder's embedding shape
    save_file({"step_5": torch.full((2, *shape), float("nan"))}, str(root / "nan.safetensors"))
    save_file({"step_5": torch.zeros(2, 10, 7)}, str(root / "wrong_shape.safetensors"))
    (root / "not_tensors.safetensors").write_bytes(b"\x01\x02\x03")
    (root / "a_file").write_text("")
    return root


def _model_cases(bad, tiny_sd_dir):
    base = ["generate", "--seeds", "1", "--steps", "1"]
    gen = base + ["--prompt", "a cat"]
    tiny = ["--model", tiny_sd_dir]
    return [
        (["generate", "--prompt", "a cat", "--model", bad / "nowhere"], "model folder not found"),
        (gen + ["--model", bad / "no_vae"], "the 'vae' folder (the VAE) is missing"),
        (gen + ["--model", bad / "not_a_model"], "the 'unet' folder (the U-Net) is missing"),
        (gen + ["--model", bad / "corrupt"], "could not load the U-Net"),
        (base + tiny + ["--embeddings", bad / "nan.safetensors"], "contains NaN or inf"),
        (base + tiny + ["--embeddings", bad / "wrong_shape.safetensors"], "has shape [2, 10, 7]"),
        (base + tiny + ["--embeddings", bad / "not_tensors.safetensors"], "is not a safetensors file"),
        (base + tiny + ["--embeddings", bad / "none.safetensors"], "embedding file not found"),
        (base + tiny, "give either --prompt TEXT"),
        (gen + tiny + ["--embeddings", bad / "nan.safetensors"], "give either --prompt TEXT"),
        (["generate", "--prompt", "a cat", "--seeds", "0"] + tiny, "--seeds must be at least 1"),
        (["generate", "--prompt", "a cat", "--steps", "-3"] + tiny, "--steps must be at least 1"),
        (gen + tiny + ["--dtype", "float8"], "unknown dtype 'float8'"),
    ]


def test_bad_models_embeddings_and_counts(bad, tiny_sd_dir, capsys, tmp_path):
    for args, message in _model_cases(bad, tiny_sd_dir):
        out = tmp_path / "out"
        code, err = run_cli(args + ["--out", out], capsys)
        assert_clear_error(code, err, message)
        assert not out.exists(), f"{args}: wrote output before failing"


def test_bad_prompt_files_images_and_folders(bad, tiny_sd_dir, prompt_files, sscd_file, capsys, tmp_path):
    rep = ["replicate", "--model", tiny_sd_dir, "--sscd", sscd_file, "--seeds", "1", "--steps", "1"]
    mem = prompt_files / "mem.csv"
    cases = [
        (rep + ["--prompts", bad / "wrong_columns.csv", "--images", bad / "images"], "'Caption' column"),
        (rep + ["--prompts", bad / "bad_line.jsonl", "--images", bad / "images"], "line 2: not valid JSON"),
        (rep + ["--prompts", bad / "empty.txt", "--images", bad / "images"], "is empty"),
        (rep + ["--prompts", bad / "latin1.txt", "--images", bad / "images"], "not UTF-8"),
        (rep + ["--prompts", mem, "--type", "TM", "--images", bad / "images"], "has no prompts of type 'TM'"),
        (rep + ["--prompts", mem, "--images", bad / "nowhere"], "training-image folder not found"),
        (rep + ["--prompts", mem, "--images", bad / "images"], "mem.csv have no training image in"),
        (rep + ["--prompts", mem, "--images", bad / "images", "--missing-images", "some"],
         "--missing-images must be error or skip"),  # fmt: skip
        (rep + ["--prompts", mem, "--images", bad / "broken_images"], "is unreadable"),
        (rep + ["--prompts", mem, "--images", bad / "images", "--sscd", bad / "none.pt"], "not found"),
        (["attack", "--model", tiny_sd_dir, "--prompts", mem, "--images", prompt_files / "images", "--sscd", sscd_file,
          "--mitigation", bad / "nowhere"], "no mitigation in"),  # fmt: skip
        (["mitigate", "--method", "wanda", "--sites", "attn", "--model", tiny_sd_dir, "--prompts", mem],
         "unknown site set 'attn'"),  # fmt: skip
        (["locality", "--model", tiny_sd_dir, "--prompts", mem, "--inits", "0"], "inits must be at least 1"),
        (["attack", "--model", tiny_sd_dir, "--prompts", mem, "--steps-curve", "0,x"], "comma-separated integers"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code, err = run_cli(args + ["--out", out], capsys)
        assert_clear_error(code, err, message)
        assert not (out / "results.jsonl").exists() and not (out / "summary.json").exists(), args
        shutil.rmtree(out, ignore_errors=True)
    code, err = run_cli(rep + ["--prompts", mem, "--images", prompt_files / "images", "--out", bad / "a_file" / "run"],
                        capsys)  # fmt: skip
    assert_clear_error(code, err, "cannot write to output folder")


def test_prompts_without_a_training_image_are_named_first_or_skipped(bad, tiny_sd_dir, prompt_files, sscd_file,
                                                                    capsys, tmp_path):  # fmt: skip
    """Many LAION URLs are dead: every prompt's image is checked before any work; the error names
    the missing indices, and --missing-images skip runs the others (with a warning)."""
    rep = ["replicate", "--model", tiny_sd_dir, "--sscd", sscd_file, "--seeds", "1", "--steps", "1",
           "--prompts", prompt_files / "mem.csv", "--images", bad / "images"]  # fmt: skip
    code, err = run_cli(rep + ["--out", tmp_path / "a"], capsys)
    assert_clear_error(code, err, "(index 1001); add the files (named by the prompt's Index), or pass --missing-images skip")
    code, err = run_cli(rep + ["--missing-images", "skip", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "1 of 4 prompts of" in err and "mem.csv have no training image" in err and "they are left out" in err
    import json

    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == ["1000", "1002", "1003"]


def test_odd_image_modes_and_sizes_are_converted_not_refused(bad, tiny_sd_dir, prompt_files, sscd_file, capsys, tmp_path):
    """Greyscale, RGBA and odd-sized training images are legitimate (LAION has them): they are
    converted to RGB at the model's size, as SSCD's own preprocessing would."""
    code, err = run_cli(["replicate", "--model", tiny_sd_dir, "--sscd", sscd_file, "--seeds", "1", "--steps", "1",
                         "--prompts", prompt_files / "mem.csv", "--images", bad / "odd_images", "--limit", "2",
                         "--out", tmp_path / "odd"], capsys)  # fmt: skip
    assert code in (0, None), err
    assert (tmp_path / "odd" / "summary.json").exists()


def test_unknown_site_and_foreign_mask_in_the_library(tiny_sd, tmp_path):
    with pytest.raises(DoriError, match="no module named"):
        tiny_sd.sites(["down_blocks.9.attentions.0.proj"])


def test_a_full_disk_mid_run_keeps_earlier_results_and_leaves_no_partial_file(tiny_sd, prompt_files, sscd_file,
                                                                             tmp_path, monkeypatch):  # fmt: skip
    from pathlib import Path

    from dori.configs import ReplicateConfig
    from dori.stages.replicate import run_replicate

    config = ReplicateConfig(prompts=str(prompt_files / "mem.csv"), images=str(prompt_files / "images"),
                             sscd=str(sscd_file), seeds=1, steps=1, batch_size=1)  # fmt: skip
    out = tmp_path / "run"
    real_write = Path.write_text
    writes = {"results": 0}

    def full_disk(self, data, *args, **kwargs):
        if self.name == ".results.jsonl.tmp":
            writes["results"] += 1
            if writes["results"] == 3:  # the third batch of rows finds the disk full
                real_write(self, data[: len(data) // 2], *args, **kwargs)  # half a file reaches the disk
                raise OSError(28, "No space left on device")
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DoriError, match="No space left on device.*free disk space"):
        run_replicate(config, tiny_sd, out)
    monkeypatch.undo()
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2  # the two batches written before the failure, intact
    assert not list(out.glob(".*.tmp")) and not (out / "summary.json").exists()
    summary = run_replicate(config, tiny_sd, out, resume=True)  # and the run finishes on resume
    assert summary["n_prompts"] == 4


def test_non_finite_steps_stop_with_a_clear_error(tiny_sd_dir, monkeypatch):
    """Numerical guard: the attack and the fine-tuning stop at the first non-finite value, before
    anything non-finite reaches a checkpoint (``on_step`` is where checkpoints are written)."""
    from dori.attack import AttackConfig, dori_attack
    from dori.models import load_model
    from dori.unlearn.adversarial import UnlearnConfig, adversarial_finetune

    model = load_model(tiny_sd_dir)  # its own copy: the fine-tuning below may spoil its weights
    targets = model.to_latents(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    emb = model.encode(["a cat"])
    with pytest.raises(DoriError, match="non-finite at step 0; lower the learning rate"):
        dori_attack(model, targets, emb * 1e30, AttackConfig(steps=2, batch=1))
    checkpoints = []

    def finetune(retain) -> None:
        adversarial_finetune(model, targets=targets, surrogates=targets.clone(), prompt_emb=emb, retain_latents=retain,
                             retain_emb=emb, retain_index=torch.tensor([0]),
                             config=UnlearnConfig(steps=3, retain_batch=1, triggers_per_target=1, inner_steps=1,
                                                  adv_pairs=1),
                             on_step=lambda state, optimizer: checkpoints.append(state.step))  # fmt: skip

    with pytest.raises(DoriError, match="non-finite loss at step 0; the last good checkpoint is kept"):
        finetune(torch.full_like(targets, float("inf")))
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):  # an update that overflows
        out = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(DoriError, match="non-finite weights at step 0; the last good checkpoint is kept"):
        finetune(targets.clone())
    assert checkpoints == []  # nothing non-finite was handed to the checkpoint writer


@pytest.mark.parametrize("device, message", [
    ("bogus", "unknown --device 'bogus'; use cpu, cuda or cuda:N"),
    pytest.param("cuda", "--device cuda: torch sees no CUDA GPU on this machine; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])  # fmt: skip
def test_a_device_that_is_not_there_is_named_before_any_work(device, message, tmp_path, capsys):
    for args in (["generate", "--model", "bundled", "--prompt", "a red circle, top left", "--out", tmp_path / "g"],
                 ["toy", "train", "--out", tmp_path / "t"]):
        code, err = run_cli([*args, "--device", device], capsys)
        assert_clear_error(code, err, message)
    assert not (tmp_path / "t" / "train_config.json").exists()
