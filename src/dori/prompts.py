"""Prompt sets: NeMo's ``;``-separated CSV, Wen et al.'s JSONL, plain text, and named sets.

Named sets: ``bundled:memorized`` (VM), ``bundled:template`` (TM), ``bundled:non_memorized``,
``bundled:held_out`` (the bundled model's own), and ``sd14:memorized``, ``sd14:non_memorized``,
``sd14:coco`` (NeMo's public lists for SD v1.4, shipped with their licence).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dori.errors import DoriError

SD14_SETS = {
    "memorized": "memorized_laion_prompts.csv",
    "non_memorized": "unmemorized_laion_prompts.csv",
    "coco": "coco2014_val_10000.csv",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Prompt:
    prompt: str
    type: str = "unknown"  # VM, TM, none, held_out, unknown
    index: str | None = None  # training-image id (LAION index), if any
    truncated: bool = False  # longer than the text encoder's window: its end is cut

    def to_dict(self) -> dict:
        out = {"prompt": self.prompt, "type": self.type, "index": self.index}
        return {**out, "truncated": True} if self.truncated else out


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.prompt for p in self.prompts]

    def only(self, kind: str | None) -> PromptSet:
        if kind is None:
            return self
        kept = tuple(p for p in self.prompts if p.type == kind)
        if not kept:
            raise DoriError(f"prompt set {self.name} has no prompts of type {kind!r}")
        return PromptSet(f"{self.name}[{kind}]", kept)

    def head(self, limit: int | None) -> PromptSet:
        return self if limit is None else PromptSet(self.name, self.prompts[:limit])

    def pick(self, indices: list[int]) -> PromptSet:
        return PromptSet(self.name, tuple(self.prompts[i] for i in indices))


def load_prompt_set(spec: str, *, model_folder: str | Path | None = None) -> PromptSet:
    """Load ``spec``: a named set (``bundled:NAME``, ``sd14:NAME``) or a .csv / .jsonl / .txt file."""
    if spec.startswith("bundled:"):
        from dori.models.loading import bundled_model_dir
        from dori.toy.kit import ToyKit

        kit = ToyKit.from_folder(model_folder or bundled_model_dir())
        rows = kit.prompt_set(spec.split(":", 1)[1])
        return _checked(spec, [Prompt(r["prompt"], r["type"], None if r["index"] is None else str(r["index"])) for r in rows])
    if spec.startswith("sd14:"):
        name = spec.split(":", 1)[1]
        if name not in SD14_SETS:
            raise DoriError(f"unknown set {spec!r}; use one of {', '.join('sd14:' + n for n in SD14_SETS)}")
        text = (resources.files("dori.data") / "sd14" / SD14_SETS[name]).read_text(encoding="utf-8")
        return _checked(spec, _parse_csv(text, spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DoriError(f"{path} is a folder; pass a prompt file in it (.csv, .jsonl or .txt) or a named set such as "
                        "bundled:memorized")  # fmt: skip
    if not path.is_file():
        raise DoriError(f"prompt file not found: {path}; pass a .csv, .jsonl or .txt file or a named set such as bundled:memorized")
    text = read_user_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _checked(spec, _parse_csv(text, str(path)))
    if suffix in (".jsonl", ".json"):
        return _checked(spec, _parse_jsonl(text, str(path)))
    return _checked(spec, [Prompt(line.strip()) for line in text.splitlines() if line.strip()])


# The byte-order marks editors write (Notepad's "UTF-8 with BOM" and "Unicode"), longest first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def read_user_text(path: Path) -> str:
    """A text file as people's editors save it: UTF-8, or UTF-8/16/32 with a byte-order mark (the
    mark itself removed); anything else is a one-line error that names the byte and the fix."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DoriError(f"cannot read {path} ({error.strerror}); check the path and its permissions") from error
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError as error:
                raise DoriError(f"{path} starts with a {encoding} byte-order mark but is not {encoding} text; "
                                "save it as UTF-8") from error  # fmt: skip
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DoriError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}: a legacy "
                        "encoding such as Windows-1252?); save it as UTF-8") from error  # fmt: skip


def _checked(name: str, prompts: list[Prompt]) -> PromptSet:
    if not prompts:
        raise DoriError(f"prompt set {name} is empty; give at least one prompt")
    return PromptSet(name, tuple(prompts))


def _parse_csv(text: str, where: str) -> list[Prompt]:
    """NeMo's format: ``;``-separated, a ``Caption`` column, optional ``type`` and ``Index``."""
    reader = csv.DictReader(io.StringIO(text), delimiter=";")
    if reader.fieldnames is None or "Caption" not in reader.fieldnames:
        found = ", ".join(reader.fieldnames or []) or "no header"
        raise DoriError(f"{where}: a ';'-separated CSV with a 'Caption' column is expected (found: {found})")
    out = []
    for line, row in enumerate(reader, start=2):
        caption = (row.get("Caption") or "").strip()
        if not caption:
            raise DoriError(f"{where}, line {line}: empty Caption; remove the line or fill it in")
        index = (row.get("Index") or "").strip() or None
        out.append(Prompt(caption, (row.get("type") or "unknown").strip(), index))
    return out


def _parse_jsonl(text: str, where: str) -> list[Prompt]:
    """Wen et al.'s format: one JSON object per line with ``caption`` (and ``index``, ``url``)."""
    out = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DoriError(f"{where}, line {line}: not valid JSON ({error.msg}); fix or remove that line") from error
        caption = obj.get("caption", obj.get("prompt")) if isinstance(obj, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise DoriError(f"{where}, line {line}: a 'caption' string is expected in every line")
        index = obj.get("index")
        out.append(Prompt(caption.strip(), str(obj.get("type", "unknown")), None if index is None else str(index)))
    return out


def training_image_path(images_dir: str | Path, prompt: Prompt) -> Path:
    """The training image of ``prompt`` in a folder of files named by the prompt's index."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise DoriError(f"training-image folder not found: {folder}; pass --images DIR with files named by index")
    if prompt.index is None:
        raise DoriError(f"prompt {prompt.prompt[:60]!r} has no index, so its training image cannot be found")
    found = find_training_image(folder, prompt)
    if found is None:
        raise DoriError(f"no training image for index {prompt.index} in {folder} (looked for {prompt.index}.png/.jpg/...)")
    return found


def find_training_image(folder: Path, prompt: Prompt) -> Path | None:
    """The file named by ``prompt``'s index in ``folder`` (any of :data:`IMAGE_SUFFIXES`), if any."""
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{prompt.index}{suffix}"
        if candidate.is_file():
            return candidate
    return None
