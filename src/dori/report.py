"""The study's HTML report: one self-contained file (images inlined as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from dori import run_files
from dori.references import References, attack_targets, load_prompts
from dori.report_images import grid_cell, to_pil
from dori.runs import write_text_atomic


# The paper's headline table (SD v1.4, VM prompts; METHOD.md): SSCD_orig mean, std, MR.
PAPER = {
    "memorized": (0.90, 0.04, 0.98),
    "non_memorized": (0.17, 0.05, 0.00),
    "non_memorized+dori": (0.48, 0.06, 0.00),
    "nemo": (0.33, 0.18, 0.20),
    "nemo+dori": (0.91, 0.03, 0.99),
    "wanda": (0.20, 0.08, 0.00),
    "wanda+dori": (0.76, 0.05, 0.72),
    # ESD, Concept Ablation and SISS: the paper reports them after DoRI only (SSCD_orig mean, MR).
    "esd": (None, None, None),
    "esd+dori": (0.90, None, 0.98),
    "ca": (None, None, None),
    "ca+dori": (0.91, None, 0.97),
    "siss": (None, None, None),
    "siss+dori": (0.60, None, 0.39),
    "adv_ft": (None, None, None),
    "adv_ft+dori": (0.36, 0.14, 0.02),
}
PAPER_CURVES = {"nemo": [0.20, 0.73, 0.79, 0.94, 0.99], "wanda": [0.00, 0.02, 0.18, 0.49, 0.73]}
STRIP = (
    ("training image", None),
    ("no mitigation", ("replicate", run_files.PROMPT_GRID, 0)),
    ("NeMo", ("nemo", run_files.MITIGATED_GRID, None)),
    ("NeMo + DoRI", ("nemo_dori", run_files.generations_grid("attack"), None)),
    ("Wanda", ("wanda", run_files.MITIGATED_GRID, None)),
    ("Wanda + DoRI", ("wanda_dori", run_files.generations_grid("attack"), None)),
    ("ESD", ("esd", run_files.MITIGATED_GRID, None)),
    ("ESD + DoRI", ("esd_dori", run_files.generations_grid("attack"), None)),
    ("CA", ("ca", run_files.MITIGATED_GRID, None)),
    ("CA + DoRI", ("ca_dori", run_files.generations_grid("attack"), None)),
    ("SISS", ("siss", run_files.MITIGATED_GRID, None)),
    ("SISS + DoRI", ("siss_dori", run_files.generations_grid("attack"), None)),
    ("adv. fine-tuning + DoRI", ("unlearn", run_files.generations_grid("after_attack_prompt"), None)),
)


STRIP_ALWAYS = ("replicate", "nemo", "nemo_dori", "wanda", "wanda_dori", "unlearn")  # "missing" where not run


def _png(image: Image.Image, size: int | None = None) -> str:
    if size is not None:
        image = image.resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(image: Image.Image | None, alt: str, size: int = 96) -> str:
    if image is None:
        return '<span class="missing">not run</span>'
    return f'<img src="{_png(image, size)}" alt="{html.escape(alt)}" width="{size}" height="{size}">'


def _file_img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{html.escape(alt)}">'


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _paper_mean(mean: float, std: float | None) -> str:
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"


def _utility_sentence(info: dict | None) -> str:
    """What the table's utility column holds, or which options would fill it."""
    if not info:
        return "prompt alignment on held-out captions (bundled model)."
    if info.get("note"):
        return info["note"] + "."
    return f"{info['measure']} ({info['prompts']}, {info['seeds']} seed(s) each); the column holds the first."


def write_report(root: Path, summary: dict, results: dict, configs: dict, model) -> Path:

    stages = root / "stages"
    rows = []
    for name, (p_mean, p_std, p_mr) in PAPER.items():
        ours = summary["table"].get(name)
        ours_cells = (f"<td>{_fmt(ours['sscd_mean'])} ± {_fmt(ours['sscd_std'])}</td><td>{_fmt(ours['mr'])}</td>"
                      f"<td>{_fmt(ours.get('mr_any_planted'))}</td><td>{_fmt(ours['utility'])}</td>"
                      ) if ours else "<td colspan=4>not run</td>"  # fmt: skip
        paper = f"<td>{_paper_mean(p_mean, p_std)}</td><td>{_fmt(p_mr)}</td>" if p_mean is not None else \
            f"<td>–</td><td>{_fmt(p_mr)}</td>"  # fmt: skip
        rows.append(f"<tr><th>{html.escape(name)}</th>{ours_cells}{paper}</tr>")

    strips = []
    if "replicate" in configs:
        prompts = load_prompts(configs["replicate"].prompts, model, kind=configs["replicate"].type,
                                  limit=configs["replicate"].limit)  # fmt: skip
        height, width = model.image_size
        try:
            refs = References(model, images=configs["replicate"].images, sscd=configs["replicate"].sscd)
            targets = attack_targets(model, prompts, refs)
        except Exception:  # noqa: BLE001 - a report without training images still renders
            targets = [None] * len(prompts)
        # the optional stages' columns only where they ran
        shown = [(label, source) for label, source in STRIP if source is None or source[0] in STRIP_ALWAYS
                 or (stages / source[0] / "summary.json").exists()]  # fmt: skip
        for i, prompt in enumerate(prompts.prompts):
            cells = []
            for label, source in shown:
                if source is None:
                    image = None if targets[i] is None else to_pil(targets[i][0])
                else:
                    stage, pattern, row = source
                    image = grid_cell(stages / stage / pattern.format(i=i), i if row is None else row, 0, height, width)
                cells.append(f"<figure>{_img(image, label)}<figcaption>{html.escape(label)}</figcaption></figure>")
            strips.append(f'<div class="strip"><p class="prompt">{html.escape(prompt.prompt)}</p>{"".join(cells)}</div>')

    detection = summary.get("detection")
    det_html = "<p>not run</p>" if detection is None else (
        f"<p>noise-difference norm (first step): ROC-AUC {detection['auc']:.3f}, TPR@1%FPR "
        f"{detection['tpr_at_1pct_fpr']:.3f}; NeMo's SSIM check: ROC-AUC {detection['ssim']['auc']:.3f}, threshold "
        f"{detection['ssim']['threshold']:.3f}.</p>" + _file_img(stages / "detect" / run_files.ROC_PLOT, "ROC curves"))  # fmt: skip
    curves = "".join(
        f"<h3>{m}</h3><p>ours: " + ", ".join(f"{k} steps: {v:.2f}" for k, v in sorted(c.items(), key=lambda kv: int(kv[0])))
        + f"; paper (0/1/10/25/50): {', '.join(f'{v:.2f}' for v in PAPER_CURVES[m])}</p>"
        + _file_img(stages / f"{m}_dori" / run_files.STEPS_CURVE_PLOT, f"MR against DoRI steps, {m}")
        for m, c in summary.get("steps_curve", {}).items()
    )  # fmt: skip
    locality = summary.get("locality")
    loc_html = "<p>not run</p>" if locality is None else (
        "<ul>" + "".join(f"<li><b>{html.escape(view)}</b>: {html.escape(text)}</li>"
                         for view, text in locality["verdicts"].items()) + "</ul>"
        + "".join(_file_img(stages / f"locality_{m}" / run_files.PROJECTION_PLOT.format(target=0),
                            f"initialisations and triggers under {m}'s mask, 2-D projections") for m in locality["embedding"])
        + _file_img(root / run_files.DISCREPANCY_PLOT, "activation discrepancy per layer, one panel per method")
        + _file_img(root / run_files.AGREEMENT_PLOT, "weight agreement per layer, one panel per method"))  # fmt: skip
    sweep = summary.get("wanda_sweep")
    sweep_html = "<p>not run (add wanda_sweep to the study's --stages, or run 'dori wanda-sweep')</p>" if sweep is None \
        else _sweep_table(sweep) + _file_img(stages / "wanda_sweep" / run_files.SWEEP_PLOT, "MR and utility against Wanda's ratio")  # fmt: skip
    timing = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.0f} s</td></tr>" for k, v in summary["timing"].items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dori study: {html.escape(model.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ text-align: left; }} .strip {{ display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-end;
margin-bottom: 1em; }} .prompt {{ width: 100%; margin: 0; font-weight: 600; }}
figure {{ margin: 0; text-align: center; font-size: 11px; }} img {{ image-rendering: pixelated; }}
.missing {{ display: inline-block; width: 96px; height: 96px; background: #eee; font-size: 11px; }}
</style></head><body>
<h1>dori study: {html.escape(model.name)}</h1>
<p>{"<b>Quick run (reduced settings): numbers are indicative only.</b>" if summary["quick"] else ""}
Similarity: the model's copy detector (SSCD for real models); MR = fraction of generations above its threshold
against the prompt's own training image; "any memorized image" counts generations above it against any memorized
training image (bundled model).
Utility: {html.escape(_utility_sentence(summary.get("utility")))}</p>
<h2>Results beside the paper (SD v1.4, VM prompts)</h2>
<table><tr><th>setting</th><th>similarity (ours)</th><th>MR (ours)</th><th>MR, any memorized image (ours)</th><th>utility (ours)</th>
<th>SSCD_orig (paper)</th><th>MR (paper)</th></tr>{"".join(rows)}</table>
{"".join(f"<p>{html.escape(line)}</p>" for line in summary.get("mitigations", []))}
<h2>Each memorized target</h2>{"".join(strips)}
<h2>MR against DoRI steps</h2>{curves or "<p>not run</p>"}
<h2>How hard must Wanda prune before DoRI fails?</h2>{sweep_html}
<h2>Detection</h2>{det_html}
<h2>Locality</h2>{loc_html}
<h2>Time per stage</h2><table>{timing}</table>
</body></html>
"""
    return write_text_atomic(root / "report.html", page)


def _sweep_table(sweep: dict) -> str:
    """Wanda's trade-off curve as an HTML table: one row per ratio, in ladder order."""
    rows = "".join(
        f"<tr><th>{r['ratio']:g}</th><td>{r['pruned_weights']}</td><td>{100 * r['sparsity']:.2f}%</td>"
        f"<td>{_fmt(r['mr'])}</td><td>{_fmt(r['mr_dori'])}</td><td>{_fmt(r['utility'])}</td></tr>"
        for r in sweep["rows"]
    )  # fmt: skip
    fails = sweep.get("dori_fails_at")
    verdict = (f"DoRI ({sweep['attack_steps']} steps) brings no image back from ratio {fails:g} on." if fails is not None
               else f"DoRI ({sweep['attack_steps']} steps) brings images back at every ratio of the ladder.")  # fmt: skip
    return (f"<p>Wanda on the {html.escape(str(sweep.get('sites', 'ffn')))} sites. {html.escape(verdict)} Utility of the "
            f"unmitigated model: {_fmt(sweep.get('utility_unmitigated'))}. "
            "The paper's Wanda 10% on SD v1.4: Wanda + DoRI MR 0.01, at the price of the concept.</p>"
            "<table><tr><th>ratio</th><th>weights pruned</th><th>sparsity</th><th>MR, Wanda</th>"
            f"<th>MR, Wanda + DoRI</th><th>utility</th></tr>{rows}</table>")  # fmt: skip


def markdown_table(summary: dict) -> str:
    """The study's table beside the paper's, as Markdown (``DIR/table.md``; the README's results
    table is this file, copied by ``tools/readme_results.py``)."""
    lines = ["| setting | similarity (ours) | MR (ours) | MR, any memorized image (ours) | prompt alignment (ours) "
             "| SSCD_orig (paper) | MR (paper) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (p_mean, p_std, p_mr) in PAPER.items():
        ours = summary["table"].get(name)
        cells = (f"{_fmt(ours['sscd_mean'])} ± {_fmt(ours['sscd_std'])} | {_fmt(ours['mr'])} | "
                 f"{_fmt(ours.get('mr_any_planted'))} | {_fmt(ours['utility'])}" if ours else "not run | | | ")  # fmt: skip
        paper = f"{_paper_mean(p_mean, p_std)} | {_fmt(p_mr)}" if p_mean is not None else f"– | {_fmt(p_mr)}"
        lines.append(f"| {name} | {cells} | {paper} |")
    notes = list(summary.get("mitigations", []))  # each its own paragraph below the table
    detection = summary.get("detection")
    if detection:
        notes.append(f"Detection (noise-difference norm, first step): ROC-AUC {detection['auc']:.3f}, "
                     f"TPR@1%FPR {detection['tpr_at_1pct_fpr']:.3f}.")  # fmt: skip
    curves = summary.get("steps_curve") or {}
    for method, curve in curves.items():
        ours = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(curve.items(), key=lambda kv: int(kv[0])))
        notes.append(f"{method} + DoRI, MR by attack steps: {ours} (paper {'/'.join(f'{v:.2f}' for v in PAPER_CURVES[method])}).")
    sweep = summary.get("wanda_sweep")
    if sweep:
        notes.append("Wanda sweep (ratio: MR / MR after DoRI / utility): " + "; ".join(
            f"{r['ratio']:g}: {_fmt(r['mr'])} / {_fmt(r['mr_dori'])} / {_fmt(r['utility'])}" for r in sweep["rows"]) + ".")
    locality = summary.get("locality")
    if locality:
        notes += [f"Locality, {view}: {text}." for view, text in locality["verdicts"].items()]
    timing = summary.get("timing") or {}
    if timing:
        from dori.configs import STUDY_OPTIONAL_STAGES

        default = {k: v for k, v in timing.items() if k not in STUDY_OPTIONAL_STAGES}
        optional = {k: v for k, v in timing.items() if k in STUDY_OPTIONAL_STAGES}
        notes.append(f"Time: {sum(default.values()) / 60:.1f} min for the default stages ("
                     + ", ".join(f"{k} {v:.0f} s" for k, v in default.items()) + ")"
                     + "".join(f"; the optional {k} {v:.0f} s more" for k, v in optional.items()) + ".")  # fmt: skip
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)
