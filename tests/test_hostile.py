"""Issue 23's classes of hostile input, one test per class: no silent NaN, no mixed resumes, no
leftovers that block the corrected command, no overwriting, no traceback from a damaged file."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_errors import assert_clear_error, run_cli

from dori import configs
from dori.errors import DoriError
from dori.runs import ResultsFile, open_run, write_json_atomic


class _NanEmbedder(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) * float("nan")


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
    from dori.workflows import run_mitigate

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
    from dori.workflows import cached_value_statistics

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
    from dori.workflows import load_prompts

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
