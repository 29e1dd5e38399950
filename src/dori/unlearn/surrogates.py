"""Surrogate images for adversarial fine-tuning: what the mitigated model makes instead of the
memorized image."""

from __future__ import annotations

import torch

from dori.interventions import each_mask, intervene, put_rows
from dori.prompts import PromptSet
from dori.references import References


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
        put_rows(images, made, group, tries)
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
