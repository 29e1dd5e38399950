"""``dori locality``: triggers from many random starts, which of them bring the image back, and
the three views of non-locality (dori.locality computes them)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from dori import run_files
from dori.attack import AttackConfig, dori_attack, initial_embeddings
from dori.configs import LocalityConfig
from dori.fields import carried
from dori.errors import DoriError
from dori.interventions import each_mask, load_mitigation, put_rows
from dori.locality import (
    METHOD_NAMES,
    METHODS,
    Say,
    _mean_embedding,
    activation_view,
    embedding_view,
    method_layers,
    plot_panels,
    plot_projection,
    verdicts,
    weight_agreement_view,
)
from dori.measure.replication import replication
from dori.mitigate.nemo_reference import check_nemo_inputs
from dori.models.base import DiffusionModel
from dori.parallel import Shards
from dori.references import References, attack_targets, is_bundled, load_prompts
from dori.report_images import save_grid
from dori.runs import read_json, read_tensors, save_tensors_atomic, write_json_atomic


def run_locality(config: LocalityConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                 progress: Say | None = None) -> dict:  # fmt: skip
    """``dori locality``: the three views of METHOD.md stage 5, written to ``out``."""
    say = progress or (lambda message: None)
    began = time.monotonic()
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    if len(prompts) < 2:
        raise DoriError(f"{config.prompts} has {len(prompts)} prompt(s); locality compares memorized prompts, give at least 2")
    if config.targets > len(prompts):
        raise DoriError(f"--targets {config.targets} exceeds the {len(prompts)} prompts of {config.prompts}; lower it")
    # NeMo runs last (the weight-agreement view): its inputs are checked now, before any trigger is searched.
    check_nemo_inputs(model, reference_prompts=config.reference_prompts, stats=config.stats, threshold=config.threshold)
    non_mem_spec = config.non_memorized or ("bundled:non_memorized" if is_bundled(model) else None)
    if non_mem_spec is None:
        raise DoriError("locality compares triggers with non-memorized prompts: pass --non-memorized SET")
    non_mem = model.encode(load_prompts(non_mem_spec, model).texts).float()
    # Y_mem: the prompt set, and more memorized prompts that are not attacked (no training image needed).
    more = [] if config.more_prompts is None else load_prompts(config.more_prompts, model).texts
    mem_texts = list(dict.fromkeys(prompts.texts + more))
    refs = References(model, images=config.images, sscd=config.sscd)
    prompts = refs.with_images(prompts, config.missing_images)  # every prompt's training image, checked first
    mitigation = load_mitigation(model, config.mitigation)
    shards = Shards()
    out = shards.open_run(out, "locality", asdict(config), resume=resume)

    targets = prompts.head(config.targets)
    mem = model.encode(mem_texts).float()
    latents = model.to_latents(torch.cat(attack_targets(model, targets, refs)))
    k = config.inits
    inits = torch.cat([initial_embeddings(model, [p], "random", seed=config.seed * 1_000 + j, per_prompt=k)
                       for j, p in enumerate(targets.texts)])  # fmt: skip
    mine = shards.mine(range(len(inits)))  # under accelerate: every world-th trigger
    texts = [p for p in targets.texts for _ in range(k)]  # the target prompt of every trigger
    trigger_file = out / "triggers.safetensors"
    if trigger_file.exists():
        triggers = read_tensors(trigger_file, keys=("triggers",))["triggers"].to(model.device)
    else:
        say(f"locality: attacking {len(targets)} target(s) from {k} random initialisations each")
        attack = carried(AttackConfig, config, renamed={"batch": "attack_batch"})
        found = inits[mine].clone()
        rows = latents.repeat_interleave(k, dim=0)[mine]
        for group in each_mask(model, mitigation, [texts[i] for i in mine]):  # each target under its own mask
            found[group] = dori_attack(model, rows[group], found[group], attack,
                                       seeds=[config.seed * 1_000_003 + mine[n] for n in group]).embeddings.detach()  # fmt: skip
        triggers = shards.assemble(mine, found, len(inits)).to(inits.device)
        if shards.main:
            save_tensors_atomic({"inits": inits, "triggers": triggers}, trigger_file, metadata={"model": model.fingerprint()})
            # From here on the triggers come from the file, as in a resumed run: the same tensors, bit for bit.
            triggers = read_tensors(trigger_file, keys=("triggers",))["triggers"].to(model.device)

    say("locality: checking which triggers bring the image back")
    references = [refs.of(p) for p in targets.prompts for _ in range(k)]
    results, images = [None] * len(mine), torch.zeros(len(mine) * config.seeds, 3, *model.image_size)
    for group in each_mask(model, mitigation, [texts[i] for i in mine]):
        rows = [mine[n] for n in group]
        part, made = replication(model, [texts[i] for i in rows], [references[i] for i in rows], refs.detector,
                                 seeds=list(range(config.seeds)), steps=config.eval_steps, guidance=config.guidance,
                                 embeddings=triggers[rows].to(model.dtype), batch_size=config.batch_size)  # fmt: skip
        for m, n in enumerate(group):
            results[n] = part[m]
        put_rows(images, made, group, config.seeds)
    success = torch.zeros(len(inits), dtype=torch.bool)
    first_images = {}
    for rows, flags, part in shards.gather((mine, [r.mr >= 0.5 for r in results], images.cpu())):
        success[rows] = torch.tensor(flags, dtype=torch.bool)
        first_images.update({i: part[n * config.seeds : (n + 1) * config.seeds] for n, i in enumerate(rows) if i < 16})
    if not shards.main:  # the remaining views are cheap: the main process computes and writes them
        shards.wait()
        return read_json(out / "summary.json")
    save_grid(torch.cat([first_images[i] for i in sorted(first_images)]), out / "trigger_generations.png",
              columns=config.seeds)  # fmt: skip

    per_target, groups = [], []
    for j, prompt in enumerate(targets.texts):
        rows = slice(j * k, (j + 1) * k)
        view = embedding_view(inits[rows], triggers[rows], success[rows], mem[j : j + 1], non_mem)
        per_target.append({"prompt": prompt, **view})
        plot_projection(inits[rows], triggers[rows], success[rows], mem[j : j + 1], non_mem,
                        out / run_files.PROJECTION_PLOT.format(target=j), tsne=config.tsne, seed=config.seed)  # fmt: skip
        ok = triggers[rows][success[rows]] if int(success[rows].sum()) >= 2 else triggers[rows]
        groups.append(ok)
    embedding = {"per_target": per_target, "mean": _mean_embedding(per_target)}

    # Under a NeMo or Wanda mask, that method's views (the paper's separate bars); without one, both.
    methods = METHODS if mitigation is None or mitigation.method not in METHODS else (mitigation.method,)
    say("locality: activation discrepancy")
    activation = activation_view(model, groups, mem, method_layers(model, config, methods), seed=config.seed,
                                 steps=config.eval_steps, batch_size=config.batch_size, mitigation=mitigation,
                                 target_texts=targets.texts, mem_texts=mem_texts)  # fmt: skip
    # The selection runs on the unpruned model, as a defender runs it on a new prompt: under its own
    # mask a memorized prompt no longer replicates, and NeMo would select nothing for it.
    agreement = weight_agreement_view(model, [g[: config.agreement_triggers] for g in groups], mem, config, say, methods)
    plot_method_views(activation, agreement, out, under=None if mitigation is None else {m: mitigation.method for m in methods})

    summary = {"embedding": embedding, "activation": activation, "weight_agreement": agreement,
               "targets": targets.texts, "inits": k, "mitigation": None if mitigation is None else mitigation.method,
               "methods": list(methods), "memorized_prompts": mem_texts,
               "similarity": refs.detector.to_dict()}  # fmt: skip
    summary["verdicts"] = verdicts(summary)
    summary["seconds"] = time.monotonic() - began
    write_json_atomic(out / "summary.json", summary)
    shards.wait()
    return summary


def plot_method_views(activation: dict, agreement: dict, out: Path, *, under: dict | None = None) -> None:
    """The paper's two figures: activation discrepancy and weight agreement, one panel per method.
    ``under``: method -> the mask its triggers were found under, for the panel titles."""
    under = under or {}

    def title(method: str, what: str) -> str:
        return f"{METHOD_NAMES[method]}'s {what}" + (f" (triggers under {METHOD_NAMES[under[method]]}'s mask)"
                                                      if method in under else "")  # fmt: skip

    plot_panels([(title(m, "layers"), v["sites"]) for m, v in activation["methods"].items()],
                out / run_files.DISCREPANCY_PLOT, title="activation discrepancy per layer", ylabel="mean pairwise L2")  # fmt: skip
    plot_panels([(title(m, "selection"), agreement[m]["sites"]) for m in METHODS if m in agreement],
                out / run_files.AGREEMENT_PLOT, title="weight agreement per layer", ylabel="mean pairwise IoU",
                ylim=(0, 1.05))  # fmt: skip
