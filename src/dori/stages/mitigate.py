"""``dori mitigate``: select NeMo's neurons or Wanda's weights, save the mask, and measure the
mitigated model (replication before and after, utility)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dori import run_files
from dori.configs import FINETUNING_METHODS
from dori.errors import DoriError
from dori.evaluation import (
    before_and_after,
    check_utility_options,
    evaluate_replication,
    evaluate_under,
    utility,
    utility_options,
    write_results,
)
from dori.interventions import Mitigation, baked, each_mask, intervene, load_mask, save_mask
from dori.measure.replication import summarize
from dori.mitigate.nemo import nemo_localize, union
from dori.mitigate.nemo_reference import nemo_for_run
from dori.mitigate.wanda import (
    DEFENDER_FIRST_SEED,
    WANDA_LADDER,
    first_clean_ratio,
    mask_size,
    wanda_mitigation,
    wanda_scores_for,
)
from dori.models.base import DiffusionModel
from dori.prompts import PromptSet
from dori.references import References, is_bundled, load_prompts
from dori.report_images import save_grid
from dori.runs import ResultsFile, open_run, read_json, save_tensors_atomic, write_json_atomic


def run_mitigate(config, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """``dori mitigate``: select the mask (NeMo or Wanda), save it with the mitigated weights,
    and measure MR / similarity / utility before and after; the fine-tuning methods (ESD, CA,
    SISS) save a fine-tuned model instead (:mod:`dori.stages.erasure`)."""
    say = progress or (lambda message: None)
    check_utility_options(model, utility_options(config))  # a wrong option fails before any work
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd)
    prompts = refs.with_images(prompts, config.missing_images)  # every prompt's training image, checked first
    out = open_run(out, "mitigate", asdict(config), resume=resume)
    if config.method in FINETUNING_METHODS:  # a new model, not a mask
        from dori.stages.erasure import run_erasure

        before = _baseline(config, model, prompts, refs) if config.baseline is not None else None
        return run_erasure(config, model, out, prompts, refs, resume=resume, before=before, say=say)
    emb = model.encode(prompts.texts)
    summary: dict = {"method": config.method, "prompt_set": prompts.name, "n_prompts": len(prompts)}
    selection_file = out / "selection.json"  # written after the mask: a resumed run skips the search
    if selection_file.exists():
        say("resuming: the mask is already selected")
        mitigation, extra = load_mask(out, model), read_json(selection_file)
    else:
        mitigation, extra = _select_mask(config, model, prompts, refs, emb, out, say)
        save_mask(mitigation, out)
        write_json_atomic(selection_file, extra)
    with baked(model, mitigation) as changed:
        tensors = {f"{name}.{kind}": getattr(model.module(name), kind) for name in changed for kind in ("weight", "bias")
                   if getattr(model.module(name), kind) is not None}  # fmt: skip
        save_tensors_atomic(tensors, out / "mitigated_weights.safetensors",
                            metadata={"model": mitigation.model_fingerprint})  # fmt: skip
    summary.update(extra)

    evaluation = dict(seeds=config.seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size)
    util = dict(seeds=config.utility_seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                **utility_options(config))  # fmt: skip
    if config.baseline is not None:
        before, rows_before = _baseline(config, model, prompts, refs)
    else:
        say("measuring the unmitigated model")
        before, rows_before, _ = evaluate_replication(model, prompts, refs, **evaluation)
    utility_before = utility(model, **util)
    say("measuring the mitigated model")
    after, rows_after, images_after = evaluate_under(model, mitigation, prompts, refs, **evaluation)
    with intervene(model, mitigation):  # no prompt of its own: the union (the mask a released model carries)
        utility_after = utility(model, **util)
    utility_own = _utility_under_own_masks(model, mitigation, prompts.texts, util) if utility_after else None
    save_grid(images_after, out / run_files.MITIGATED_GRID, columns=config.seeds)
    summary.update(before_and_after(before, after, utility_before, utility_after), utility_after_scope="union",
                   utility_after_own=utility_own, similarity=refs.detector.to_dict())  # fmt: skip
    return write_results(out, summary, rows_before, rows_after)


def _utility_under_own_masks(model: DiffusionModel, mitigation, texts: list[str], util: dict) -> float | None:
    """Held-out prompt alignment under each prompt's own mask (NeMo, scope "prompt"), averaged
    over the prompts: the utility that goes with MR measured the same way. ``None`` where every
    prompt runs under one mask (then the union's utility is the only one), and on real models,
    where one utility measurement generates thousands of images: there it is the union's."""
    if not mitigation.has_own_masks or not is_bundled(model):
        return None
    total = 0.0
    for group in each_mask(model, mitigation, texts):
        total += utility(model, **util)["alignment"] * len(group)
    return total / len(texts)


def _select_mask(config, model: DiffusionModel, prompts: PromptSet, refs: References, emb: torch.Tensor, out: Path,
                 say) -> tuple:  # fmt: skip
    """The mitigation mask of ``dori mitigate`` and the numbers that describe it."""
    if config.method == "nemo":
        return select_nemo(config, model, prompts.texts, emb, out, say)

    say("wanda: recording activations")
    scores = wanda_scores_for(model, [emb], config.sites, config.batch_size)
    extra: dict = {"sites": config.sites}
    tried: dict[float, object] = {}  # each rung's mitigation, so the chosen one is not built twice

    def at(ratio: float):
        if ratio not in tried:
            tried[ratio] = wanda_mitigation(model, scores.mask(model, 0, ratio))
        return tried[ratio]

    if config.ratio == "auto":
        def defender_mr(ratio: float) -> float:
            say(f"wanda: ratio {ratio:g} on the defender's seeds")
            return evaluate_under(model, at(ratio), prompts, refs, seeds=config.seeds, first_seed=DEFENDER_FIRST_SEED,
                                  steps=config.steps, guidance=config.guidance, batch_size=config.batch_size)[0]["mr"]  # fmt: skip

        ratio, rungs, satisfied = first_clean_ratio(WANDA_LADDER, defender_mr)
        extra.update({"ratio_rule": "auto", "ladder": list(WANDA_LADDER), "ladder_mr": rungs,
                      "auto_satisfied": satisfied,
                      "defender_seeds": [DEFENDER_FIRST_SEED, DEFENDER_FIRST_SEED + config.seeds - 1]})  # fmt: skip
    else:
        ratio = float(config.ratio)
        extra["ratio_rule"] = "fixed"
    mitigation = at(ratio)
    extra.update({"ratio": ratio, **mask_size(mitigation)})
    return mitigation, extra


def _baseline(config, model: DiffusionModel, prompts: PromptSet, refs: References) -> tuple[dict, list[dict]]:
    """The "before" numbers from a finished ``dori replicate`` run of the same prompts and settings."""
    folder = Path(config.baseline)
    try:
        manifest = json.loads((folder / "config.json").read_text())
        rows = sorted(ResultsFile(folder / "results.jsonl").rows, key=lambda r: r["id"])
    except (OSError, json.JSONDecodeError) as error:
        raise DoriError(f"--baseline {folder} is not a finished 'dori replicate' run; drop --baseline") from error
    theirs = manifest.get("config", {})
    wanted = {"prompts": config.prompts, "type": config.type, "limit": config.limit, "seeds": config.seeds,
              "first_seed": 0, "steps": config.steps, "guidance": config.guidance, "mitigation": None,
              "images": config.images, "sscd": config.sscd}  # fmt: skip
    differ = sorted(k for k, v in wanted.items() if theirs.get(k) != v)
    if manifest.get("command") != "replicate" or differ or [r["prompt"] for r in rows] != prompts.texts:
        raise DoriError(f"--baseline {folder} was run with other settings ({', '.join(differ) or 'prompts'}); "
                        "drop --baseline or point it at a matching replicate run")  # fmt: skip
    return summarize(rows, refs.detector.tau), rows


def select_nemo(config, model, texts, emb, out, say):
    """NeMo's neurons for each of ``texts`` (``emb``), kept per prompt, and the numbers that describe
    the search (dori unlearn runs it too, for its surrogates, when no mitigation is given)."""
    nemo_config, stats, threshold = nemo_for_run(model, config, say)
    say("nemo: localising neurons")
    results = nemo_localize(model, emb, stats, threshold, nemo_config, progress=say)
    per_prompt = {str(i): r.neurons for i, r in enumerate(results)}
    write_json_atomic(out / "neurons.json", per_prompt)
    mitigation = Mitigation("neurons", model.fingerprint(), neurons=union([r.neurons for r in results]), method="nemo",
                            per_prompt={text: r.neurons for text, r in zip(texts, results)}, scope=config.scope)  # fmt: skip
    extra = {
        "scope": config.scope,
        "threshold": threshold,
        "neurons_per_prompt": [sum(len(v) for v in r.neurons.values()) for r in results],
        "memorized_before_check": [r.memorized_before for r in results],
        "mitigated_by_check": [r.mitigated for r in results],
        "initial_ssim": [r.initial_ssim for r in results],
        "refined_ssim": [r.refined_ssim for r in results],
        "refinement_threshold": [r.refinement_threshold for r in results],
        "initial_rounds": [r.rounds for r in results],
        "memorized_seeds": [r.memorized_seeds for r in results],
        "union_neurons": mitigation.size(),
    }
    return mitigation, extra
