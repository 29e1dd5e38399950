"""The bundled model's synthetic data and recipe pieces (cheap, no training)."""

from __future__ import annotations

import torch

from dori.toy.data import all_combinations, build_dataset, caption, is_held_out
from dori.toy.train import ToyTrainConfig, learning_rate, token_map_for


def _small(seed=0):
    return build_dataset(seed=seed, n_ordinary=60, n_verbatim=3, n_template=2, copies=5)


def test_data_is_deterministic_by_seed():
    a, b, c = _small(0), _small(0), _small(1)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_planted_pairs_are_duplicated_and_held_out_captions_never_trained():
    data = _small()
    held_out = {caption(*combo) for combo in all_combinations() if is_held_out(*combo)}
    assert len(held_out) == 16 and set(data.held_out_captions) == held_out
    assert not held_out & set(data.captions)
    for pair in data.planted:
        rows = [i for i, c in enumerate(data.captions) if c == pair.caption]
        assert len(rows) == 5
        copies = data.images[rows]
        if pair.kind == "VM":  # the same image every time
            assert torch.equal(copies, pair.image.expand_as(copies))
        else:  # one layout, varied details: copies differ but stay closer to each other than to other images
            assert not torch.equal(copies[0], copies[1])
    ordinary = [i for i, k in enumerate(data.kinds) if k == "ordinary"]
    by_caption = {}
    for i in ordinary:
        by_caption.setdefault(data.captions[i], []).append(i)
    repeated = next(rows for rows in by_caption.values() if len(rows) > 1)
    assert not torch.equal(data.images[repeated[0]], data.images[repeated[1]])  # a caption stands for many images


def test_token_map_covers_every_caption_and_recipe_schedule():
    data = _small()
    table = token_map_for(sorted(set(data.captions)) + data.held_out_captions)
    assert table[49406] > 0 and table[49407] > 0 and table.max() < 200
    config = ToyTrainConfig(steps=1000, warmup_steps=100)
    assert learning_rate(config, 0) < learning_rate(config, 99) <= config.learning_rate
    assert abs(learning_rate(config, 999) - 0.1 * config.learning_rate) < 1e-4
