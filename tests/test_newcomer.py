"""Issue 38: a newcomer's own files, one test per class: the encodings people's editors write,
folders that are not dori runs, and messages that name the real problem."""

from __future__ import annotations

import codecs
import json

import pytest
from test_errors import assert_clear_error, run_cli

from dori.errors import DoriError
from dori.prompts import load_prompt_set
from dori.runs import open_run


@pytest.mark.parametrize("encoding, bom", [
    ("utf-8", b""),
    ("utf-8", codecs.BOM_UTF8),  # Notepad's "UTF-8 with BOM"
    ("utf-16-le", codecs.BOM_UTF16_LE),  # Notepad's "Unicode"
    ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-32-le", codecs.BOM_UTF32_LE),
])  # fmt: skip
@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_prompt_files_in_every_unicode_encoding_editors_write_read_the_same(tmp_path, encoding, bom, suffix):
    prompts = ["Café on the Seine", "a red barn"]
    body = {".txt": "\r\n".join(prompts) + "\r\n",
            ".csv": "Caption;index\r\n" + "".join(f"{p};{i}\r\n" for i, p in enumerate(prompts)),
            ".jsonl": "".join(json.dumps({"caption": p, "index": i}) + "\n" for i, p in enumerate(prompts))}[suffix]  # fmt: skip
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(bom + body.encode(encoding))
    assert load_prompt_set(str(path)).texts == prompts  # no '\ufeff' glued to the first prompt


def test_a_legacy_encoding_is_a_one_line_error_that_names_the_fix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("Café\n".encode("cp1252"))
    with pytest.raises(DoriError, match=r"not UTF-8 text \(byte 0xe9 at offset 3.*save it as UTF-8"):
        load_prompt_set(str(path))


def test_a_folder_given_as_a_prompt_file_is_called_a_folder(tmp_path, capsys):
    with pytest.raises(DoriError, match="is a folder; pass a prompt file in it"):
        load_prompt_set(str(tmp_path))
    code, err = run_cli(["replicate", "--prompts", tmp_path, "--out", tmp_path / "out"], capsys)
    assert_clear_error(code, err, "is a folder")


def test_a_run_refuses_a_non_empty_folder_that_is_not_its_own(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DoriError, match="is not empty and holds no dori run"):
        open_run(theirs, "replicate", {"a": 1}, resume=False, lock=False)
    with pytest.raises(DoriError, match="is not empty and holds no dori run"):
        open_run(theirs, "replicate", {"a": 1}, resume=True, lock=False)
    assert sorted(p.name for p in theirs.iterdir()) == ["holiday.jpg"]  # nothing written


def test_a_folder_whose_config_json_is_not_dori_s_is_named_as_such(tmp_path):
    model_like = tmp_path / "unet"
    model_like.mkdir()
    (model_like / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    for resume in (False, True):
        with pytest.raises(DoriError, match="holds a config.json that is not a dori run's"):
            open_run(model_like, "replicate", {"a": 1}, resume=resume, lock=False)


def test_a_file_given_as_out_is_named_as_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DoriError, match="is a file; name a folder"):
        open_run(tmp_path / "notes.txt", "replicate", {"a": 1}, resume=False, lock=False)


def test_an_empty_or_new_folder_and_the_run_s_own_resume_are_still_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    out = open_run(tmp_path / "empty", "replicate", {"a": 1}, resume=False, lock=False)
    (out / "results.jsonl").write_text("")
    assert open_run(out, "replicate", {"a": 1}, resume=True, lock=False) == out
    assert open_run(tmp_path / "new" / "deeper", "replicate", {"a": 1}, resume=False, lock=False).is_dir()


def test_the_bundled_training_refuses_someone_else_s_folder(tmp_path):
    from dori.bundled.recipe import ToyTrainConfig
    from dori.bundled.train import train_bundled_model
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("x")
    with pytest.raises(DoriError, match="is not empty and holds no dori run"):
        train_bundled_model(ToyTrainConfig(steps=1), theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"]


def test_the_installed_model_folder_is_not_a_place_for_runs(capsys):
    from dori.models.loading import bundled_model_dir

    code, err = run_cli(["replicate", "--prompts", "bundled:memorized", "--out", bundled_model_dir()], capsys)
    assert_clear_error(code, err, "is not empty and holds no dori run")
