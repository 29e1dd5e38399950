"""Issue 23's classes of hostile input, one test per class: no silent NaN, no mixed resumes, no
leftovers that block the corrected command, no overwriting, no traceback from a damaged file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_errors import assert_clear_error, run_cli

from dori import configs
from dori.errors import DoriError
from dori.runs import ResultsFile, open_run, write_json_atomic


class _NanEmbedder(torch.nn.Module):
    """Finite on the plain image dori probes at load, NaN on every real picture."""

    def forward(self, x):
        scale = float("nan") if bool(x.std() > 1e-3) else 1.0
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) * scale


def _configs_with_numbers():
    """Every run config, built with its required fields, and its numeric fields."""
    required = {"method": "wanda", "prompts": "p", "memorized": "m", "non_memorized": "n"}
    for cls in (configs.ReplicateConfig, configs.DetectConfig, configs.MitigateConfig, configs.AttackRunConfig,
                configs.WandaSweepConfig, configs.UnlearnRunConfig, configs.LocalityConfig):  # fmt: skip
        names = {f.name for f in dataclasses.fields(cls)}
        base = {k: v for k, v in required.items() if k in names}
        numeric = [f.name for f in dataclasses.fields(cls) if f.type in ("float", "float | None", "float | str")]
        yield cls, base, numeric


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_float_option_of_every_config_refuses_non_finite_values(bad):
    tried = 0
    for cls, base, numeric in _configs_with_numbers():
        cls(**base)  # the defaults are valid
        for name in numeric:
            with pytest.raises(DoriError, match="must be a finite number"):
                cls(**base, **{name: bad})
            tried += 1
    assert tried >= 15  # guidance, learning rates, thresholds, weights, ratios across seven configs


@pytest.mark.parametrize("args, message", [
    (["replicate", "--guidance", "nan"], "--guidance must be a finite number"),
    (["attack", "--lr", "inf"], "--lr must be a finite number"),
    (["mitigate", "--method", "nemo", "--threshold", "nan"], "--threshold must be a finite number"),
    (["attack", "--guidance", "-1"], "--guidance must be at least 0"),
])  # fmt: skip
def test_non_finite_numbers_stop_before_anything_is_written(args, message, tiny_sd_dir, prompt_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli([*args, "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--out", out], capsys)
    assert_clear_error(code, err, message)
    assert not out.exists()


def test_generate_refuses_nan_guidance_huge_embeddings_and_a_folder_in_use(tiny_sd_dir, tmp_path, capsys):
    base = ["generate", "--model", tiny_sd_dir, "--seeds", "1", "--steps", "1"]
    code, err = run_cli([*base, "--prompt", "a cat", "--guidance", "nan", "--out", tmp_path / "g"], capsys)
    assert_clear_error(code, err, "--guidance must be a finite number")
    save_file({"step_1": torch.full((1, 77, 32), 1e30)}, str(tmp_path / "huge.safetensors"))
    code, err = run_cli([*base, "--embeddings", tmp_path / "huge.safetensors", "--out", tmp_path / "g"], capsys)
    assert_clear_error(code, err, "beyond")
    assert not (tmp_path / "g").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own file"}')
    code, err = run_cli([*base, "--prompt", "a cat", "--out", mine], capsys)
    assert_clear_error(code, err, "not an empty folder")
    assert (mine / "config.json").read_text() == '{"my": "own file"}'
    code, err = run_cli([*base, "--prompt", "a cat", "--out", ""], capsys)
    assert_clear_error(code, err, "--out must name a new folder")


def test_a_similarity_model_that_returns_nan_is_an_error_not_a_result(tiny_sd_dir, prompt_files, tmp_path, capsys):
    sscd = tmp_path / "nan_sscd.pt"
    torch.jit.script(_NanEmbedder()).save(str(sscd))
    out = tmp_path / "rep"
    code, err = run_cli(["replicate", "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--images",
                         prompt_files / "images", "--sscd", sscd, "--seeds", "1", "--steps", "1", "--out", out], capsys)  # fmt: skip
    assert_clear_error(code, err, "NaN or infinite")
    assert not (out / "summary.json").exists() and not (out / "results.jsonl").exists()


def test_json_results_are_never_written_with_nan(tmp_path):
    with pytest.raises(DoriError, match="not a finite number"):
        write_json_atomic(tmp_path / "summary.json", {"mr": 0.0, "sscd_mean": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_an_edited_input_file_and_results_without_a_config(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    config = {"prompts": str(prompts), "seeds": 2}
    out = open_run(tmp_path / "run", "replicate", config, resume=False)
    assert json.loads((out / "config.json").read_text())["inputs"]["prompts"]
    open_run(out, "replicate", config, resume=True)  # unchanged: resumes
    prompts.write_text("a cat\na horse\n")
    with pytest.raises(DoriError, match=r"input file\(s\) prompts .* changed since it started"):
        open_run(out, "replicate", config, resume=True)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "results.jsonl").write_text('{"id": 0}\n')
    with pytest.raises(DoriError, match="no config.json"):
        open_run(orphan, "replicate", config, resume=False)
    with pytest.raises(DoriError, match="--out is empty"):
        open_run("", "replicate", config, resume=False)


def test_a_torn_last_row_is_dropped_and_a_bad_middle_row_is_an_error(tmp_path):
    torn = tmp_path / "results.jsonl"
    torn.write_text('{"id": 0}\n{"id": 1}\n{"id": 2, "simil')
    rows = ResultsFile(torn)
    assert rows.keys() == {0, 1}
    rows.extend([{"id": 2}])
    assert [json.loads(line)["id"] for line in torn.read_text().splitlines()] == [0, 1, 2]
    torn.write_text('{"id": 0}\n{broken\n{"id": 2}\n')
    with pytest.raises(DoriError, match="line 2 is not a result row"):
        ResultsFile(torn)


def test_a_refused_run_leaves_nothing_that_blocks_the_corrected_command(tiny_sd_dir, prompt_files, tmp_path, capsys):
    out = tmp_path / "nemo"
    args = ["mitigate", "--method", "nemo", "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--images",
            prompt_files / "images", "--sscd", "SSCD", "--threshold", "0.5", "--out", out]  # fmt: skip
    sscd = tmp_path / "sscd.pt"
    from conftest import _Embedder

    torch.jit.script(_Embedder()).save(str(sscd))
    args[args.index("SSCD")] = sscd
    code, err = run_cli([*args, "--stats", tmp_path / "missing.pt"], capsys)
    assert_clear_error(code, err, "statistics file not found")
    assert not out.exists()  # so the corrected command starts cleanly, with or without --resume
    existing = tmp_path / "existing"
    existing.mkdir()
    code, err = run_cli([*args[:-1], existing, "--stats", tmp_path / "missing.pt"], capsys)
    assert_clear_error(code, err, "statistics file not found")
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's own folder stays


@pytest.fixture
def wanda_run(tiny_sd, prompt_files, sscd_file, tmp_path_factory):
    from dori.configs import MitigateConfig
    from dori.stages.mitigate import run_mitigate

    folder = tmp_path_factory.mktemp("wanda") / "wanda"
    run_mitigate(MitigateConfig(method="wanda", ratio=0.1, seeds=1, steps=2, prompts=str(prompt_files / "mem.csv"),
                                images=str(prompt_files / "images"), sscd=str(sscd_file), limit=1), tiny_sd, folder)  # fmt: skip
    return folder


def _damaged(folder, tmp_path, name, damage):
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def test_damaged_mask_folders_are_clear_errors(wanda_run, tiny_sd, tmp_path):
    from dori.interventions import load_mask

    info = json.loads((wanda_run / "mask.json").read_text())
    weights = info["weights"]

    def floats(folder):
        tensors = {k: torch.full_like(v, float("nan"), dtype=torch.float32) for k, v in load_file(str(folder / weights)).items()}
        save_file(tensors, str(folder / weights))

    cases = {
        "nan floats": (floats, "not a 0/1 mask"),
        "junk bytes": (lambda f: (f / weights).write_bytes(b"\x00junk" * 9), "not a readable safetensors file"),
        "empty file": (lambda f: (f / weights).write_bytes(b""), "not a readable safetensors file"),
        "missing file": (lambda f: (f / weights).unlink(), "not a file inside the folder"),
        "path outside": (lambda f: (f / "mask.json").write_text(json.dumps({**info, "weights": "../../etc/passwd"})),
                         "not a file inside the folder"),
        "no kind": (lambda f: (f / "mask.json").write_text(json.dumps({"model": info["model"]})), "is damaged"),
        "truncated json": (lambda f: (f / "mask.json").write_text('{"model": '), "not valid JSON"),
    }  # fmt: skip
    for name, (damage, message) in cases.items():
        with pytest.raises(DoriError, match=message):
            load_mask(_damaged(wanda_run, tmp_path, name.replace(" ", "_"), damage), tiny_sd)


def test_a_damaged_nemo_statistics_cache_is_computed_again(tiny_sd, tmp_path, monkeypatch):
    from dori.mitigate.nemo_reference import cached_value_statistics

    monkeypatch.setenv("DORI_CACHE", str(tmp_path))
    reference = tmp_path / "ref.txt"
    reference.write_text("a cat\na dog\n")
    first = cached_value_statistics(tiny_sd, str(reference), print)
    (cache,) = tmp_path.glob("nemo_stats_*.pt")
    cache.write_bytes(b"damaged")
    again = cached_value_statistics(tiny_sd, str(reference), print)
    assert all(torch.equal(a, b) for a, b in zip(first.mean, again.mean))
    assert cache.stat().st_size > len(b"damaged")  # replaced by a good copy


def test_a_prompt_longer_than_the_text_window_is_named_and_marked(tiny_sd, tmp_path, capsys):
    from dori.references import load_prompts

    long = " ".join(["a very long caption about a red barn"] * 20)
    (tmp_path / "prompts.txt").write_text(f"a short caption\n{long}\n")
    prompts = load_prompts(str(tmp_path / "prompts.txt"), tiny_sd)
    assert [p.truncated for p in prompts.prompts] == [False, True]
    assert prompts.prompts[1].to_dict()["truncated"] is True and "truncated" not in prompts.prompts[0].to_dict()
    err = capsys.readouterr().err
    assert "1 prompt(s)" in err and "cut at the end" in err


def test_the_interrupt_hint_offers_resume_only_where_the_command_has_it():
    from dori.cli import _resumable

    assert _resumable(["attack"]) and _resumable(["toy", "train"]) and _resumable(["wanda-sweep"])
    assert not _resumable(["generate"]) and not _resumable(["toy", "card"]) and not _resumable([])


def test_a_second_process_on_the_same_out_is_refused_while_the_first_runs(tiny_sd_dir, prompt_files, sscd_file,
                                                                           tmp_path, capsys):  # fmt: skip
    """Class 9: the folder is locked before its state is read, so two processes cannot both pass
    the "is it free" check. The lock dies with its process, however it ends."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"command": "replicate", "config": {}}')
    # Another process holding the folder as runs.lock_folder does (plain Python: no torch to import).
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time; "
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["replicate", "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--images",
                prompt_files / "images", "--sscd", sscd_file, "--out", out]  # fmt: skip
        for extra in ([], ["--resume"]):
            code, err = run_cli([*args, *extra], capsys)
            assert_clear_error(code, err, "another dori process is writing to")
        assert json.loads((out / "config.json").read_text())["command"] == "replicate"  # the holder's, untouched
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(DoriError, match="other parameters"):  # free again: refused now only for its settings
        open_run(out, "replicate", {"seeds": 3}, resume=True)


def test_generate_streams_images_to_disk_and_leaves_nothing_when_stopped(tiny_sd, tiny_sd_dir, tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    """Class 6: each batch is on disk before the next is computed; the folder appears complete or
    not at all."""
    from dori.models.base import DiffusionModel

    original = DiffusionModel.generate_chunks
    on_disk = []

    def watched(self, *args, **kwargs):
        for rows, images in original(self, *args, **kwargs):
            yield rows, images
            on_disk.append(len(list(tmp_path.glob(".g.partial-*/*.png"))))

    monkeypatch.setattr(DiffusionModel, "generate_chunks", watched)
    base = ["generate", "--model", tiny_sd_dir, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "3",
            "--steps", "1", "--batch-size", "2"]  # fmt: skip
    code, err = run_cli([*base, "--out", tmp_path / "g"], capsys)
    assert code == 0, err
    assert on_disk == [2, 4, 6]  # every batch written as it came, memory held at one batch
    written = json.loads((tmp_path / "g" / "images.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in written] == [(p, s) for p in ("a cat", "a dog") for s in (0, 1, 2)]
    whole = tiny_sd.generate(tiny_sd.encode(["a cat", "a dog"]), [0, 1, 2], steps=1)
    from PIL import Image

    last = np.asarray(Image.open(tmp_path / "g" / "prompt001_seed2.png"))
    assert np.abs(last.astype(int) - (whole[5].permute(1, 2, 0).numpy() * 255).round().astype(int)).max() <= 1
    assert not list(tmp_path.glob(".g.partial-*"))

    def stop_after_first(self, *args, **kwargs):
        for n, item in enumerate(original(self, *args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(DiffusionModel, "generate_chunks", stop_after_first)
    code, err = run_cli([*base, "--out", tmp_path / "stopped"], capsys)
    assert code == 130 and "this command does not resume" in err
    assert not (tmp_path / "stopped").exists() and not list(tmp_path.glob(".stopped.partial-*"))


def _variant(tiny_sd_dir, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(tiny_sd_dir, copy)
    return copy


def test_model_folders_whose_parts_do_not_fit_or_are_malformed_fail_at_load(tiny_sd_dir, tmp_path):
    """Class 5: checked at load, not in the middle of a run."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from dori.models.loading import load_model

    wide = _variant(tiny_sd_dir, tmp_path, "wide_text")
    shutil.rmtree(wide / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77)).save_pretrained(wide / "text_encoder")  # fmt: skip
    with pytest.raises(DoriError, match=r"text encoder's width \(48\) is not the U-Net's cross-attention width \(32\)"):
        load_model(wide)
    vae8 = _variant(tiny_sd_dir, tmp_path, "vae8")
    shutil.rmtree(vae8 / "vae")
    AutoencoderKL(block_out_channels=(8,), latent_channels=8, norm_num_groups=4).save_pretrained(vae8 / "vae")
    with pytest.raises(DoriError, match=r"U-Net takes 4 channels .* the VAE's latents \(8 channels\)"):
        load_model(vae8)
    cases = {
        "dori_model.json": [("{", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not a JSON object"),
                            ('{"pixel_space": "yes"}', "'pixel_space' has the wrong type"),
                            ('{"token_map": "../../x.json"}', "must name a file in text_encoder/")],
        "scheduler/scheduler_config.json": [("", "is not valid JSON"),
                                            ('{"num_train_timesteps": "many"}', "not describe a usable noise schedule")],
    }  # fmt: skip
    for file, damages in cases.items():
        for n, (text, message) in enumerate(damages):
            folder = _variant(tiny_sd_dir, tmp_path, f"{file.replace('/', '_')}{n}")
            (folder / file).write_text(text)
            with pytest.raises(DoriError, match=message):
                load_model(folder)


class _Pickled:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickle_format_weights_load_only_as_plain_tensors(tiny_sd_dir, tmp_path, capsys):
    """Class 7: ``*.bin`` weights are read with ``weights_only=True`` by dori's own rule; a file
    that holds other pickled objects is refused with a clear message and never executed."""
    from dori.models.loading import load_model

    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        folder = _variant(tiny_sd_dir, tmp_path, f"bin_{part}")
        tensors = load_file(str(folder / part / f"{name}.safetensors"))
        (folder / part / f"{name}.safetensors").unlink()
        binary = folder / part / ("diffusion_pytorch_model.bin" if part == "unet" else "pytorch_model.bin")
        torch.save(tensors, binary)
        assert load_model(folder).unet is not None  # plain tensors in pickle format: loaded
        torch.save({**tensors, "extra": _Pickled()}, binary)
        with pytest.raises(DoriError, match="hold pickled objects other than tensors, which dori does not load"):
            load_model(folder)
        assert "this ran while loading" not in capsys.readouterr().out


def test_every_file_of_a_run_has_the_permissions_of_the_users_umask(wanda_run):
    """Class 7: temporary-then-rename writes, safetensors, PNGs and JSON all get one mode."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in wanda_run.rglob("*") if path.is_file()}
    assert len(modes) >= 5 and set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_run_stopped_before_its_first_result_keeps_nothing_and_says_so(tiny_sd_dir, prompt_files, sscd_file,
                                                                          tmp_path, capsys, monkeypatch):  # fmt: skip
    """Class 6: the interrupt hint tells the truth about what was kept."""
    from dori.stages import replicate as replicate_stage

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(replicate_stage, "replication", stopped)
    out = tmp_path / "rep"
    args = ["replicate", "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--images",
            prompt_files / "images", "--sscd", sscd_file, "--seeds", "1", "--steps", "1", "--out", out]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert code == 130 and "before any result was written, so nothing was kept; run the same command again" in err
    assert not out.exists()
    monkeypatch.undo()
    code, err = run_cli(args, capsys)  # the same command, as the hint says
    assert code == 0, err


def test_a_stage_that_needs_nemo_late_checks_its_inputs_before_any_work(tiny_sd_dir, prompt_files, sscd_file,
                                                                         tmp_path, capsys):  # fmt: skip
    """Class 3, found by the full-size check (benchmarks/sd_full_size.py): locality runs NeMo last;
    a missing --threshold used to stop it after its triggers were saved, and that folder then
    refused the corrected command. Now the inputs are checked first and nothing is written."""
    stats = tmp_path / "stats.pt"
    stats.write_bytes(b"not read before the check")
    out = tmp_path / "locality"
    args = ["locality", "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--images",
            prompt_files / "images", "--sscd", sscd_file, "--non-memorized", prompt_files / "non.txt", "--inits", "2",
            "--steps", "1", "--seeds", "1", "--eval-steps", "1", "--out", out]  # fmt: skip
    code, err = run_cli([*args, "--stats", stats], capsys)
    assert_clear_error(code, err, "NeMo needs an SSIM threshold")
    assert not out.exists()
    code, err = run_cli([*args, "--stats", tmp_path / "missing.pt", "--threshold", "0.4"], capsys)
    assert_clear_error(code, err, "statistics file not found")
    assert not out.exists()
