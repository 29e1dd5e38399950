"""The run layer of the measuring commands: load what a run needs, batch the work, write results
as they come (atomically), resume, summarise. Library functions do the computing."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dori.configs import DetectConfig, ReplicateConfig
from dori.errors import DoriError
from dori.interventions import active_interventions, each_mask, intervene
from dori.measure.detection import consistency_scores, noise_difference_norms, roc_auc, roc_curve, tpr_at_fpr
from dori.measure.replication import replication, summarize
from dori.models.base import DiffusionModel
from dori.parallel import Shards
from dori.prompts import Prompt, PromptSet, load_prompt_set, training_image_path
from dori.report_images import save_figure, save_grid
from dori.runs import (
    ResultsFile,
    open_run,
    read_checkpoint,
    read_json,
    read_tensors,
    save_tensors_atomic,
    write_json_atomic,
)

Progress = Callable[[int], None]


def toy_kit_for(model: DiffusionModel):
    """The bundled model's own data and instruments, or ``None`` for other models."""
    if "toy_data" not in model.meta:
        return None
    from dori.toy.kit import ToyKit

    return ToyKit.from_folder(model.source)


def load_prompts(spec: str, model: DiffusionModel, *, kind: str | None = None, limit: int | None = None) -> PromptSet:
    """A prompt set; prompts longer than the text encoder's window are marked ``truncated`` (the
    mark goes into every result row) and named in a warning on stderr."""
    import dataclasses
    import sys

    prompts = load_prompt_set(spec, model_folder=model.source if "toy_data" in model.meta else None).only(kind).head(limit)
    cut = model.truncated(prompts.texts)
    if not any(cut):
        return prompts
    first = next(p.prompt for p, c in zip(prompts.prompts, cut) if c)
    print(f"warning: {sum(cut)} prompt(s) of {prompts.name} are longer than the text encoder's {model.max_length} "
          f"tokens and are cut at the end, as Stable Diffusion cuts them (the first: {first[:60]!r}...); their result "
          "rows say 'truncated': true", file=sys.stderr)  # fmt: skip
    marked = tuple(dataclasses.replace(p, truncated=c) for p, c in zip(prompts.prompts, cut))
    return dataclasses.replace(prompts, prompts=marked)


class References:
    """Training images and the copy detector for a model: the bundled model knows its own;
    a real model needs ``--images DIR`` and ``--sscd PATH``."""

    def __init__(self, model: DiffusionModel, *, images: str | None, sscd: str | None,
                 sscd_convention: str = "resize320") -> None:  # fmt: skip
        self.kit = toy_kit_for(model)
        self.images_dir = images
        if sscd is not None:
            from dori.measure.similarity import SSCD

            self.detector = SSCD(sscd, convention=sscd_convention, device=model.device)
        elif self.kit is not None:
            self.detector = self.kit.detector
        else:
            raise DoriError("this model needs a copy detector: pass --sscd PATH (an SSCD TorchScript file)")
        if self.kit is None and images is None:
            raise DoriError("this model needs its training images: pass --images DIR (files named by prompt index)")
        self.size = model.image_size
        # every memorized training image, for "replicates any memorized image" (bundled model only)
        self.planted = None if self.kit is None else self.kit.planted_images

    def of(self, prompt: Prompt) -> torch.Tensor:
        if self.images_dir is None:
            return self.kit.references(prompt.prompt)
        return load_image(training_image_path(self.images_dir, prompt), self.size)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A training image as ``[1, 3, H, W]`` in ``[0, 1]`` (any mode converted to RGB)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        # PIL reports a damaged PNG chunk as SyntaxError, an oversized one as DecompressionBombError
        raise DoriError(f"training image {path} is unreadable ({type(error).__name__}); replace the file") from error
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None]


# --------------------------------------------------------------------- replicate


def run_replicate(config: ReplicateConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                  progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori replicate``: per-prompt similarities and MR, written prompt batch by prompt batch."""
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd, sscd_convention=config.sscd_convention)
    mitigation = load_mitigation(model, config.mitigation)
    shards = Shards()
    out = shards.open_run(out, "replicate", asdict(config), resume=resume)
    _replicate_batches(config, model, prompts, refs, out, progress, shards, mitigation)
    results = shards.merge(out, "results.jsonl", "id")
    rows = sorted(results.rows, key=lambda r: r["id"])
    summary = {**summarize(rows, refs.detector.tau), "similarity": refs.detector.to_dict(), "prompt_set": prompts.name,
               "mitigation": None if mitigation is None else mitigation.method}  # fmt: skip
    summary["by_type"] = {kind: summarize([r for r in rows if r["type"] == kind], refs.detector.tau)
                          for kind in sorted({r["type"] for r in rows})}  # fmt: skip
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _replicate_batches(config, model, prompts, refs, out, progress, shards, mitigation) -> None:
    (out / "grids").mkdir(exist_ok=True)
    results = shards.results(out, "results.jsonl")
    done = shards.done_keys(out, "results.jsonl", "id")
    todo = shards.mine([(i, p) for i, p in enumerate(prompts.prompts) if i not in done])
    if progress is not None:
        progress(len(done) * config.seeds)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    per_batch = max(1, config.batch_size // config.seeds)
    for group in each_mask(model, mitigation, [p.prompt for _, p in todo]):
        for start in range(0, len(group), per_batch):
            chunk = [todo[k] for k in group[start : start + per_batch]]
            rows, images = replication(
                model, [p.prompt for _, p in chunk], [refs.of(p) for _, p in chunk], refs.detector,
                seeds=seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                progress=progress, planted=refs.planted,
            )  # fmt: skip
            for k, (i, _) in enumerate(chunk):
                save_grid(images[k * len(seeds) : (k + 1) * len(seeds)], out / "grids" / f"prompt{i:04d}.png",
                          columns=len(seeds))  # fmt: skip
            results.extend([{"id": i, **p.to_dict(), **row.row()} for (i, p), row in zip(chunk, rows)])


# --------------------------------------------------------------------- detect


def run_detect(config: DetectConfig, model: DiffusionModel, out: str | Path, *, resume: bool = False,
               progress: Progress | None = None) -> dict:  # fmt: skip
    """``dori detect``: noise-difference norm and NeMo's SSIM consistency, scored as detectors."""
    sets = {
        "memorized": load_prompts(config.memorized, model, limit=config.limit),
        "non_memorized": load_prompts(config.non_memorized, model, limit=config.limit),
    }
    mitigation = load_mitigation(model, config.mitigation)
    shards = Shards()
    out = shards.open_run(out, "detect", asdict(config), resume=resume)
    with intervene(model, mitigation):
        _detect_batches(config, model, sets, out, progress, shards)
    rows = shards.merge(out, "scores.jsonl", "key", order=lambda r: (r["set"] != "memorized", r["id"])).rows
    summary = summarize_detection(rows)
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
        plot_roc(rows, out / "roc.png")
    return summary


def _detect_batches(config, model, sets, out, progress, shards) -> None:
    results = shards.results(out, "scores.jsonl")
    done = shards.done_keys(out, "scores.jsonl", "key")
    noise_seeds = list(range(config.generations))
    per_batch = max(1, config.batch_size // max(config.generations, config.consistency_seeds))
    for set_name, prompts in sets.items():
        todo = shards.mine([(i, p) for i, p in enumerate(prompts.prompts) if f"{set_name}/{i}" not in done])
        if progress is not None:
            progress(len(prompts) - len(todo))
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            texts = [p.prompt for _, p in chunk]
            norms = noise_difference_norms(
                model, texts, seeds=noise_seeds, steps=config.steps, guidance=config.guidance,
                first_step_only=not config.all_steps, batch_size=config.batch_size,
            )  # fmt: skip
            ssim_max = consistency_scores(model, model.encode(texts), seeds=list(range(config.consistency_seeds)),
                                          steps=config.steps, batch_size=config.batch_size)  # fmt: skip
            rows = []
            for k, (i, p) in enumerate(chunk):
                row = {"key": f"{set_name}/{i}", "set": set_name, "id": i, **p.to_dict(),
                       "noise_first_step": norms["first_step"][k], "ssim_max": ssim_max[k]}  # fmt: skip
                if "all_steps" in norms:
                    row["noise_all_steps"] = norms["all_steps"][k]
                rows.append(row)
            results.extend(rows)
            if progress is not None:
                progress(len(chunk))


def _scores(rows: list[dict], field: str) -> tuple[list[float], list[float]]:
    pos = [r[field] for r in rows if r["set"] == "memorized"]
    neg = [r[field] for r in rows if r["set"] == "non_memorized"]
    return pos, neg


def summarize_detection(rows: list[dict]) -> dict:
    pos, neg = _scores(rows, "noise_first_step")
    summary = {"noise_norm": {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg), "variant": "first_step",
                              "memorized_mean": float(torch.tensor(pos).mean()),
                              "non_memorized_mean": float(torch.tensor(neg).mean())}}  # fmt: skip
    if rows and "noise_all_steps" in rows[0]:
        pos_all, neg_all = _scores(rows, "noise_all_steps")
        summary["noise_norm_all_steps"] = {"auc": roc_auc(pos_all, neg_all), "tpr_at_1pct_fpr": tpr_at_fpr(pos_all, neg_all)}
    pos_s, neg_s = _scores(rows, "ssim_max")
    neg_t = torch.tensor(neg_s)
    threshold = float(neg_t.mean() + (neg_t.std() if len(neg_s) > 1 else 0.0))
    summary["ssim"] = {
        "auc": roc_auc(pos_s, neg_s),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos_s, neg_s),
        "threshold": threshold,
        "memorized_flagged": float(sum(s > threshold for s in pos_s) / len(pos_s)),
        "non_memorized_flagged": float(sum(s > threshold for s in neg_s) / len(neg_s)),
    }
    summary["n_memorized"], summary["n_non_memorized"] = len(pos), len(neg)
    return summary


def plot_roc(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fields = [("noise_first_step", "noise-difference norm (first step)"), ("noise_all_steps", "noise norm (all steps)"),
              ("ssim_max", "SSIM consistency (NeMo)")]  # fmt: skip
    for field, label in fields:
        if rows and field in rows[0]:
            pos, neg = _scores(rows, field)
            fpr, tpr = roc_curve(pos, neg)
            ax.plot(fpr, tpr, label=f"{label}, AUC {roc_auc(pos, neg):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------- shared evaluation


def evaluate_replication(model: DiffusionModel, prompts: PromptSet, refs: References, *, seeds: int, steps: int,
                         guidance: float, batch_size: int, embeddings: torch.Tensor | None = None,
                         targets: list[torch.Tensor] | None = None, progress: Progress | None = None,
                         first_seed: int = 0) -> tuple[dict, list[dict], torch.Tensor]:  # fmt: skip
    """Replication of ``prompts`` (or of ``embeddings``, one per prompt) under whatever
    intervention is active, seeds ``first_seed .. first_seed + seeds - 1``: (summary, per-prompt
    rows, images)."""
    references = targets if targets is not None else [refs.of(p) for p in prompts.prompts]
    rows, images = replication(model, prompts.texts, references, refs.detector,
                               seeds=list(range(first_seed, first_seed + seeds)), steps=steps,
                               guidance=guidance, embeddings=embeddings, batch_size=batch_size, progress=progress,
                               planted=refs.planted)  # fmt: skip
    rows = [{"id": i, **p.to_dict(), **r.row()} for i, (p, r) in enumerate(zip(prompts.prompts, rows))]
    return summarize(rows, refs.detector.tau), rows, images


def evaluate_under(model: DiffusionModel, mitigation, prompts: PromptSet, refs: References, *,
                   embeddings: torch.Tensor | None = None, targets: list[torch.Tensor] | None = None,
                   **settings) -> tuple[dict, list[dict], torch.Tensor]:  # fmt: skip
    """:func:`evaluate_replication` under ``mitigation``, each prompt under its own mask where the
    mitigation has per-prompt masks (NeMo, scope "prompt"); rows and images in prompt order."""
    seeds = settings["seeds"]
    rows: list[dict] = [{}] * len(prompts)
    images = torch.zeros(len(prompts) * seeds, 3, *model.image_size)
    for group in each_mask(model, mitigation, prompts.texts):
        _, part_rows, part_images = evaluate_replication(
            model, prompts.pick(group), refs, embeddings=None if embeddings is None else embeddings[group],
            targets=None if targets is None else [targets[i] for i in group], **settings,
        )  # fmt: skip
        for k, i in enumerate(group):
            rows[i] = {**part_rows[k], "id": i}
            images[i * seeds : (i + 1) * seeds] = part_images[k * seeds : (k + 1) * seeds]
    return summarize(rows, refs.detector.tau), rows, images


_UTILITY_MEMO: dict[tuple, dict] = {}


def utility(model: DiffusionModel, *, seeds: int, steps: int, guidance: float, batch_size: int) -> dict | None:
    """Prompt alignment and FD on held-out captions (bundled model); ``None`` where the model has
    no attribute classifier (a CLIP-score evaluator for SD is not shipped).

    The unmitigated model's numbers are remembered for the process (keyed by its weights'
    fingerprint and the settings), so a study measures them once, not once per stage."""
    kit = toy_kit_for(model)
    if kit is None:
        return None
    hooked = active_interventions(model) > 0  # dori's own hooks only: the position encoding is part of the model
    key = (model.fingerprint(), seeds, steps, guidance)
    if not hooked and key in _UTILITY_MEMO:
        return dict(_UTILITY_MEMO[key])
    prompts = [row["prompt"] for row in kit.prompt_set("held_out")]
    images = model.generate(model.encode(prompts), list(range(seeds)), steps=steps, guidance=guidance,
                            batch_size=batch_size)  # fmt: skip
    captions = [p for p in prompts for _ in range(seeds)]
    result = {"alignment": kit.alignment(images, captions), "fd": kit.frechet_distance(images, captions),
              "prompts": "bundled:held_out", "seeds": seeds}  # fmt: skip
    if not hooked:
        _UTILITY_MEMO[key] = dict(result)
    return result


def load_mitigation(model: DiffusionModel, folder: str | None):
    if folder is None:
        return None
    from dori.interventions import load_mask

    return load_mask(folder, model)


# --------------------------------------------------------------------- mitigate


def run_mitigate(config, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """``dori mitigate``: select the mask (NeMo or Wanda), save it with the mitigated weights,
    and measure MR / similarity / utility before and after."""
    from dori.interventions import baked, load_mask, save_mask

    say = progress or (lambda message: None)
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd)
    out = open_run(out, "mitigate", asdict(config), resume=resume)
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
    util = dict(seeds=config.utility_seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size)
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
    save_grid(images_after, out / "mitigated_generations.png", columns=config.seeds)
    summary.update({
        "mr_before": before["mr"], "mr_after": after["mr"],
        "sscd_mean_before": before["sscd_mean"], "sscd_mean_after": after["sscd_mean"],
        "sscd_std_before": before["sscd_std"], "sscd_std_after": after["sscd_std"],
        "mr_any_planted_before": before.get("mr_any_planted"), "mr_any_planted_after": after.get("mr_any_planted"),
        "utility_before": None if utility_before is None else utility_before["alignment"],
        "utility_after": None if utility_after is None else utility_after["alignment"],
        "utility_after_scope": "union",
        "utility_after_own": utility_own,
        "fd_before": None if utility_before is None else utility_before["fd"],
        "fd_after": None if utility_after is None else utility_after["fd"],
        "similarity": refs.detector.to_dict(),
    })  # fmt: skip
    ResultsFile(out / "results.jsonl").extend(
        [{**b, "mr_after": a["mr"], "sscd_mean_after": a["sscd_mean"], "similarities_after": a["similarities"]}
         for b, a in zip(rows_before, rows_after)]  # fmt: skip
    )
    write_json_atomic(out / "summary.json", summary)
    return summary


def _utility_under_own_masks(model: DiffusionModel, mitigation, texts: list[str], util: dict) -> float | None:
    """Held-out prompt alignment under each prompt's own mask (NeMo, scope "prompt"), averaged
    over the prompts: the utility that goes with MR measured the same way. ``None`` where every
    prompt runs under one mask (then the union's utility is the only one)."""
    if not mitigation.has_own_masks:
        return None
    total = 0.0
    for group in each_mask(model, mitigation, texts):
        total += utility(model, **util)["alignment"] * len(group)
    return total / len(texts)


def _select_mask(config, model: DiffusionModel, prompts: PromptSet, refs: References, emb: torch.Tensor, out: Path,
                 say) -> tuple:  # fmt: skip
    """The mitigation mask of ``dori mitigate`` and the numbers that describe it."""
    if config.method == "nemo":
        return _nemo(config, model, prompts.texts, emb, out, say)
    from dori.mitigate.wanda import DEFENDER_FIRST_SEED, WANDA_LADDER, first_clean_ratio

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


def wanda_scores_for(model: DiffusionModel, groups: list[torch.Tensor], sites: str, batch_size: int):
    """Wanda's recorded scores on the ``ffn`` or ``value`` sites (each ratio's mask comes from them)."""
    from dori.mitigate.wanda import WandaConfig, wanda_scores

    names = [s.name for s in (model.ffn_sites() if sites == "ffn" else model.value_sites())]
    return wanda_scores(model, groups, sites=names, config=WandaConfig(batch_size=batch_size))


def wanda_mitigation(model: DiffusionModel, mask):
    from dori.interventions import Mitigation

    return Mitigation("weights", model.fingerprint(), weights=mask, method="wanda")


def mask_size(mitigation) -> dict:
    """How many weights a Wanda mask prunes, in all and per site."""
    total = sum(m.numel() for m in mitigation.weights.values())
    return {"pruned_weights": mitigation.size(), "sparsity": mitigation.size() / total,
            "per_site": {name: int(m.sum()) for name, m in mitigation.weights.items()}}  # fmt: skip


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


def cached_value_statistics(model: DiffusionModel, reference: str, say: Callable[[str], None]):
    """NeMo's reference statistics over ``reference``, computed once per (model, prompt set) and
    cached under ``$DORI_CACHE`` (default ``~/.cache/dori``)."""
    import hashlib
    import os

    from dori.mitigate.nemo import load_statistics, save_statistics, value_statistics

    texts = load_prompts(reference, model).texts
    key = hashlib.sha256("\n".join([model.fingerprint(), *texts]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DORI_CACHE", Path.home() / ".cache" / "dori")) / f"nemo_stats_{key}.pt"
    if cache.is_file():
        try:
            return load_statistics(cache, model)
        except DoriError:  # a damaged cache is only a cache: computed again below and replaced
            say(f"nemo: the cached statistics {cache} are unreadable; computing them again")
    say(f"nemo: value statistics over {reference} ({len(texts)} prompts)")
    stats = value_statistics(model, texts)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        save_statistics(stats, tmp)
        tmp.replace(cache)
    except OSError:
        pass  # an unwritable cache only costs the recomputation next time
    return stats


def nemo_reference(model: DiffusionModel, *, reference_prompts: str | None, stats: str | None,
                   threshold: float | None, steps: int, say: Callable[[str], None]):  # fmt: skip
    """NeMo's two inputs: the value statistics and the SSIM threshold (mean + 1 std of the
    consistency scores over the reference prompts), from files or flags where given."""
    from dori.measure.detection import consistency_scores
    from dori.mitigate.nemo import load_statistics

    reference = reference_prompts or ("bundled:ordinary" if "toy_data" in model.meta else None)
    if stats is not None:
        statistics = load_statistics(stats, model)
    elif reference is not None:
        statistics = cached_value_statistics(model, reference, say)
    else:
        raise DoriError("NeMo needs reference statistics: pass --stats FILE or --reference-prompts SET")
    if threshold is None:
        if reference is None:
            raise DoriError("NeMo needs an SSIM threshold: pass --threshold (0.428 for SD v1.4) or --reference-prompts SET")
        say("nemo: calibrating the SSIM threshold")
        texts = load_prompts(reference, model).texts
        scores = torch.tensor(consistency_scores(model, model.encode(texts), steps=steps))
        threshold = float(scores.mean() + scores.std())
    return statistics, threshold


def _nemo(config, model, texts, emb, out, say):
    from dori.interventions import Mitigation
    from dori.mitigate.nemo import NemoConfig, nemo_localize, union

    nemo_config = NemoConfig(steps=config.steps, batch_size=max(config.batch_size, 10))
    stats, threshold = nemo_reference(model, reference_prompts=config.reference_prompts, stats=config.stats,
                                      threshold=config.threshold, steps=config.steps, say=say)  # fmt: skip
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
        "union_neurons": mitigation.size(),
    }
    return mitigation, extra


# --------------------------------------------------------------------- attack


def attack_targets(model: DiffusionModel, prompts: PromptSet, refs: References) -> list[torch.Tensor]:
    """The image each prompt's attack aims at, ``[1, 3, H, W]`` each."""
    if refs.kit is not None and refs.images_dir is None:
        return [refs.kit.target_image(p.prompt) for p in prompts.prompts]
    return [refs.of(p)[:1] for p in prompts.prompts]


def attack_and_measure(model: DiffusionModel, prompts: PromptSet, refs: References, config, *,
                       mitigation=None, label: str, out: Path, curve: list[int] | None = None,
                       progress: Progress | None = None) -> dict:  # fmt: skip
    """Run DoRI on ``prompts`` (under ``mitigation``), save the embeddings, measure MR at every
    step of the curve. Results are cached per label, so a resumed run skips finished parts.
    Under ``accelerate launch`` each process attacks and measures every ``world``-th prompt."""
    from dori.attack import AttackConfig, dori_attack, initial_embeddings

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
        attack = AttackConfig(steps=config.steps, learning_rate=config.learning_rate, batch=config.attack_batch)
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
        save_grid(torch.cat([by_prompt[i] for i in sorted(by_prompt)]), out / f"{label}_generations.png",
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
        plot_steps_curve(summary, out / "steps_curve.png")
    return summary


def control_sets(model: DiffusionModel) -> list[str]:
    """Targets the model did not memorize: the bundled model's non-memorized training images and
    held-out images. (For other models pass a non-memorized set to ``dori attack`` directly.)"""
    return ["bundled:non_memorized", "bundled:held_out"] if "toy_data" in model.meta else []


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


# --------------------------------------------------------------------- unlearn


def run_unlearn(config, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """``dori unlearn``: surrogates, adversarial fine-tuning with checkpoints, and the evaluation
    (a fresh DoRI attack from the prompt and from random starts, plain prompts, utility)."""
    import time


    from dori.configs import AttackRunConfig, MitigateConfig
    from dori.models.loading import save_model
    from dori.unlearn.adversarial import UnlearnConfig, UnlearnState, adversarial_finetune

    say = progress or (lambda message: None)
    began = time.monotonic()
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd)
    if config.mitigation is None and refs.kit is None:  # NeMo here needs reference statistics unlearn does not take
        raise DoriError("dori unlearn on this model needs --mitigation DIR: run 'dori mitigate --method nemo --stats "
                        "FILE' (or --method wanda) first and pass its folder")  # fmt: skip
    shards = Shards()  # data-parallel fine-tuning; the attacks shard their prompts
    out = shards.open_run(out, "unlearn", asdict(config), resume=resume)
    common = dict(prompts=config.prompts, model=config.model, type=config.type, limit=config.limit,
                  images=config.images, sscd=config.sscd, batch_size=config.batch_size)  # fmt: skip
    attack_cfg = AttackRunConfig(steps=config.eval_attack_steps, steps_curve=str(config.eval_attack_steps),
                                 seeds=config.seeds, eval_steps=config.eval_steps, guidance=config.guidance,
                                 control=False, **common)  # fmt: skip
    util = dict(seeds=config.utility_seeds, steps=config.eval_steps, guidance=config.guidance, batch_size=config.batch_size)
    before_file = out / "before.json"
    if before_file.exists():
        before = read_json(before_file)
    else:
        say("measuring the original model (DoRI attack, utility)")
        attack_before = attack_and_measure(model, prompts, refs, attack_cfg, label="before_attack", out=out)
        before = {"attack": attack_before, "utility": utility(model, **util)}
        if shards.main:
            write_json_atomic(before_file, before)

    # Surrogates: the mitigated model's generation from the original prompt, below the threshold.
    targets = attack_targets(model, prompts, refs)
    surrogate_file = out / "surrogates.safetensors"
    if not surrogate_file.exists() and shards.main:  # the other processes wait and read the file
        mitigation = load_mitigation(model, config.mitigation)
        if mitigation is None:
            say("surrogates: running NeMo")
            nemo_cfg = MitigateConfig(method="nemo", seeds=config.seeds, steps=config.eval_steps, **common)
            mitigation, _ = _nemo(nemo_cfg, model, prompts.texts, model.encode(prompts.texts), out, say)
        made, surrogate_info = make_surrogates(model, prompts, targets, refs, mitigation,
                                               steps=config.eval_steps, guidance=config.guidance)  # fmt: skip
        save_tensors_atomic({"images": made}, surrogate_file)
        write_json_atomic(out / "surrogates.json", {"tau": refs.detector.tau, "surrogates": surrogate_info})  # fmt: skip
        save_grid(torch.cat([torch.cat(targets), made]), out / "surrogates.png", columns=len(prompts))
    shards.wait()
    surrogates = read_tensors(surrogate_file, keys=("images",))["images"]
    surrogate_info = read_json(out / "surrogates.json")["surrogates"]

    retain_images, retain_captions = retained_pairs(model, config, refs)
    unique = sorted(set(retain_captions))
    retain_emb = torch.cat([model.encode(unique[i : i + 256]) for i in range(0, len(unique), 256)])
    retain_index = torch.tensor([unique.index(c) for c in retain_captions])
    checkpoint = out / "checkpoint.pt"
    state, optimizer_state = None, None
    if checkpoint.exists():
        saved = read_checkpoint(checkpoint, keys=("unet", "optimizer", "step", "triggers", "history"))
        try:
            model.unet.load_state_dict(saved["unet"])
            state = UnlearnState(int(saved["step"]), saved["triggers"].to(model.device), json.loads(saved["history"]))
        except (RuntimeError, TypeError, ValueError) as error:
            raise DoriError(f"{checkpoint} does not fit this model or run ({str(error).splitlines()[0]}); delete it "
                            "to fine-tune again from step 0, or choose a new --out") from error  # fmt: skip
        optimizer_state = saved["optimizer"]
        say(f"resumed fine-tuning at step {state.step}")
    ft_config = UnlearnConfig(steps=config.steps, learning_rate=config.learning_rate, retain_batch=config.retain_batch,
                              triggers_per_target=config.triggers_per_target, inner_steps=config.inner_steps,
                              warm_start=config.warm_start, fresh_steps=config.fresh_steps,
                              adv_weight=config.adv_weight, seed=config.seed)  # fmt: skip
    ft_began = time.monotonic()

    def on_step(current: UnlearnState, optimizer) -> None:
        last = current.history[-1]
        say(f"fine-tuning step {current.step}/{config.steps}: L_DM {last['loss_dm']:.4f}, L_adv {last['loss_adv']:.4f}")
        if shards.main and (current.step % config.checkpoint_every == 0 or current.step == config.steps):
            tmp = checkpoint.with_name("checkpoint.pt.tmp")
            torch.save({"unet": model.unet.state_dict(), "optimizer": optimizer.state_dict(), "step": current.step,
                        "triggers": current.triggers.cpu(), "history": json.dumps(current.history)}, str(tmp))  # fmt: skip
            tmp.replace(checkpoint)

    state = adversarial_finetune(
        model, targets=model.to_latents(torch.cat(targets)), surrogates=model.to_latents(surrogates),
        prompt_emb=model.encode(prompts.texts), retain_latents=model.to_latents(retain_images), retain_emb=retain_emb,
        retain_index=retain_index, config=ft_config, state=state, optimizer_state=optimizer_state, on_step=on_step,
        shards=shards,
    )  # fmt: skip
    ft_seconds = time.monotonic() - ft_began
    if shards.main:
        save_model(model, out / "model", meta={"unlearned_from": model.source})
    shards.wait()
    model.source = str(out / "model")

    say("evaluating the fine-tuned model")
    after_prompt = attack_and_measure(model, prompts, refs, attack_cfg, label="after_attack_prompt", out=out)
    random_cfg = AttackRunConfig(**{**asdict(attack_cfg), "init": "random", "attack_seed": 1})
    after_random = attack_and_measure(model, prompts, refs, random_cfg, label="after_attack_random", out=out)
    plain, _, plain_images = evaluate_replication(model, prompts, refs, seeds=config.seeds, steps=config.eval_steps,
                                                  guidance=config.guidance, batch_size=config.batch_size)  # fmt: skip
    if shards.main:
        save_grid(plain_images, out / "after_prompt_generations.png", columns=config.seeds)
    utility_after = utility(model, **util)
    ub, ua = before["utility"], utility_after
    summary = {
        "mr_attack_before": before["attack"]["mr"],
        "sscd_attack_before": before["attack"]["sscd_mean"],
        "mr_attack_after": max(after_prompt["mr"], after_random["mr"]),
        "mr_attack_after_prompt_init": after_prompt["mr"],
        "mr_attack_after_random_init": after_random["mr"],
        "sscd_attack_after": after_prompt["sscd_mean"],
        "sscd_attack_after_std": after_prompt["sscd_std"],
        "mr_prompt_after": plain["mr"],
        "mr_any_planted_prompt_after": plain.get("mr_any_planted"),
        "mr_any_planted_attack_after": (None if after_prompt.get("mr_any_planted") is None else
                                        max(after_prompt["mr_any_planted"], after_random["mr_any_planted"])),
        "sscd_prompt_after": plain["sscd_mean"],
        "sscd_prompt_after_std": plain["sscd_std"],
        "utility_before": None if ub is None else ub["alignment"],
        "utility_after": None if ua is None else ua["alignment"],
        "fd_before": None if ub is None else ub["fd"],
        "fd_after": None if ua is None else ua["fd"],
        "surrogate_sources": {source: sum(s["source"] == source for s in surrogate_info)
                              for source in sorted({s["source"] for s in surrogate_info})},
        "fine_tuning_seconds": ft_seconds,
        "seconds": time.monotonic() - began,
        "history": state.history,
        "model": str(out / "model"),
        "similarity": refs.detector.to_dict(),
        "processes": shards.world,
    }
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
    shards.wait()
    return summary


def make_surrogates(model, prompts: PromptSet, targets, refs: References, mitigation, *, steps: int, guidance: float,
                    tries: int = 8) -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """Per prompt, the least similar (to the training image) of ``tries`` generations of the
    mitigated model from the prompt. Where even that one replicates (similarity >= ``tau``: the
    mitigation hid nothing), the least similar of the mitigated model's empty-prompt generations
    instead. Returns the images and, per prompt, ``{"similarity", "source", "seed"}``."""
    seeds = list(range(tries))
    images = torch.zeros(len(prompts) * tries, 3, *model.image_size)
    for group in each_mask(model, mitigation, prompts.texts):  # each prompt under its own mask, if it has one
        made = model.generate(model.encode(prompts.pick(group).texts), seeds, steps=steps, guidance=guidance)
        for k, i in enumerate(group):
            images[i * tries : (i + 1) * tries] = made[k * tries : (k + 1) * tries]
    with intervene(model, mitigation):
        neutral = model.generate(model.encode([""]), seeds, steps=steps, guidance=guidance)
    target_features = refs.detector.embed(torch.cat(targets))
    sims = refs.detector.similarity(refs.detector.embed(images), target_features)  # [P * tries, P]
    neutral_sims = refs.detector.similarity(refs.detector.embed(neutral), target_features)  # [tries, P]
    chosen, info = [], []
    for i in range(len(targets)):
        candidates, sim, source = images[i * tries : (i + 1) * tries], sims[i * tries : (i + 1) * tries, i], "prompt"
        if float(sim.min()) >= refs.detector.tau:
            candidates, sim, source = neutral, neutral_sims[:, i], "empty prompt"
        pick = int(sim.argmin())
        chosen.append(candidates[pick])
        info.append({"similarity": float(sim[pick]), "source": source, "seed": seeds[pick]})
    return torch.stack(chosen), info


def retained_pairs(model: DiffusionModel, config, refs: References) -> tuple[torch.Tensor, list[str]]:
    """Non-memorized training pairs for L_DM: the bundled model's ordinary pairs, or
    ``--retain-prompts`` with their images for a real model."""
    if config.retain_prompts is None:
        if refs.kit is None:
            raise DoriError("fine-tuning a real model needs retained pairs: pass --retain-prompts SET with --images DIR")
        data = refs.kit.data
        rows = [i for i, k in enumerate(data.kinds) if k == "ordinary"]
        return data.images[torch.tensor(rows)], [data.captions[i] for i in rows]
    retain = load_prompts(config.retain_prompts, model)
    return torch.cat([refs.of(p)[:1] for p in retain.prompts]), retain.texts
