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
from dori.interventions import Mitigation, capture, each_mask
from dori.measure.replication import rate
from dori.models.base import DiffusionModel
from dori.report_images import save_figure

Say = Callable[[str], None]
METHODS = ("nemo", "wanda")
METHOD_NAMES = {"nemo": "NeMo", "wanda": "Wanda"}
# The study's sizes on the bundled kind (the command's defaults: 100 starts, 10 triggers): NeMo's
# search costs about 6 s an embedding on 2 CPU cores, Wanda's scores one pass.
BUNDLED_SIZES = {"inits": 32, "agreement_triggers": {"nemo": 8, "wanda": 16}, "more_prompts": "bundled:template"}


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
                     batch_size: int, mitigation: Mitigation | None = None,
                     texts: list[str] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Each site's output ``[N, ...]`` for every embedding, at the first sampling step of an
    ``steps``-step schedule on the same noise (seed ``seed``) for all of them. Under ``mitigation``,
    row ``i`` runs under the mask of ``texts[i]`` (its own neurons, for a NeMo mask)."""
    timestep = model.ddim_scheduler(steps).timesteps[0]
    noise = model.initial_noise([seed])
    out: dict[str, list] = {name: [None] * emb.shape[0] for name in sites}
    with torch.no_grad():
        for group in each_mask(model, mitigation, texts or [""] * emb.shape[0]):
            records: dict[str, list[Tensor]] = {name: [] for name in sites}

            def keep(name: str, value: Tensor, records=records) -> None:
                records[name].append(value.float().cpu())

            with capture(model, sites, reduce=keep):
                for start in range(0, len(group), batch_size):
                    chunk = emb[group[start : start + batch_size]].to(model.device, model.dtype)
                    model.predict_noise(noise.expand(chunk.shape[0], -1, -1, -1), timestep, chunk)
            for name in sites:
                for i, row in zip(group, torch.cat(records[name])):
                    out[name][i] = row
    return {name: torch.stack(rows) for name, rows in out.items()}


def layer_rows(adv: list[dict[str, Tensor]], mem: dict[str, Tensor], sites: list[str]) -> list[dict]:
    """Per site: Y_adv (mean pairwise L2 among each target's triggers, averaged over targets),
    Y_mem (among the memorized prompts) and their ratio."""
    rows = []
    for name in sites:
        adv_d = sum(mean_pairwise_l2(a[name]) for a in adv) / len(adv)
        mem_d = mean_pairwise_l2(mem[name])
        rows.append({"site": name, "adv": adv_d, "mem": mem_d, "ratio": adv_d / max(mem_d, 1e-12)})
    return rows


def activation_view(model: DiffusionModel, triggers: list[Tensor], mem: Tensor, layers: dict[str, list[str]], *,
                    seed: int, steps: int, batch_size: int, mitigation: Mitigation | None = None,
                    target_texts: list[str] | None = None, mem_texts: list[str] | None = None) -> dict:  # fmt: skip
    """Per method (``layers``: method -> its sites), per site: the activation distance among each
    target's triggers and among the memorized prompts; under ``mitigation``, each trigger runs
    under its target's mask and each prompt under its own."""
    sites = list(dict.fromkeys(name for names in layers.values() for name in names))
    acts_mem = site_activations(model, mem, sites, seed=seed, steps=steps, batch_size=batch_size,
                                mitigation=mitigation, texts=mem_texts)  # fmt: skip
    acts_adv = [site_activations(model, t, sites, seed=seed, steps=steps, batch_size=batch_size, mitigation=mitigation,
                                 texts=None if target_texts is None else [target_texts[j]] * len(t))
                for j, t in enumerate(triggers)]  # fmt: skip
    methods = {}
    for method, names in layers.items():
        rows = layer_rows(acts_adv, acts_mem, names)
        ratios = [r["ratio"] for r in rows]
        methods[method] = {"sites": rows, "ratio_median": true_median(ratios), "n_layers": len(rows),
                           "layers_adv_above_mem": sum(r["adv"] > r["mem"] for r in rows)}  # fmt: skip
    return {"methods": methods, "timestep": "first sampling step", "noise_seed": seed,
            "triggers_per_target": [len(t) for t in triggers], "prompts": len(mem),
            "under_mask": None if mitigation is None else mitigation.method}  # fmt: skip


def weight_agreement_view(model: DiffusionModel, groups: list[Tensor], mem: Tensor, config: LocalityConfig,
                          say: Say, methods: tuple[str, ...] = METHODS) -> dict:  # fmt: skip
    """NeMo's and/or Wanda's selection (``methods``) runs on each trigger (each group: one target's
    triggers) and on each memorized prompt, on the model as it is given (the caller leaves any
    mitigation off); per site, the mean pairwise IoU within each target's triggers and among the
    prompts, and whether any trigger selects anything there."""
    every = torch.cat([*groups, mem])
    bounds, start = [], 0
    for g in groups:
        bounds.append(range(start, start + len(g)))
        start += len(g)
    mem_rows = range(start, len(every))
    adv_rows = [i for rng in bounds for i in rng]

    def table(selections: list[dict], names: list[str]) -> list[dict]:
        rows = []
        for name in names:
            adv = [mean_pairwise_iou([selections[i][name] for i in rng]) for rng in bounds]
            rows.append({"site": name, "adv": _mean(adv),
                         "mem": mean_pairwise_iou([selections[i][name] for i in mem_rows]),
                         "selected": any(_size(selections[i][name]) for i in adv_rows)})  # fmt: skip
        return rows

    out: dict = {"triggers_per_target": [len(g) for g in groups], "prompts": len(mem)}
    if "nemo" in methods:
        from dori.mitigate.nemo import nemo_localize
        from dori.mitigate.nemo_reference import nemo_for_run

        nemo_config, stats, threshold = nemo_for_run(model, config, say)
        say(f"locality: NeMo on {len(every)} embeddings")
        nemo = nemo_localize(model, every, stats, threshold, nemo_config)
        value_names = [s.name for s in model.value_sites()]
        nemo_sets = [{name: set(r.neurons.get(name, [])) for name in value_names} for r in nemo]
        flagged = [[i for i in rng if nemo[i].memorized_before] for rng in bounds]
        sites = table(nemo_sets, value_names)
        for row in sites:  # the same, among the triggers NeMo's check flags (the others select nothing)
            row["adv_flagged"] = _mean([mean_pairwise_iou([nemo_sets[i][row["site"]] for i in f]) for f in flagged])
        out["nemo"] = {"sites": sites, "threshold": threshold,
                       "neurons_adv": [sum(len(v) for v in nemo_sets[i].values()) for i in adv_rows],
                       "neurons_mem": [sum(len(v) for v in nemo_sets[i].values()) for i in mem_rows],
                       "memorized_by_check_adv": [nemo[i].memorized_before for i in adv_rows],
                       "memorized_by_check_mem": [nemo[i].memorized_before for i in mem_rows]}  # fmt: skip
    if "wanda" in methods:
        from dori.mitigate.wanda import SD14_FFN_CANDIDATES, WandaConfig, candidates_per_row, wanda_scores

        wanda_sites = wanda_layers(model, config)
        say(f"locality: Wanda on {len(every)} embeddings")
        scores = wanda_scores(model, [every[i : i + 1] for i in range(len(every))], sites=wanda_sites,
                              config=WandaConfig(ratio=config.ratio, batch_size=config.batch_size))  # fmt: skip
        wanda = [scores.mask(model, i, config.ratio) for i in range(len(every))]
        out["wanda"] = {
            "sites": table(wanda, wanda_sites), "site_set": config.wanda_sites, "ratio": config.ratio,
            "candidates_per_row": {s.name: candidates_per_row(s.module.in_features, config.ratio)
                                   for s in model.sites(wanda_sites)},
            # The same agreement with SD v1.4's candidates per row at 1% (12, 25, 51), from the
            # same recorded scores: how much of the agreement is the sites' narrowness.
            "candidate_sweep": [{"candidates": c, "sites": table([scores.mask_with_candidates(model, i, c)
                                                                 for i in range(len(every))], wanda_sites)}
                                for c in SD14_FFN_CANDIDATES],
            "weights_adv": [int(sum(m.sum() for m in wanda[i].values())) for i in adv_rows],
            "weights_mem": [int(sum(m.sum() for m in wanda[i].values())) for i in mem_rows]}  # fmt: skip
    return out


def _size(selection: set | Tensor) -> int:
    return int(selection.sum()) if isinstance(selection, Tensor) else len(selection)


def wanda_layers(model: DiffusionModel, config: LocalityConfig) -> list[str]:
    """Wanda's sites: the feed-forward outputs (ConceptPrune's), or the value projections."""
    return [s.name for s in (model.ffn_sites() if config.wanda_sites == "ffn" else model.value_sites())]


def method_layers(model: DiffusionModel, config: LocalityConfig, methods: tuple[str, ...]) -> dict[str, list[str]]:
    """Each method's layers: NeMo's value projections, Wanda's sites."""
    return {m: [s.name for s in model.value_sites()] if m == "nemo" else wanda_layers(model, config) for m in methods}


def embedding_view(inits: Tensor, triggers: Tensor, success: Tensor, prompt_emb: Tensor, non_mem: Tensor) -> dict:
    """Distances for one target: ``inits`` and ``triggers`` ``[K, L, D]``, ``success`` ``[K]``
    bool, ``prompt_emb`` ``[1, L, D]`` (the target's own caption), ``non_mem`` ``[M, L, D]``."""
    found = triggers[success] if int(success.sum()) >= 2 else triggers
    moved = (triggers - inits).flatten(1).norm(dim=1)
    init_spread = (inits - inits.mean(0, keepdim=True)).flatten(1).norm(dim=1)
    to_prompt = (found - prompt_emb).flatten(1).norm(dim=1)
    return {
        "success_rate": rate(success),
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


def plot_panels(panels: list[tuple[str, list[dict]]], path: Path, *, title: str, ylabel: str,
                labels=("Y_adv (triggers of one image)", "Y_mem (memorized prompts)"),
                ylim: tuple[float, float] | None = None) -> None:  # fmt: skip
    """The paper's layout: one panel per method, a pair of bars (``adv``, ``mem``) per layer ID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    widest = max([len(rows) for _, rows in panels] + [1])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.6 * widest + 2.2) * len(panels), 3.8), squeeze=False)
    undefined = float("nan")  # no bar where a value is undefined (null in the summary)
    for ax, (name, rows) in zip(axes[0], panels):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [undefined if r["adv"] is None else r["adv"] for r in rows], 0.4, label=labels[0], color="#d62728")
        ax.bar(x + 0.2, [undefined if r["mem"] is None else r["mem"] for r in rows], 0.4, label=labels[1], color="#1f77b4")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{i + 1}\n{_short(r['site'])}" for i, r in enumerate(rows)], fontsize=6)
        ax.set_xlabel("layer ID", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        if ylim is not None:
            ax.set_ylim(*ylim)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _short(site: str) -> str:
    return (site.replace("down_blocks.", "d").replace("up_blocks.", "u").replace("mid_block", "mid")
            .replace(".attentions.", ".a").replace(".transformer_blocks.", ".t").replace("attn2.to_v", "to_v"))  # fmt: skip


def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------- the run


# The authors' figures, read off their bars (about +-5%; docs/RESULTS.md), 7 layer IDs per method.
PAPER_ACTIVATION_RATIO = {"nemo": (1.28, 1.53), "wanda_first": 1.17, "wanda_rest": (0.57, 0.86)}  # Y_adv / Y_mem
PAPER_WANDA_IOU_TRIGGERS = (0.57, 0.80, 0.58, 0.74, 0.54, 0.34, 0.26)
PAPER_NEMO_IOU = {"first": 0.57, "rest": (0.78, 1.0)}  # METHOD.md: NeMo selects anything in one layer only
# The rules of the verdicts, fixed before the per-method numbers were measured (docs/RESULTS.md).
HIGHER = 1.0  # NeMo's layers: triggers differ at least as much as prompts ...
COMPARABLE = 0.9  # ... or within 10% of it ("comparable", short of the paper's "higher")
IOU_MARGIN = 0.1  # the bars read to about +-5%, and the paper measures one image


def true_median(values: list[float]) -> float | None:
    """The median, with the mean of the two middle values for an even count (``torch.median``
    returns the lower one); ``None`` for no value."""
    import statistics

    return float(statistics.median(values)) if values else None


def paper_iou_level(method: str) -> float:
    """The paper's trigger IoU where its method selects anything: the median of Wanda's 7 bars
    (0.57), NeMo's first layer (0.57)."""
    return true_median(list(PAPER_WANDA_IOU_TRIGGERS)) if method == "wanda" else PAPER_NEMO_IOU["first"]


def activation_verdict(method: str, ratios: list[float]) -> str:
    """Y_adv / Y_mem per layer of ``method``, judged against the paper's direction for its layers."""
    if not ratios:
        return "undefined: no layer measured"
    name = METHOD_NAMES[method]
    if method == "nemo":
        median = true_median(ratios)
        text = (f"median trigger/prompt activation-distance ratio {median:.2f} over NeMo's {len(ratios)} layers "
                f"(rule: at least {HIGHER:g} is higher, from {COMPARABLE:g} comparable; paper 1.28-1.53): ")
        if median >= HIGHER:
            return text + "triggers differ at least as much as different prompts, as the paper says"
        if median >= COMPARABLE:
            return text + "comparable, short of the paper's higher"
        return text + "triggers agree more than different prompts, unlike the paper"
    below = sum(r < 1 for r in ratios)
    text = (f"triggers differ less than prompts at {below} of {name}'s {len(ratios)} layers (ratios "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; rule: more than half is the paper's shape; paper 6 of 7): ")
    return text + ("the paper's shape" if below > len(ratios) / 2 else "unlike the paper's figure")


def agreement_verdict(method: str, rows: list[dict]) -> str:
    """The IoU among one image's triggers per layer (``rows``: ``adv`` and ``selected``), judged
    against the paper's level for ``method``."""
    name, level = METHOD_NAMES[method], paper_iou_level(method)
    measured = [r["adv"] for r in rows if r["adv"] is not None and r.get("selected", True)]
    if not measured:
        return f"{name}: undefined: no target has two successful triggers that select anything"
    median = true_median(measured)
    text = (f"{name}: median IoU among triggers {median:.2f} over the {len(measured)} of {len(rows)} layers where "
            f"they select anything (rule: at most the paper's {level} + {IOU_MARGIN}): ")
    return text + ("partial agreement, as the paper says" if median <= level + IOU_MARGIN else "higher than the paper")


def embedding_verdict(emb: dict) -> str:
    spread = emb["trigger_l2_over_non_memorized_l2"]
    near = emb["moved_over_init_spread"]
    return (f"triggers succeed {emb['success_rate']:.0%} of the time; their pairwise L2 distance is "
            f"{spread:.2f}x that between different non-memorized prompts and each moved "
            f"{near:.2f}x the initialisations' spread from its start: "
            + ("scattered, as the paper says" if spread >= 1 and near < 1 else "not as scattered as the paper reports"))  # fmt: skip


def verdicts(summary: dict) -> dict:
    """One sentence per view and method, computed from the numbers by the rules above."""
    out = {"embedding": embedding_verdict(summary["embedding"]["mean"])}
    for method, view in summary["activation"]["methods"].items():
        out[f"activation at {METHOD_NAMES[method]}'s layers"] = activation_verdict(method, [r["ratio"] for r in view["sites"]])
    for method in METHODS:
        if method in summary["weight_agreement"]:
            out[f"weight agreement ({METHOD_NAMES[method]})"] = agreement_verdict(method, summary["weight_agreement"][method]["sites"])
    return out


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
