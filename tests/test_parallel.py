"""Prompt sharding over 2 CPU processes with ``accelerate launch`` gives the single-process results."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dori(args: list[str], processes: int) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "dori", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), "-m", "dori", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


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


def test_two_processes_give_the_single_process_results(tiny_sd_dir, prompt_files, sscd_file, tmp_path):
    common = ["--model", str(tiny_sd_dir), "--prompts", str(prompt_files / "mem.csv"), "--images",
              str(prompt_files / "images"), "--sscd", str(sscd_file)]  # fmt: skip
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        _dori(["replicate", *common, "--seeds", "2", "--steps", "2", "--out", str(out / "replicate")], processes)
        _dori(["attack", *common, "--steps", "2", "--steps-curve", "0,1", "--attack-batch", "2", "--seeds", "2",
               "--no-control", "--out", str(out / "attack")], processes)  # fmt: skip
        _dori(["detect", "--model", str(tiny_sd_dir), "--memorized", str(prompt_files / "mem.csv"), "--non-memorized",
               str(prompt_files / "non.txt"), "--steps", "2", "--generations", "2", "--consistency-seeds", "2",
               "--out", str(out / "detect")], processes)  # fmt: skip
    one, two = tmp_path / "p1", tmp_path / "p2"
    for stage, results in (("replicate", "results.jsonl"), ("attack", "attack_results.jsonl"), ("detect", "scores.jsonl")):
        _close(json.loads((one / stage / "summary.json").read_text()), json.loads((two / stage / "summary.json").read_text()))
        _close(_rows(one / stage / results), _rows(two / stage / results))
        assert not list((two / stage).glob("*.rank*.jsonl"))  # merged into one results file
        assert json.loads((two / stage / "processes.json").read_text()) == {"processes": 2}
    assert len(_rows(two / "replicate" / "results.jsonl")) == 4
