"""The study report on the tiny SD backend: prompt text is escaped, never run as markup."""

from __future__ import annotations

import shutil

from dori.study import StudyConfig, _mitigations, run_study


def test_a_prompt_with_markup_renders_as_text(tiny_sd, prompt_files, sscd_file, tmp_path):
    csv = (prompt_files / "mem.csv").read_text().replace("a red barn", "<script>alert(1)</script> a red barn")
    (tmp_path / "mem.csv").write_text(csv)
    shutil.copytree(prompt_files / "images", tmp_path / "images")
    config = StudyConfig(model=str(tiny_sd.source), memorized=str(tmp_path / "mem.csv"),
                         non_memorized=str(tmp_path / "mem.csv"), stages="replicate", quick=True,
                         images=str(tmp_path / "images"), sscd=str(sscd_file))  # fmt: skip
    summary = run_study(config, tiny_sd, tmp_path / "study")
    assert set(summary["table"]) == {"memorized", "non_memorized"}
    report = (tmp_path / "study" / "report.html").read_text()
    assert "<script>" not in report and "&lt;script&gt;alert(1)&lt;/script&gt; a red barn" in report


def test_the_nemo_sentence_gives_the_median_neurons_per_prompt():
    even = _mitigations({"nemo": {"neurons_per_prompt": [80, 11, 31, 28], "union_neurons": 120, "scope": "prompt"}})[0]
    assert even.startswith("NeMo: 29.5 neurons per prompt (median; 11 to 80), 120 in the union")
    odd = _mitigations({"nemo": {"neurons_per_prompt": [5, 1, 3], "union_neurons": 6, "scope": "union"}})[0]
    assert odd.startswith("NeMo: 3 neurons per prompt (median; 1 to 5)") and "every prompt under the union" in odd
