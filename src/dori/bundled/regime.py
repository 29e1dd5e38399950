"""The bundled model's regime checks (issue 37): does it let each mitigation the paper attacks hide
what that mitigation hides on Stable Diffusion?

Each rule was fixed before any model was measured with it, is measured on the unmitigated model
and on the mitigations' own mechanics (never on a DoRI result), and is stated in the model card
with its number and pass or fail:

(a) NeMo's memorization check (the reference's, :mod:`dori.mitigate.nemo`) flags every planted
    title (VM and TM) and at most :data:`FLAG_BAR` of the ordinary captions it was not calibrated
    on (the 20 non-memorized training captions and the held-out ones), at the threshold the
    reference's rule gives on every ordinary training caption.
(b) NeMo localises: every memorized (VM) title passes NeMo's check with at most
    :data:`NEURON_SHARE` of the value neurons (on SD v1.4, NeMo's paper finds a handful of 5,760).
(c) The feed-forward sites carry the memorized content: with every weight of Wanda's sites zeroed
    the memorized titles' MR is at most :data:`FLOOR_MR`; so it is with every value neuron zeroed.

They replace the scripts ``tools/nemo_check_floor.py``, ``tools/wanda_site_floor.py`` and
``tools/value_site_ablation.py``.
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

FLAG_BAR = 0.05  # (a): at most this share of ordinary captions flagged
NEURON_SHARE = 0.10  # (b): at most this share of the value neurons per title
FLOOR_MR = 0.10  # (c): MR with a whole site family zeroed


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
    """(a): whom NeMo's check flags at the threshold calibrated on every ordinary training caption."""
    def pairs(texts: list[str]) -> list[list[float]]:
        return pairwise_consistency(model, model.encode(texts), seeds=list(range(config.nemo.seeds)),
                                    steps=config.nemo.steps, batch_size=config.batch_size)  # fmt: skip

    planted = config.prompts(kit, "memorized", "template")
    ordinary = config.prompts(kit, "non_memorized", "held_out")
    planted_max = [max(p) for p in pairs(planted)]
    ordinary_max = [max(p) for p in pairs(ordinary)]
    flagged_planted = sum(s > threshold for s in planted_max)
    flagged_ordinary = sum(s > threshold for s in ordinary_max)
    return {"threshold": threshold, "planted_scores": planted_max, "ordinary_scores": ordinary_max,
            "planted_flagged": flagged_planted, "n_planted": len(planted),
            "ordinary_flagged": flagged_ordinary, "n_ordinary": len(ordinary),
            "passed": flagged_planted == len(planted) and flagged_ordinary <= FLAG_BAR * len(ordinary)}  # fmt: skip


def nemo_localises(model: DiffusionModel, kit: ToyKit, stats: ValueStatistics, threshold: float,
                   config: RegimeConfig, progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """(b): the faithful NeMo on each memorized title, with statistics over every ordinary caption."""
    titles = config.prompts(kit, "memorized")
    results = nemo_localize(model, model.encode(titles), stats, threshold, config.nemo, progress=progress)
    total = sum(site.width for site in model.value_sites())
    sizes = [sum(len(v) for v in r.neurons.values()) for r in results]
    return {"value_neurons": total, "neurons_per_title": sizes, "mitigated": [r.mitigated for r in results],
            "memorized_by_check": [r.memorized_before for r in results],
            "refined_ssim": [r.refined_ssim for r in results], "bar": NEURON_SHARE * total,
            "passed": all(r.mitigated for r in results) and max(sizes) <= NEURON_SHARE * total}  # fmt: skip


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
    out["passed"] = out["ffn_zeroed"]["mr"] <= FLOOR_MR and out["value_zeroed"]["mr"] <= FLOOR_MR
    return out


def regime_checks(model: DiffusionModel, kit: ToyKit, config: RegimeConfig = RegimeConfig(), *,
                  say: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """(a), (b) and (c) with their numbers and pass or fail."""
    say = say or (lambda message: None)
    # NeMo's two inputs from every ordinary training caption, as `dori mitigate` computes them.
    stats, threshold = nemo_reference(model, reference_prompts="bundled:ordinary", stats=None, threshold=None,
                                      config=config.nemo, say=say)  # fmt: skip
    say("regime (a): NeMo's check on planted titles and ordinary captions")
    flags = nemo_flags(model, kit, threshold, config)
    say("regime (b): NeMo on each memorized title")
    local = nemo_localises(model, kit, stats, threshold, config, progress=say)
    say("regime (c): MR with whole site families zeroed")
    floors = site_floors(model, kit, config)
    return {"a_nemo_check": flags, "b_nemo_localises": local, "c_site_floors": floors,
            "rules": {"flag_bar": FLAG_BAR, "neuron_share": NEURON_SHARE, "floor_mr": FLOOR_MR}}  # fmt: skip


def regime_lines(regime: dict) -> list[str]:
    """The card's section: each check with its number and pass or fail."""
    a, b, c = regime["a_nemo_check"], regime["b_nemo_localises"], regime["c_site_floors"]
    verdict = {True: "pass", False: "FAIL"}
    per_title = ", ".join(str(n) for n in b["neurons_per_title"])
    return [
        "## Regime checks",
        "",
        "Rules fixed before any model was measured with them (`dori.bundled.regime`), on the unmitigated model and the "
        "mitigations' own mechanics, never on a DoRI result:",
        "",
        f"- (a) NeMo's check flags every planted title and at most {FLAG_BAR:.0%} of ordinary captions, at the "
        f"reference's threshold on every ordinary training caption ({a['threshold']:.3f}): planted "
        f"{a['planted_flagged']} of {a['n_planted']}, ordinary {a['ordinary_flagged']} of {a['n_ordinary']}. "
        f"**{verdict[a['passed']]}**",
        f"- (b) NeMo localises: every memorized title passes NeMo's check with at most {NEURON_SHARE:.0%} of the "
        f"{b['value_neurons']} value neurons ({b['bar']:.0f}): neurons per title {per_title}; passed the check "
        f"{sum(b['mitigated'])} of {len(b['mitigated'])}. **{verdict[b['passed']]}**",
        f"- (c) With every weight of Wanda's sites zeroed, MR {c['ffn_zeroed']['mr']:.2f}; with every value neuron "
        f"zeroed, MR {c['value_zeroed']['mr']:.2f} (bar: at most {FLOOR_MR:g} each). **{verdict[c['passed']]}**",
        *([_card_line(regime["d_card"], verdict)] if "d_card" in regime else []),
        "",
    ]


def _card_line(d: dict, verdict: dict) -> str:
    failed = [name.replace("_", " ") for name, ok in d["checks"].items() if not ok]
    return ("- (d) The card's own checks below (copy-detection benchmark, non-memorized margin, memorized MR, "
            "non-memorized and held-out MR, held-out alignment): "
            + (f"failed: {', '.join(failed)}. " if failed else "all pass. ") + f"**{verdict[d['passed']]}**")
