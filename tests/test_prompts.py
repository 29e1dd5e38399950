"""Prompt-set loaders: the public formats in shared/data, plain text, named sets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dori.errors import DoriError
from dori.prompts import load_prompt_set

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_nemo_csv_shipped_copy():
    prompts = load_prompt_set("sd14:memorized")
    assert len(prompts) == 500
    assert sum(p.type == "VM" for p in prompts.prompts) == 112
    assert prompts.prompts[0].prompt == "The No Limits Business Woman Podcast"
    assert prompts.prompts[0].index == "1030727993"
    assert len(prompts.only("VM")) == 112
    assert len(load_prompt_set("sd14:non_memorized")) == 500
    assert len(load_prompt_set("sd14:coco")) == 10_000


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
def test_loaders_on_the_files_in_shared_data():
    csv_set = load_prompt_set(str(SHARED / "memorized_laion_prompts.csv"))
    jsonl_set = load_prompt_set(str(SHARED / "sdv1_500_memorized.jsonl"))
    assert len(csv_set) == len(jsonl_set) == 500
    assert csv_set.texts == jsonl_set.texts  # the same prompts in the same order
    assert [p.index for p in csv_set.prompts] == [p.index for p in jsonl_set.prompts]


def test_plain_text(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a cat\n\n  a dog  \n")
    assert load_prompt_set(str(file)).texts == ["a cat", "a dog"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("wrong.csv", "a,b\n1,2\n", "'Caption' column"),
        ("bad.jsonl", '{"caption": "ok"}\n{not json\n', "line 2: not valid JSON"),
        ("nocaption.jsonl", json.dumps({"index": 3}) + "\n", "'caption' string"),
        ("empty.txt", "", "is empty"),
        ("header_only.csv", ";Caption;URL;Index\n", "is empty"),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path, name, content, message):
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(DoriError, match=message):
        load_prompt_set(str(file))


def test_non_utf8_and_missing_files(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DoriError, match="not UTF-8"):
        load_prompt_set(str(file))
    with pytest.raises(DoriError, match="prompt file not found"):
        load_prompt_set(str(tmp_path / "nope.csv"))
    with pytest.raises(DoriError, match="unknown set"):
        load_prompt_set("sd14:nothing")
