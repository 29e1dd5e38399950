"""Training the bundled model by its recipe (:mod:`dori.bundled.recipe`), with checkpoints and
resume, and finishing it: the attribute classifier, the copy detector, the model card.

Every batch, noise draw and timestep at step ``k`` comes from a generator seeded by ``(seed, k)``,
so an interrupted run resumed from its last checkpoint continues exactly as if never stopped. The
bits still depend on the machine: the CPU's instruction set, the thread count and the library
versions each change the order of sums (after 50 steps by about 1e-7, after thousands a different
draw of the recipe), so the record names the machine each part of a run trained on
(:func:`training_machine`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dori.bundled.recipe import (ToyTrainConfig, build_model, build_text_encoder, build_unet, learning_rate, model_meta,
                                  recorded_config, scheduler_config)  # fmt: skip
from dori.errors import DoriError
from dori.models.base import DiffusionModel
from dori.models.loading import clip_tokenizer, save_model
from dori.runs import read_checkpoint, refuse_foreign_folder, save_torch_atomic
from dori.toy.classifier import train_classifier
from dori.toy.data import PARTIAL_FORMS, ToyDataset, build_dataset, partial_captions

CHECKPOINT = "checkpoint.pt"
NOT_RECORDED = "not recorded"  # the machine of a part trained before dori recorded it


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def training_machine(device: str | torch.device = "cpu") -> dict:
    """What besides the recipe decides a training run's bits: the processor and the instruction set
    torch uses on it, the thread count, the accelerator if any, and the library versions."""
    import diffusers
    import numpy
    import transformers

    device = torch.device(device)
    machine = {"cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "numpy": numpy.__version__}  # fmt: skip
    return {**machine, **versions}


@dataclass(frozen=True)
class CaptionTable:
    """The token ids training draws its captions from."""

    tokens: torch.Tensor  # [distinct captions, 77]
    index: torch.Tensor  # [images]: each training image's row of ``tokens``
    ordinary: torch.Tensor  # [images] bool
    empty: torch.Tensor  # [77]: the empty caption
    partial: torch.Tensor | None  # [distinct captions, forms, 77] (a planted caption repeats itself)

    @classmethod
    def build(cls, model: DiffusionModel, data: ToyDataset, config: ToyTrainConfig) -> CaptionTable:
        distinct = sorted(set(data.captions))
        row = {c: i for i, c in enumerate(distinct)}
        tokens = model.token_map[model.tokenize(distinct)].cpu()  # batches are drawn on the CPU
        partial = None
        if config.partial_caption_prob > 0:
            partial = torch.stack([
                model.token_map[model.tokenize(partial_captions(data.attributes[c]))].cpu() if c in data.attributes
                else tokens[i].expand(len(PARTIAL_FORMS), -1)
                for i, c in enumerate(distinct)
            ])  # fmt: skip
        return cls(tokens=tokens, index=torch.tensor([row[c] for c in data.captions]),
                   ordinary=torch.tensor([k == "ordinary" for k in data.kinds]),
                   empty=model.token_map[model.tokenize([""])][0].cpu(), partial=partial)  # fmt: skip

    def draw(self, config: ToyTrainConfig, step: int, image_shape, timesteps: int):
        """Step ``step``'s batch: (image indices, caption tokens, noise, timesteps), all from the
        generator seeded by ``(seed, step)``. A caption is dropped (the empty caption) with
        ``empty_caption_prob``; an ordinary image's caption is otherwise replaced by one of its partial
        captions with ``partial_caption_prob``, drawn last so that a recipe without it keeps its stream."""
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        n = config.batch_size
        idx = torch.randint(len(self.index), (n,), generator=generator)
        tokens = self.tokens[self.index[idx]].clone()
        drop = torch.rand(n, generator=generator) < config.empty_caption_prob
        tokens[drop] = self.empty
        noise = torch.randn((n, *image_shape), generator=generator)
        t = torch.randint(timesteps, (n,), generator=generator)
        if self.partial is not None and config.partial_caption_prob > 0:
            partial = torch.rand(n, generator=generator) < config.partial_caption_prob
            form = torch.randint(len(PARTIAL_FORMS), (n,), generator=generator)
            partial &= self.ordinary[idx] & ~drop
            tokens[partial] = self.partial[self.index[idx][partial], form[partial]]
        return idx, tokens, noise, t


def _counter(progress: Callable[[str, int, int], None], phase: str, total: int) -> Callable[[int], None]:
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(phase, done, max(done, total))  # the classifier may train past its first round

    return advance


def memory_format(config: ToyTrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def prepare_training(model: DiffusionModel, config: ToyTrainConfig) -> tuple[torch.optim.Optimizer, list]:
    """Put the model in training mode and build its optimizer; returns it and the clipped parameters
    (the U-Net's, and the text encoder's unless the recipe freezes it)."""
    unet, text_encoder = model.unet, model.text_encoder
    # Channels-last convolutions train about 5% faster on CPU; the saved weights are contiguous again.
    unet.to(memory_format=memory_format(config))
    train_text = config.text_lr_scale > 0
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    groups = [{"params": list(unet.parameters()), "scale": 1.0}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "scale": config.text_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.01)
    unet.train().requires_grad_(True)
    text_encoder.train(train_text).requires_grad_(train_text)
    return optimizer, params


def train_step(model: DiffusionModel, optimizer: torch.optim.Optimizer, params: list, config: ToyTrainConfig,
               x0: torch.Tensor, tokens: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One optimisation step of the diffusion loss on a batch of latents and caption token rows."""
    emb = model.text_encoder(tokens.to(model.device))[0]
    loss = model.diffusion_loss(x0, emb, noise.to(model.device), t.to(model.device)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return loss


def step_seconds(config: ToyTrainConfig, steps: int, device: str | torch.device = "cpu") -> tuple[DiffusionModel, list[float]]:
    """The recipe's model (random weights) and the seconds of each of ``steps`` timed training steps
    at its batch size on random batches, after one untimed step: the cost of a step, without the data
    set (what benchmarks/recipe_step.py prints and what a GPU screen fits its steps to)."""
    torch.manual_seed(config.seed)
    vocab = torch.arange(49408) % 512  # the embedding table's size barely matters to the time
    model = DiffusionModel(name="timing", unet=build_unet(config), text_encoder=build_text_encoder(config, vocab),
                           tokenizer=clip_tokenizer(), scheduler_config=scheduler_config(), token_map=vocab,
                           meta=model_meta(config), device=device)  # fmt: skip
    optimizer, params = prepare_training(model, config)
    n, f = config.batch_size, config.space_to_depth
    shape = (n, 3 * f * f, 32 // f, 32 // f)
    x0 = torch.randn(shape, device=model.device).contiguous(memory_format=memory_format(config))
    tokens, noise, t = torch.randint(512, (n, 77)), torch.randn(shape), torch.randint(model.num_train_timesteps, (n,))
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        train_step(model, optimizer, params, config, x0, tokens, noise, t)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return model, times[1:]


def recipe_changes(config_file: Path, config: ToyTrainConfig) -> list[str]:
    """The parameters in which ``config`` differs from the recipe recorded in ``config_file``. A
    parameter that a later recipe added is absent from an older record and counts at the value the
    code then had (:func:`recorded_config`), so that such a run can still be resumed."""
    try:
        recorded = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DoriError(f"{config_file} is not a readable training record ({error}); choose a new --out") from error
    current = asdict(config)
    unknown = sorted(set(recorded) - set(current))
    then = asdict(recorded_config({k: v for k, v in recorded.items() if k in current}))
    return unknown + [k for k in current if then[k] != current[k]]


def train_bundled_model(
    config: ToyTrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    on_checkpoint: Callable[[int, DiffusionModel], None] | None = None,
) -> Path:
    """Train the classifier and the diffusion model; write a loadable model folder to ``out_dir``.

    ``progress(phase, done, total)`` reports advancement. With ``resume``, training continues from
    ``out_dir/checkpoint.pt``; a checkpoint made with another config is refused. ``device`` trains
    the diffusion model there (the batches are still drawn on the CPU, so the data stream is the
    same; the weights are not bit-identical to a CPU run). ``on_checkpoint(step, model)`` is called
    after each checkpoint, under ``torch.no_grad``, with the model as it is at that step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "train_config.json"
    config_json = json.dumps(asdict(config), indent=2)
    checkpoint_file = out / CHECKPOINT
    own_files = (checkpoint_file, config_file, out / "attribute_classifier.safetensors", out / "attribute_classifier.json")
    refuse_foreign_folder(out, ours=any(f.exists() for f in own_files))
    if checkpoint_file.exists() and not resume:
        raise DoriError(f"{out} already holds a training checkpoint; pass --resume to continue it or choose a new --out")
    if resume and config_file.exists() and (changed := recipe_changes(config_file, config)):
        raise DoriError(f"{out} was trained with other parameters ({', '.join(changed)}; see {config_file}); "
                        "resume with the same ones")  # fmt: skip
    config_file.write_text(config_json)

    data = build_dataset(**config.data_kwargs())
    log(f"data: {len(data.captions)} training images, {len(data.planted)} planted pairs")
    model = build_model(config, data, device)
    unet, text_encoder = model.unet, model.text_encoder
    captions = CaptionTable.build(model, data, config)
    x0_all = model.to_latents(data.images)

    classifier_file = out / "attribute_classifier.safetensors"
    if not classifier_file.exists():
        classifier, info = train_classifier(
            seed=config.seed,
            steps=config.classifier_steps,
            style=config.ordinary_style,
            progress=None if progress is None else _counter(progress, "classifier", config.classifier_steps),
        )
        save_file(classifier.state_dict(), str(classifier_file))
        (out / "attribute_classifier.json").write_text(json.dumps(info))
        log(f"attribute classifier: accuracy {info['accuracy_on_fresh_renders']:.4f} on fresh renders (all three "
            f"attributes) after {info['steps']} steps")  # fmt: skip

    optimizer, params = prepare_training(model, config)
    start, seconds, began, machines = 0, 0.0, time.monotonic(), []
    if resume and checkpoint_file.exists():
        state = read_checkpoint(checkpoint_file, keys=("unet", "text_encoder", "optimizer", "step"))
        try:
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise DoriError(f"{checkpoint_file} does not fit this recipe ({str(error).splitlines()[0]}); delete it "
                            "to train from step 0, or choose a new --out") from error  # fmt: skip
        start, seconds = int(state["step"]), float(state.get("seconds", 0.0))
        machines = list(state.get("machines", [NOT_RECORDED]))
        log(f"resumed at step {start}")
    if start < config.steps and (machine := training_machine(device)) not in machines:
        machines.append(machine)
    for step in range(start, config.steps):
        idx, tokens, noise, t = captions.draw(config, step, x0_all.shape[1:], model.num_train_timesteps)
        x0 = x0_all[idx.to(x0_all.device)].contiguous(memory_format=memory_format(config))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step) * group.get("scale", 1.0)  # older checkpoints: 1
        loss = train_step(model, optimizer, params, config, x0, tokens, noise, t)
        if not torch.isfinite(loss):
            raise DoriError(f"training diverged at step {step} (loss {loss.item()}); the last good checkpoint is kept")
        done = step + 1
        if progress is not None:
            progress("diffusion", done, config.steps)
        if done % 50 == 0:
            log(f"step {done} loss {loss.item():.4f} lr {learning_rate(config, step):.2e}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_torch_atomic(
                {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                 "optimizer": optimizer.state_dict(), "step": done,
                 "seconds": seconds + time.monotonic() - began, "machines": machines},
                checkpoint_file,
            )  # fmt: skip
            if on_checkpoint is not None:
                with torch.no_grad():
                    on_checkpoint(done, model)

    unet.eval().requires_grad_(False).to("cpu", memory_format=torch.contiguous_format)
    text_encoder.eval().requires_grad_(False).to("cpu")
    if start < config.steps:  # otherwise the checkpoint's own time stands
        seconds += time.monotonic() - began
    train_info = {**asdict(config), "seconds": seconds, "machines": machines}
    # A provisional guidance: finish_bundled_model replaces it by the model card's rule.
    save_model(model, out, meta={"toy_data": config.data_kwargs(), "train_config": train_info,
                                 "default_guidance": 3.0})  # fmt: skip
    log(f"model written to {out}")
    return out


def card_train_info(folder: Path) -> dict:
    """The training record the card prints: ``dori_model.json``'s, with the attribute classifier's
    accuracy on fresh renders and its steps."""
    from dori.models.loading import MODEL_FILE

    train_info = json.loads((folder / MODEL_FILE).read_text())["train_config"]
    classifier_info = folder / "attribute_classifier.json"
    if classifier_info.exists():
        recorded = json.loads(classifier_info.read_text())
        train_info["classifier_accuracy"] = recorded["accuracy_on_fresh_renders"]
        train_info["classifier_steps_taken"] = recorded.get("steps")  # None: trained before the accuracy bar
    return train_info


def rewrite_card(folder: str | os.PathLike) -> None:
    """Write MODEL_CARD.md again from the folder's ``card.json`` and calibration, measuring nothing
    (for a change in the card's wording only; the grids stay as they are)."""
    from dori.bundled.card import write_card
    from dori.toy.kit import DETECTOR_FILE

    folder = Path(folder)
    numbers = json.loads((folder / "card.json").read_text())
    calibration = json.loads((folder / DETECTOR_FILE).read_text())["calibration"]
    write_card(folder, numbers, calibration, card_train_info(folder), {})


def finish_bundled_model(
    out_dir: str | os.PathLike,
    *,
    seeds: int = 10,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
) -> dict:
    """Calibrate the copy detector on the training data and benchmark it, choose the sampling
    guidance by the card's rule (written to ``dori_model.json``), measure the model, write
    MODEL_CARD.md. Runs on any finished bundled-kind folder. ``progress(done, total)`` counts
    generated images; ``device`` is where the model generates them."""
    from dori.models.loading import MODEL_FILE, load_model
    from dori.runs import write_json_atomic
    from dori.bundled.card import (benchmark, calibrate, card_checks, choose_guidance, guidance_sweep, images_to_measure,
                               measure_bundled, write_card)  # fmt: skip
    from dori.toy.kit import ToyKit

    out = Path(out_dir)
    kit = ToyKit.from_folder(out)
    calibration = calibrate(kit)
    log(f"copy detector: tau {kit.detector.tau:.4f}")
    bench = benchmark(kit)
    log(f"copy-detection benchmark: recall {bench['recall']:.3f}, false positives {bench['false_positive_rate']:.4f}")
    model = load_model(out, device=device)
    count = _counter(lambda _, d, t: progress(d, t), "", images_to_measure(kit, seeds)) if progress else None
    sweep = guidance_sweep(model, kit, progress=count)
    guidance = choose_guidance(sweep)
    meta = json.loads((out / MODEL_FILE).read_text())
    write_json_atomic(out / MODEL_FILE, {**meta, "default_guidance": guidance})
    scales = ", ".join(f"{e['guidance']:g}: MR {e['mr']:.2f}" for e in sweep)
    log(f"guidance sweep: {scales}; chosen {guidance:g}")
    numbers, images = measure_bundled(model, kit, seeds=seeds, guidance=guidance, progress=count)
    numbers.update({"copy_benchmark": bench, "guidance_sweep": sweep,
                    "guidance_rule": "highest MR, then highest mean similarity, then the lower scale"})
    from dori.bundled.regime import RegimeConfig, regime_checks, ship_verdict

    numbers["regime"] = regime_checks(model, kit, RegimeConfig(seeds=seeds, guidance=guidance), say=log)
    numbers["regime"]["d_card"] = card_checks(numbers)
    numbers["regime"]["ship"] = ship_verdict(numbers["regime"])
    checks = numbers["regime"]
    log("regime checks: " + ", ".join(f"{k.split('_')[0]} {'pass' if v['passed'] else 'FAIL'}"
                                      for k, v in checks.items() if isinstance(v, dict) and "passed" in v))
    write_card(out, numbers, calibration, card_train_info(out), images)
    for name in ("memorized", "template", "non_memorized", "held_out"):
        log(f"{name}: MR {numbers[name]['mr']:.3f}, similarity {numbers[name]['sscd_mean']:.3f}")
    log(f"held-out alignment {numbers['held_out']['alignment']:.3f}, noise-norm AUC {numbers['noise_norm']['auc']:.3f}")
    return numbers
