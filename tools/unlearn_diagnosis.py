"""Where adversarial fine-tuning's utility goes: one fine-tuning run on the bundled model, measured
at several step counts (the runs draw every step from a per-step seed, so a shorter run is a prefix
of a longer one).

    python tools/unlearn_diagnosis.py --mitigation STUDY/stages/nemo --out DIR [--set KEY=VALUE ...]
        [--at 20,40,60] [--attack-at 60] [--surrogates RULE]

``--set`` overrides the study's fine-tuning settings (``dori.stages.study.stage_configs``'s unlearn
config: ``adv_weight=0``, ``learning_rate=1e-4``, ``refresh_every=20``, ...). ``--surrogates`` picks
the surrogate rule of :func:`dori.unlearn.surrogates.make_surrogates` (``study``: the study's own).
At step 0 (the original model) and at each ``--at`` step it measures:

- held-out prompt alignment at the model's guidance and at guidance 1.0, with 10 seeds per caption
  (seeds 100-109 by default, not the study's 0-9), and the misses per attribute (shape, colour, position) at the model's guidance;
- FD in the classifier's features (held-out captions, the model's guidance);
- alignment on 20 training captions (``bundled:non_memorized``), 4 seeds each;
- the titles' MR from their own prompts (4 seeds);
- at the ``--attack-at`` steps, DoRI's MR (50 steps) from the prompt and from a random start.

It writes ``DIR/diagnosis.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mitigation", required=True, help="The study's NeMo folder (STUDY/stages/nemo).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--at", default="20,40,60")
    parser.add_argument("--attack-at", default="60")
    parser.add_argument("--surrogates", default="study")
    parser.add_argument("--utility-seeds", type=int, default=10)
    parser.add_argument("--original", action=argparse.BooleanOptionalAction, default=True,
                        help="Also measure the original model (step 0).")
    parser.add_argument("--first-seed", type=int, default=100, help="Held-out seeds (the study uses 0..).")
    args = parser.parse_args()
    import torch

    from dori.configs import AttackRunConfig, StudyConfig, carried
    from dori.evaluation import evaluate_replication
    from dori.interventions import load_mitigation
    from dori.models.loading import load_model
    from dori.references import References, attack_targets, encode_unique, load_prompts, retained_pairs
    from dori.report_images import save_grid
    from dori.stages.attack import attack_and_measure
    from dori.stages.study import stage_configs
    from dori.unlearn.adversarial import UnlearnConfig, adversarial_finetune
    from dori.unlearn.surrogates import make_surrogates

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    run = stage_configs(StudyConfig(), out)["unlearn"]
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(getattr(run, key))
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    run = replace(run, **overrides)
    at = sorted({int(s) for s in args.at.split(",")} | ({0} if args.original else set()))
    attack_at = {int(s) for s in args.attack_at.split(",") if s}
    run = replace(run, steps=max(at))

    model = load_model("bundled")
    prompts = load_prompts(run.prompts, model)
    refs = References(model, images=None, sscd=None)
    kit = refs.kit
    targets = attack_targets(model, prompts, refs)
    mitigation = load_mitigation(model, args.mitigation)
    rule = {} if args.surrogates == "study" else {"rule": args.surrogates}
    made, info = make_surrogates(model, prompts, targets, refs, mitigation, steps=run.eval_steps,
                                 guidance=run.guidance, **rule)  # fmt: skip
    save_grid(torch.cat([torch.cat(targets), made]), out / "surrogates.png", columns=len(prompts))
    planted = kit.planted_images
    titles = [p.caption for p in kit.data.planted]
    sims = refs.detector.similarity(refs.detector.embed(made), refs.detector.embed(planted))  # [T, P]
    for i, row in enumerate(info):
        best = int(sims[i].argmax())
        row.update(prompt=prompts.texts[i], max_any_planted=float(sims[i, best]), nearest_planted=titles[best])

    retain_images, retain_captions = retained_pairs(model, run, refs)
    retain_emb, retain_index = encode_unique(model, retain_captions)
    ft = carried(UnlearnConfig, run)
    snapshots = {0: copy.deepcopy(model.unet.state_dict())} if args.original else {}

    def on_step(state, optimizer) -> None:
        if state.step in at:
            snapshots[state.step] = copy.deepcopy(model.unet.state_dict())
        last = state.history[-1]
        print(f"step {state.step}: L_DM {last['loss_dm']:.4f} L_adv {last['loss_adv']:.4f}", flush=True)

    keep = [i for i, r in enumerate(info) if r["source"] != "none"]  # a title with no surrogate is not trained
    state = adversarial_finetune(model, targets=model.to_latents(torch.cat([targets[i] for i in keep])),
                                 surrogates=model.to_latents(made[keep]),
                                 prompt_emb=model.encode([prompts.texts[i] for i in keep]),
                                 retain_latents=model.to_latents(retain_images), retain_emb=retain_emb,
                                 retain_index=retain_index, config=ft, on_step=on_step)  # fmt: skip

    train_prompts = load_prompts("bundled:non_memorized", model).texts
    rows = []
    sampling = dict(steps=run.eval_steps, batch_size=run.batch_size)
    held_prompts = [r["prompt"] for r in kit.prompt_set("held_out")]
    held_seeds = list(range(args.first_seed, args.first_seed + args.utility_seeds))
    held_captions = [p for p in held_prompts for _ in held_seeds]

    def held_out(guidance: float) -> dict:
        images = model.generate(model.encode(held_prompts), held_seeds, guidance=guidance, **sampling)
        return {"alignment": kit.alignment(images, held_captions), "misses": kit.misses(images, held_captions),
                "fd": kit.frechet_distance(images, held_captions)}  # fmt: skip

    for step in at:
        model.unet.load_state_dict(snapshots[step])
        held = held_out(model.default_guidance)
        held_g1 = held_out(1.0)
        images = model.generate(model.encode(train_prompts), list(range(4)), guidance=model.default_guidance, **sampling)
        train_alignment = kit.alignment(images, [p for p in train_prompts for _ in range(4)])
        plain, _, _ = evaluate_replication(model, prompts, refs, seeds=run.seeds, guidance=model.default_guidance,
                                           **sampling)  # fmt: skip
        row = {"step": step, "held_out_alignment": held["alignment"], "held_out_alignment_g1": held_g1["alignment"],
               "misses": held["misses"], "fd": held["fd"], "train_alignment": train_alignment, "mr_prompt": plain["mr"],
               "mr_any_planted_prompt": plain.get("mr_any_planted")}  # fmt: skip
        if step in attack_at:
            cfg = AttackRunConfig(prompts=run.prompts, steps=run.eval_attack_steps, steps_curve=str(run.eval_attack_steps),
                                  seeds=run.seeds, eval_steps=run.eval_steps, control=False)  # fmt: skip
            for init, seed in (("prompt", 0), ("random", 1)):
                result = attack_and_measure(model, prompts, refs, replace(cfg, init=init, attack_seed=seed),
                                            label=f"step{step}_{init}", out=out)  # fmt: skip
                row[f"mr_dori_{init}"] = result["mr"]
                row[f"mr_any_planted_dori_{init}"] = result.get("mr_any_planted")
        if step == max(at):
            grid = model.generate(model.encode([r["prompt"] for r in kit.prompt_set("held_out")]), list(range(4)),
                                  guidance=model.default_guidance, **sampling)  # fmt: skip
            save_grid(grid, out / "held_out_after.png", columns=4)
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"settings": asdict(ft), "surrogates": info, "rows": rows, "history": state.history}
    (out / "diagnosis.json").write_text(json.dumps(result, indent=1))
    print(f"\n{out}: {', '.join(args.set) or 'study settings'}; surrogates {args.surrogates}")
    sources = {s: sum(r["source"] == s for r in info) for s in sorted({r["source"] for r in info})}
    crossing = [f"{r['prompt']} -> {r['nearest_planted']} {r['max_any_planted']:.2f}" for r in info
                if r["source"] != "none" and r["max_any_planted"] >= refs.detector.tau]  # fmt: skip
    print(f"surrogates by source: {sources}; copying some planted image: {crossing or 'none'}\n")
    print("| step | held-out alignment (g {:g}) | (g 1) | misses shape / colour / position | FD | training captions "
          "| MR prompt | DoRI MR prompt / random |".format(model.default_guidance))
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["misses"]
        dori = f"{r['mr_dori_prompt']:.2f} / {r['mr_dori_random']:.2f}" if "mr_dori_prompt" in r else "-"
        print(f"| {r['step']} | {r['held_out_alignment']:.3f} | {r['held_out_alignment_g1']:.3f} | {m['shape']:.2f} / "
              f"{m['colour']:.2f} / {m['position']:.2f} | {r['fd']:.0f} | {r['train_alignment']:.3f} | {r['mr_prompt']:.2f} "
              f"| {dori} |")  # fmt: skip


if __name__ == "__main__":
    main()
