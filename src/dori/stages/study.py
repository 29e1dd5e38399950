"""``dori study``: the whole study in one command, stage by stage, resumable.

detection -> replication (memorized, non-memorized) -> NeMo and Wanda -> DoRI on each (with the
MR-vs-steps curve; the NeMo run also attacks the control targets) -> adversarial fine-tuning ->
DoRI again -> the report. Each stage is an ordinary run folder under ``DIR/stages/``, written by the
same workflow functions as the single commands; a stage whose ``summary.json`` exists is skipped
on ``--resume``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from dori.configs import (
    FINETUNING_METHODS,
    STUDY_STAGES,
    AttackRunConfig,
    DetectConfig,
    LocalityConfig,
    MitigateConfig,
    ReplicateConfig,
    StudyConfig,
    UnlearnRunConfig,
    WandaSweepConfig,
)
from dori.errors import DoriError
from dori.evaluation import MISSING_UTILITY, check_utility_options, utility_options
from dori.models.base import DiffusionModel
from dori.models.loading import is_bundled_kind
from dori.locality import BUNDLED_SIZES
from dori.locality import METHODS as LOCALITY_METHODS
from dori.references import is_bundled
from dori.runs import open_run, read_json, write_json_atomic
from dori.stages.attack import run_attack
from dori.stages.detect import run_detect
from dori.stages.mitigate import run_mitigate
from dori.stages.replicate import run_replicate
from dori.stages.unlearn import run_unlearn


def stage_configs(config: StudyConfig, root: Path) -> dict:
    """Each stage's own config (reduced settings with ``quick``)."""
    q = config.quick
    bundled = is_bundled_kind(config.model)  # the shipped model or any folder 'dori toy train' wrote
    seeds = config.seeds or (2 if q else 4 if bundled else 10)
    limit = 3 if q else None
    common = dict(model=config.model, images=config.images, sscd=config.sscd, batch_size=config.batch_size,
                  missing_images=config.missing_images)  # fmt: skip
    mem = dict(prompts=config.memorized, type=config.type, limit=limit, **common)
    # A real model's NeMo takes what the user gave (statistics, threshold) and the rest from the
    # non-memorized prompts; fine-tuning keeps their training pairs (the bundled kind has its own).
    nemo = dict(stats=config.stats, threshold=config.threshold, nemo_seeds=4 if q else 10,
                reference_prompts=None if bundled else config.non_memorized)  # fmt: skip
    util = utility_options(config)  # the stages that measure utility
    gen = dict(steps=config.sampling_steps or (20 if q or bundled else 50))
    stages = root / "stages"
    return {
        "detect": DetectConfig(memorized=config.memorized, non_memorized=config.non_memorized, model=config.model,
                               generations=2 if q else 4, consistency_seeds=4 if q else 10, limit=limit,
                               batch_size=config.batch_size, **gen),  # fmt: skip
        "replicate": ReplicateConfig(seeds=seeds, **mem, **gen),
        "replicate_non_memorized": ReplicateConfig(**{**mem, "prompts": config.non_memorized, "type": None}, seeds=seeds,
                                                   **gen),  # fmt: skip
        "nemo": MitigateConfig(method="nemo", seeds=seeds, utility_seeds=1 if q else 4, baseline=str(stages / "replicate"),
                               **mem, **gen, **util, **nemo),  # fmt: skip
        # Wanda's ratio as a defender picks it: the smallest on the ladder that stops
        # replication on the defender's own seeds.
        "wanda": MitigateConfig(method="wanda", ratio="auto", seeds=seeds, utility_seeds=1 if q else 4,
                                baseline=str(stages / "replicate"), **mem, **gen, **util),  # fmt: skip
        "nemo_dori": AttackRunConfig(mitigation=str(stages / "nemo"), steps=5 if q else 50,
                                     steps_curve="0,1,5" if q else "0,1,10,25,50", seeds=seeds,
                                     eval_steps=gen["steps"], control_limit=2 if q else 5 if bundled else 10, **mem),  # fmt: skip
        "wanda_dori": AttackRunConfig(mitigation=str(stages / "wanda"), steps=5 if q else 50,
                                      steps_curve="0,1,5" if q else "0,1,10,25,50", seeds=seeds,
                                      eval_steps=gen["steps"], control=False, **mem),  # fmt: skip
        "wanda_sweep": WandaSweepConfig(ladder="0.01,0.1" if q else WandaSweepConfig.ladder, seeds=seeds,
                                        utility_seeds=1 if q else 4, attack_steps=5 if q else 50, **mem, **gen,
                                        **util),  # fmt: skip
        **{method: MitigateConfig(method=method, seeds=seeds, utility_seeds=1 if q else 4, baseline=str(stages / "replicate"),
                                  finetune_steps=2 if q else None, anchor=config.anchor if method == "ca" else None,
                                  lr_rule=config.lr_rule, siss_keep=config.siss_keep,
                                  **mem, **gen, **util) for method in FINETUNING_METHODS},  # fmt: skip
        **{f"{method}_dori": AttackRunConfig(**{**mem, "model": str(stages / method / "model")}, steps=5 if q else 50,
                                             steps_curve="0,1,5" if q else "0,1,10,25,50", seeds=seeds,
                                             eval_steps=gen["steps"], control=False)
           for method in FINETUNING_METHODS},  # fmt: skip
        # Locality as the paper shows it: triggers searched under each pruning method's own mask,
        # that method's layers measured; Y_mem takes the template titles too (BUNDLED_SIZES).
        **{f"locality_{method}": LocalityConfig(
            prompts=config.memorized, non_memorized=config.non_memorized, limit=limit,
            mitigation=str(stages / method), more_prompts=BUNDLED_SIZES["more_prompts"] if bundled and not q else None,
            inits=4 if q else BUNDLED_SIZES["inits"] if bundled else LocalityConfig.inits,
            steps=5 if q else LocalityConfig.steps, seeds=1 if q else LocalityConfig.seeds, eval_steps=gen["steps"],
            agreement_triggers=2 if q else BUNDLED_SIZES["agreement_triggers"][method] if bundled
            else LocalityConfig.agreement_triggers,
            tsne=not q, type=config.type, **common, **nemo) for method in LOCALITY_METHODS},  # fmt: skip
        "unlearn": UnlearnRunConfig(mitigation=str(stages / "nemo"),
                                    steps=3 if q else 60 if bundled else UnlearnRunConfig.steps,
                                    triggers_per_target=2 if q or bundled else UnlearnRunConfig.triggers_per_target,
                                    inner_steps=3 if bundled else UnlearnRunConfig.inner_steps,
                                    # 10 generations per held-out caption: 64 images cannot resolve a 0.05 change
                                    eval_attack_steps=5 if q else 50, seeds=seeds, utility_seeds=1 if q else 10,
                                    eval_steps=gen["steps"], retain_prompts=None if bundled else config.non_memorized,
                                    **mem, **util),  # fmt: skip
    }


def run_study(config: StudyConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
              progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    from dori.stages.locality import run_locality
    from dori.stages.wanda_sweep import run_wanda_sweep

    say = progress or (lambda message: None)
    # Which stages run is not a parameter of the results: a study started with some stages can be
    # resumed with others (each stage keeps its own config and refuses a mismatched resume).
    settings = {k: v for k, v in asdict(config).items() if k != "stages"}
    check_utility_options(model, utility_options(config))  # a wrong option fails before any stage runs
    if not is_bundled(model):
        _check_real_inputs(config, model, stage_configs(config, Path(out).expanduser()))
    _check_locality_masks(config, Path(out).expanduser())
    root = open_run(out, "study", settings, resume=resume)
    configs = stage_configs(config, root)
    timing_file = root / "timing.json"
    timing = read_json(timing_file) if timing_file.exists() else {}
    runners = {
        "detect": [("detect", run_detect)],
        "replicate": [("replicate", run_replicate), ("replicate_non_memorized", run_replicate)],
        "nemo": [("nemo", run_mitigate)],
        "wanda": [("wanda", run_mitigate)],
        "nemo_dori": [("nemo_dori", run_attack)],
        "wanda_dori": [("wanda_dori", run_attack)],
        "wanda_sweep": [("wanda_sweep", run_wanda_sweep)],
        **{m: [(m, run_mitigate)] for m in FINETUNING_METHODS},
        **{f"{m}_dori": [(f"{m}_dori", _attack_finetuned)] for m in FINETUNING_METHODS},
        "locality": [(f"locality_{m}", run_locality) for m in LOCALITY_METHODS],
        "unlearn": [("unlearn", run_unlearn)],
    }
    results = {}
    for stage in STUDY_STAGES:
        for name, runner in runners[stage]:
            folder = root / "stages" / name
            done = folder / "summary.json"
            if stage not in config.stage_list():
                if done.exists():
                    results[name] = read_json(done)
                continue
            if done.exists():
                results[name] = read_json(done)
                continue
            say(f"stage {name}")
            began = time.monotonic()
            kwargs = {"progress": say} if runner in (run_mitigate, run_unlearn, run_locality, run_wanda_sweep) else {}
            stage_config = configs[name]
            if getattr(stage_config, "baseline", None) and not (Path(stage_config.baseline) / "summary.json").exists():
                stage_config = replace(stage_config, baseline=None)  # no replicate run to reuse: measure "before"
            results[name] = runner(stage_config, model, folder, resume=True, **kwargs)
            timing[name] = timing.get(name, 0.0) + time.monotonic() - began
            write_json_atomic(timing_file, timing)
            if name == "unlearn":  # later stages must see the original model again
                from dori.models.loading import load_model

                original = load_model(config.model, device=model.device, dtype=model.dtype)
                model.unet.load_state_dict(original.unet.state_dict())
                model.source = original.source
    summary = {"table": table(results), "detection": _detection(results), "timing": timing,
               "quick": config.quick, "stages_run": config.stage_list(),
               "locality": _locality(results, root), "steps_curve": _curves(results),
               "mitigations": _mitigations(results), "wanda_sweep": _sweep(results),
               "utility": _utility(results, model)}  # fmt: skip
    write_json_atomic(root / "summary.json", summary)
    from dori.report import markdown_table, write_report
    from dori.runs import write_text_atomic

    write_text_atomic(root / "table.md", markdown_table(summary))
    write_report(root, summary, results, configs, model)
    return summary


def _check_locality_masks(config: StudyConfig, root: Path) -> None:
    """The locality stage searches its triggers under the NeMo and Wanda stages' masks: both must
    run in this study, or have run in its folder, before it."""
    stages = config.stage_list()
    if "locality" not in stages:
        return
    for method in LOCALITY_METHODS:
        if method not in stages and not (root / "stages" / method / "summary.json").exists():
            raise DoriError(f"the locality stage searches triggers under the {method} stage's mask, which {root} "
                            f"does not have: add {method} to --stages")  # fmt: skip


def _attack_finetuned(config: AttackRunConfig, model: DiffusionModel, folder: Path, *, resume: bool) -> dict:
    """DoRI on a fine-tuning mitigation's model (``config.model``: its ``DIR/model``), loaded as
    ``model`` was (device, dtype, checkpointing)."""
    from dori.models.loading import load_model

    tuned = load_model(config.model, device=model.device, dtype=model.dtype,
                       gradient_checkpointing=model.gradient_checkpointing)  # fmt: skip
    return run_attack(config, tuned, folder, resume=resume)


def _check_real_inputs(config: StudyConfig, model: DiffusionModel, configs: dict) -> None:
    """A real model's study runs for hours: what a late stage needs is checked before the first
    (every prompt's training image, with --missing-images; NeMo's statistics and threshold)."""
    from dori.mitigate.nemo_reference import check_nemo_inputs
    from dori.references import References, load_prompts

    stages = set(config.stage_list())
    needs = {"replicate": bool(stages - {"detect"}), "replicate_non_memorized": bool(stages & {"replicate", "unlearn"})}
    for name, needed in needs.items():
        c = configs[name]
        if needed:
            refs = References(model, images=c.images, sscd=c.sscd)
            refs.with_images(load_prompts(c.prompts, model, kind=c.type, limit=c.limit), c.missing_images)
    if stages & {"nemo", "locality", "unlearn"}:
        n = configs["nemo"]
        check_nemo_inputs(model, reference_prompts=n.reference_prompts, stats=n.stats, threshold=n.threshold)


def _row(mr, mean, std, utility, mr_any_planted=None):
    """One table row; ``mr_any_planted`` counts a generation that replicates any memorized image."""
    return {"mr": mr, "sscd_mean": mean, "sscd_std": std, "utility": utility, "mr_any_planted": mr_any_planted}


def table(results: dict) -> dict:
    """One row per setting, named as in the paper's table."""
    rows = {}
    util_before = next((results[m]["utility_before"] for m in ("nemo", "wanda", *FINETUNING_METHODS) if m in results),
                       None)  # fmt: skip
    if "replicate" in results:
        r = results["replicate"]
        rows["memorized"] = _row(r["mr"], r["sscd_mean"], r["sscd_std"], util_before, r.get("mr_any_planted"))
    if "replicate_non_memorized" in results:
        r = results["replicate_non_memorized"]
        rows["non_memorized"] = _row(r["mr"], r["sscd_mean"], r["sscd_std"], util_before, r.get("mr_any_planted"))
    control = results.get("nemo_dori", {}).get("control", {})
    non_mem = next((v for k, v in control.items() if k.endswith(":non_memorized")), None)
    if non_mem is not None:
        rows["non_memorized+dori"] = _row(non_mem["mr"], non_mem["sscd_mean"], non_mem["sscd_std"], util_before,
                                          non_mem.get("mr_any_planted"))
    for method in ("nemo", "wanda"):
        if method in results:
            m = results[method]
            # utility measured the way MR is: each prompt under its own neurons where NeMo has them
            util = m.get("utility_after_own") if m.get("utility_after_own") is not None else m["utility_after"]
            rows[method] = _row(m["mr_after"], m["sscd_mean_after"], m["sscd_std_after"], util,
                                m.get("mr_any_planted_after"))
            if f"{method}_dori" in results:
                a = results[f"{method}_dori"]
                rows[f"{method}+dori"] = _row(a["mr"], a["sscd_mean"], a["sscd_std"], util,
                                              a.get("mr_any_planted"))
    for method in FINETUNING_METHODS:
        if method in results:
            m = results[method]
            rows[method] = _row(m["mr_after"], m["sscd_mean_after"], m["sscd_std_after"], m["utility_after"],
                                m.get("mr_any_planted_after"))
            if f"{method}_dori" in results:
                a = results[f"{method}_dori"]
                rows[f"{method}+dori"] = _row(a["mr"], a["sscd_mean"], a["sscd_std"], m["utility_after"],
                                              a.get("mr_any_planted"))
    if "unlearn" in results:
        u = results["unlearn"]
        rows["adv_ft"] = _row(u["mr_prompt_after"], u["sscd_prompt_after"], u.get("sscd_prompt_after_std"),
                              u["utility_after"], u.get("mr_any_planted_prompt_after"))
        rows["adv_ft+dori"] = _row(u["mr_attack_after"], u["sscd_attack_after"], u["sscd_attack_after_std"],
                                   u["utility_after"], u.get("mr_any_planted_attack_after"))
    return rows


def _utility(results: dict, model: DiffusionModel) -> dict | None:
    """What the utility column measures (from the first stage that measured it), or, on a real
    model given neither --clip nor --inception, which options would fill it."""
    for stage in ("nemo", "wanda", "unlearn", "wanda_sweep"):
        detail = results.get(stage, {}).get("utility_detail_before")
        if detail:
            return {"measure": detail["measure"], "prompts": detail["prompts"], "seeds": detail["seeds"], "note": None}
    if is_bundled(model):
        return None
    return {"measure": None, "prompts": None, "seeds": None, "note": MISSING_UTILITY}


def _detection(results: dict) -> dict | None:
    if "detect" not in results:
        return None
    d = results["detect"]
    return {"auc": d["noise_norm"]["auc"], "tpr_at_1pct_fpr": d["noise_norm"]["tpr_at_1pct_fpr"], "ssim": d["ssim"]}


def _mitigations(results: dict) -> list[str]:
    """One sentence per pruning mitigation: what it masked and how it was applied."""
    lines = []
    if "nemo" in results:
        n = results["nemo"]
        per = n["neurons_per_prompt"]
        scope = ("each prompt under its own neurons, as NeMo evaluates it" if n.get("scope", "union") == "prompt"
                 else "every prompt under the union")  # fmt: skip
        own = n.get("utility_after_own")
        utility_text = (f"held-out prompt alignment {own:.2f} under each prompt's own neurons (mean over prompts; the "
                        f"table's value) and {n['utility_after']:.2f} under the union" if own is not None and
                        n.get("utility_after") is not None else "utility is measured under the union")  # fmt: skip
        lines.append(f"NeMo: {statistics.median(per) if per else 0:g} neurons per prompt (median; {min(per, default=0)} "
                     f"to {max(per, default=0)}), {n['union_neurons']} in the union of all prompts; {scope}; "
                     f"{utility_text}.")  # fmt: skip
    if "wanda" in results:
        w = results["wanda"]
        if w.get("ratio_rule") == "auto":
            ladder = ", ".join(f"{r['ratio']:g}: {r['mr']:.2f}" for r in w["ladder_mr"])
            seeds = w["defender_seeds"]
            how = (f"ratio {w['ratio']:g}, the smallest on the ladder that replicates none of the memorized prompts on "
                   f"the defender's seeds {seeds[0]}-{seeds[1]} (MR by ratio {ladder})" if w["auto_satisfied"] else
                   f"ratio {w['ratio']:g}, the largest on the ladder: none stopped replication on the defender's seeds "
                   f"{seeds[0]}-{seeds[1]} (MR by ratio {ladder})")  # fmt: skip
        else:
            how = f"ratio {w.get('ratio', 0.01):g} (fixed)"
        lines.append(f"Wanda: {how}; {w['pruned_weights']} weights pruned ({100 * w['sparsity']:.2f}% of its "
                     f"{w['sites']} sites).")  # fmt: skip
    if "unlearn" in results:
        u = results["unlearn"]
        detail = u.get("utility_detail_after") or {}
        if u.get("utility_before") is not None and u.get("utility_after") is not None:
            missing = u.get("prompts_without_surrogate") or []
            lines.append(f"Adversarial fine-tuning: held-out prompt alignment {u['utility_before']:.2f} -> "
                         f"{u['utility_after']:.2f} ({u['utility_after'] / max(u['utility_before'], 1e-9):.0%} of the "
                         f"original's, {detail.get('seeds', '?')} seeds per caption), FD {u['fd_before']:.0f} -> "
                         f"{u['fd_after']:.0f}; DoRI MR {u['mr_attack_after_prompt_init']:.2f} from the prompt, "
                         f"{u['mr_attack_after_random_init']:.2f} from a random start"
                         + (f"; no surrogate for {', '.join(missing)}" if missing else "") + ".")  # fmt: skip
    return lines


def _sweep(results: dict) -> dict | None:
    """Wanda's trade-off curve (the optional ``wanda_sweep`` stage)."""
    if "wanda_sweep" not in results:
        return None
    s = results["wanda_sweep"]
    return {"rows": s["rows"], "utility_unmitigated": s["utility_unmitigated"], "dori_fails_at": s["dori_fails_at"],
            "attack_steps": s["attack_steps"], "sites": s["sites"]}  # fmt: skip


def _curves(results: dict) -> dict:
    return {m: results[f"{m}_dori"]["steps_curve"] for m in ("nemo", "wanda") if f"{m}_dori" in results}


def _locality(results: dict, root: Path | None = None) -> dict | None:
    """Both runs' views in brief, per method (the full numbers stay in each run's ``summary.json``);
    with ``root``, the paper's two figures from both runs, one panel per method."""
    runs = {m: results[f"locality_{m}"] for m in LOCALITY_METHODS if f"locality_{m}" in results}
    if not runs:
        return None
    from dori.locality import METHOD_NAMES, verdicts
    from dori.stages.locality import plot_method_views

    brief = lambda rows: {r["site"]: {"adv": r["adv"], "mem": r["mem"]} for r in rows}  # noqa: E731
    out: dict = {"embedding": {}, "activation": {}, "weight_agreement": {}, "verdicts": {}, "seconds": 0.0}
    activation, agreement = {"methods": {}}, {}
    for method, loc in runs.items():
        view = loc["activation"]["methods"][method]
        activation["methods"][method] = view
        agreement[method] = loc["weight_agreement"][method]
        out["embedding"][method] = loc["embedding"]["mean"]
        out["activation"][method] = {"ratio_median": view["ratio_median"], "sites": brief(view["sites"])}
        out["weight_agreement"][method] = brief(agreement[method]["sites"])
        # recomputed from the numbers, so a resumed study reads as the code now judges
        judged = verdicts(loc)
        out["verdicts"] |= {f"{view_name} (triggers under {METHOD_NAMES[method]}'s mask)": text
                            for view_name, text in judged.items()}  # fmt: skip
        out["seconds"] += loc["seconds"]
    if root is not None:
        plot_method_views(activation, agreement, root, under={m: m for m in runs})
    return out