"""Can NeMo's SSIM check ever call a prompt unmemorized on this model?

NeMo lowers its z-score threshold and prunes more value neurons until its SSIM consistency check
(METHOD.md stage 2) says the prompt is no longer memorized. This script prints that check's score
for each memorized prompt as it is and with every neuron of NeMo's sites zeroed (no text reaches
the U-Net at all), beside the empty prompt, the ordinary prompts and the threshold NeMo uses
(mean + 1 std over the ordinary prompts). A prompt whose fully-zeroed score is still above the
threshold can never pass the check: NeMo's search ends with every neuron selected and reports the
prompt as not mitigated. On the third bundled model (--steps 20, as the study runs NeMo) every
memorized title scored 0.387 with its text zeroed, under the threshold 0.518; on the fourth (shipped)
0.489, above the threshold 0.457 (the empty prompt: 0.467), so a title whose partial masks never
pass ends with every value neuron selected:

    python tools/nemo_check_floor.py [--model bundled] [--prompts bundled:memorized] [--steps 20]

--steps must match the --steps that NeMo ran with (it sets the first timestep the check uses).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dori.interventions import mask_neurons
from dori.measure.detection import consistency_scores
from dori.models import load_model
from dori.references import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help="'bundled' or a bundled-format model folder")
    parser.add_argument("--prompts", default="bundled:memorized")
    parser.add_argument("--reference", default="bundled:ordinary", help="the prompts NeMo's threshold comes from")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps whose first timestep the check uses")
    args = parser.parse_args()
    model = load_model(args.model)
    texts = load_prompts(args.prompts, model).texts
    reference = torch.tensor(consistency_scores(model, model.encode(load_prompts(args.reference, model).texts),
                                                steps=args.steps))  # fmt: skip
    threshold = float(reference.mean() + reference.std())
    emb = model.encode(texts)
    plain = consistency_scores(model, emb, steps=args.steps)
    silent = {site.name: torch.zeros(site.width) for site in model.value_sites()}
    with mask_neurons(model, silent):
        zeroed = consistency_scores(model, emb, steps=args.steps)
    empty = consistency_scores(model, model.encode([""]), steps=args.steps)[0]
    print(f"threshold (mean + 1 std over {len(reference)} reference prompts) = {threshold:.3f}; "
          f"reference median {statistics.median(reference.tolist()):.3f}, max {float(reference.max()):.3f}; "
          f"empty prompt {empty:.3f}")  # fmt: skip
    print("| prompt | score | score, all value neurons zeroed | can pass the check |")
    print("|---|---|---|---|")
    for text, a, b in zip(texts, plain, zeroed):
        print(f"| {text} | {a:.3f} | {b:.3f} | {'yes' if b <= threshold else 'no'} |")


if __name__ == "__main__":
    main()
