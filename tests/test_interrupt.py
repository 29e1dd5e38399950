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
from test_errors import run_cli

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
    (folder / "non.txt").write_text("".join(f"an ordinary picture {i}\n" for i in range(N_PROMPTS)))
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
            pytest.fail(f"the run ended (exit {process.returncode}) before it could be interrupted; give it more "
                        f"work: {process.stderr.read()[-500:]}")  # fmt: skip
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return err


def _rows(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _summary(folder, *, without=()) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in without}


def _dori(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dori", *map(str, args)], capture_output=True, text=True, **kwargs)


def _whole_run(args: list, out) -> None:
    """The uninterrupted reference run, in this process: the interrupted run and its resume ran in
    processes of their own, so the comparison still spans processes, and one start is saved."""
    from dori import cli

    old = sys.argv
    sys.argv = ["dori", *map(str, args), "--out", str(out)]
    try:
        cli.main()
    except SystemExit as done:
        assert not done.code, f"the uninterrupted run exited {done.code}"
    finally:
        sys.argv = old


def _resume_matches_whole_run(args: list, interrupted, whole, *, without=()) -> None:
    """``--resume`` finishes the interrupted run; an uninterrupted run gives the same summary."""
    resumed = _dori(args + ["--out", interrupted, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    _whole_run(args, whole)
    assert _summary(interrupted, without=without) == _summary(whole, without=without)


def test_replicate_killed_with_sigkill_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, sscd_file, tmp_path,
                                                                   capsys):  # fmt: skip
    args = ["replicate", "--model", tiny_sd_dir, "--prompts", many_prompts / "mem.csv", "--images",
            many_prompts / "images", "--sscd", sscd_file, "--seeds", "2", "--steps", "8", "--batch-size", "2"]  # fmt: skip
    killed = tmp_path / "killed"
    process = _start(args + ["--out", killed])
    _interrupt_when(process, lambda: _rows(killed / "results.jsonl") >= 3, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    partial = _rows(killed / "results.jsonl")
    assert 3 <= partial < N_PROMPTS and not (killed / "summary.json").exists()
    assert not list(killed.glob(".*.tmp"))  # the kill left no half-written file behind
    code, err = run_cli([*args[:-2], "--batch-size", "4", "--out", killed, "--resume"], capsys)  # in-process: faster
    assert code == 2 and "other parameters (batch_size)" in err
    subprocess.run([sys.executable, "-m", "dori", *map(str, args), "--out", str(killed), "--resume"], check=True,
                   capture_output=True)  # fmt: skip
    _whole_run(args, tmp_path / "whole")
    assert _summary(killed) == _summary(tmp_path / "whole")
    assert _rows(killed / "results.jsonl") == N_PROMPTS


def test_attack_interrupted_with_sigint_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, sscd_file, tmp_path):
    args = ["attack", "--model", tiny_sd_dir, "--prompts", many_prompts / "mem.csv", "--images",
            many_prompts / "images", "--sscd", sscd_file, "--steps", "3", "--steps-curve", "0,1,2", "--seeds", "3",
            "--eval-steps", "4", "--attack-batch", "2", "--no-control", "--batch-size", "4"]  # fmt: skip
    stopped = tmp_path / "stopped"
    process = _start(args + ["--out", stopped])
    # Interrupted while measuring, after the embeddings were saved.
    err = _interrupt_when(process, lambda: (stopped / "attack_embeddings.safetensors").exists(), signal.SIGINT)
    assert process.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert not (stopped / "summary.json").exists()
    subprocess.run([sys.executable, "-m", "dori", *map(str, args), "--out", str(stopped), "--resume"], check=True,
                   capture_output=True)  # fmt: skip
    _whole_run(args, tmp_path / "whole")
    assert _summary(stopped) == _summary(tmp_path / "whole")


def test_detect_killed_with_sigkill_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, tmp_path, capsys):
    args = ["detect", "--model", tiny_sd_dir, "--memorized", many_prompts / "mem.csv", "--non-memorized",
            many_prompts / "non.txt", "--generations", "2", "--consistency-seeds", "2", "--steps", "6",
            "--batch-size", "2"]  # fmt: skip
    killed = tmp_path / "killed"
    process = _start(args + ["--out", killed])
    _interrupt_when(process, lambda: _rows(killed / "scores.jsonl") >= 3, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert 3 <= _rows(killed / "scores.jsonl") < 2 * N_PROMPTS and not (killed / "summary.json").exists()
    code, err = run_cli([*args[:-1], "3", "--out", killed, "--resume"], capsys)
    assert code == 2 and "other parameters (batch_size)" in err
    _resume_matches_whole_run(args, killed, tmp_path / "whole")
    assert _rows(killed / "scores.jsonl") == 2 * N_PROMPTS


def test_mitigate_killed_while_measuring_resumes_without_selecting_again(tiny_sd_dir, many_prompts, sscd_file, tmp_path):
    args = ["mitigate", "--method", "wanda", "--ratio", "0.1", "--model", tiny_sd_dir, "--prompts",
            many_prompts / "mem.csv", "--images", many_prompts / "images", "--sscd", sscd_file, "--seeds", "2",
            "--steps", "4", "--batch-size", "8"]  # fmt: skip
    killed = tmp_path / "killed"
    process = _start(args + ["--out", killed])
    # Killed after the mask was chosen, while the mitigated model is being measured.
    _interrupt_when(process, lambda: (killed / "selection.json").exists(), signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    chosen = (killed / "mask.safetensors").stat().st_mtime_ns
    _resume_matches_whole_run(args, killed, tmp_path / "whole")
    assert (killed / "mask.safetensors").stat().st_mtime_ns == chosen  # the resumed run reused the mask


def test_locality_interrupted_with_sigint_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, sscd_file, tmp_path):
    args = ["locality", "--model", tiny_sd_dir, "--prompts", many_prompts / "mem.csv", "--images",
            many_prompts / "images", "--sscd", sscd_file, "--non-memorized", many_prompts / "non.txt", "--inits", "24",
            "--steps", "2", "--attack-batch", "1", "--seeds", "4", "--eval-steps", "8", "--agreement-triggers", "2",
            "--threshold", "1.0", "--reference-prompts", many_prompts / "non.txt", "--no-tsne", "--batch-size", "4",
            "--limit", "6"]  # fmt: skip
    # --threshold 1.0: NeMo's check calls nothing memorized, so its search is short; --limit 6: NeMo and
    # Wanda run on 6 prompts besides the triggers (this test is about resuming, not about the numbers).
    stopped = tmp_path / "stopped"
    process = _start(args + ["--out", stopped])
    # Interrupted after the triggers were found, while checking which of them succeed.
    err = _interrupt_when(process, lambda: (stopped / "triggers.safetensors").exists(), signal.SIGINT)
    assert process.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert not (stopped / "summary.json").exists()
    found = (stopped / "triggers.safetensors").stat().st_mtime_ns
    _resume_matches_whole_run(args, stopped, tmp_path / "whole", without=("seconds",))
    assert (stopped / "triggers.safetensors").stat().st_mtime_ns == found  # the search was not repeated


def test_unlearn_killed_mid_fine_tuning_resumes_to_the_same_numbers(tiny_sd_dir, many_prompts, sscd_file, tmp_path,
                                                                    capsys):  # fmt: skip
    import torch

    common = ["--model", tiny_sd_dir, "--prompts", many_prompts / "mem.csv", "--images", many_prompts / "images",
              "--sscd", sscd_file, "--limit", "2", "--batch-size", "4"]  # fmt: skip
    code, err = run_cli(["mitigate", "--method", "wanda", "--ratio", "0.1", "--seeds", "1", "--steps", "2", *common,
                         "--out", tmp_path / "wanda"], capsys)  # fmt: skip
    assert code == 0, err
    steps = 24
    args = ["unlearn", *common, "--mitigation", tmp_path / "wanda", "--retain-prompts", many_prompts / "mem.csv",
            "--steps", steps, "--retain-batch", "2", "--triggers", "2", "--inner-steps", "1", "--eval-attack-steps",
            "1", "--seeds", "2", "--eval-steps", "2", "--utility-seeds", "1", "--checkpoint-every", "1"]  # fmt: skip
    killed = tmp_path / "killed"
    process = _start(args + ["--out", killed])
    _interrupt_when(process, lambda: (killed / "checkpoint.pt").exists(), signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    reached = int(torch.load(str(killed / "checkpoint.pt"), weights_only=True)["step"])
    assert 1 <= reached < steps, "the kill came after fine-tuning ended; give it more steps"
    _resume_matches_whole_run(args, killed, tmp_path / "whole", without=("seconds", "fine_tuning_seconds", "model"))
