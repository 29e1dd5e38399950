"""``dori wanda-sweep``: how hard must a defender prune before DoRI fails, and what does it cost?

Wanda's scores are recorded once; for each ratio on the ladder (in order) the mask at that ratio
is applied and three numbers are measured: MR from the memorized prompts (no attack), MR after
DoRI (the attack starts from the prompt's own embedding, so its step 0 is the first number), and
held-out utility under the mask. One row per ratio is appended to ``results.jsonl`` as it is
finished; ``--resume`` skips the finished ratios (and an attack's cached embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dori import run_files
from dori.configs import WandaSweepConfig
from dori.evaluation import check_utility_options, utility, utility_options
from dori.interventions import intervene
from dori.mitigate.wanda import mask_size, wanda_mitigation, wanda_scores_for
from dori.models.base import DiffusionModel
from dori.references import References, load_prompts
from dori.report_images import save_figure
from dori.runs import ResultsFile, open_run, write_json_atomic, write_text_atomic
from dori.stages.attack import attack_and_measure


def run_wanda_sweep(config: WandaSweepConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip

    say = progress or (lambda message: None)
    check_utility_options(model, utility_options(config))  # a wrong option fails before any work
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd)
    prompts = refs.with_images(prompts, config.missing_images)  # every prompt's training image, checked first
    out = open_run(out, "wanda-sweep", asdict(config), resume=resume)
    results = ResultsFile(out / "results.jsonl")
    done = {row["ratio"]: row for row in results.rows}
    attack = config.attack()
    scores = None
    for ratio in config.ratios():
        if ratio in done:
            continue
        if scores is None:  # recorded only when a ratio is left to measure
            say("wanda: recording activations")
            scores = wanda_scores_for(model, [model.encode(prompts.texts)], config.sites, config.batch_size)
        mitigation = wanda_mitigation(model, scores.mask(model, 0, ratio))
        say(f"ratio {ratio:g}: DoRI ({config.attack_steps} steps) and replication")
        attacked = attack_and_measure(model, prompts, refs, attack, mitigation=mitigation, label=f"ratio_{ratio:g}",
                                         out=out, curve=[0, config.attack_steps])  # fmt: skip
        say(f"ratio {ratio:g}: utility")
        with intervene(model, mitigation):
            util = utility(model, seeds=config.utility_seeds, steps=config.steps, guidance=config.guidance,
                           batch_size=config.batch_size, **utility_options(config))  # fmt: skip
        size = mask_size(mitigation)
        row = {"ratio": ratio, "pruned_weights": size["pruned_weights"], "sparsity": size["sparsity"],
               "mr": attacked["steps_curve"]["0"], "sscd_mean": attacked["sscd_curve"]["0"],
               "mr_dori": attacked["steps_curve"][str(config.attack_steps)],
               "sscd_mean_dori": attacked["sscd_curve"][str(config.attack_steps)],
               "utility": None if util is None else util["alignment"], "fd": None if util is None else util["fd"]}  # fmt: skip
        results.extend([row])
        done[ratio] = row
    rows = [done[ratio] for ratio in config.ratios()]
    baseline = utility(model, seeds=config.utility_seeds, steps=config.steps, guidance=config.guidance,
                       batch_size=config.batch_size, **utility_options(config))  # fmt: skip
    summary = {"rows": rows, "utility_unmitigated": None if baseline is None else baseline["alignment"],
               "attack_steps": config.attack_steps, "sites": config.sites, "prompt_set": prompts.name,
               "n_prompts": len(prompts), "similarity": refs.detector.to_dict(),
               "dori_fails_at": _fails_from(rows)}  # fmt: skip
    write_sweep_table(rows, out / "sweep.csv")
    plot_sweep(summary, out / run_files.SWEEP_PLOT)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _fails_from(rows: list[dict]) -> float | None:
    """The smallest ratio from which DoRI brings nothing back at this and every larger ratio."""
    fails = None
    for row in reversed(rows):
        if row["mr_dori"] != 0.0:
            break
        fails = row["ratio"]
    return fails


def write_sweep_table(rows: list[dict], path: Path) -> None:
    fields = ("ratio", "pruned_weights", "sparsity", "mr", "mr_dori", "sscd_mean", "sscd_mean_dori", "utility", "fd")
    lines = [",".join(fields)]
    for row in rows:
        lines.append(",".join("" if row[f] is None else f"{row[f]:.6g}" for f in fields))
    write_text_atomic(path, "\n".join(lines) + "\n")


def plot_sweep(summary: dict, path: Path) -> None:
    """Both MR curves against the ratio; utility on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    # hollow large circles under small squares: both curves stay visible where they coincide
    ax.plot(ratios, [r["mr"] for r in rows], marker="o", markersize=10, markerfacecolor="none", label="MR, Wanda")
    ax.plot(ratios, [r["mr_dori"] for r in rows], marker="s", markersize=4, linestyle="--",
            label=f"MR, Wanda + DoRI ({summary['attack_steps']} steps)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("Wanda ratio (fraction of each row considered)")
    ax.set_ylabel("memorization rate")
    ax.set_ylim(-0.02, 1.02)
    if all(r["utility"] is not None for r in rows):
        twin = ax.twinx()
        twin.plot(ratios, [r["utility"] for r in rows], color="tab:green", linestyle="--", marker="^",
                  label="utility (held-out alignment)")  # fmt: skip
        if summary.get("utility_unmitigated") is not None:
            twin.axhline(summary["utility_unmitigated"], color="tab:green", linewidth=0.8, linestyle=":")
        twin.set_ylabel("held-out prompt alignment")
        twin.set_ylim(-0.02, 1.02)
        lines, labels = ax.get_legend_handles_labels()
        more, more_labels = twin.get_legend_handles_labels()
        ax.legend(lines + more, labels + more_labels, fontsize=7, loc="center left")
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
