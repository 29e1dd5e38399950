"""Memory and precision settings for real GPUs (issue 26): gradient checkpointing, half precision
with float32 training state, and PyTorch's scaled-dot-product attention."""

from __future__ import annotations

import pytest
import torch

from dori.attack import AttackConfig, dori_attack
from dori.models import load_model
from dori.unlearn.adversarial import UnlearnConfig, adversarial_finetune


def _attack(model):
    targets = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return dori_attack(model, targets, model.encode(["a cat", "a dog"]).float(), AttackConfig(steps=3))


def _saved_bytes(model) -> int:
    """Bytes the autograd graph keeps for the backward pass of one attack-style loss."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    emb = model.encode(["a cat"]).float().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.diffusion_loss(torch.zeros(1, 4, 8, 8), emb, torch.ones(1, 4, 8, 8), torch.tensor([5]))
    return total


def test_gradient_checkpointing_gives_the_same_attack_with_fewer_saved_activations(tiny_sd_dir):
    plain, checkpointed = load_model(tiny_sd_dir), load_model(tiny_sd_dir, gradient_checkpointing=True)
    assert not plain.gradient_checkpointing and checkpointed.gradient_checkpointing
    a, b = _attack(plain), _attack(checkpointed)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.losses, b.losses)
    assert _saved_bytes(checkpointed) < 0.5 * _saved_bytes(plain)


def test_attention_runs_through_scaled_dot_product_attention(tiny_sd_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = load_model(tiny_sd_dir)
    processors = model.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_fine_tuning_keeps_float32_weights_and_optimizer_state(tiny_sd_dir, dtype):
    model = load_model(tiny_sd_dir, dtype=dtype)
    half = model.dtype
    before = {k: v.float().clone() for k, v in model.unet.state_dict().items()}
    seen = []

    def on_step(state, optimizer):
        weights = next(model.unet.parameters())
        moments = optimizer.state[weights]["exp_avg"]
        seen.append((weights.dtype, moments.dtype, state.loss_scale is not None))

    g = torch.Generator().manual_seed(0)
    state = adversarial_finetune(
        model, targets=torch.randn(2, 4, 8, 8, generator=g), surrogates=torch.randn(2, 4, 8, 8, generator=g),
        prompt_emb=model.encode(["a", "b"]), retain_latents=torch.randn(5, 4, 8, 8, generator=g),
        retain_emb=model.encode(["c", "d"]), retain_index=torch.tensor([0, 1, 0, 1, 0]), on_step=on_step,
        config=UnlearnConfig(steps=2, retain_batch=4, triggers_per_target=2, inner_steps=2, learning_rate=1e-2),
    )  # fmt: skip
    assert seen == [(torch.float32, torch.float32, dtype == "float16")] * 2
    assert next(model.unet.parameters()).dtype == half  # cast back for sampling
    assert state.triggers.dtype == torch.float32
    changed = sum((v.float() - before[k]).abs().sum().item() for k, v in model.unet.state_dict().items())
    assert changed > 0 and all(torch.isfinite(p).all() for p in model.unet.parameters())
