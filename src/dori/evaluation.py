"""Measurements every stage shares: replication of a prompt set (under a mitigation, each prompt
under its own mask where it has one) and the held-out utility, remembered per model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.interventions import active_interventions, each_mask, put_rows
from dori.measure.replication import replication, summarize
from dori.models.base import DiffusionModel
from dori.prompts import PromptSet
from dori.references import References, load_prompts, toy_kit_for
from dori.runs import ResultsFile, write_json_atomic


Progress = Callable[[int], None]


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
        put_rows(images, part_images, group, seeds)
    return summarize(rows, refs.detector.tau), rows, images


_UTILITY_MEMO: dict[tuple, dict] = {}
_NETWORKS: dict[tuple, object] = {}  # CLIP / Inception networks and FID reference statistics, loaded once

# Where a real model's utility comes from (sd14:coco: the COCO 2014 validation captions).
UTILITY_PROMPTS = "sd14:coco"
UTILITY_FLAGS = ("clip", "inception", "fid_reference", "utility_prompts")
MISSING_UTILITY = ("utility not measured on this model: pass --clip DIR for the CLIP score, and --inception FILE "
                   "with --fid-reference PATH for FID")  # fmt: skip


def utility_options(config) -> dict:
    """The utility settings of a run config (``clip``, ``inception``, ``fid_reference``, ``utility_prompts``)."""
    return {name: getattr(config, name) for name in UTILITY_FLAGS if hasattr(config, name)}


def check_utility_options(model: DiffusionModel, options: dict) -> None:
    """The real-model utility options fit the model: the bundled kind takes none of them (stages
    call this before their first measurement, so a wrong option fails at once)."""
    given = [name for name in ("clip", "inception", "fid_reference") if options.get(name)]
    if given and toy_kit_for(model) is not None:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise DoriError(f"{flags}: the bundled kind measures utility with its own classifier; these options are for "
                        "real models, so leave them out")  # fmt: skip


def _network(kind: str, path: str, device):
    from dori.measure.utility import ClipScorer, InceptionFeatures

    key = (kind, str(path), str(device))
    if key not in _NETWORKS:
        _NETWORKS[key] = {"clip": ClipScorer, "inception": InceptionFeatures}[kind](path, device=device)
    return _NETWORKS[key]


def _reference(path: str, features) -> tuple:
    from dori.measure.utility import reference_statistics
    from dori.references import load_image

    key = ("fid_reference", str(path), features.path)
    if key not in _NETWORKS:
        _NETWORKS[key] = reference_statistics(path, features, load_image)
    return _NETWORKS[key]


def utility(model: DiffusionModel, *, seeds: int, steps: int, guidance: float, batch_size: int,
            clip: str | None = None, inception: str | None = None, fid_reference: str | None = None,
            utility_prompts: int = 1000) -> dict | None:  # fmt: skip
    """The model's utility: ``alignment`` (how well images follow their captions) and ``fd`` (a
    Frechet distance to real images), with ``measure`` saying what they are.

    - The bundled kind: prompt alignment (its attribute classifier) and FD in the classifier's
      features, on its held-out captions.
    - A real model: the CLIP score (``clip``: a CLIP folder) and FID (``inception``: the Inception
      TorchScript file, ``fid_reference``: real images) of ``utility_prompts`` COCO captions times
      ``seeds``; ``None`` when neither is given (:data:`MISSING_UTILITY` says what to pass).

    The unmitigated model's numbers are remembered for the process (keyed by its weights'
    fingerprint and the settings), so a study measures them once, not once per stage."""
    kit = toy_kit_for(model)
    check_utility_options(model, {"clip": clip, "inception": inception, "fid_reference": fid_reference})
    if kit is None and clip is None and inception is None:
        return None
    hooked = active_interventions(model) > 0  # dori's own hooks only: the position encoding is part of the model
    key = (model.fingerprint(), seeds, steps, guidance, clip, inception, fid_reference, utility_prompts)
    if not hooked and key in _UTILITY_MEMO:
        return dict(_UTILITY_MEMO[key])
    sampling = dict(steps=steps, guidance=guidance, batch_size=batch_size)
    if kit is not None:
        prompts = [row["prompt"] for row in kit.prompt_set("held_out")]
        images = model.generate(model.encode(prompts), list(range(seeds)), **sampling)
        captions = [p for p in prompts for _ in range(seeds)]
        result = {"alignment": kit.alignment(images, captions), "fd": kit.frechet_distance(images, captions),
                  "misses": kit.misses(images, captions),
                  "measure": "held-out prompt alignment; FD in the classifier's features",
                  "prompts": "bundled:held_out", "seeds": seeds}  # fmt: skip
    else:
        prompts = load_prompts(UTILITY_PROMPTS, model, limit=utility_prompts).texts
        result = _real_utility(model, prompts, list(range(seeds)), sampling, clip, inception, fid_reference)
        result.update(prompts=f"{UTILITY_PROMPTS} (first {len(prompts)})", seeds=seeds)
    if not hooked:
        _UTILITY_MEMO[key] = dict(result)
    return result


def _real_utility(model: DiffusionModel, prompts: list[str], seeds: list[int], sampling: dict, clip, inception,
                  fid_reference) -> dict:  # fmt: skip
    """CLIP score and FID of every prompt at every seed, one batch of images at a time (thousands
    of 512 px images would not fit in memory at once)."""
    from dori.measure.utility import frechet_from_statistics, gaussian

    scorer = None if clip is None else _network("clip", clip, model.device)
    features = None if inception is None else _network("inception", inception, model.device)
    reference = None if features is None else _reference(fid_reference, features)  # fails before sampling
    scores, feature_chunks = [], []
    emb = model.encode(prompts)
    for rows, images in model.generate_chunks(emb, seeds, **sampling):
        if scorer is not None:
            scores += scorer.scores(images, [prompts[n // len(seeds)] for n in range(rows.start, rows.stop)])
        if features is not None:
            feature_chunks.append(features(images))
    result = {"alignment": None, "fd": None, "clip_score": None, "fid": None,
              "measure": "CLIP score (100 x cosine, mean over images); FID to the reference images"}  # fmt: skip
    if scorer is not None:
        result["clip_score"] = result["alignment"] = sum(scores) / len(scores)
        result["clip"] = str(clip)
    if features is not None:
        mu, sigma, count = reference
        result["fid"] = result["fd"] = frechet_from_statistics(*gaussian(torch.cat(feature_chunks)), mu, sigma)
        result.update(inception=str(inception), fid_reference=str(fid_reference), fid_reference_images=count)
    return result


def before_and_after(before: dict, after: dict, utility_before: dict | None, utility_after: dict | None) -> dict:
    """A mitigation's summary numbers: MR, similarity and utility of the model before and after."""
    return {
        "mr_before": before["mr"], "mr_after": after["mr"],
        "sscd_mean_before": before["sscd_mean"], "sscd_mean_after": after["sscd_mean"],
        "sscd_std_before": before["sscd_std"], "sscd_std_after": after["sscd_std"],
        "mr_any_planted_before": before.get("mr_any_planted"), "mr_any_planted_after": after.get("mr_any_planted"),
        "utility_before": None if utility_before is None else utility_before["alignment"],
        "utility_after": None if utility_after is None else utility_after["alignment"],
        "fd_before": None if utility_before is None else utility_before["fd"],
        "fd_after": None if utility_after is None else utility_after["fd"],
        "utility_detail_before": utility_before, "utility_detail_after": utility_after,
    }  # fmt: skip


def write_results(out: Path, summary: dict, rows_before: list[dict], rows_after: list[dict]) -> dict:
    """Each prompt's row before and after into ``results.jsonl``, then ``summary.json``."""
    ResultsFile(out / "results.jsonl").extend(
        [{**b, "mr_after": a["mr"], "sscd_mean_after": a["sscd_mean"], "similarities_after": a["similarities"]}
         for b, a in zip(rows_before, rows_after)]  # fmt: skip
    )
    write_json_atomic(out / "summary.json", summary)
    return summary
