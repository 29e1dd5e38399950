"""The plots and tables the stages write beside their results (the report embeds them)."""

from __future__ import annotations

from pathlib import Path

from dori.measure.detection import roc_auc, roc_curve, scores_by_set
from dori.report_images import save_figure


def plot_roc(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fields = [("noise_first_step", "noise-difference norm (first step)"), ("noise_all_steps", "noise norm (all steps)"),
              ("ssim_max", "SSIM consistency (NeMo)")]  # fmt: skip
    for field, label in fields:
        if rows and field in rows[0]:
            pos, neg = scores_by_set(rows, field)
            fpr, tpr = roc_curve(pos, neg)
            ax.plot(fpr, tpr, label=f"{label}, AUC {roc_auc(pos, neg):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def write_steps_table(summary: dict, path: Path) -> None:
    """MR and mean similarity after each number of DoRI steps, one row per step count."""
    lines = ["targets,steps,mr,sscd_mean"]
    parts = {"memorized": summary, **{f"control:{k.split(':')[-1]}": v for k, v in summary.get("control", {}).items()}}
    for name, part in parts.items():
        for step in sorted(part["steps_curve"], key=int):
            lines.append(f"{name},{step},{part['steps_curve'][step]:.4f},{part['sscd_curve'][step]:.4f}")
    from dori.runs import write_text_atomic

    write_text_atomic(path, "\n".join(lines) + "\n")


def plot_steps_curve(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    curves = {"memorized targets": summary["steps_curve"]}
    for name, control in summary.get("control", {}).items():
        curves[f"control: {name.split(':')[-1]}"] = control["steps_curve"]
    for label, curve in curves.items():
        steps = sorted(curve, key=int)
        ax.plot([int(s) for s in steps], [curve[s] for s in steps], marker="o", label=label)
    ax.set_xlabel("DoRI steps")
    ax.set_ylabel("memorization rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
