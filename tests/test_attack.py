"""The DoRI attack on the tiny SD backend."""

from __future__ import annotations

import pytest
import torch

from dori.attack import AttackConfig, dori_attack, initial_embeddings
from dori.errors import DoriError


@pytest.fixture(scope="module")
def targets(tiny_sd):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return tiny_sd.to_latents(images)


def test_zero_learning_rate_leaves_the_embedding_unchanged(tiny_sd, targets):
    init = initial_embeddings(tiny_sd, ["a cat", "a dog"])
    result = dori_attack(tiny_sd, targets, init, AttackConfig(steps=3, learning_rate=0.0, batch=2))
    assert torch.equal(result.embeddings, init)


def test_the_attack_lowers_its_loss_and_leaves_the_model_alone(tiny_sd, targets):
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    init = initial_embeddings(tiny_sd, ["a cat", "a dog"], "random", seed=3)
    config = AttackConfig(steps=30, learning_rate=0.1, batch=8)
    result = dori_attack(tiny_sd, targets, init, config, snapshot_steps=(0, 30))
    # The same fixed evaluation draws before and after: the optimised embedding fits better.
    g = torch.Generator().manual_seed(99)
    x0 = targets.repeat_interleave(32, dim=0)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(1000, (len(x0),), generator=g)
    with torch.no_grad():
        loss_init = tiny_sd.diffusion_loss(x0, init.repeat_interleave(32, dim=0), noise, t).mean()
        loss_adv = tiny_sd.diffusion_loss(x0, result.embeddings.repeat_interleave(32, dim=0), noise, t).mean()
    assert loss_adv < loss_init
    assert result.losses.shape == (30, 2)
    assert torch.equal(result.snapshots[0], init) and torch.equal(result.snapshots[30], result.embeddings)
    assert all(torch.equal(v, before[k]) for k, v in tiny_sd.unet.state_dict().items())
    assert all(p.grad is None for p in tiny_sd.unet.parameters())


def test_batched_equals_one_by_one(tiny_sd, targets):
    init = initial_embeddings(tiny_sd, ["a cat", "a dog"])
    config = AttackConfig(steps=5, batch=4)
    batched = dori_attack(tiny_sd, targets, init, config, seeds=[11, 12]).embeddings
    single = torch.cat([dori_attack(tiny_sd, targets[i : i + 1], init[i : i + 1], config, seeds=[11 + i]).embeddings
                        for i in range(2)])  # fmt: skip
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_bounds_hold_and_bad_input_is_refused(tiny_sd, targets):
    init = initial_embeddings(tiny_sd, ["a cat", "a dog"])
    for bound, radius in (("l2", 0.5), ("linf", 0.01)):
        emb = dori_attack(tiny_sd, targets, init, AttackConfig(steps=4, batch=2, bound=bound, radius=radius)).embeddings
        delta = (emb - init).flatten(1)
        size = delta.norm(dim=1) if bound == "l2" else delta.abs().amax(dim=1)
        assert (size <= radius + 1e-5).all() and (size > 0).all()
    with pytest.raises(DoriError, match="NaN"):
        dori_attack(tiny_sd, targets, init * float("nan"), AttackConfig(steps=1))
    with pytest.raises(DoriError, match="one per target"):
        dori_attack(tiny_sd, targets[:1], init, AttackConfig(steps=1))
