"""Prompt sharding and data-parallel fine-tuning over 2 CPU processes with ``accelerate launch`` give the
single-process results."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from test_errors import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dori(args: list[str], processes: int, capsys, *, fresh: bool = False) -> None:
    """The command under ``accelerate launch`` with ``processes`` processes; with one process, in
    this process (no second start of torch), or with ``fresh`` in a new one with one thread as the
    launched processes have (fine-tuning's Adam steps make the thread count's float noise visible)."""
    if processes == 1 and not fresh:
        code, err = run_cli(args, capsys)
        assert code == 0, err[-3000:]
        return
    command = [sys.executable, "-m", "dori", *args] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "dori", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _close(a, b) -> None:
    """The same numbers, up to the float noise of different batch shapes."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    else:
        assert a == b


def test_two_processes_give_the_single_process_results(tiny_sd_dir, prompt_files, sscd_file, tmp_path, capsys):
    common = ["--model", str(tiny_sd_dir), "--prompts", str(prompt_files / "mem.csv"), "--images",
              str(prompt_files / "images"), "--sscd", str(sscd_file)]  # fmt: skip
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        _dori(["replicate", *common, "--seeds", "2", "--steps", "2", "--out", str(out / "replicate")], processes, capsys)
        _dori(["attack", *common, "--steps", "2", "--steps-curve", "0,1", "--attack-batch", "2", "--seeds", "2",
               "--eval-steps", "2", "--no-control", "--out", str(out / "attack")], processes, capsys)  # fmt: skip
        _dori(["detect", "--model", str(tiny_sd_dir), "--memorized", str(prompt_files / "mem.csv"), "--non-memorized",
               str(prompt_files / "non.txt"), "--steps", "2", "--generations", "2", "--consistency-seeds", "2",
               "--out", str(out / "detect")], processes, capsys)  # fmt: skip
    one, two = tmp_path / "p1", tmp_path / "p2"
    for stage, results in (("replicate", "results.jsonl"), ("attack", "attack_results.jsonl"), ("detect", "scores.jsonl")):
        _close(json.loads((one / stage / "summary.json").read_text()), json.loads((two / stage / "summary.json").read_text()))
        _close(_rows(one / stage / results), _rows(two / stage / results))
        assert not list((two / stage).glob("*.rank*.jsonl"))  # merged into one results file
        assert json.loads((two / stage / "processes.json").read_text()) == {"processes": 2}
    assert len(_rows(two / "replicate" / "results.jsonl")) == 4


def test_data_parallel_fine_tuning_matches_one_process(tiny_sd_dir, prompt_files, sscd_file, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["--model", str(tiny_sd_dir), "--prompts", str(prompt_files / "mem.csv"), "--images",
              str(prompt_files / "images"), "--sscd", str(sscd_file)]  # fmt: skip
    _dori(["mitigate", "--method", "wanda", "--ratio", "0.1", "--seeds", "1", "--steps", "2", *common,
           "--out", str(tmp_path / "wanda")], 1, capsys)  # fmt: skip
    args = [*common, "--mitigation", str(tmp_path / "wanda"), "--retain-prompts", str(prompt_files / "mem.csv"),
            "--steps", "3", "--retain-batch", "4", "--triggers", "2", "--inner-steps", "1", "--eval-attack-steps", "1",
            "--eval-steps", "2", "--seeds", "2", "--limit", "2"]  # fmt: skip
    for processes in (1, 2):
        _dori(["unlearn", *args, "--out", str(tmp_path / f"p{processes}")], processes, capsys, fresh=True)
    one = json.loads((tmp_path / "p1" / "summary.json").read_text())
    two = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    _close(one["history"], two["history"])  # the same losses at every step
    for key in ("mr_attack_before", "mr_attack_after", "mr_prompt_after"):
        assert one[key] == two[key]
    weights_one = load_file(str(tmp_path / "p1" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    weights_two = load_file(str(tmp_path / "p2" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(weights_one) == set(weights_two)
    moved = sum(int(not torch.equal(weights_one[k], v)) for k, v in load_file(
        str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")).items())  # fmt: skip
    assert moved > 0  # the fine-tuning changed the weights, and both runs changed them alike
    for key, value in weights_one.items():
        assert torch.allclose(value, weights_two[key], rtol=1e-4, atol=1e-6), key
