"""The bundled model's regime checks: does it let each mitigation the paper attacks hide what that
mitigation hides on Stable Diffusion?

Each rule was fixed before any model was measured with it, is measured on the unmitigated model
and on the mitigations' own mechanics (never on a DoRI result), and is stated in the model card:

(a) NeMo's memorization check (the reference's, :mod:`dori.mitigate.nemo`) flags every planted
    title (VM and TM), at the threshold the reference's rule gives on every ordinary training
    caption: NeMo searches only a flagged prompt. A check. (An earlier rule also bounded the share
    of ordinary captions flagged; it was retired because no data can pass it: the reference
    compares a caption's best of 45 seed pairs with mean + 1 std of all pairs, which the best of 45
    draws beats for most captions whatever the data.)
(b) NeMo localises: the faithful NeMo's neurons per memorized (VM) title and whether its check
    then passes. A measurement beside SD's (NeMo's paper: a few of SD v1.4's 5,760 value neurons,
    often one for a VM prompt).
(c) The sites carry the memorized content: the memorized titles' MR with every weight of Wanda's
    sites zeroed, and with every value neuron zeroed. A measurement beside SD's (NeMo's few down-
    and mid-block neurons stop the original prompt).

The shipping rule (:func:`ship_verdict`) takes the card's own checks (d), (a), NeMo's check passing
for at least :data:`SHIP_NEMO_TITLES` titles in (b) and the value-zeroed MR of (c) at most
:data:`FLOOR_MR`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dori.interventions import mask_neurons, mask_weights
from dori.measure.detection import pairwise_consistency
from dori.measure.replication import replication, summarize
from dori.mitigate.nemo import NemoConfig, ValueStatistics, nemo_localize
from dori.mitigate.nemo_reference import nemo_reference
from dori.models.base import DiffusionModel
from dori.toy.kit import ToyKit

NEURON_SHARE = 0.10  # (b): the share of the value neurons per title reported beside the count
FLOOR_MR = 0.10  # (c) and the shipping rule: MR with every value neuron zeroed
SHIP_NEMO_TITLES = 8  # the shipping rule: titles of 10 whose NeMo check passes in (b)


@dataclass(frozen=True)
class RegimeConfig:
    seeds: int = 10  # generations per title for (c), seeds 0..seeds-1
    steps: int = 50
    guidance: float | None = None  # the model's own (the card's rule)
    nemo: NemoConfig = NemoConfig()
    batch_size: int = 100
    limit: int | None = None  # reduced size: the first prompts of each checked set (the calibration keeps all)

    def prompts(self, kit: ToyKit, *names: str) -> list[str]:
        return [row["prompt"] for name in names for row in kit.prompt_set(name)[: self.limit]]


def nemo_flags(model: DiffusionModel, kit: ToyKit, threshold: float, config: RegimeConfig) -> dict:
    """(a): whether NeMo's check flags each planted title at the threshold calibrated on every
    ordinary training caption."""
    planted = config.prompts(kit, "memorized", "template")
    scores = [max(p) for p in pairwise_consistency(model, model.encode(planted), seeds=list(range(config.nemo.seeds)),
                                                   steps=config.nemo.steps, batch_size=config.batch_size)]  # fmt: skip
    flagged = sum(s > threshold for s in scores)
    return {"threshold": threshold, "planted_scores": scores, "planted_flagged": flagged, "n_planted": len(planted),
            "passed": flagged == len(planted)}  # fmt: skip


def nemo_localises(model: DiffusionModel, kit: ToyKit, stats: ValueStatistics, threshold: float,
                   config: RegimeConfig, progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """(b): the faithful NeMo on each memorized title, with statistics over every ordinary caption."""
    titles = config.prompts(kit, "memorized")
    results = nemo_localize(model, model.encode(titles), stats, threshold, config.nemo, progress=progress)
    total = sum(site.width for site in model.value_sites())
    sizes = [sum(len(v) for v in r.neurons.values()) for r in results]
    return {"value_neurons": total, "neurons_per_title": sizes, "mitigated": [r.mitigated for r in results],
            "memorized_by_check": [r.memorized_before for r in results],
            "refined_ssim": [r.refined_ssim for r in results], "share": NEURON_SHARE * total}  # fmt: skip


def titles_mr(model: DiffusionModel, kit: ToyKit, config: RegimeConfig,
              progress: Callable[[int], None] | None = None) -> dict:  # fmt: skip
    """The memorized titles' MR and mean similarity, as the model generates them now (hooks included)."""
    titles = config.prompts(kit, "memorized")
    rows, _ = replication(model, titles, [kit.references(p) for p in titles], kit.detector,
                          seeds=list(range(config.seeds)), steps=config.steps, guidance=config.guidance,
                          batch_size=config.batch_size, progress=progress)  # fmt: skip
    summary = summarize([r.row() for r in rows], kit.detector.tau)
    return {"mr": summary["mr"], "sscd_mean": summary["sscd_mean"]}


def site_floors(model: DiffusionModel, kit: ToyKit, config: RegimeConfig,
                progress: Callable[[int], None] | None = None) -> dict:  # fmt: skip
    """(c): the memorized titles' MR with every weight of Wanda's sites zeroed, and with every
    value neuron zeroed."""
    out = {}
    every_weight = {s.name: torch.ones_like(s.module.weight, dtype=torch.bool) for s in model.ffn_sites()}
    with mask_weights(model, every_weight):
        out["ffn_zeroed"] = titles_mr(model, kit, config, progress)
    with mask_neurons(model, {s.name: torch.zeros(s.width) for s in model.value_sites()}):
        out["value_zeroed"] = titles_mr(model, kit, config, progress)
    return out


def regime_checks(model: DiffusionModel, kit: ToyKit, config: RegimeConfig = RegimeConfig(), *,
                  say: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """(a) with its pass or fail, (b) and (c) with their numbers."""
    say = say or (lambda message: None)
    # NeMo's two inputs from every ordinary training caption, as `dori mitigate` computes them.
    stats, threshold = nemo_reference(model, reference_prompts="bundled:ordinary", stats=None, threshold=None,
                                      config=config.nemo, say=say)  # fmt: skip
    say("regime (a): NeMo's check on the planted titles")
    flags = nemo_flags(model, kit, threshold, config)
    say("regime (b): NeMo on each memorized title")
    local = nemo_localises(model, kit, stats, threshold, config, progress=say)
    say("regime (c): MR with whole site families zeroed")
    floors = site_floors(model, kit, config)
    return {"a_nemo_check": flags, "b_nemo_localises": local, "c_site_floors": floors,
            "rules": {"neuron_share": NEURON_SHARE, "floor_mr": FLOOR_MR, "ship_nemo_titles": SHIP_NEMO_TITLES}}  # fmt: skip


def ship_verdict(regime: dict) -> dict:
    """The rule a trained model must meet to be shipped as the bundled model: the card's own checks
    (d) pass, NeMo's check flags every planted title (a), NeMo's check passes for at least
    :data:`SHIP_NEMO_TITLES` memorized titles (b), and with every value neuron zeroed the memorized
    titles' MR is at most :data:`FLOOR_MR` (c)."""
    d, a, b, c = regime.get("d_card"), regime["a_nemo_check"], regime["b_nemo_localises"], regime["c_site_floors"]
    checks = {"card_checks": bool(d and d["passed"]), "every_planted_title_flagged": a["passed"],
              "nemo_check_passes": sum(b["mitigated"]) >= min(SHIP_NEMO_TITLES, len(b["mitigated"])),
              "value_zeroed_mr": c["value_zeroed"]["mr"] <= FLOOR_MR}  # fmt: skip
    return {"checks": checks, "passed": all(checks.values())}


def regime_lines(regime: dict) -> list[str]:
    """The card's section: (a) with pass or fail, (b) and (c) beside SD's, (d), and the shipping rule."""
    a, b, c = regime["a_nemo_check"], regime["b_nemo_localises"], regime["c_site_floors"]
    verdict = {True: "pass", False: "FAIL"}
    per_title = ", ".join(str(n) for n in b["neurons_per_title"])
    ship = ship_verdict(regime)
    failed = [name.replace("_", " ") for name, ok in ship["checks"].items() if not ok]
    return [
        "## Regime checks",
        "",
        "Rules fixed before any model was measured with them (`dori.bundled.regime`), on the unmitigated model and the "
        "mitigations' own mechanics, never on a DoRI result:",
        "",
        f"- (a) NeMo's check flags every planted title, at the reference's threshold on every ordinary training "
        f"caption ({a['threshold']:.3f}): {a['planted_flagged']} of {a['n_planted']}. **{verdict[a['passed']]}**",
        f"- (b) Measured: NeMo's neurons per memorized title, of {b['value_neurons']} value neurons "
        f"({NEURON_SHARE:.0%} is {b['share']:.0f}): {per_title}; its check then passes for {sum(b['mitigated'])} of "
        f"{len(b['mitigated'])}. On SD v1.4 NeMo's paper finds a few of 5,760, often one for a VM prompt.",
        f"- (c) Measured: with every weight of Wanda's sites zeroed, MR {c['ffn_zeroed']['mr']:.2f}; with every "
        f"value neuron zeroed, MR {c['value_zeroed']['mr']:.2f}. On SD NeMo's few down- and mid-block neurons stop "
        "the original prompt.",
        *([_card_line(regime["d_card"], verdict)] if "d_card" in regime else []),
        f"- Shipping rule: (d) passes, every planted title is flagged, NeMo's check passes for at least "
        f"{SHIP_NEMO_TITLES} titles and the value-zeroed MR is at most {FLOOR_MR:g}: "
        + (f"not met ({', '.join(failed)}). " if failed else "met. ") + f"**{verdict[ship['passed']]}**",
        "",
    ]


def _card_line(d: dict, verdict: dict) -> str:
    failed = [name.replace("_", " ") for name, ok in d["checks"].items() if not ok]
    return ("- (d) The card's own checks below (copy-detection benchmark, non-memorized margin, memorized MR, "
            "non-memorized and held-out MR, held-out alignment): "
            + (f"failed: {', '.join(failed)}. " if failed else "all pass. ") + f"**{verdict[d['passed']]}**")
