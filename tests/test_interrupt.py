"""Runs killed mid-stage (SIGKILL, SIGINT) finish on --resume with the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

N_PROMPTS = 24


@pytest.fixture(scope="module")
def many_prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    (folder / "images").mkdir()
    rng = np.random.default_rng(1)
    lines = [";Caption;URL;type;Index"]
    for i in range(N_PROMPTS):
        lines.append(f"{i};prompt number {i};;VM;{i}")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    (folder / "mem.csv").write_text("\n".join(lines) + "\n")
    return folder


def _default_sigint() -> None:
    # A shell that starts jobs in the background (as CI runners may) ignores SIGINT, and children
    # inherit that; restore the default so Python turns Ctrl-C into KeyboardInterrupt as at a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dori", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)  # fmt: skip


def _interrupt_when(process: subprocess.Popen, ready, sig: int) -> str:
    """Send ``sig`` as soon as ``ready()`` holds (the run is inside its stage); return stderr."""
    deadline = time.monotonic() + 300
    while not ready():
        if process.poll() is not None:
            pytest.fail("the run finished before it could be interrupted; give it more work")
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return err


def _rows(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_replicate_killed_with_sigkill_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, sscd_file, tmp_path):
    args = ["replicate", "--model", tiny_sd_dir, "--prompts", many_prompts / "mem.csv", "--images",
            many_prompts / "images", "--sscd", sscd_file, "--seeds", "2", "--steps", "8", "--batch-size", "2"]  # fmt: skip
    killed = tmp_path / "killed"
    process = _start(args + ["--out", killed])
    _interrupt_when(process, lambda: _rows(killed / "results.jsonl") >= 3, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    partial = _rows(killed / "results.jsonl")
    assert 3 <= partial < N_PROMPTS and not (killed / "summary.json").exists()
    assert not list(killed.glob(".*.tmp"))  # the kill left no half-written file behind
    refused = subprocess.run([sys.executable, "-m", "dori", *map(str, args[:-2]), "--batch-size", "4", "--out",
                              str(killed), "--resume"], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "other parameters (batch_size)" in refused.stderr
    subprocess.run([sys.executable, "-m", "dori", *map(str, args), "--out", str(killed), "--resume"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "dori", *map(str, args), "--out", str(tmp_path / "whole")], check=True,
                   capture_output=True)  # fmt: skip
    assert _summary(killed) == _summary(tmp_path / "whole")
    assert _rows(killed / "results.jsonl") == N_PROMPTS


def test_attack_interrupted_with_sigint_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, sscd_file, tmp_path):
    args = ["attack", "--model", tiny_sd_dir, "--prompts", many_prompts / "mem.csv", "--images",
            many_prompts / "images", "--sscd", sscd_file, "--steps", "3", "--steps-curve", "0,1,2", "--seeds", "10",
            "--eval-steps", "6",
            "--attack-batch", "2", "--no-control", "--batch-size", "4"]  # fmt: skip
    stopped = tmp_path / "stopped"
    process = _start(args + ["--out", stopped])
    # Interrupted while measuring, after the embeddings were saved.
    err = _interrupt_when(process, lambda: (stopped / "attack_embeddings.safetensors").exists(), signal.SIGINT)
    assert process.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert not (stopped / "summary.json").exists()
    subprocess.run([sys.executable, "-m", "dori", *map(str, args), "--out", str(stopped), "--resume"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "dori", *map(str, args), "--out", str(tmp_path / "whole")], check=True,
                   capture_output=True)  # fmt: skip
    assert _summary(stopped) == _summary(tmp_path / "whole")
