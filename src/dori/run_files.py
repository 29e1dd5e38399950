"""The names of the files the stages write into their run folders. The report (and anyone reading
a run folder) finds them by these names, so a renamed file cannot silently vanish from the report."""

from __future__ import annotations

PROMPT_GRID = "grids/prompt{i:04d}.png"  # replicate: each prompt's generations
MITIGATED_GRID = "mitigated_generations.png"  # mitigate: every prompt under the mask
ROC_PLOT = "roc.png"  # detect
STEPS_CURVE_PLOT = "steps_curve.png"  # attack: MR against DoRI steps
SWEEP_PLOT = "sweep.png"  # wanda-sweep
PROJECTION_PLOT = "embedding_projection_{target}.png"  # locality, one per target
DISCREPANCY_PLOT = "activation_discrepancy.png"  # locality: one panel per method
AGREEMENT_PLOT = "weight_agreement.png"  # locality: one panel per method


def generations_grid(label: str) -> str:
    """The grid of an attacked set's generations (``attack``, ``after_attack_prompt``, a ratio...)."""
    return f"{label}_generations.png"
