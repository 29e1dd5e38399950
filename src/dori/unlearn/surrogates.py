"""Surrogate images for adversarial fine-tuning: what the mitigated model makes instead of the
memorized image (the DoRI paper, stage 6: "generated with the pruned model and the original prompt;
it must not replicate").

Two rules:

- ``"any"`` (the default): a candidate is a generation of the mitigated model from the prompt, each
  prompt under its own mask where the mitigation has per-prompt masks (NeMo); it qualifies when its
  similarity to *every* memorized image the model knows (``refs.planted``: each planted image of
  the bundled model, as ``mr_any_planted`` counts) and to its own training image is below ``tau``,
  so that the adversarial term never trains a trigger toward another memorized picture. Of those,
  the least similar to any of them is kept. Where no generation of ``tries`` qualifies, the same
  search runs under the union of the mitigation's masks (the pruned model at its strongest);
  where that fails too, the prompt has no surrogate and is reported (``source`` ``"none"``).
- ``"own"`` (the rule before this one, kept for comparison): the least similar to the prompt's own
  training image of ``tries`` generations; where all of them replicate, the least similar of the
  mitigated model's *empty-prompt* generations instead.
"""

from __future__ import annotations

import torch

from dori.errors import DoriError
from dori.interventions import each_mask, intervene, put_rows
from dori.prompts import PromptSet
from dori.references import References

SURROGATE_RULES = ("any", "own")


def make_surrogates(model, prompts: PromptSet, targets, refs: References, mitigation, *, steps: int, guidance: float,
                    tries: int = 8, rule: str = "any") -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """One surrogate per prompt by ``rule`` (see the module docstring). Returns the images
    ``[P, 3, H, W]`` (a prompt with none gets a zero image) and, per prompt, ``{"similarity"`` (to
    its own training image), ``"max_any_memorized"``, ``"source"`` (``"prompt"``, ``"prompt, union
    mask"``, ``"empty prompt"`` or ``"none"``), ``"seed"}``."""
    if rule not in SURROGATE_RULES:
        raise DoriError(f"unknown surrogate rule {rule!r}; use {' or '.join(SURROGATE_RULES)}")
    detector = refs.detector
    seeds = list(range(tries))
    images = torch.zeros(len(prompts) * tries, 3, *model.image_size)
    for group in each_mask(model, mitigation, prompts.texts):  # each prompt under its own mask, if it has one
        made = model.generate(model.encode(prompts.pick(group).texts), seeds, steps=steps, guidance=guidance)
        put_rows(images, made, group, tries)
    own_features = detector.embed(torch.cat(targets))  # [P, F]
    others = refs.planted if refs.planted is not None else torch.zeros(0, 3, *model.image_size)
    other_features = detector.embed(others) if len(others) else own_features[:0]

    def scores(candidates: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity to prompt i's own image, the largest to any memorized image), per candidate."""
        features = detector.embed(candidates)
        own = detector.similarity(features, own_features[i : i + 1])[:, 0]
        if not len(other_features):
            return own, own
        return own, torch.maximum(own, detector.similarity(features, other_features).max(1).values)

    chosen, info = [], []
    if rule == "own":
        with intervene(model, mitigation):
            neutral = model.generate(model.encode([""]), seeds, steps=steps, guidance=guidance)
        for i in range(len(prompts)):
            candidates, source = images[i * tries : (i + 1) * tries], "prompt"
            own, worst = scores(candidates, i)
            if float(own.min()) >= detector.tau:
                candidates, source = neutral, "empty prompt"
                own, worst = scores(candidates, i)
            pick = int(own.argmin())
            chosen.append(candidates[pick])
            info.append(_entry(own, worst, pick, source, seeds[pick]))
        return torch.stack(chosen), info

    found = [scores(images[i * tries : (i + 1) * tries], i) for i in range(len(prompts))]
    # Every prompt with no qualifying generation, searched again in one batch under the union mask.
    retry = [i for i, (_, worst) in enumerate(found) if float(worst.min()) >= detector.tau]
    union_images = {}
    if retry and mitigation is not None:
        with intervene(model, mitigation.union()):
            made = model.generate(model.encode(prompts.pick(retry).texts), seeds, steps=steps, guidance=guidance)
        union_images = {i: made[k * tries : (k + 1) * tries] for k, i in enumerate(retry)}
    for i in range(len(prompts)):
        candidates, source = images[i * tries : (i + 1) * tries], "prompt"
        own, worst = found[i]
        if i in union_images:
            candidates, source = union_images[i], "prompt, union mask"
            own, worst = scores(candidates, i)
        pick = int(worst.argmin())
        if float(worst[pick]) >= detector.tau:
            chosen.append(torch.zeros_like(candidates[pick]))
            info.append(_entry(own, worst, pick, "none", None))
            continue
        chosen.append(candidates[pick])
        info.append(_entry(own, worst, pick, source, seeds[pick]))
    return torch.stack(chosen), info


def _entry(own: torch.Tensor, worst: torch.Tensor, pick: int, source: str, seed: int | None) -> dict:
    """What the run reports of one prompt's surrogate (candidate ``pick``)."""
    return {"similarity": float(own[pick]), "max_any_memorized": float(worst[pick]), "source": source, "seed": seed}
