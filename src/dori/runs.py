"""Run folders: atomic result files and a manifest (config, command line, versions, seed)."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from dori.errors import DoriError

PACKAGES = ("dori", "torch", "diffusers", "transformers", "safetensors", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create the output folder, or fail with a clear message if it cannot be written."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dori-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise DoriError(f"cannot write to output folder {out} ({error.strerror}); choose a writable --out") from error
    return out


def refuse_foreign_folder(out: Path, *, ours: bool = False) -> None:
    """Refuse to write a run into a folder that holds anything but a run of the caller's own
    (``ours``): its files would be mixed with someone else's (a model folder, a home directory)."""
    if out.is_dir() and not ours and next(out.iterdir(), None) is not None:
        raise DoriError(f"{out} is not empty and holds no dori run; choose an empty or new --out")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: renamed over ``path`` when the block ends
    without error, removed otherwise, so readers never see half a file. The one place dori
    writes a result file; a full disk or a read-only folder is a clear error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        raise DoriError(f"could not write {path} ({error.strerror}); free disk space or choose another --out") from error
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_torch_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` (checkpoints, statistics) through :func:`atomic_path`."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))
    return Path(path)


def with_user_mode(*paths: Path) -> None:
    """Give files the mode an ordinary ``open`` gives them (0o666 less the umask): safetensors
    creates its files 0o600, so a run folder would otherwise mix two modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file and a rename (see ``write_text_atomic``)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with_user_mode(tmp)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Valid JSON only: a NaN or infinite number is refused (it would be a wrong result written as
    if it were one) and nothing is written."""
    return write_text_atomic(path, _finite_json(obj, path, indent=2) + "\n")


def _finite_json(obj, path: str | os.PathLike, **options) -> str:
    try:
        return json.dumps(obj, allow_nan=False, **options)
    except ValueError as error:
        raise DoriError(f"a result for {Path(path).name} is not a finite number (NaN or infinite), so it was not "
                        "written; check the inputs (model weights, embeddings, similarity model) for NaN") from error  # fmt: skip


def _damaged(path: Path, why: str) -> DoriError:
    return DoriError(f"{path} is damaged ({why}); delete it and rerun with --resume to compute it again, or "
                     "choose a new --out")  # fmt: skip


def read_json(path: str | os.PathLike):
    """A JSON file that a run wrote earlier (a resume reads it back): a damaged one is a clear error
    naming the file to delete, never a traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _damaged(path, "not valid JSON") from error


def read_tensors(path: str | os.PathLike, *, keys: tuple[str, ...] = ()) -> dict:
    """A safetensors file that a run wrote earlier, with its finite tensors (``keys`` must be there)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise _damaged(path, "not a readable safetensors file") from error
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise _damaged(path, f"it lacks {', '.join(missing)}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _damaged(path, f"{name} holds NaN or infinite values")
    return tensors


def read_checkpoint(path: str | os.PathLike, *, keys: tuple[str, ...]) -> dict:
    """A ``torch.save`` checkpoint that dori wrote (``weights_only=True``: tensors and plain
    containers, never arbitrary pickled objects), with ``keys`` present."""
    import pickle

    import torch

    path = Path(path)
    try:
        saved = torch.load(str(path), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise _damaged(path, "not a readable checkpoint") from error
    missing = [k for k in keys if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise _damaged(path, f"it lacks {', '.join(missing)}")
    return saved


def write_manifest(out: Path, command: str, config: dict, inputs: dict | None = None) -> Path:
    return write_json_atomic(
        out / "config.json",
        {"command": command, "argv": sys.argv, "config": config, "inputs": inputs or {}, "versions": versions()},
    )


def _normalised(config: dict) -> dict:
    return json.loads(json.dumps(config))


def input_fingerprints(config: dict) -> dict[str, str]:
    """A content hash of every input *file* the config names (prompt lists, statistics, SSCD):
    a resume checks them, so an input edited between a kill and its resume cannot mix old and new
    rows. Folders (models, images, earlier runs) are not hashed."""
    import hashlib

    prints = {}
    for key, value in sorted(config.items()):
        if isinstance(value, str) and value and not value.startswith("bundled"):
            path = Path(value).expanduser()
            if path.is_file():
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                prints[key] = digest.hexdigest()[:16]
    return prints


# Run folders created by this process and not yet holding any result: if the command is refused
# before it writes one, ``discard_unstarted_runs`` removes them so the corrected command can start.
_FRESH_RUNS: list[tuple[Path, bool]] = []  # (folder, whether this process created it)


def forget_started_runs() -> None:
    """A new command starts: the runs an earlier command of this process started are not its own."""
    _FRESH_RUNS.clear()


def discard_unstarted_runs() -> tuple[int, int]:
    """Remove the run folders this process started that hold no result yet; returns (discarded,
    started)."""
    discarded, started = 0, len(_FRESH_RUNS)
    for out, created in reversed(_FRESH_RUNS):
        try:
            if [p for p in out.rglob("*") if not p.is_dir()] == [out / "config.json"]:  # empty sub-folders aside
                (out / "config.json").unlink()
                for folder in sorted(out.rglob("*"), reverse=True):  # the empty sub-folders, deepest first
                    folder.rmdir()
                release_folder(out)
                discarded += 1
                if created:
                    out.rmdir()
        except OSError:
            pass
    _FRESH_RUNS.clear()
    return discarded, started


RESULT_FILES = ("results.jsonl", "summary.json", "scores.jsonl")


# Folders this process holds locked: the open descriptor keeps the lock until the process ends,
# however it ends (the kernel releases a flock with its last descriptor), so no stale lock survives a kill.
_LOCKS: dict[Path, int] = {}


def lock_folder(out: Path) -> None:
    """Take an exclusive lock on the run folder, or refuse: two processes writing one ``--out``
    would mix their rows. The lock is taken *before* the folder's state is read, so the check and
    the write that follow cannot race with another process. Where the platform has no ``flock``
    (Windows) the folder is not locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    key = out.resolve()
    if key in _LOCKS:  # this process already holds it (the same folder opened again, e.g. by a resume)
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        raise DoriError(f"another dori process is writing to {out}; wait for it to finish (or stop it) and "
                        "rerun with --resume, or choose another --out") from error  # fmt: skip
    _LOCKS[key] = fd


def release_folder(out: Path) -> None:
    fd = _LOCKS.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """Release every run folder this process locked (the CLI does so when a command ends; a
    library caller may, once its runs have returned)."""
    for out in list(_LOCKS):
        release_folder(out)


def open_run(path: str | os.PathLike, command: str, config: dict, *, resume: bool, lock: bool = True) -> Path:
    """Prepare a run folder. A folder holding a run is only reused with ``resume``, the same
    parameters and the same input files; otherwise the user gets a clear message and nothing is
    touched. With ``lock`` the folder is locked for the rest of the process (see :func:`lock_folder`);
    the extra processes of a data-parallel run join their main process's folder without it."""
    if str(path).strip() == "":
        raise DoriError("--out is empty; name an output folder")
    if Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        raise DoriError(f"--out {path} is a file; name a folder for the run")
    created = not Path(path).expanduser().exists()
    out = prepare_out_dir(path)
    if lock:
        lock_folder(out)
    manifest = out / "config.json"
    config = _normalised(config)
    inputs = input_fingerprints(config)
    if not manifest.exists():
        orphans = sorted(name for name in RESULT_FILES if (out / name).exists())
        if orphans:
            raise DoriError(f"{out} holds {', '.join(orphans)} but no config.json, so its parameters are unknown; "
                            "choose a new --out")  # fmt: skip
        refuse_foreign_folder(out)
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DoriError(f"{manifest} is unreadable; choose a new --out") from error
        if not (isinstance(old, dict) and isinstance(old.get("command"), str) and isinstance(old.get("config"), dict)):
            raise DoriError(f"{out} holds a config.json that is not a dori run's (a model folder?); choose an empty "
                            "or new --out")  # fmt: skip
        if not resume:
            raise DoriError(
                f"{out} already holds a '{old.get('command')}' run; pass --resume to continue it or choose a new --out"
            )
        if old.get("command") != command or old.get("config") != config:
            changed = sorted(k for k in set(config) | set(old.get("config", {}))
                             if config.get(k) != old.get("config", {}).get(k))  # fmt: skip
            what = ", ".join(changed) or "command"
            raise DoriError(f"cannot resume {out}: it was started with other parameters ({what}); "
                            "rerun with the same ones or choose a new --out")  # fmt: skip
        before = old.get("inputs")
        if before is not None:  # runs started by an older dori have no fingerprints
            edited = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
            if edited:
                names = ", ".join(f"{k} ({config.get(k)})" for k in edited)
                raise DoriError(f"cannot resume {out}: the input file(s) {names} changed since it started; restore "
                                "them or start a new run in a new --out")  # fmt: skip
        return out
    write_manifest(out, command, config, inputs)
    _FRESH_RUNS.append((out, created))
    return out


class ResultsFile:
    """A JSONL file of result rows, rewritten atomically after each batch of new rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            lines = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            for number, line in enumerate(lines, 1):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    if number == len(lines):
                        break  # the last row, torn by a kill mid-write: dropped, so it is computed again
                    raise DoriError(f"{self.path} line {number} is not a result row; restore the file or choose a "
                                    "new --out") from error  # fmt: skip

    def keys(self, field: str = "id") -> set:
        return {row[field] for row in self.rows}

    def extend(self, rows: list[dict]) -> None:
        text = "".join(_finite_json(row, self.path) + "\n" for row in [*self.rows, *rows])
        write_text_atomic(self.path, text)
        self.rows.extend(rows)
