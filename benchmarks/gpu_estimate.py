"""How long the paper's SD v1.4 study cannot take less than, on one GPU.

    python benchmarks/gpu_estimate.py                      # SD v1.4, 512 px, H100 dense BF16 peak
    python benchmarks/gpu_estimate.py --peak-tflops 1979 --gpus 8

FLOPs are counted, not guessed: PyTorch's ``FlopCounterMode`` runs the U-Net, the VAE decoder and
the text encoder of the published configuration (``sd_full_size.py``) once on the meta device
(shapes only). The work of each stage is then read from ``dori study``'s own settings for a real
model (``stage_configs``: 10 seeds, 50 DDIM steps, 50 attack steps at batch 8...) and the prompt
counts of ``sd14:memorized`` (VM), ``sd14:non_memorized`` and the COCO captions of the utility.
A backward pass through frozen weights (the attack) costs about one forward, one that also
computes the weights' gradients (fine-tuning) about two; gradient checkpointing adds one forward.

Each stage's time is its FLOPs at the GPU's dense peak: a floor. Real runs reach a fraction of the
peak (attention, normalisation and the sampler are memory-bound), so expect several times more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_full_size import TEXT, UNET, VAE  # noqa: E402 - the published configurations, written once


def unit_flops(shape: str, resolution: int) -> dict[str, float]:
    """FLOPs of one U-Net forward, one VAE decode and one text encoding, for one sample."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    latent = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=latent, **UNET[shape])
        vae = AutoencoderKL(sample_size=resolution, **VAE)
        text = CLIPTextModel(CLIPTextConfig(**TEXT[shape]))
        emb = torch.empty(1, 77, TEXT[shape]["hidden_size"])
        calls = {
            "unet": lambda: unet(torch.empty(1, 4, latent, latent), torch.zeros(1, dtype=torch.long),
                                 encoder_hidden_states=emb),  # fmt: skip
            "vae_decode": lambda: vae.decode(torch.empty(1, 4, latent, latent)),
            "text": lambda: text(torch.zeros(1, 77, dtype=torch.long)),
        }
        out = {}
        for name, call in calls.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                call()
            out[name] = float(counter.get_total_flops())
    return out


def stage_work(units: dict[str, float], *, checkpointing: bool) -> dict[str, float]:
    """FLOPs per stage of ``dori study`` on a real model at its default settings."""
    from dori.configs import StudyConfig, carried
    from dori.unlearn.adversarial import UnlearnConfig
    from dori.evaluation import UTILITY_PROMPTS
    from dori.mitigate.wanda import WANDA_LADDER
    from dori.prompts import load_prompt_set
    from dori.stages.study import stage_configs

    import tempfile

    real = tempfile.mkdtemp(prefix="sd-folder-")  # any folder that is not of the bundled kind
    configs = stage_configs(StudyConfig(model=real, memorized="sd14:memorized", non_memorized="sd14:non_memorized",
                                        type="VM"), Path(real) / "study")  # fmt: skip
    mem = len(load_prompt_set("sd14:memorized").only("VM"))
    mem_all = len(load_prompt_set("sd14:memorized"))  # detection scores every memorized prompt
    non = len(load_prompt_set("sd14:non_memorized"))
    unet, decode = units["unet"], units["vae_decode"]
    recompute = 1 if checkpointing else 0

    def images(n: int, steps: int) -> float:  # DDIM with classifier-free guidance, then the VAE
        return n * (2 * steps * unet + decode)

    def attack(n: int, steps: int, batch: int) -> float:  # forward + backward to the embedding
        return n * steps * batch * (2 + recompute) * unet

    rep, det, nemo, wanda = configs["replicate"], configs["detect"], configs["nemo"], configs["wanda"]
    util = images(nemo.utility_prompts * nemo.utility_seeds, nemo.steps)
    out = {
        "detect (first-step noise norm + NeMo's SSIM check)":
            (mem_all + non) * (det.generations * 2 + det.consistency_seeds) * unet,
        "replicate (memorized VM + non-memorized)": images((mem + non) * rep.seeds, rep.steps),
        "NeMo (MR and utility after; its search, a few first-step checks per prompt, left out)":
            images(mem * nemo.seeds, nemo.steps) + 2 * util,
        f"Wanda auto (at most {len(WANDA_LADDER)} rungs on the defender's seeds, then MR and utility)":
            len(WANDA_LADDER) * images(mem * wanda.seeds, wanda.steps) + images(mem * wanda.seeds, wanda.steps) + 2 * util,
    }  # fmt: skip
    for name in ("nemo_dori", "wanda_dori"):
        a = configs[name]
        evaluations = len(a.curve())  # a real model has no control sets of its own (dori attack takes them as prompts)
        out[f"{name.replace('_', ' + ').replace('nemo', 'NeMo').replace('wanda', 'Wanda').replace('dori', 'DoRI')} "
            f"({a.steps} steps at batch {a.attack_batch}, MR at {len(a.curve())} points)"] = (
            attack(mem, a.steps, a.attack_batch) + evaluations * images(mem * a.seeds, a.eval_steps))
    for method in ("nemo", "wanda"):  # the study's locality runs once under each method's mask
        loc = configs[f"locality_{method}"]
        out[f"locality under {method}'s mask ({loc.targets} target, {loc.inits} triggers)"] = (
            attack(loc.targets * loc.inits, loc.steps, loc.attack_batch)
            + images(loc.targets * loc.inits * loc.seeds, loc.eval_steps))
    u = carried(UnlearnConfig, configs["unlearn"])  # the algorithm's settings (adv_pairs...) as the stage passes them
    u_run = configs["unlearn"]
    triggers = mem * u.triggers_per_target
    per_step = (triggers * u.inner_steps * u.adv_pairs * (2 + recompute) * unet
                + (u.retain_batch + triggers * u.adv_pairs) * (3 + recompute) * unet)  # fmt: skip
    evaluation = (2 * attack(mem, u_run.eval_attack_steps, 8) + 3 * images(mem * u_run.seeds, u_run.eval_steps)
                  + 2 * util)  # fmt: skip
    out[f"adversarial fine-tuning ({u.steps} steps, {triggers} triggers) + its evaluation"] = u.steps * per_step + evaluation
    out[f"(utility: {UTILITY_PROMPTS}, {nemo.utility_prompts} captions x {nemo.utility_seeds} seeds, each time)"] = util
    return out  # noqa: RET504


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="v1.4")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak (H100 SXM: 989)")
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel processes (accelerate launch)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    units = unit_flops(args.shape, args.resolution)
    print(f"SD {args.shape} at {args.resolution} px: U-Net forward {units['unet'] / 1e12:.3f} TFLOP, VAE decode "
          f"{units['vae_decode'] / 1e12:.3f} TFLOP, text encoder {units['text'] / 1e12:.4f} TFLOP per sample\n")
    print(f"| stage | PFLOP | floor on {args.gpus} GPU(s) at {args.peak_tflops:g} TFLOP/s |")
    print("|---|---|---|")
    total = 0.0
    for name, flops in stage_work(units, checkpointing=args.gradient_checkpointing).items():
        seconds = flops / (args.peak_tflops * 1e12 * args.gpus)
        if not name.startswith("("):
            total += seconds
        print(f"| {name} | {flops / 1e15:.1f} | {seconds / 60:.1f} min |")
    print(f"| whole study | | {total / 3600:.2f} h |")


if __name__ == "__main__":
    main()
