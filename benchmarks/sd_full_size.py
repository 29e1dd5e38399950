"""Stable Diffusion at full size without a GPU or a download.

    python benchmarks/sd_full_size.py --shape v1.4 --resolution 256
    python benchmarks/sd_full_size.py --shape v2.1 --resolution 256 --stages generate,attack

Builds a folder shaped like SD v1.4 (U-Net of 860 M parameters, CLIP ViT-L/14 text encoder of
width 768, epsilon prediction) or SD v2.1 (OpenCLIP ViT-H text encoder of width 1024,
v-prediction, linear attention projections) from the published configurations written below,
with random weights, and ``save_pretrained`` to a temporary folder. Every dori command then runs on
it at minimum sizes, each in a fresh process: seconds and peak resident memory per stage, printed
as a table. The images are noise (random weights); what is checked is that every shape, dtype and
name lines up at full size. ``--resolution`` sets the sample size (the U-Net's weights do not
depend on it): 256 px keeps a CPU run in minutes per stage; 512 px is the models' own.

Not part of the test suite: it needs about 22 GB of memory (fine-tuning holds the U-Net, its
gradients and Adam's two moments) and about 40 GB of disk for all stages (each fine-tuning stage
keeps its checkpoint, Adam's state included, and its fine-tuned model: about 14 GB each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("generate", "detect", "replicate", "nemo", "wanda", "esd", "ca", "siss", "attack", "locality", "unlearn")
# NeMo's published statistics for SD v1.4's value sites (the project's shared data, beside the checkout).
NEMO_STATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nemo_sd14_value_stats.pt"

# The published component configurations (diffusers' config.json of CompVis/stable-diffusion-v1-4
# and stabilityai/stable-diffusion-2-1), written out so that nothing is downloaded.
UNET = {
    "v1.4": dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32),
    "v2.1": dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32),
}  # fmt: skip
TEXT = {
    "v1.4": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "v2.1": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024),
}  # fmt: skip
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           latent_channels=4, norm_num_groups=32)  # fmt: skip
PREDICTION = {"v1.4": "epsilon", "v2.1": "v_prediction"}


def build(shape: str, resolution: int, folder: Path) -> dict:
    """The folder in the diffusers StableDiffusionPipeline layout; returns parameter counts."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dori.models.loading import clip_tokenizer

    torch.manual_seed(0)
    counts = {}
    unet = UNet2DConditionModel(sample_size=resolution // 8, **UNET[shape])
    counts["unet"] = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(folder / "unet")
    del unet
    text = CLIPTextModel(CLIPTextConfig(**TEXT[shape]))
    counts["text_encoder"] = sum(p.numel() for p in text.parameters())
    text.save_pretrained(folder / "text_encoder")
    del text
    vae = AutoencoderKL(sample_size=resolution, **VAE)
    counts["vae"] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(folder / "vae")
    del vae
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                  prediction_type=PREDICTION[shape]).save_pretrained(folder / "scheduler")  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return counts


def inputs(folder: Path) -> dict:
    """Prompt files, training-image stand-ins and a TorchScript stand-in for SSCD."""
    import numpy as np
    import torch
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["Index;Caption;type"]
    for i in range(2):
        lines.append(f"{i};a memorized picture number {i};VM")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    (folder / "mem.csv").write_text("\n".join(lines) + "\n")
    (folder / "non.txt").write_text("".join(f"an ordinary photograph {i}\n" for i in range(4)))

    class Descriptor(torch.nn.Module):  # SSCD's interface: images in, [N, 512] descriptors out
        """Random filters on the image less its mean colour, pooled to a 4x4 grid: two different
        images (random weights make noise) are far apart, so the fine-tuning methods find the
        generations that are not copies they need (a descriptor of mean colours called every noise
        image a copy of every other)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 8, stride=8)

        def forward(self, x):
            x = x - x.mean(dim=(2, 3), keepdim=True)
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 4).flatten(1)

    torch.manual_seed(0)
    torch.jit.script(Descriptor()).save(str(folder / "sscd.pt"))
    return {"mem": folder / "mem.csv", "non": folder / "non.txt", "images": folder / "images",
            "sscd": folder / "sscd.pt"}  # fmt: skip


def commands(shape: str, model: Path, files: dict, work: Path) -> dict[str, list[str]]:
    """Each stage's dori command at minimum sizes."""
    sel = ["--model", str(model), "--prompts", str(files["mem"]), "--images", str(files["images"]), "--sscd",
           str(files["sscd"]), "--batch-size", "8"]  # fmt: skip
    # v1.4: NeMo's published statistics and its threshold for SD v1.4 (0.428, METHOD.md); v2.1 has
    # none, so both come from a small reference set.
    nemo_reference = (["--stats", str(NEMO_STATS), "--threshold", "0.428"] if shape == "v1.4"
                      else ["--reference-prompts", str(files["non"])])  # fmt: skip
    return {
        "generate": ["generate", "--model", str(model), "--prompt", "a photograph of a cat", "--seeds", "1", "--steps",
                     "2", "--out", str(work / "generate")],
        "detect": ["detect", "--model", str(model), "--memorized", str(files["mem"]), "--non-memorized",
                   str(files["non"]), "--generations", "1", "--consistency-seeds", "2", "--steps", "2",
                   "--batch-size", "8", "--out", str(work / "detect")],
        "replicate": ["replicate", *sel, "--seeds", "1", "--steps", "2", "--out", str(work / "replicate")],
        "nemo": ["mitigate", "--method", "nemo", *sel, *nemo_reference, "--seeds", "1", "--steps", "2",
                 "--utility-seeds", "1", "--limit", "1", "--out", str(work / "nemo")],
        "wanda": ["mitigate", "--method", "wanda", "--ratio", "0.01", *sel, "--seeds", "1", "--steps", "2",
                  "--utility-seeds", "1", "--out", str(work / "wanda")],
        # the fine-tuning mitigations at their references' settings, one step each (ESD samples at 50 DDIM steps)
        **{method: ["mitigate", "--method", method, *sel, "--finetune-steps", "1", "--seeds", "1", "--steps", "2",
                    "--utility-seeds", "1", "--limit", "1", *(["--anchor", "a photograph"] if method == "ca" else []),
                    "--out", str(work / method)] for method in ("esd", "ca", "siss")},
        "attack": ["attack", *sel, "--steps", "1", "--steps-curve", "0,1", "--attack-batch", "8", "--seeds", "1",
                   "--eval-steps", "2", "--no-control", "--limit", "1", "--out", str(work / "attack")],
        "locality": ["locality", *sel, "--non-memorized", str(files["non"]), "--targets", "1", "--inits", "2",
                     "--steps", "1", "--attack-batch", "1", "--seeds", "1", "--eval-steps", "2",
                     "--agreement-triggers", "2", *nemo_reference, "--no-tsne", "--out", str(work / "locality")],
        "unlearn": ["unlearn", *sel, "--mitigation", str(work / "wanda"), "--retain-prompts", str(files["mem"]),
                    "--steps", "1", "--retain-batch", "1", "--triggers", "1", "--inner-steps", "1",
                    "--eval-attack-steps", "1", "--seeds", "1", "--eval-steps", "2", "--utility-seeds", "1",
                    "--limit", "1", "--out", str(work / "unlearn")],
    }  # fmt: skip


def run(command: list[str]) -> dict:
    """One dori command in a fresh process: wall seconds, peak resident memory (its own), exit code."""
    began = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen([sys.executable, "-m", "dori", *command], stdout=log, stderr=log, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - began
        log.seek(0)
        err = log.read()
    code = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "peak_gib": usage.ru_maxrss / 2**20, "code": code,
            "error": "" if code == 0 else err.strip().splitlines()[-1][:300]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(UNET), default="v1.4")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--folder", type=Path, default=None, help="Build (or reuse) the model here.")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    root = args.folder or Path(tempfile.mkdtemp(prefix=f"dori-sd{args.shape}-"))
    model = root / "model"
    if not (model / "unet").is_dir():
        began = time.monotonic()
        counts = build(args.shape, args.resolution, model)
        print(f"built SD {args.shape} at {args.resolution} px in {time.monotonic() - began:.0f} s: "
              + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in counts.items()), file=sys.stderr, flush=True)  # fmt: skip
    files = inputs(root / "inputs")
    todo = commands(args.shape, model, files, root / "runs")
    rows = []
    for stage in stages:
        result = run(todo[stage])
        rows.append((stage, result))
        print(f"{stage}: {result}", file=sys.stderr, flush=True)
    print(f"\nSD {args.shape} shape, {args.resolution} px, random weights, CPU ({os.cpu_count()} cores)\n")
    print("| stage | seconds | peak memory (GiB) | result |\n|---|---|---|---|")
    for stage, r in rows:
        print(f"| {stage} | {r['seconds']:.0f} | {r['peak_gib']:.1f} | {'ok' if r['code'] == 0 else r['error']} |")


if __name__ == "__main__":
    main()
