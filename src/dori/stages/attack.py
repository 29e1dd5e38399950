"""``dori attack``: DoRI on every prompt (under a mitigation), replication at each step of the
curve, the control sets; embeddings and each measured part saved as they finish."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from dori import run_files
from dori.attack import AttackConfig, dori_attack, initial_embeddings
from dori.fields import carried
from dori.evaluation import Progress, evaluate_under
from dori.interventions import each_mask, load_mitigation
from dori.measure.replication import summarize
from dori.models.base import DiffusionModel
from dori.parallel import Shards
from dori.plots import plot_steps_curve, write_steps_table
from dori.prompts import PromptSet
from dori.references import References, attack_targets, control_sets, load_prompts
from dori.report_images import save_grid
from dori.runs import ResultsFile, read_json, read_tensors, save_tensors_atomic, write_json_atomic


def attack_and_measure(model: DiffusionModel, prompts: PromptSet, refs: References, config, *,
                       mitigation=None, label: str, out: Path, curve: list[int] | None = None,
                       progress: Progress | None = None) -> dict:  # fmt: skip
    """Run DoRI on ``prompts`` (under ``mitigation``), save the embeddings, measure MR at every
    step of the curve. Results are cached per label, so a resumed run skips finished parts.
    Under ``accelerate launch`` each process attacks and measures every ``world``-th prompt."""
    shards = Shards()
    done_file = out / f"{label}_summary.json"
    if done_file.exists():
        return read_json(done_file)
    curve = config.curve() if curve is None else curve
    emb_file = out / f"{label}_embeddings.safetensors"
    mine = shards.mine(range(len(prompts)))
    if emb_file.exists():
        saved = read_tensors(emb_file, keys=tuple(f"step_{k}" for k in curve))
        snapshots = {int(k.split("_")[1]): v[mine].to(model.device) for k, v in saved.items()}
    else:
        others = load_prompts(config.other_prompts, model).texts if config.other_prompts else None
        init = initial_embeddings(model, prompts.texts, config.init, seed=config.attack_seed, others=others)[mine]
        attack = carried(AttackConfig, config, renamed={"batch": "attack_batch"})
        snapshots = {k: init.detach().clone() for k in curve}
        if mine:
            mine_set = prompts.pick(mine)
            latents = model.to_latents(torch.cat(attack_targets(model, mine_set, refs)))
            for group in each_mask(model, mitigation, mine_set.texts):
                found = dori_attack(model, latents[group], init[group], attack,
                                    seeds=[config.attack_seed * 100_003 + mine[i] for i in group],
                                    snapshot_steps=curve).snapshots  # fmt: skip
                for k in curve:
                    snapshots[k][group] = found[k].detach()
        full = {k: shards.assemble(mine, snapshots[k].detach().cpu().float(), len(prompts)) for k in curve}
        if shards.main:
            save_tensors_atomic({f"step_{k}": v for k, v in full.items()}, emb_file)
    mine_set = prompts.pick(mine)
    targets = attack_targets(model, mine_set, refs)
    per_step_rows, final_images = {}, torch.zeros(0, 3, *model.image_size)
    for step in curve:
        if not mine:
            per_step_rows[step] = []
            continue
        _, rows, images = evaluate_under(
            model, mitigation, mine_set, refs, seeds=config.seeds, steps=config.eval_steps, guidance=config.guidance,
            batch_size=config.batch_size, embeddings=snapshots[step].to(model.dtype), targets=targets,
            progress=progress,
        )  # fmt: skip
        per_step_rows[step] = [{**row, "id": i} for i, row in zip(mine, rows)]
        if step == config.steps:
            final_images = images
    parts = shards.gather((per_step_rows, final_images.cpu()))
    rows_at = {step: sorted((r for rows, _ in parts for r in rows[step]), key=lambda r: r["id"]) for step in curve}
    per_step = {str(step): summarize(rows_at[step], refs.detector.tau) for step in curve}
    summary = {**per_step[str(config.steps)], "steps_curve": {k: v["mr"] for k, v in per_step.items()},
               "sscd_curve": {k: v["sscd_mean"] for k, v in per_step.items()}}  # fmt: skip
    if shards.main:
        by_prompt = {}
        for rows, images in parts:
            for k, row in enumerate(rows[config.steps]):
                by_prompt[row["id"]] = images[k * config.seeds : (k + 1) * config.seeds]
        save_grid(torch.cat([by_prompt[i] for i in sorted(by_prompt)]), out / run_files.generations_grid(label),
                  columns=config.seeds)  # fmt: skip
        ResultsFile(out / f"{label}_results.jsonl").extend(rows_at[config.steps])
        write_json_atomic(done_file, summary)
    shards.wait()
    return summary


def run_attack(config, model: DiffusionModel, out: str | Path, *, resume: bool = False,
               progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori attack``: DoRI against the (mitigated) model, the MR-vs-steps curve, and the control."""
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd)
    prompts = refs.with_images(prompts, config.missing_images)  # every prompt's training image, checked first
    mitigation = load_mitigation(model, config.mitigation)
    shards = Shards()
    out = shards.open_run(out, "attack", asdict(config), resume=resume)
    summary = attack_and_measure(model, prompts, refs, config, mitigation=mitigation, label="attack", out=out,
                                 progress=progress)  # fmt: skip
    summary["mitigation"] = None if mitigation is None else mitigation.method
    summary["similarity"] = refs.detector.to_dict()
    if config.control:
        control = {}
        for name in control_sets(model):
            control[name] = attack_and_measure(model, load_prompts(name, model, limit=config.control_limit), refs,
                                               config, mitigation=None, label="control_" + name.split(":")[-1],
                                               out=out, curve=[0, config.steps], progress=progress)  # fmt: skip
        summary["control"] = control
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
        write_steps_table(summary, out / "steps_curve.csv")
        plot_steps_curve(summary, out / run_files.STEPS_CURVE_PLOT)
    return summary
