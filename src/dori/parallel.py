"""Prompt sharding over the processes of ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 4 -m dori replicate --prompts sd14:memorized ... --out runs/rep

(``--multi_gpu`` selects accelerate's torchrun launcher; on a machine without GPUs the same command
runs CPU processes that talk over gloo, which is how the tests run it.)

Each process takes every ``world``-th prompt (all randomness is per prompt and per seed, so a
prompt's numbers do not depend on which process ran it), writes its rows to its own results file
``NAME.rankR.jsonl`` as it goes, and the main process merges them into ``NAME`` once all are done.
Small per-stage results (an attack's embeddings and rows) travel with ``accelerate``'s
``gather_object``. Fine-tuning (``dori unlearn``) is data-parallel instead: every process holds the
whole model, computes the gradient of its share of each step's batch, and the gradients are summed
over the process group that ``accelerate`` set up. Outside ``accelerate launch`` (``WORLD_SIZE``
unset) every helper is a no-op for one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dori.runs import ResultsFile, open_run, write_json_atomic


class Shards:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self._state = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # Without a GPU the processes talk over gloo (accelerate's MULTI_CPU mode).
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
            self._state = PartialState(cpu=cpu)
            self.rank, self.world = self._state.process_index, self._state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def mine(self, items: Sequence) -> list:
        """This process's share: items ``rank, rank + world, ...``."""
        return list(items)[self.rank :: self.world]

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        if self._state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def assemble(self, rows: Sequence[int], part, total: int):
        """The rows every process computed (``part[i]`` is global row ``rows[i]``) as one tensor
        of ``total`` rows in global order, on every process (``part`` itself for one process)."""
        if self._state is None:
            return part
        import torch

        full = torch.zeros(total, *part.shape[1:], dtype=part.dtype)
        for their_rows, theirs in self.gather((list(rows), part.detach().cpu())):
            full[their_rows] = theirs
        return full.to(part.device)

    def sum_(self, tensors: Sequence) -> None:
        """Sum each tensor over the processes, in place (gradients of a data-parallel step)."""
        if self._state is None:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def open_run(self, path, command: str, config: dict, *, resume: bool) -> Path:
        """``runs.open_run`` once on the main process; the others join the folder it prepared."""
        if self.main:
            out = open_run(path, command, config, resume=resume)
            if self.world > 1:
                write_json_atomic(out / "processes.json", {"processes": self.world})
        self.wait()
        if not self.main:
            out = open_run(path, command, config, resume=True, lock=False)  # the main process holds the lock
        return out

    def results(self, out: Path, name: str) -> ResultsFile:
        """The file this process appends its rows to."""
        if self.world == 1:
            return ResultsFile(out / name)
        stem, _, suffix = name.rpartition(".")
        return ResultsFile(out / f"{stem}.rank{self.rank}.{suffix}")

    def done_keys(self, out: Path, name: str, key: str) -> set:
        """Keys finished by any earlier run, whatever its number of processes."""
        stem, _, suffix = name.rpartition(".")
        keys = ResultsFile(out / name).keys(key)
        for part in sorted(out.glob(f"{stem}.rank*.{suffix}")):
            keys |= ResultsFile(part).keys(key)
        return keys

    def merge(self, out: Path, name: str, key: str, order=None) -> ResultsFile:
        """Wait for every process, fold the per-process files into ``name`` (main process; rows
        sorted by ``order``, default the key), and return the merged file on every process."""
        self.wait()
        stem, _, suffix = name.rpartition(".")
        parts = sorted(out.glob(f"{stem}.rank*.{suffix}"))
        if self.main and parts:
            merged = ResultsFile(out / name)
            have = merged.keys(key)
            rows = merged.rows + [r for part in parts for r in ResultsFile(part).rows if r[key] not in have]
            merged.rows = []
            merged.extend(sorted(rows, key=order or (lambda r: r[key])))
            for part in parts:
                part.unlink()
        self.wait()
        return ResultsFile(out / name)


def device_for(device: str) -> str:
    """``--device`` checked before any work (an unknown name, or a GPU that torch does not see, is
    a one-line error); under ``accelerate launch`` on GPUs, ``cuda`` means this process's own GPU."""
    import torch

    from dori.errors import DoriError

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise DoriError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DoriError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
