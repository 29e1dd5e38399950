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


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_manifest(out: Path, command: str, config: dict) -> Path:
    return write_json_atomic(
        out / "config.json",
        {"command": command, "argv": sys.argv, "config": config, "versions": versions()},
    )
