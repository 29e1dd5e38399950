"""Stage 5 of METHOD.md: is memorization local?

For each analysed memorized image, the DoRI attack (the same ``dori_attack``) runs from many random
initialisations at once; the embeddings it finds are the image's *triggers* (Y_adv). Three views:

- **embedding**: how far apart the triggers are (pairwise L2 and cosine distance), how far each
  moved from its own initialisation, and the same distances among the embeddings of different
  non-memorized prompts; a 2-D projection (PCA and t-SNE) of initialisations and triggers.
- **activation**: per site, the mean pairwise L2 distance between the site's activations for the
  triggers of one image and for different memorized prompts (Y_mem), with the noise and the
  timestep held fixed.
- **weight_agreement**: NeMo's neuron selection and Wanda's weight selection run on each trigger as
  if it were a prompt; per site, the mean pairwise IoU of the selected sets (two empty sets count
  as 1), for triggers and for the memorized prompts.

If memorization were local, the triggers of one image would gather in one region, share their
activations and select the same neurons and weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dori.configs import LocalityConfig
from dori.interventions import capture
from dori.models.base import DiffusionModel
from dori.report_images import save_figure

Say = Callable[[str], None]


# --------------------------------------------------------------------- statistics


def pairwise_distances(x: Tensor) -> dict:
    """Mean / std / median of the pairwise L2 and cosine distances among the rows of ``x``
    (any shape ``[N, ...]``, flattened; ``N >= 2``)."""
    flat = x.detach().flatten(1).double()
    first, second = torch.triu_indices(len(flat), len(flat), offset=1)
    l2 = torch.cdist(flat, flat)[first, second]
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = 1 - (unit @ unit.T)[first, second]
    return {"n": len(flat), "l2_mean": float(l2.mean()), "l2_std": float(l2.std()) if len(l2) > 1 else 0.0,
            "l2_median": float(l2.median()), "cosine_mean": float(cosine.mean()),
            "cosine_std": float(cosine.std()) if len(cosine) > 1 else 0.0}  # fmt: skip


def mean_pairwise_l2(x: Tensor) -> float:
    flat = x.detach().flatten(1).double()
    first, second = torch.triu_indices(len(flat), len(flat), offset=1)
    return float(torch.cdist(flat, flat)[first, second].mean())


def iou(a: set | Tensor, b: set | Tensor) -> float:
    """Intersection over union of two sets (or two boolean masks); two empty sets give 1."""
    if isinstance(a, Tensor):
        union = int((a | b).sum())
        return 1.0 if union == 0 else int((a & b).sum()) / union
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def mean_pairwise_iou(selections: list) -> float | None:
    """``None`` for fewer than two selections (no pair: undefined, written as null)."""
    pairs = list(itertools.combinations(range(len(selections)), 2))
    return float(sum(iou(selections[i], selections[j]) for i, j in pairs) / len(pairs)) if pairs else None


def _mean(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


# --------------------------------------------------------------------- views


def site_activations(model: DiffusionModel, emb: Tensor, sites: list[str], *, seed: int, steps: int,
                     batch_size: int) -> dict[str, Tensor]:  # fmt: skip
    """Each site's output ``[N, ...]`` for every embedding, at the first sampling step of an
    ``steps``-step schedule on the same noise (seed ``seed``) for all of them."""
    timestep = model.ddim_scheduler(steps).timesteps[0]
    noise = model.initial_noise([seed])
    records: dict[str, list[Tensor]] = {name: [] for name in sites}

    def keep(name: str, value: Tensor) -> None:
        records[name].append(value.float().cpu())

    with torch.no_grad(), capture(model, sites, reduce=keep):
        for start in range(0, emb.shape[0], batch_size):
            chunk = emb[start : start + batch_size].to(model.device, model.dtype)
            model.predict_noise(noise.expand(chunk.shape[0], -1, -1, -1), timestep, chunk)
    return {name: torch.cat(values) for name, values in records.items()}


def activation_view(model: DiffusionModel, triggers: list[Tensor], mem: Tensor, *, seed: int, steps: int,
                    batch_size: int) -> dict:  # fmt: skip
    """Per site: mean pairwise activation distance among each target's triggers (averaged over
    targets) and among the memorized prompts."""
    sites = [s.name for s in model.value_sites()] + [s.name for s in model.ffn_sites()]
    kind = {s.name: "value" for s in model.value_sites()} | {s.name: "ffn" for s in model.ffn_sites()}
    acts_mem = site_activations(model, mem, sites, seed=seed, steps=steps, batch_size=batch_size)
    acts_adv = [site_activations(model, t, sites, seed=seed, steps=steps, batch_size=batch_size) for t in triggers]
    rows = []
    for name in sites:
        adv = sum(mean_pairwise_l2(a[name]) for a in acts_adv) / len(acts_adv)
        mem_d = mean_pairwise_l2(acts_mem[name])
        rows.append({"site": name, "kind": kind[name], "adv": adv, "mem": mem_d, "ratio": adv / max(mem_d, 1e-12)})
    ratios = torch.tensor([r["ratio"] for r in rows])
    value_ratios = torch.tensor([r["ratio"] for r in rows if r["kind"] == "value"])
    return {"sites": rows, "ratio_median": float(ratios.median()),
            "ratio_median_value_sites": float(value_ratios.median()) if len(value_ratios) else None,
            "sites_adv_above_mem": sum(r["adv"] > r["mem"] for r in rows), "n_sites": len(rows),
            "timestep": "first sampling step", "noise_seed": seed}  # fmt: skip


def weight_agreement_view(model: DiffusionModel, groups: list[Tensor], mem: Tensor, config: LocalityConfig,
                          say: Say) -> dict:  # fmt: skip
    """NeMo and Wanda run on each trigger (each group: one target's triggers) and on each memorized
    prompt; per site, the mean pairwise IoU within each target's triggers and among the prompts."""
    from dori.mitigate.nemo import nemo_localize
    from dori.mitigate.nemo_reference import nemo_for_run
    from dori.mitigate.wanda import SD14_FFN_CANDIDATES, WandaConfig, candidates_per_row, wanda_scores

    nemo_config, stats, threshold = nemo_for_run(model, config, say)
    every = torch.cat([*groups, mem])
    say(f"locality: NeMo on {len(every)} embeddings")
    nemo = nemo_localize(model, every, stats, threshold, nemo_config)
    wanda_sites = [s.name for s in (model.ffn_sites() if config.wanda_sites == "ffn" else model.value_sites())]
    say(f"locality: Wanda on {len(every)} embeddings")
    scores = wanda_scores(model, [every[i : i + 1] for i in range(len(every))], sites=wanda_sites,
                          config=WandaConfig(ratio=config.ratio, batch_size=config.batch_size))  # fmt: skip
    wanda = [scores.mask(model, i, config.ratio) for i in range(len(every))]
    bounds, start = [], 0
    for g in groups:
        bounds.append(range(start, start + len(g)))
        start += len(g)
    mem_rows = range(start, len(every))
    nemo_sets = [{name: set(r.neurons.get(name, [])) for name in (s.name for s in model.value_sites())} for r in nemo]

    def table(selections: list[dict], names: list[str]) -> list[dict]:
        rows = []
        for name in names:
            adv = [mean_pairwise_iou([selections[i][name] for i in rng]) for rng in bounds]
            rows.append({"site": name, "adv": _mean(adv),
                         "mem": mean_pairwise_iou([selections[i][name] for i in mem_rows])})  # fmt: skip
        return rows

    value_names = [s.name for s in model.value_sites()]
    return {
        "nemo": {"sites": table(nemo_sets, value_names), "threshold": threshold,
                 "neurons_adv": [sum(len(v) for v in nemo_sets[i].values()) for rng in bounds for i in rng],
                 "neurons_mem": [sum(len(v) for v in nemo_sets[i].values()) for i in mem_rows],
                 "memorized_by_check_adv": [nemo[i].memorized_before for rng in bounds for i in rng],
                 "memorized_by_check_mem": [nemo[i].memorized_before for i in mem_rows]},
        "wanda": {"sites": table(wanda, wanda_sites), "site_set": config.wanda_sites, "ratio": config.ratio,
                  "candidates_per_row": {s.name: candidates_per_row(s.module.in_features, config.ratio)
                                         for s in model.sites(wanda_sites)},
                  # The same agreement with SD v1.4's candidates per row at 1% (12, 25, 51), from the
                  # same recorded scores: how much of the agreement is the sites' narrowness.
                  "candidate_sweep": [{"candidates": c, "sites": table([scores.mask_with_candidates(model, i, c)
                                                                       for i in range(len(every))], wanda_sites)}
                                      for c in SD14_FFN_CANDIDATES],
                  "weights_adv": [int(sum(m.sum() for m in wanda[i].values())) for rng in bounds for i in rng],
                  "weights_mem": [int(sum(m.sum() for m in wanda[i].values())) for i in mem_rows]},
        "triggers_per_target": [len(g) for g in groups],
    }  # fmt: skip


def embedding_view(inits: Tensor, triggers: Tensor, success: Tensor, prompt_emb: Tensor, non_mem: Tensor) -> dict:
    """Distances for one target: ``inits`` and ``triggers`` ``[K, L, D]``, ``success`` ``[K]``
    bool, ``prompt_emb`` ``[1, L, D]`` (the target's own caption), ``non_mem`` ``[M, L, D]``."""
    found = triggers[success] if int(success.sum()) >= 2 else triggers
    moved = (triggers - inits).flatten(1).norm(dim=1)
    init_spread = (inits - inits.mean(0, keepdim=True)).flatten(1).norm(dim=1)
    to_prompt = (found - prompt_emb).flatten(1).norm(dim=1)
    return {
        "success_rate": float(success.float().mean()),
        "n_successful": int(success.sum()),
        "triggers_measured": "successful" if int(success.sum()) >= 2 else "all (fewer than 2 succeeded)",
        "triggers": pairwise_distances(found),
        "inits": pairwise_distances(inits),
        "non_memorized_prompts": pairwise_distances(non_mem),
        "moved_from_init_mean": float(moved.mean()),
        "moved_from_init_std": float(moved.std()),
        "init_distance_to_centre_mean": float(init_spread.mean()),
        "distance_to_prompt_mean": float(to_prompt.mean()),
    }


# --------------------------------------------------------------------- plots


def plot_projection(inits: Tensor, triggers: Tensor, success: Tensor, prompt_emb: Tensor, non_mem: Tensor,
                    path: Path, *, tsne: bool, seed: int) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [("initialisations", inits, "#bbbbbb", "o"), ("triggers (succeeded)", triggers[success], "#d62728", "o"),
              ("triggers (failed)", triggers[~success], "#1f77b4", "x"), ("the caption's embedding", prompt_emb, "k", "*"),
              ("non-memorized prompts", non_mem, "#2ca02c", "^")]  # fmt: skip
    data = torch.cat([g[1].flatten(1) for g in groups]).double().numpy()
    sizes = [len(g[1]) for g in groups]
    centred = data - data.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projections = [("PCA", centred @ vt[:2].T)]
    if tsne and len(data) > 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, (len(data) - 1) / 3))
        projections.append(("t-SNE", TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(data)))
    fig, axes = plt.subplots(1, len(projections), figsize=(5.2 * len(projections), 4.4))
    axes = np.atleast_1d(axes)
    for ax, (title, points) in zip(axes, projections):
        start = 0
        for (label, _, colour, marker), size in zip(groups, sizes):
            if size:
                part = points[start : start + size]
                ax.scatter(part[:, 0], part[:, 1], s=60 if marker == "*" else 14, c=colour, marker=marker, label=label)
            start += size
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def plot_sites(rows: list[dict], path: Path, *, title: str, ylabel: str, labels=("Y_adv (triggers)", "Y_mem (prompts)")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.6))
    undefined = float("nan")  # no bar where a value is undefined (null in the summary)
    ax.bar(x - 0.2, [undefined if r["adv"] is None else r["adv"] for r in rows], 0.4, label=labels[0], color="#d62728")
    ax.bar(x + 0.2, [undefined if r["mem"] is None else r["mem"] for r in rows], 0.4, label=labels[1], color="#1f77b4")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(r["site"]) for r in rows], rotation=70, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _short(site: str) -> str:
    return (site.replace("down_blocks.", "d").replace("up_blocks.", "u").replace("mid_block", "mid")
            .replace(".attentions.", ".a").replace(".transformer_blocks.", ".t").replace("attn2.to_v", "to_v"))  # fmt: skip


def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------- the run


PAPER_IOU = 0.6  # METHOD.md stage 5: Wanda's trigger IoU below this in most layers, NeMo's about this
IOU_MARGIN = 0.1  # "about 0.6": NeMo's agreement reads as the paper's up to 0.7


def verdicts(summary: dict) -> dict:
    """One sentence per view, computed from the numbers, on whether the paper's claim holds."""
    emb = summary["embedding"]["mean"]
    act = summary["activation"]
    agree = summary["weight_agreement"]
    spread = emb["trigger_l2_over_non_memorized_l2"]
    near = emb["moved_over_init_spread"]
    nemo = [r["adv"] for r in agree["nemo"]["sites"] if r["adv"] is not None]
    wanda = [r["adv"] for r in agree["wanda"]["sites"] if r["adv"] is not None]
    if not nemo or not wanda:
        weight_text = "undefined: no target has two successful triggers to compare"
    else:
        nemo_iou, wanda_iou = sum(nemo) / len(nemo), sum(wanda) / len(wanda)
        wanda_low = sum(v < PAPER_IOU for v in wanda)
        weight_text = (f"mean IoU among triggers: NeMo {nemo_iou:.2f} (paper about {PAPER_IOU}): "
                       + ("partial agreement, as the paper says" if nemo_iou <= PAPER_IOU + IOU_MARGIN else "higher than the paper")
                       + f"; Wanda {wanda_iou:.2f}, below {PAPER_IOU} at {wanda_low}/{len(wanda)} sites: "
                       + ("low agreement, as the paper says" if wanda_low > len(wanda) / 2 else "high agreement, unlike the paper"))  # fmt: skip
    return {
        "embedding": (f"triggers succeed {emb['success_rate']:.0%} of the time; their pairwise L2 distance is "
                      f"{spread:.2f}x that between different non-memorized prompts and each moved "
                      f"{near:.2f}x the initialisations' spread from its start: "
                      + ("scattered, as the paper says" if spread >= 1 and near < 1 else "not as scattered as the paper reports")),
        "activation": (f"median trigger/prompt activation-distance ratio {act['ratio_median']:.2f} over {act['n_sites']} sites "
                       f"(triggers above prompts at {act['sites_adv_above_mem']}): "
                       + ("comparable or higher, as the paper says" if act["ratio_median"] >= 0.8 else "triggers agree more than different prompts, unlike the paper")),
        "weight_agreement": weight_text,
    }  # fmt: skip


def _mean_embedding(per_target: list[dict]) -> dict:
    def avg(get) -> float:
        return float(sum(get(t) for t in per_target) / len(per_target))

    return {
        "success_rate": avg(lambda t: t["success_rate"]),
        "trigger_l2": avg(lambda t: t["triggers"]["l2_mean"]),
        "trigger_cosine": avg(lambda t: t["triggers"]["cosine_mean"]),
        "init_l2": avg(lambda t: t["inits"]["l2_mean"]),
        "non_memorized_l2": avg(lambda t: t["non_memorized_prompts"]["l2_mean"]),
        "non_memorized_cosine": avg(lambda t: t["non_memorized_prompts"]["cosine_mean"]),
        "moved_from_init": avg(lambda t: t["moved_from_init_mean"]),
        "trigger_l2_over_non_memorized_l2": avg(lambda t: t["triggers"]["l2_mean"] / t["non_memorized_prompts"]["l2_mean"]),
        "moved_over_init_spread": avg(lambda t: t["moved_from_init_mean"] / t["init_distance_to_centre_mean"]),
    }
