"""``dori mitigate --method esd|ca|siss``: a fine-tuning mitigation (:mod:`dori.unlearn.erasure`)
with checkpoints and resume, the fine-tuned model saved in ``out/model`` (attack it with
``dori attack --model out/model``), and MR / similarity / utility before and after, as for the
pruning methods. The model passed in is left as it was (its U-Net is restored afterwards)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dori import run_files
from dori.fields import carried
from dori.errors import DoriError
from dori.evaluation import before_and_after, evaluate_replication, utility, utility_options, write_results
from dori.measure.replication import replication
from dori.unlearn.erasure import (
    ANCHOR_IMAGES,
    ANCHOR_MAX_COPIES,
    CA_PREFIXES,
    KEEP_TRIES,
    PAPER,
    ErasureConfig,
    anchor_for,
    ca_loss,
    esd_loss,
    siss_loss,
)
from dori.models.base import DiffusionModel
from dori.models.loading import save_model
from dori.parallel import Shards
from dori.prompts import PromptSet
from dori.references import References, attack_targets, is_bundled
from dori.report_images import save_grid
from dori.runs import read_checkpoint, read_json, read_tensors, save_tensors_atomic, save_torch_atomic, write_json_atomic
from dori.unlearn.training import TrainState, refuse_float16, train_unet

DATA_REPORT = {"ca": "anchors.json", "siss": "kept_images.json"}


def run_erasure(config, model: DiffusionModel, out: Path, prompts: PromptSet, refs: References, *, resume: bool,
                before: tuple[dict, list[dict]] | None, say: Callable[[str], None]) -> dict:  # fmt: skip
    """The fine-tuning branch of ``dori mitigate`` (``out`` is the opened run folder; ``before``
    the unmitigated numbers when a baseline run gave them)."""
    shards = Shards()
    erasure = carried(ErasureConfig, config, renamed={"steps": "finetune_steps"}).resolved(model)
    refuse_float16(model)  # before any work (the loop refuses it too)
    anchors = _anchors(config, model, prompts) if erasure.method == "ca" else None
    evaluation = dict(seeds=config.seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size)
    util = dict(seeds=config.utility_seeds, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                **utility_options(config))  # fmt: skip
    if before is None:
        say("measuring the unmitigated model")
        summary_before, rows_before, _ = evaluate_replication(model, prompts, refs, **evaluation)
    else:
        summary_before, rows_before = before
    utility_before = utility(model, **util)
    emb = model.encode(prompts.texts)
    step_loss = _objective(config, erasure, model, prompts, refs, emb, anchors, out, say)

    original = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    checkpoint = out / "checkpoint.pt"

    def on_step(state: TrainState, optimizer) -> None:
        last = state.history[-1]
        say(f"{config.method}: step {state.step}/{erasure.steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()
                                                                         if k != "step"))  # fmt: skip
        if shards.main and (state.step % config.checkpoint_every == 0 or state.step == erasure.steps):
            save_torch_atomic({"unet": model.unet.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": state.step, "history": json.dumps(state.history)}, checkpoint)  # fmt: skip

    try:
        with model.fp32_weights():  # a half-precision model trains and is saved with float32 weights
            state, optimizer_state = None, None
            if checkpoint.exists():
                saved = read_checkpoint(checkpoint, keys=("unet", "optimizer", "step", "history"))
                try:
                    model.unet.load_state_dict(saved["unet"])
                    state = TrainState(int(saved["step"]), json.loads(saved["history"]))
                except (RuntimeError, TypeError, ValueError) as error:
                    raise DoriError(f"{checkpoint} does not fit this model or run ({str(error).splitlines()[0]}); "
                                    "delete it to fine-tune again from step 0, or choose a new --out") from error  # fmt: skip
                optimizer_state = saved["optimizer"]
                say(f"{config.method}: resumed at step {state.step}")
            state = train_unet(model, erasure.params, step_loss, steps=erasure.steps, learning_rate=erasure.learning_rate,
                               weight_decay=erasure.weight_decay, grad_clip=erasure.grad_clip, seed=erasure.seed,
                               state=state, optimizer_state=optimizer_state, on_step=on_step, shards=shards)  # fmt: skip
            if shards.main:
                save_model(model, out / "model", meta={"mitigated_from": model.source, "mitigation": config.method})
        shards.wait()
        say(f"{config.method}: measuring the fine-tuned model")
        after, rows_after, images_after = evaluate_replication(model, prompts, refs, **evaluation)
        utility_after = utility(model, **util)
    finally:
        model.unet.load_state_dict(original)  # the caller's model is the unmitigated one again
    if not shards.main:
        return {}
    save_grid(images_after, out / run_files.MITIGATED_GRID, columns=config.seeds)
    summary = {
        "method": config.method, "prompt_set": prompts.name, "n_prompts": len(prompts),
        "finetuning": {**asdict(erasure), "reference_learning_rate": PAPER[erasure.method]["learning_rate"]},
        "history": state.history, "model": str(out / "model"),
        **before_and_after(summary_before, after, utility_before, utility_after),
        "utility_after_scope": "model", "utility_after_own": None, "similarity": refs.detector.to_dict(),
        # CA's anchors and SISS's kept images per prompt: copies, kept, and whether it was trained on
        "data": read_json(out / DATA_REPORT[config.method]) if config.method in DATA_REPORT else None,
    }  # fmt: skip
    return write_results(out, summary, rows_before, rows_after)


def _objective(config, erasure: ErasureConfig, model: DiffusionModel, prompts: PromptSet, refs: References,
               emb: torch.Tensor, anchors: list[str] | None, out: Path, say: Callable[[str], None]):  # fmt: skip
    """The method's step loss, with the data it needs made once and kept in the run folder (so a
    resumed run trains on the same anchor or kept images)."""
    if erasure.method == "esd":
        return esd_loss(model, emb, erasure)
    data_file = out / f"{erasure.method}_data.safetensors"
    empty_keep = erasure.method == "siss" and erasure.siss_keep == "empty"
    if not data_file.exists():
        count = ANCHOR_IMAGES if erasure.method == "ca" else KEEP_TRIES
        references = [refs.of(p) for p in prompts.prompts]
        common = dict(seeds=list(range(count)), steps=config.steps, guidance=config.guidance,
                      batch_size=config.batch_size)  # fmt: skip
        if empty_keep:
            # the empty prompt's generations are the same for every prompt: made once, scored against
            # every training image the run knows (the bundled kind's planted ones, else the set's), so
            # that no prompt keeps another memorized image
            say(f"siss: keeping the non-copies among {count} generations of the empty prompt")
            known = refs.planted if refs.planted is not None else torch.cat(references)
            one, made = replication(model, [""], [known], refs.detector, embeddings=model.empty_embedding(), **common)
            rows = one * len(prompts)
        else:
            # each image scored against its own prompt's training image(s), as every MR is
            say(f"ca: generating {count} images of each anchor and dropping the copies" if erasure.method == "ca"
                else f"siss: keeping the non-copies among {count} generations per prompt")  # fmt: skip
            rows, made = replication(model, prompts.texts, references, refs.detector,
                                     embeddings=model.encode(anchors) if erasure.method == "ca" else emb, **common)
        scores = torch.tensor([r.similarities for r in rows])  # [P, count]
        copies = scores > refs.detector.tau
        valid = usable_images(copies, ANCHOR_MAX_COPIES if erasure.method == "ca" else 1.0)
        kept_from = {"kept_from": "the empty prompt" if empty_keep else "the prompt"}
        report = [{"prompt": p, **({"anchor": anchors[i]} if anchors else kept_from), "copies": int(copies[i].sum()),
                   "kept": int(valid[i].sum()), "of": count, "trained": bool(valid[i].any()),
                   "similarity": [round(float(v), 4) for v in scores[i]]} for i, p in enumerate(prompts.texts)]  # fmt: skip
        if erasure.method == "ca":  # pixels (the augmentation works on them), as 8-bit values
            tensors = {"images": (made * 255).round().to(torch.uint8).view(len(prompts), count, *made.shape[1:])}
        else:
            latents = torch.cat([model.to_latents(made[i : i + config.batch_size])
                                 for i in range(0, len(made), config.batch_size)]).cpu()  # fmt: skip
            latents = latents.view(-1, count, *latents.shape[1:]).expand(len(prompts), -1, -1, -1, -1)
            tensors = {"latents": latents.contiguous()}
            tensors["forget"] = model.to_latents(torch.cat(attack_targets(model, prompts, refs))).cpu()
        tensors["valid"] = valid.to(torch.uint8)
        save_tensors_atomic(tensors, data_file)
        write_json_atomic(out / DATA_REPORT[erasure.method], report)
        save_grid(made, out / f"{erasure.method}_data.png", columns=count)
    keys = ("images", "valid") if erasure.method == "ca" else ("latents", "valid", "forget")
    data = read_tensors(data_file, keys=keys)
    valid = data["valid"].bool()
    if not valid.any():
        what = ("anchor passes the replication filter (its images copy the memorized one); pass --anchor with "
                "captions that do not copy" if erasure.method == "ca" else
                "prompt has a generation that is not a copy, so SISS has no kept images (its reference's keep set); "
                "this model copies these prompts in every seed: pass --siss-keep empty to keep the empty prompt's "
                "generations instead, or leave siss out")  # fmt: skip
        raise DoriError(f"{erasure.method}: no {what} ({out / DATA_REPORT[erasure.method]} lists them)")
    if erasure.method == "ca":
        prefixed = model.encode([q + p for p in prompts.texts for q in CA_PREFIXES])
        prefixed = prefixed.view(len(prompts), len(CA_PREFIXES), *prefixed.shape[1:])
        return ca_loss(model, emb, model.encode(anchors), data["images"].float() / 255, erasure, valid, prefixed)
    return siss_loss(model, emb, data["forget"], data["latents"], erasure, valid)


def usable_images(copies: torch.Tensor, max_copies: float) -> torch.Tensor:
    """``[P, n]``: the images a method may train on: not copies, of a prompt whose images copy at
    most ``max_copies`` of the time (Concept Ablation's anchors: 0.3, utils.py; SISS: 1, no limit)."""
    return ~copies & (copies.float().mean(1) <= max_copies)[:, None]


def _anchors(config, model: DiffusionModel, prompts: PromptSet) -> list[str]:
    """CA's anchor per prompt: ``--anchor TEXT`` for all, ``--anchor FILE`` (one per line, in prompt
    order), or, on the bundled kind, the title's object without its name (:func:`anchor_for`)."""
    if config.anchor is None:
        if not is_bundled(model):
            raise DoriError("Concept Ablation needs an anchor: pass --anchor TEXT (a generic caption such as "
                            "'a photo') or --anchor FILE with one caption per prompt")  # fmt: skip
        return [anchor_for(p) for p in prompts.texts]
    path = Path(config.anchor).expanduser()
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != len(prompts):
            raise DoriError(f"{path} holds {len(lines)} anchors for {len(prompts)} prompts; give one per prompt")
        return lines
    return [config.anchor] * len(prompts)
