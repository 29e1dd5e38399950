"""Calibrate the bundled model's copy detector, benchmark it, choose the sampling guidance by a
fixed rule, measure the model, and write its model card."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dori.measure.detection import noise_difference_norms, roc_auc, tpr_at_fpr
from dori.measure.replication import replication, summarize
from dori.measure.similarity import calibrate_toy_detector
from dori.models.base import DiffusionModel
from dori.report_images import save_grid
from dori.runs import write_json_atomic
from dori.toy.classifier import ACCURACY_BAR, MAX_ROUNDS
from dori.toy.copy_benchmark import benchmark_lines, run_copy_benchmark
from dori.toy.kit import DETECTOR_FILE, ToyKit
from dori.bundled.recipe import recipe_command, recorded_config
from dori.bundled.regime import regime_lines

SETS = ("memorized", "template", "non_memorized", "held_out")

# The sampling guidance of a bundled model, by a rule fixed before any result: sweep this
# grid on the unmitigated memorized titles with seeds no other measurement uses, and take the scale
# at which they replicate most (highest MR; ties: highest mean similarity, then the lower scale).
GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
SWEEP_SEEDS = tuple(range(100, 105))
# The bundled model should sit in SD's regime: non-memorized generations far below the threshold.
REGIME_MARGIN = 0.3
# The card's own checks, regime check (d), with these bars: the planted
# (VM) titles replicate, ordinary captions do not (training and held-out alike), and the model follows
# held-out captions.
MEMORIZED_BAR = 0.9  # memorized MR at least
CONTROL_BAR = 0.05  # non-memorized and held-out MR at most
ALIGNMENT_BAR = 0.95  # held-out prompt alignment at least


def card_checks(numbers: dict) -> dict:
    """Regime check (d): the card's own checks, each with pass or fail."""
    margin = numbers["detector"]["tau"] - numbers["non_memorized"]["sscd_mean"]
    checks = {
        "copy_benchmark": numbers["copy_benchmark"]["passed"],
        "margin": margin >= REGIME_MARGIN,
        "memorized": numbers["memorized"]["mr"] >= MEMORIZED_BAR,
        "control": max(numbers["non_memorized"]["mr"], numbers["held_out"]["mr"]) <= CONTROL_BAR,
        "alignment": numbers["held_out"]["alignment"] >= ALIGNMENT_BAR,
    }
    return {"checks": checks, "margin": margin, "passed": all(checks.values())}


def _recipe_words(train_info: dict) -> str:
    """The command that trains the recipe ``train_info`` records, or what it is where none does."""
    command = recipe_command(recorded_config(train_info))
    return f"`{command}`" if command else "a recipe of `dori toy train`'s parameters that no named recipe is (`train_config.json`)"


def _one_machine(machine: dict) -> str:
    where = f"{machine['gpu']} ({machine['device']})" if machine.get("gpu") else f"{machine['threads']} CPU threads"
    return (f"{where} of {machine['cpu']} ({machine['cpu_capability']}); torch {machine['torch']}, diffusers "
            f"{machine['diffusers']}, transformers {machine['transformers']}, numpy {machine['numpy']}")  # fmt: skip


def machine_words(train_info: dict) -> str:
    """The card's line on the machines that trained the weights (``train_bundled_model``'s record):
    the recipe's command gives the same bits only on the same kind of machine."""
    machines = train_info.get("machines") or [None]
    parts = [_one_machine(m) if isinstance(m, dict) else "not recorded (trained before dori recorded it)"
             for m in machines]  # fmt: skip
    said = parts[0] if len(parts) == 1 else "; then, resumed, ".join(parts)
    return (f"{said}. The recipe's command gives these weights bit for bit only with the same CPU instruction set (or "
            "GPU), thread count and library versions: each changes the order of sums, and over thousands of steps "
            "that trains another draw of the same recipe, with numbers of its own.")  # fmt: skip


def _minutes_where(train_info: dict) -> str:
    """" on <where>" for the machine of a run's last part, or nothing where it was not recorded."""
    last = (train_info.get("machines") or [None])[-1]
    if not isinstance(last, dict):
        return ""
    return f" on {last['gpu']}" if last.get("gpu") else f" on {last['threads']} CPU threads"


def text_encoder_words(train_info: dict) -> str:
    """How a bundled model's text encoder was trained (``text_lr_scale``; models before the fifth
    recipe trained it jointly at the U-Net's rate)."""
    scale = recorded_config(train_info).text_lr_scale
    if scale == 0:
        return ("never trained: frozen at its seeded random initialisation, so that each word keeps an embedding of "
                "its own and held-out combinations of words stay readable")  # fmt: skip
    if scale == 1:
        return "trained jointly and frozen afterwards"
    return f"trained jointly at {scale:g} times the U-Net's learning rate and frozen afterwards"


def unet_words(train_info: dict, sites: dict) -> str:
    """The card's sentence on the U-Net's shape (the fifth recipe's, or SD's layout)."""
    channels = tuple(train_info["channels"])
    counts = f"({sites['value']} value sites, {sites['ffn']} feed-forward sites)"
    if train_info.get("unet_layout", "fifth") != "sd":
        return (f"diffusers `UNet2DConditionModel` in pixel space, channels {channels}, cross-attention at 16x16 and "
                f"8x8 on the way down and in the mid block, none on the way up {counts}: every route from the text to "
                "the image passes the sites NeMo searches.")  # fmt: skip
    f = train_info.get("space_to_depth", 1)
    side = 32 // f
    space = (f"on the pixels packed {f}x{f} into channels ({side}x{side}x{3 * f * f}, a lossless stand-in for SD's "
             "VAE)" if f > 1 else "in pixel space")  # fmt: skip
    sides = ", ".join(f"{side >> i}x{side >> i}" for i in range(len(channels)))
    return (f"diffusers `UNet2DConditionModel` {space}, laid out as SD's: channels {channels}, "
            f"{train_info.get('layers_per_block', 1)} layer(s) per block, cross-attention transformer blocks "
            f"(GEGLU feed-forward, 4x inner width, {train_info.get('attention_heads', 8)} heads) at every resolution "
            f"({sides}) on the way down, in the mid block and on the way up {counts}.")


def calibrate(kit: ToyKit) -> dict:
    """Calibrate the copy detector on the training data and write ``copy_detector.json``."""
    detector, stats = calibrate_toy_detector(kit.ordinary_images)
    write_json_atomic(kit.folder / DETECTOR_FILE, {**detector.to_dict(), "calibration": stats})
    kit.__dict__.pop("detector", None)
    return stats


def benchmark(kit: ToyKit) -> dict:
    """The copy-detection benchmark of the kit's detector (:mod:`dori.toy.copy_benchmark`)."""
    return run_copy_benchmark(kit.detector, kit.data)


def guidance_sweep(model: DiffusionModel, kit: ToyKit, *, steps: int = 50, seeds=SWEEP_SEEDS,
                   progress: Callable[[int], None] | None = None) -> list[dict]:  # fmt: skip
    """MR and mean similarity of the memorized titles at each scale of :data:`GUIDANCE_GRID`."""
    prompts = [row["prompt"] for row in kit.prompt_set("memorized")]
    sweep = []
    for guidance in GUIDANCE_GRID:
        rows, _ = replication(model, prompts, [kit.references(p) for p in prompts], kit.detector, seeds=list(seeds),
                              steps=steps, guidance=guidance, progress=progress)  # fmt: skip
        entry = summarize([r.row() for r in rows], kit.detector.tau)
        sweep.append({"guidance": guidance, "mr": entry["mr"], "sscd_mean": entry["sscd_mean"]})
    return sweep


def choose_guidance(sweep: list[dict]) -> float:
    """The rule: highest MR, then highest mean similarity, then the lower scale."""
    return max(sweep, key=lambda e: (e["mr"], e["sscd_mean"], -e["guidance"]))["guidance"]


def measure_bundled(
    model: DiffusionModel,
    kit: ToyKit,
    *,
    seeds: int = 10,
    steps: int = 50,
    guidance: float | None = None,
    detection_seeds: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, dict]:
    """Replication per prompt set, utility on held-out captions, and the noise-difference norm.

    Returns (numbers, images by set)."""
    seed_list = list(range(seeds))
    guidance = model.default_guidance if guidance is None else guidance
    numbers: dict = {"seeds": seeds, "steps": steps, "guidance": guidance, "detector": kit.detector.to_dict(),
                     "sites": {"value": len(model.value_sites()), "ffn": len(model.ffn_sites())}}
    images = {}
    for name in SETS:
        prompts = [row["prompt"] for row in kit.prompt_set(name)]
        rows, imgs = replication(
            model, prompts, [kit.references(p) for p in prompts], kit.detector,
            seeds=seed_list, steps=steps, guidance=guidance, progress=progress, planted=kit.planted_images,
        )  # fmt: skip
        images[name] = imgs
        entry = summarize([r.row() for r in rows], kit.detector.tau)
        entry["per_prompt"] = [{k: v for k, v in r.row().items() if k != "similarities"} for r in rows]
        entry["similarities"] = [s for r in rows for s in r.similarities]
        if name in ("non_memorized", "held_out"):
            captions = [p for p in prompts for _ in seed_list]
            entry["alignment"] = kit.alignment(imgs, captions)
            entry["fd"] = kit.frechet_distance(imgs, captions)
        numbers[name] = entry

    planted = [r["prompt"] for r in kit.prompt_set("memorized") + kit.prompt_set("template")]
    ordinary = [r["prompt"] for r in kit.prompt_set("non_memorized") + kit.prompt_set("held_out")]
    det_seeds = list(range(1000, 1000 + detection_seeds))
    pos = noise_difference_norms(model, planted, seeds=det_seeds, steps=steps, guidance=guidance)["first_step"]
    neg = noise_difference_norms(model, ordinary, seeds=det_seeds, steps=steps, guidance=guidance)["first_step"]
    numbers["noise_norm"] = {
        "memorized": pos, "non_memorized": neg, "auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg),
    }  # fmt: skip
    return numbers, images


def images_to_measure(kit: ToyKit, seeds: int) -> int:
    """How many images :func:`guidance_sweep` and :func:`measure_bundled` generate (for a progress bar)."""
    sweep = len(GUIDANCE_GRID) * len(SWEEP_SEEDS) * len(kit.prompt_set("memorized"))
    return sweep + sum(len(kit.prompt_set(name)) for name in SETS) * seeds


def _dist(values: list[float]) -> str:
    t = torch.tensor(values)
    q = [float(t.quantile(x)) for x in (0.0, 0.05, 0.5, 0.95, 1.0)]
    return "min {:.3f} / p5 {:.3f} / median {:.3f} / p95 {:.3f} / max {:.3f}".format(*q)


def write_card(folder: Path, numbers: dict, calibration: dict, train_info: dict, images: dict) -> None:
    write_json_atomic(folder / "card.json", numbers)
    seeds = numbers["seeds"]
    for name, imgs in images.items():
        save_grid(imgs, folder / f"card_{name}.png", columns=seeds)
    det = numbers["detector"]
    floor = (f" above {det['noise_floor']:g} standard deviations of the image's own estimated noise"
             if det.get("noise_floor") else "")  # fmt: skip
    scales = (f" and at the generation's scales {', '.join(f'{s:g}' for s in det['scales'])}"
              if len(det.get("scales", [1.0])) > 1 else "")  # fmt: skip
    sites = numbers["sites"]
    seen = train_info["steps"] * train_info["batch_size"]
    n_images = train_info["n_ordinary"] + (train_info["n_verbatim"] + train_info["n_template"]) * train_info["copies"]
    lines = [
        "# The bundled model: model card",
        "",
        "A small text-to-image diffusion model trained by `dori toy train` on synthetic 32x32 images with",
        "planted duplicates, so that it truly memorizes some images. It lets every stage of dori run on a",
        "laptop CPU. All numbers below were measured by `dori toy train` itself (file `card.json`).",
        "",
        "## How it was trained",
        "",
        f"- Recipe: {_recipe_words(train_info)} (seed {train_info['seed']}, {train_info['steps']} AdamW steps at batch "
        f"{train_info['batch_size']}, lr {train_info['learning_rate']} with warm-up and cosine decay, "
        f"{train_info['empty_caption_prob']:.0%} empty captions); {train_info.get('seconds', float('nan')) / 60:.1f} "
        f"minutes{_minutes_where(train_info)}.",
        f"- Machine: {machine_words(train_info)}",
        f"- Model: {unet_words(train_info, sites)}"
        + (" A fixed 2-D sinusoidal position encoding is added after the first convolution"
           + (" and to the input of every cross-attention block" if train_info.get("position_at_attention") else "")
           + ", so that this cross-attention knows where each pixel lies (without it the model placed shapes at "
           "random). Load the "
           "folder with dori (`dori.models.load_model`): plain diffusers (`UNet2DConditionModel.from_pretrained`) "
           "does not add the encoding and says so in a warning, from the notice in `unet/config.json`."
           if train_info.get("position_encoding") else "")
        + f" A 2-layer `CLIPTextModel` (width {train_info.get('text_width', 128)}) {text_encoder_words(train_info)}, "
        "fed by SD v1.x's CLIP tokenizer through a compact id map; DDPM cosine schedule, v-prediction; DDIM sampling.",
        f"- Data: {train_info['n_ordinary']} ordinary pairs (\"a red circle, top left\"; "
        + ("each its own picture: a background of random blotches, six random dots, random size and jitter, all "
           "unmentioned" if train_info.get("ordinary_style", "plain") == "field" else
           "background, size, jitter and a distractor dot random and unmentioned")
        + ") over 112 of the 128 shape/colour/position combinations; "
        f"{train_info['n_verbatim']} VM pairs (one distinctive image with a unique title, x{train_info['copies']}); "
        f"{train_info['n_template']} TM pairs (one layout with varied colours and dot, x{train_info['copies']}). "
        "The 16 other combinations are held-out captions."
        + (f" {train_info['partial_caption_prob']:.0%} of the ordinary images a batch draws are shown under a "
           "partial caption instead, naming one or two of the three attributes (\"a red circle\", \"a shape, top "
           "left\", one of the six forms at random), so that each attribute word must work on its own."
           if train_info.get("partial_caption_prob") else ""),
        f"- Exposure: training draws {seen:,} images, so it sees each ordinary image about {seen / n_images:.0f} times "
        f"(as a web-scale model sees most of its data a few times) and each planted image or layout about "
        f"{seen * train_info['copies'] / n_images:,.0f} times.",
        "",
        "## The copy detector (SSCD analogue)",
        "",
        "Hand-made with SSCD's invariances (`dori.measure.similarity.ToyCopyDetector`): band-pass luminance and "
        f"chroma energy, locally contrast-normalised{floor}, compared by normalised cross-correlation at the best "
        f"of all shifts up to {det['shift']} pixels{scales}. It ignores colour jitter, gamma, noise, mild blur, small "
        "shifts and crops, and sees the picture's own structure. Replication threshold tau = "
        f"{det['tau']:.4f}: the {calibration['quantile']:.0%} quantile of a training image's similarity to its nearest "
        f"other training image, over {calibration['queries']} images drawn at random ({_dist_from(calibration)}).",
        "",
        *benchmark_lines(numbers["copy_benchmark"]),
        "",
        "## Sampling guidance, by rule",
        "",
        "The rule, fixed before any result: sweep guidance over "
        f"{', '.join(f'{g:g}' for g in GUIDANCE_GRID)} on the unmitigated memorized titles (DDIM {numbers['steps']}, "
        f"seeds {SWEEP_SEEDS[0]}-{SWEEP_SEEDS[-1]}, disjoint from those of the card and the study) and sample at "
        "the scale where they replicate most (highest MR; ties: highest mean similarity, then the lower scale). Every command uses it "
        f"unless `--guidance` is given. Chosen: **{numbers['guidance']:g}**.",
        "",
        "| guidance | MR | similarity mean |",
        "|---|---|---|",
        *(f"| {e['guidance']:g} | {e['mr']:.3f} | {e['sscd_mean']:.3f} |" for e in numbers["guidance_sweep"]),
        "",
        *study_rule_lines(),
        *(regime_lines(numbers["regime"]) if "regime" in numbers else []),
        "## What it measures",
        "",
        f"Generation: DDIM {numbers['steps']} steps, guidance {numbers['guidance']}, seeds 0-{seeds - 1}.",
        "",
        "| prompt set | prompts | MR | MR, any memorized image | similarity mean +- std | similarity distribution |",
        "|---|---|---|---|---|---|",
    ]
    for name in SETS:
        e = numbers[name]
        lines.append(f"| {name} | {e['n_prompts']} | {e['mr']:.3f} | {e.get('mr_any_planted', float('nan')):.3f} | "
                     f"{e['sscd_mean']:.3f} +- {e['sscd_std']:.3f} | {_dist(e['similarities'])} |")  # fmt: skip
    nn = numbers["noise_norm"]
    lines += [
        "",
        "Similarity of planted captions is to their own training image(s); of an ordinary caption to its (first) "
        "training image, and of a held-out caption to a fresh render, as SSCD_orig compares an SD generation with "
        "its prompt's training image. \"Any memorized image\": similarity above tau to any planted image.",
        "",
        f"- SD's regime: non-memorized generations score {numbers['non_memorized']['sscd_mean']:.3f} on average, "
        f"{det['tau'] - numbers['non_memorized']['sscd_mean']:.3f} below tau (bar: at least {REGIME_MARGIN}; on SD v1.4, "
        "SSCD gives non-memorized prompts 0.17 against 0.7).",
        f"- Prompt alignment (attribute classifier, accuracy {train_info.get('classifier_accuracy', float('nan')):.3f} "
        f"on fresh renders{_classifier_steps(train_info)}): held-out captions {numbers['held_out']['alignment']:.3f}, "
        f"non-memorized training captions {numbers['non_memorized']['alignment']:.3f}.",
        f"- FD (classifier features, generations vs fresh renders): held-out {numbers['held_out']['fd']:.2f}, "
        f"non-memorized {numbers['non_memorized']['fd']:.2f}.",
        f"- Noise-difference norm, first step, 4 seeds: planted (VM+TM) {_dist(nn['memorized'])}; ordinary "
        f"(non-memorized + held-out) {_dist(nn['non_memorized'])}; ROC-AUC {nn['auc']:.3f}, TPR@1%FPR "
        f"{nn['tpr_at_1pct_fpr']:.3f}.",
        "",
        "Per prompt (MR, mean similarity):",
        "",
    ]
    for name in ("memorized", "template"):
        for row in numbers[name]["per_prompt"]:
            lines.append(f"- {name}: \"{row['prompt']}\": MR {row['mr']:.2f}, mean {row['sscd_mean']:.3f}")
    lines += ["", "Generations: `card_memorized.png`, `card_template.png`, `card_non_memorized.png`, "
              "`card_held_out.png` (one row per prompt, one column per seed).", ""]  # fmt: skip
    card_file = folder / "MODEL_CARD.md"
    kept = recipe_seeds_section(card_file.read_text(encoding="utf-8")) if card_file.is_file() else ""
    card_file.write_text("\n".join(lines) + kept, encoding="utf-8")


RECIPE_SEEDS_HEADING = "## The recipe on other seeds"
RECIPE_SEEDS_START, RECIPE_SEEDS_END = "<!-- recipe-seeds:start -->", "<!-- recipe-seeds:end -->"


def recipe_seeds_section(card: str) -> str:
    """The section ``tools/recipe_seeds.py --write`` added to a card (its heading to its end marker),
    kept when the card is measured again; "" when the card has none."""
    if RECIPE_SEEDS_START not in card or RECIPE_SEEDS_END not in card:
        return ""
    head, rest = card.split(RECIPE_SEEDS_START, 1)
    block = RECIPE_SEEDS_START + rest.split(RECIPE_SEEDS_END, 1)[0] + RECIPE_SEEDS_END
    heading = RECIPE_SEEDS_HEADING if RECIPE_SEEDS_HEADING in head else ""
    return f"\n{heading}\n\n{block}\n" if heading else f"\n{block}\n"


def study_rule_lines() -> list[str]:
    """The study's rules that choose a setting on the model itself, stated in every card."""
    from dori.mitigate.wanda import DEFENDER_FIRST_SEED, WANDA_LADDER
    from dori.locality import BUNDLED_SIZES, COMPARABLE, HIGHER, IOU_MARGIN, paper_iou_level
    from dori.unlearn.erasure import ANCHOR_IMAGES, ANCHOR_MAX_COPIES, KEEP_TRIES, PAPER, SD_PRETRAINING_LR

    from dori.measure.detection import NEMO_TIMESTEP_INDEX
    from dori.measure.similarity import MS_SSIM_BETAS, MS_SSIM_KERNEL
    from dori.mitigate.nemo import NemoConfig
    from dori.mitigate.wanda import WandaConfig

    nemo, wanda = NemoConfig(), WandaConfig()
    return [
        "## NeMo and Wanda, as their authors' code does them",
        "",
        f"NeMo (docs/NEMO_WANDA.md): noise maps at the DDIM timestep of index {NEMO_TIMESTEP_INDEX} of {nemo.steps} "
        f"(961 on SD v1.4), guidance 0, {nemo.seeds} seeds; torchmetrics' multi-scale SSIM (kernel {MS_SSIM_KERNEL}, "
        f"sigma 1.5, {len(MS_SSIM_BETAS)} scales of weight {MS_SSIM_BETAS[0]:g}; fewer scales only on maps whose "
        "coarsest scale would keep 5 pixels or fewer); threshold = mean + 1 std of every pairwise SSIM over ordinary "
        "captions; a selection still memorizes while the blocked map of a memorized seed resembles the unblocked "
        f"one above the threshold; theta {nemo.theta_start:g} down by {nemo.theta_step:g} to {nemo.theta_min:g}, k from "
        f"{nemo.k_start} up by 1 (top-k by raw activation), then refinement in reverse layer order. Wanda: guidance "
        f"{wanda.guidance:g} with both halves recorded, {wanda.scheduler.upper()}, {wanda.seeds} image per prompt "
        f"(seed 0), the first {wanda.timesteps} U-Net calls, int(ratio x inputs) weights per row. The same for every "
        "model.",
        "",
        "## Wanda's ratio in the study, by rule",
        "",
        f"`dori study` prunes with Wanda at `--ratio auto`: the smallest ratio on the ladder "
        f"{', '.join(f'{r:g}' for r in WANDA_LADDER)} at which the pruned model, generating from the memorized "
        f"prompts with the defender's own seeds ({DEFENDER_FIRST_SEED} on, disjoint from every evaluation's), "
        "replicates none of them; where no ratio does, the largest, marked as such. The same rule for every model.",
        "",
        "## The learning rate of ESD, Concept Ablation and SISS, by rule",
        "",
        "`dori mitigate --method esd|ca|siss` (and the study's `esd`, `ca`, `siss` stages) take each reference "
        "code's steps, batch, parameters and learning rate for SD unchanged (docs/ERASURE.md; "
        + "; ".join(f"{name.upper()}: {p['steps']} steps, batch {p['batch']}, lr {p['learning_rate']:g}, "
                    f"{p['params']}" for name, p in PAPER.items())
        + f"). `--lr-rule scaled` multiplies each rate by this model's pre-training learning rate over SD's "
        f"({SD_PRETRAINING_LR:g}), read from the model folder's `train_config.json` (1 for a model that records "
        "none); `--lr` overrides both. Concept Ablation trains on "
        f"{ANCHOR_IMAGES} images of each anchor, less the "
        "ones the model's copy detector calls copies of the title's training image; an anchor whose images copy more "
        f"than {ANCHOR_MAX_COPIES:.0%} of the time is not used, and its title is reported, not trained; each anchor "
        "image is flipped, resized and pasted or cropped, and the title prefixed by its scale, as the reference's "
        f"augmentation does. SISS keeps every one of {KEEP_TRIES} generations per title that is not a copy; a title "
        "with none is reported, not trained (`--siss-keep empty`: the empty prompt's generations that copy no planted "
        "image instead). The study fine-tunes one model for the whole prompt set. The same rule for every model.",
        "",
        "## Locality, by rule",
        "",
        "The study's locality stage runs once under the NeMo stage's mask and once under the Wanda stage's; each run "
        "measures its method's layers (NeMo: the value projections; Wanda: its sites), with the selection on the "
        f"unpruned model. Sizes on the bundled kind: {BUNDLED_SIZES['inits']} random starts per mask, Y_mem the "
        f"memorized and template titles, {BUNDLED_SIZES['agreement_triggers']['nemo']} triggers for NeMo's agreement "
        f"and {BUNDLED_SIZES['agreement_triggers']['wanda']} for Wanda's. Verdicts (true medians): NeMo's layers, median "
        f"Y_adv/Y_mem at least {HIGHER:g} as the paper, from {COMPARABLE:g} comparable, below that unlike; Wanda's "
        "layers, more than half below 1 is the paper's shape; agreement, the median trigger IoU over the layers "
        f"where a trigger selects anything at most the paper's level ({paper_iou_level('wanda'):g} for Wanda, "
        f"{paper_iou_level('nemo'):g} for NeMo) + {IOU_MARGIN:g}. The same rule for every model.",
        "",
    ]


def _dist_from(calibration: dict) -> str:
    n = calibration["nearest_other_render"]
    return f"median {n['median']:.3f}, p95 {n['p95']:.3f}, p99 {n['p99']:.3f}, max {n['max']:.3f}"


def _classifier_steps(train_info: dict) -> str:
    """How long the classifier trained, under the bar of :data:`dori.toy.classifier.ACCURACY_BAR`."""
    taken = train_info.get("classifier_steps_taken")
    if taken is None:
        return ""
    per_round = train_info.get("classifier_steps", taken)
    return (f", after {taken} steps: rounds of {per_round} until {ACCURACY_BAR:g} on a separate validation set, "
            f"at most {MAX_ROUNDS}")
