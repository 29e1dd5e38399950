"""The DoRI attack's GPU memory on SD v1.4 / v2.1 at 512 px, computed without a GPU.

    python benchmarks/attack_memory.py                 # batch 8, both shapes, both dtypes
    python benchmarks/attack_memory.py --batch 16 --resolution 768

The U-Net of the published configuration (``sd_full_size.py``) is built on PyTorch's meta device
(shapes, no data, no arithmetic), and one attack step's forward pass runs on it exactly as dori
runs it: the embedding ``[batch, 77, D]`` in float32 (the attack's variable), cast to the model's
dtype, frozen weights, the diffusion loss. A saved-tensor hook adds up every tensor autograd keeps
for the backward pass (each storage once, the weights apart). Two things the meta device does not
do as a GPU does are put right:

- attention: on the meta device PyTorch's scaled-dot-product attention falls back to the math
  kernel and keeps the full attention matrix; on a GPU the flash / memory-efficient kernels keep
  only q, k, v, the output and a float32 log-sum-exp per query, which is what is counted here;
- checkpointing: the inputs of each checkpointed block (held by the checkpoint, not saved through
  autograd's hooks) are counted, and the backward pass recomputes one block at a time, so the
  largest block's own saved tensors are added once.

The estimate of the peak is the weights of U-Net, text encoder and VAE, the Adam state of the
embedding (float32: value, gradient, two moments), the saved tensors, and twice the largest single
saved tensor for the gradients in flight during the backward pass. It leaves out the CUDA context
(about 0.3-0.5 GB), library workspaces and the allocator's fragmentation, so a measured peak is
higher; it is a floor to plan with, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_full_size import TEXT, UNET, VAE  # noqa: E402 - the published configurations, written once

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GB = 1024**3


class _FlashAttention(torch.autograd.Function):
    """Scaled-dot-product attention as the GPU's fused kernels save it (meta device only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashAttention.apply(query, key, value)


class _Ledger:
    """Saved tensors, each storage counted once, the model's weights left out."""

    def __init__(self, weights: set[int]) -> None:
        self.weights = weights
        self.storages: dict[int, int] = {}
        self.kept: list[torch.Tensor] = []  # keeps storages alive so their ids are not reused

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.weights:
            return
        self.kept.append(tensor)
        self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @property
    def largest(self) -> int:
        return max(self.storages.values(), default=0)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor


def _components(shape: str, resolution: int, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=resolution // 8, **UNET[shape])
        text = CLIPTextModel(CLIPTextConfig(**TEXT[shape]))
        vae = AutoencoderKL(sample_size=resolution, **VAE)
    parts = []
    for module in (unet, text, vae):
        module = {torch.float32: module.float, torch.bfloat16: module.bfloat16}[dtype]()
        parts.append(module.eval().requires_grad_(False))
    return parts


def attack_step_memory(shape: str, *, batch: int, resolution: int, dtype: torch.dtype, checkpointing: bool) -> dict:
    """Bytes of one attack step (see the module docstring)."""
    unet, text, vae = _components(shape, resolution, dtype)
    weights_bytes = sum(p.numel() * p.element_size() for m in (unet, text, vae) for p in m.parameters())
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    ledger = _Ledger(weights)
    block_peak = 0
    if checkpointing:
        unet.enable_gradient_checkpointing()

        def checkpointed(module, *args):  # the checkpoint holds the block's inputs; recomputation holds one block
            nonlocal block_peak
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    ledger.add(arg)
            inner = _Ledger(weights)
            with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
                out = module(*args)
            block_peak = max(block_peak, inner.total)
            return out

        for module in unet.modules():
            if getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = checkpointed
    length, width = TEXT[shape]["max_position_embeddings"], TEXT[shape]["hidden_size"]
    latent = resolution // 8
    emb = torch.empty(batch, length, width, device="meta", dtype=torch.float32, requires_grad=True)
    x_t = torch.empty(batch, 4, latent, latent, device="meta", dtype=dtype)
    t = torch.zeros(batch, device="meta", dtype=torch.long)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t))
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _flash
        stack.callback(setattr, F, "scaled_dot_product_attention", original)
        out = unet(x_t, t, encoder_hidden_states=emb.to(dtype)).sample
        (out.float() - x_t.float()).pow(2).mean()
    adam = 4 * emb.numel() * 4  # the embedding, its gradient and Adam's two moments, float32
    saved = ledger.total
    peak = weights_bytes + adam + saved + block_peak + 2 * ledger.largest
    return {"weights": weights_bytes, "saved": saved, "block": block_peak, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="v1.4,v2.1")
    parser.add_argument("--batch", type=int, default=8, help="(noise, timestep) pairs per step, the attack's --batch")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    print("| shape | dtype | checkpointing | weights (GiB) | saved activations (GiB) | estimated peak (GiB) |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for name, dtype in DTYPES.items():
            for checkpointing in (False, True):
                m = attack_step_memory(shape, batch=args.batch, resolution=args.resolution, dtype=dtype,
                                       checkpointing=checkpointing)  # fmt: skip
                print(f"| SD {shape} {args.resolution} px, batch {args.batch} | {name} | {'on' if checkpointing else 'off'} "
                      f"| {m['weights'] / GB:.2f} | {(m['saved'] + m['block']) / GB:.2f} | {m['peak'] / GB:.1f} |")


if __name__ == "__main__":
    main()
