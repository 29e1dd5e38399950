"""The study report on the tiny SD backend: prompt text is escaped, never run as markup."""

from __future__ import annotations

import shutil

from dori.study import StudyConfig, run_study


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
