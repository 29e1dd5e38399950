"""Run folders: atomic result files and a manifest (config, command line, versions, seed)."""

from __future__ import annotations

import json
import os
import platform
import sys
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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise DoriError(f"could not write {path} ({error.strerror}); free disk space or choose another --out") from error
    return path


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file and a rename (see ``write_text_atomic``)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise DoriError(f"could not write {path} ({error.strerror}); free disk space or choose another --out") from error
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_manifest(out: Path, command: str, config: dict) -> Path:
    return write_json_atomic(
        out / "config.json",
        {"command": command, "argv": sys.argv, "config": config, "versions": versions()},
    )


def _normalised(config: dict) -> dict:
    return json.loads(json.dumps(config))


def open_run(path: str | os.PathLike, command: str, config: dict, *, resume: bool) -> Path:
    """Prepare a run folder. A folder holding a run is only reused with ``resume`` and the same
    parameters; otherwise the user gets a clear message and nothing is touched."""
    out = prepare_out_dir(path)
    manifest = out / "config.json"
    config = _normalised(config)
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DoriError(f"{manifest} is unreadable; choose a new --out") from error
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
        return out
    write_manifest(out, command, config)
    return out


class ResultsFile:
    """A JSONL file of result rows, rewritten atomically after each batch of new rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self.rows.append(json.loads(line))

    def keys(self, field: str = "id") -> set:
        return {row[field] for row in self.rows}

    def extend(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
