"""``dori unlearn``: surrogates, adversarial fine-tuning with checkpoints, and the evaluation of
the fine-tuned model (a fresh attack from the prompt and from random starts, plain prompts, utility)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dori.configs import AttackRunConfig, MitigateConfig
from dori.fields import carried
from dori.errors import DoriError
from dori.evaluation import check_utility_options, evaluate_replication, utility, utility_options
from dori.interventions import load_mitigation
from dori.models.base import DiffusionModel
from dori.models.loading import save_model
from dori.parallel import Shards
from dori.references import References, attack_targets, encode_unique, load_prompts, retained_pairs
from dori.report_images import save_grid
from dori.runs import (
    read_checkpoint,
    read_json,
    read_tensors,
    save_tensors_atomic,
    save_torch_atomic,
    write_json_atomic,
)
from dori.stages.attack import attack_and_measure
from dori.stages.mitigate import select_nemo
from dori.unlearn.adversarial import UnlearnConfig, UnlearnState, adversarial_finetune
from dori.unlearn.surrogates import make_surrogates


def run_unlearn(config, model: DiffusionModel, out: str | Path, *, resume: bool = False,
                progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """``dori unlearn``: surrogates, adversarial fine-tuning with checkpoints, and the evaluation
    (a fresh DoRI attack from the prompt and from random starts, plain prompts, utility)."""
    say = progress or (lambda message: None)
    began = time.monotonic()
    check_utility_options(model, utility_options(config))  # a wrong option fails before any work
    ft_config = carried(UnlearnConfig, config)  # steps, rates, triggers, warm start, weights, seed; checked here
    prompts = load_prompts(config.prompts, model, kind=config.type, limit=config.limit)
    refs = References(model, images=config.images, sscd=config.sscd)
    prompts = refs.with_images(prompts, config.missing_images)  # every prompt's training image, checked first
    if config.mitigation is None and refs.kit is None:  # NeMo here needs reference statistics unlearn does not take
        raise DoriError("dori unlearn on this model needs --mitigation DIR: run 'dori mitigate --method nemo --stats "
                        "FILE' (or --method wanda) first and pass its folder")  # fmt: skip
    shards = Shards()  # data-parallel fine-tuning; the attacks shard their prompts
    out = shards.open_run(out, "unlearn", asdict(config), resume=resume)
    common = dict(prompts=config.prompts, model=config.model, type=config.type, limit=config.limit,
                  images=config.images, sscd=config.sscd, batch_size=config.batch_size)  # fmt: skip
    attack_cfg = AttackRunConfig(steps=config.eval_attack_steps, steps_curve=str(config.eval_attack_steps),
                                 seeds=config.seeds, eval_steps=config.eval_steps, guidance=config.guidance,
                                 control=False, **common)  # fmt: skip
    util = dict(seeds=config.utility_seeds, steps=config.eval_steps, guidance=config.guidance, batch_size=config.batch_size,
                **utility_options(config))  # fmt: skip
    before_file = out / "before.json"
    if before_file.exists():
        before = read_json(before_file)
    else:
        say("measuring the original model (DoRI attack, utility)")
        attack_before = attack_and_measure(model, prompts, refs, attack_cfg, label="before_attack", out=out)
        before = {"attack": attack_before, "utility": utility(model, **util)}
        if shards.main:
            write_json_atomic(before_file, before)

    # Surrogates: the mitigated model's generation from the original prompt, below the threshold.
    targets = attack_targets(model, prompts, refs)
    surrogate_file = out / "surrogates.safetensors"
    if not surrogate_file.exists() and shards.main:  # the other processes wait and read the file
        mitigation = load_mitigation(model, config.mitigation)
        if mitigation is None:
            say("surrogates: running NeMo")
            nemo_cfg = MitigateConfig(method="nemo", seeds=config.seeds, steps=config.eval_steps, **common)
            mitigation, _ = select_nemo(nemo_cfg, model, prompts.texts, model.encode(prompts.texts), out, say)
        made, surrogate_info = make_surrogates(model, prompts, targets, refs, mitigation, steps=config.eval_steps,
                                               guidance=config.guidance, tries=config.surrogate_tries,
                                               rule=config.surrogate_rule)  # fmt: skip
        save_tensors_atomic({"images": made}, surrogate_file)
        write_json_atomic(out / "surrogates.json", {"tau": refs.detector.tau, "surrogates": surrogate_info})  # fmt: skip
        save_grid(torch.cat([torch.cat(targets), made]), out / "surrogates.png", columns=len(prompts))
    shards.wait()
    surrogates = read_tensors(surrogate_file, keys=("images",))["images"]
    surrogate_info = read_json(out / "surrogates.json")["surrogates"]
    # A prompt whose mitigated generations all copy some memorized image has no surrogate: it is
    # reported and left out of L_adv (the evaluation still attacks it).
    trained = [i for i, s in enumerate(surrogate_info) if s["source"] != "none"]
    if not trained:
        raise DoriError(f"no prompt has a surrogate: every generation of the mitigated model copies a memorized image "
                        f"(see {out / 'surrogates.png'}); pass a stronger --mitigation or raise --surrogate-tries")  # fmt: skip

    retain_images, retain_captions = retained_pairs(model, config, refs)
    retain_emb, retain_index = encode_unique(model, retain_captions)
    checkpoint = out / "checkpoint.pt"
    latents = dict(targets=model.to_latents(torch.cat([targets[i] for i in trained])),
                   surrogates=model.to_latents(surrogates[trained]), prompt_emb=model.encode(prompts.pick(trained).texts),
                   retain_latents=model.to_latents(retain_images))  # fmt: skip
    ft_began = time.monotonic()

    def on_step(current: UnlearnState, optimizer) -> None:
        last = current.history[-1]
        say(f"fine-tuning step {current.step}/{config.steps}: L_DM {last['loss_dm']:.4f}, L_adv {last['loss_adv']:.4f}")
        if shards.main and (current.step % config.checkpoint_every == 0 or current.step == config.steps):
            save_torch_atomic({"unet": model.unet.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": current.step, "triggers": current.triggers.cpu(),
                               "history": json.dumps(current.history),
                               "loss_scale": json.dumps(current.loss_scale)}, checkpoint)  # fmt: skip

    # A half-precision model trains (and is saved) with float32 weights: see DiffusionModel.fp32_weights.
    with model.fp32_weights():
        state, optimizer_state, original = None, None, None
        if checkpoint.exists():
            if ft_config.preserve_weight > 0:  # the preservation term holds the model to the original, not the checkpoint
                original = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
            saved = read_checkpoint(checkpoint, keys=("unet", "optimizer", "step", "triggers", "history"))
            try:
                model.unet.load_state_dict(saved["unet"])
                state = UnlearnState(int(saved["step"]), saved["triggers"].to(model.device), json.loads(saved["history"]),
                                     json.loads(saved.get("loss_scale", "null")))  # fmt: skip
            except (RuntimeError, TypeError, ValueError) as error:
                raise DoriError(f"{checkpoint} does not fit this model or run ({str(error).splitlines()[0]}); delete "
                                "it to fine-tune again from step 0, or choose a new --out") from error  # fmt: skip
            optimizer_state = saved["optimizer"]
            say(f"resumed fine-tuning at step {state.step}")
        state = adversarial_finetune(model, **latents, retain_emb=retain_emb, retain_index=retain_index,
                                     config=ft_config, state=state, optimizer_state=optimizer_state, on_step=on_step,
                                     shards=shards, reference_weights=original)  # fmt: skip
        if shards.main:
            save_model(model, out / "model", meta={"unlearned_from": model.source})
    ft_seconds = time.monotonic() - ft_began
    shards.wait()
    model.source = str(out / "model")

    say("evaluating the fine-tuned model")
    after_prompt = attack_and_measure(model, prompts, refs, attack_cfg, label="after_attack_prompt", out=out)
    random_cfg = AttackRunConfig(**{**asdict(attack_cfg), "init": "random", "attack_seed": 1})
    after_random = attack_and_measure(model, prompts, refs, random_cfg, label="after_attack_random", out=out)
    plain, _, plain_images = evaluate_replication(model, prompts, refs, seeds=config.seeds, steps=config.eval_steps,
                                                  guidance=config.guidance, batch_size=config.batch_size)  # fmt: skip
    if shards.main:
        save_grid(plain_images, out / "after_prompt_generations.png", columns=config.seeds)
    utility_after = utility(model, **util)
    ub, ua = before["utility"], utility_after
    summary = {
        "mr_attack_before": before["attack"]["mr"],
        "sscd_attack_before": before["attack"]["sscd_mean"],
        "mr_attack_after": max(after_prompt["mr"], after_random["mr"]),
        "mr_attack_after_prompt_init": after_prompt["mr"],
        "mr_attack_after_random_init": after_random["mr"],
        "sscd_attack_after": after_prompt["sscd_mean"],
        "sscd_attack_after_std": after_prompt["sscd_std"],
        "mr_prompt_after": plain["mr"],
        "mr_any_planted_prompt_after": plain.get("mr_any_planted"),
        "mr_any_planted_attack_after": (None if after_prompt.get("mr_any_planted") is None else
                                        max(after_prompt["mr_any_planted"], after_random["mr_any_planted"])),
        "sscd_prompt_after": plain["sscd_mean"],
        "sscd_prompt_after_std": plain["sscd_std"],
        "utility_before": None if ub is None else ub["alignment"],
        "utility_after": None if ua is None else ua["alignment"],
        "fd_before": None if ub is None else ub["fd"],
        "fd_after": None if ua is None else ua["fd"],
        "utility_detail_before": ub, "utility_detail_after": ua,
        "surrogate_sources": {source: sum(s["source"] == source for s in surrogate_info)
                              for source in sorted({s["source"] for s in surrogate_info})},
        "surrogate_rule": config.surrogate_rule,
        "prompts_without_surrogate": [prompts.texts[i] for i, s in enumerate(surrogate_info) if s["source"] == "none"],
        "fine_tuning_seconds": ft_seconds,
        "seconds": time.monotonic() - began,
        "history": state.history,
        "model": str(out / "model"),
        "similarity": refs.detector.to_dict(),
        "processes": shards.world,
    }
    if shards.main:
        write_json_atomic(out / "summary.json", summary)
    shards.wait()
    return summary
