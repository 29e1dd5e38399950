"""The study report on the tiny SD backend: prompt text is escaped, never run as markup."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from dori.configs import StudyConfig
from dori.errors import DoriError
from dori.stages.study import _mitigations, run_study, stage_configs


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


def test_the_optional_wanda_sweep_stage_is_in_the_report(tiny_sd, prompt_files, sscd_file, tmp_path):
    config = StudyConfig(model=str(tiny_sd.source), memorized=str(prompt_files / "mem.csv"),
                         non_memorized=str(prompt_files / "non.txt"), stages="wanda_sweep", quick=True,
                         images=str(prompt_files / "images"), sscd=str(sscd_file), sampling_steps=2, seeds=1)  # fmt: skip
    assert "wanda_sweep" not in StudyConfig().stage_list()  # optional: not in the default study
    summary = run_study(config, tiny_sd, tmp_path / "study")
    rows = summary["wanda_sweep"]["rows"]
    assert [r["ratio"] for r in rows] == [0.01, 0.1]
    report = (tmp_path / "study" / "report.html").read_text()
    section = report.split("How hard must Wanda prune before DoRI fails?</h2>")[1].split("<h2>")[0]
    assert section.count("<tr><th>0.") == 2 and 'alt="MR and utility against Wanda' in section
    # a real model given neither --clip nor --inception: the report says which options fill the utility column
    assert summary["utility"]["note"].startswith("utility not measured on this model: pass --clip DIR")
    assert "pass --clip DIR for the CLIP score" in report.split("<h2>")[0]


def test_the_wanda_sentence_states_the_rule_and_the_ladder():
    auto = {"ratio_rule": "auto", "ratio": 0.05, "auto_satisfied": True, "defender_seeds": [1000, 1003],
            "ladder_mr": [{"ratio": 0.01, "mr": 1.0}, {"ratio": 0.02, "mr": 0.5}, {"ratio": 0.05, "mr": 0.0}],
            "pruned_weights": 40, "sparsity": 0.01, "sites": "ffn"}  # fmt: skip
    line = _mitigations({"wanda": auto})[0]
    assert "ratio 0.05, the smallest on the ladder" in line and "0.02: 0.50" in line and "seeds 1000-1003" in line
    failed = _mitigations({"wanda": {**auto, "auto_satisfied": False, "ratio": 0.5}})[0]
    assert "none stopped replication" in failed


def test_a_real_model_study_takes_what_nemo_and_fine_tuning_need_and_checks_it_first(tiny_sd, prompt_files,
                                                                                    sscd_file, tmp_path):  # fmt: skip
    mem, non = str(prompt_files / "mem.csv"), str(prompt_files / "non.txt")
    config = StudyConfig(model=str(tiny_sd.source), memorized=mem, non_memorized=non, type="VM", stats="s.pt",
                         threshold=0.428, images=str(tmp_path / "images"), sscd=str(sscd_file))  # fmt: skip
    c = stage_configs(config, tmp_path / "study")
    loc = [c["locality_nemo"], c["locality_wanda"]]
    assert c["replicate"].type == loc[0].type == loc[1].type == "VM" and c["replicate_non_memorized"].type is None
    assert (c["nemo"].stats, c["nemo"].threshold, c["nemo"].reference_prompts) == ("s.pt", 0.428, non)
    assert all(x.reference_prompts == non and x.more_prompts is None for x in loc) and c["unlearn"].retain_prompts == non
    assert [x.mitigation for x in loc] == [str(tmp_path / "study" / "stages" / m) for m in ("nemo", "wanda")]
    shipped = stage_configs(StudyConfig(), tmp_path / "shipped")
    assert shipped["unlearn"].retain_prompts is None and shipped["nemo"].reference_prompts is None
    assert shipped["esd"].lr_rule == "reference"
    assert {stage_configs(StudyConfig(lr_rule="scaled"), tmp_path / "s")[m].lr_rule for m in ("esd", "ca", "siss")} == {"scaled"}
    with pytest.raises(DoriError, match="unknown --lr-rule 'paper'; use reference or scaled"):
        StudyConfig(lr_rule="paper")
    # a missing training image or NeMo input stops the study before its first stage, not hours later
    shutil.copytree(prompt_files / "images", tmp_path / "images")
    (tmp_path / "images" / "1002.png").unlink()
    with pytest.raises(DoriError, match=r"1 of 4 prompts of .*mem.csv\[VM\] have no training image .*\(index 1002\)"):
        run_study(config, tiny_sd, tmp_path / "study")
    with pytest.raises(DoriError, match="statistics file not found: s.pt"):
        run_study(replace(config, missing_images="skip", stages="nemo"), tiny_sd, tmp_path / "study")
    with pytest.raises(DoriError, match="non.txt have no training image in .*they have no Index"):
        run_study(replace(config, missing_images="skip", stages="replicate"), tiny_sd, tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_a_fine_tuning_mitigation_and_dori_on_its_model_are_rows_and_strips(tiny_sd, prompt_files, sscd_file,
                                                                            tmp_path):  # fmt: skip
    config = StudyConfig(model=str(tiny_sd.source), memorized=str(prompt_files / "mem.csv"),
                         non_memorized=str(prompt_files / "mem.csv"), stages="replicate,esd,esd_dori", quick=True,
                         images=str(prompt_files / "images"), sscd=str(sscd_file), sampling_steps=2, seeds=1)  # fmt: skip
    weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    summary = run_study(config, tiny_sd, tmp_path / "study")
    assert all(torch.equal(v, weights[k]) for k, v in tiny_sd.unet.state_dict().items())  # the caller's model is kept
    esd = json.loads((tmp_path / "study" / "stages" / "esd" / "summary.json").read_text())
    attack = json.loads((tmp_path / "study" / "stages" / "esd_dori" / "config.json").read_text())
    assert esd["finetuning"]["steps"] == 2 and attack["config"]["model"] == esd["model"]
    assert summary["table"]["esd"]["mr"] == esd["mr_after"] and "esd+dori" in summary["table"]
    report = (tmp_path / "study" / "report.html").read_text()
    assert "ESD + DoRI</figcaption>" in report and "SISS + DoRI</figcaption>" not in report  # only the stages run
    assert "<th>esd+dori</th>" in report and "<td>0.90</td><td>0.98</td>" in report  # beside the paper's numbers
