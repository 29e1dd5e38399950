"""The bundled model's synthetic data and recipe pieces (cheap: at most two training steps of a tiny U-Net, nine
of the attribute classifier)."""

from __future__ import annotations

import pytest
import torch

from dori.toy.data import (PARTIAL_FORMS, all_combinations, build_dataset, caption, is_held_out, partial_caption,
                           partial_captions)  # fmt: skip
from dori.bundled.recipe import ToyTrainConfig, build_model, learning_rate, token_map_for
from dori.bundled.train import CaptionTable
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


def test_partial_captions_name_only_what_they_keep():
    assert partial_captions(("circle", "orange", "top left")) == [
        "an orange circle", "a circle, top left", "an orange shape, top left", "a circle", "an orange shape",
        "a shape, top left",
    ]  # fmt: skip
    assert partial_caption("cross", "red", "bottom right", ("shape", "colour", "position")) == caption(
        "cross", "red", "bottom right")  # fmt: skip


def test_training_shows_ordinary_images_under_partial_captions_and_planted_ones_never():
    data = _small()
    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, batch_size=64,
                            partial_caption_prob=0.3)
    model = build_model(config, data)
    table = CaptionTable.build(model, data, config)
    full, partial_ids, seen = 0, 0, set()
    for step in range(60):
        idx, tokens, noise, t = table.draw(config, step, (3, 32, 32), 1000)
        assert torch.equal(idx, table.draw(config, step, (3, 32, 32), 1000)[0])  # a pure function of (seed, step)
        for i, row in zip(idx.tolist(), tokens):
            if torch.equal(row, table.empty):
                continue
            caption_row = table.index[i]
            if torch.equal(row, table.tokens[caption_row]):
                full += 1
                continue
            assert table.ordinary[i], "a planted caption must never be shortened"
            forms = [k for k in range(len(PARTIAL_FORMS)) if torch.equal(row, table.partial[caption_row, k])]
            assert len(forms) == 1
            partial_ids += 1
            seen.add(forms[0])
    share = partial_ids / (full + partial_ids)
    ordinary_share = float(table.ordinary.float().mean())
    assert abs(share - config.partial_caption_prob * ordinary_share) < 0.05
    assert seen == set(range(len(PARTIAL_FORMS)))
    # Every word of every partial caption has a row of the token map (none falls on row 0, "unknown").
    words = model.token_map[model.tokenize([c for combo in all_combinations() for c in partial_captions(combo)])]
    ids = model.tokenize([c for combo in all_combinations() for c in partial_captions(combo)])
    assert bool((words[ids != ids[0, -1]] > 0).all())


def test_a_recipe_without_partial_captions_keeps_its_batches():
    data = _small()
    off = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, partial_caption_prob=0.0)
    model = build_model(off, data)
    table = CaptionTable.build(model, data, off)
    assert table.partial is None
    idx, tokens, noise, t = table.draw(off, 7, (3, 32, 32), 1000)
    generator = torch.Generator().manual_seed(off.seed * 1_000_003 + 7)  # the draw order of the first recipes
    assert torch.equal(idx, torch.randint(len(data.captions), (off.batch_size,), generator=generator))
    drop = torch.rand(off.batch_size, generator=generator) < off.empty_caption_prob
    assert torch.equal(noise, torch.randn((off.batch_size, 3, 32, 32), generator=generator))
    assert torch.equal(t, torch.randint(1000, (off.batch_size,), generator=generator))
    expected = table.tokens[table.index[idx]].clone()
    expected[drop] = table.empty
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("text_lr_scale", [0.0, 1.0])
def test_a_frozen_text_encoder_keeps_its_initialisation_while_the_unet_trains(tmp_path, text_lr_scale):
    from dori.models import load_model
    from dori.bundled.train import train_bundled_model
    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, steps=2, batch_size=4,
                            channels=(8, 16, 16), text_width=16, checkpoint_every=1, text_lr_scale=text_lr_scale)
    (tmp_path / "attribute_classifier.safetensors").write_bytes(b"")  # an existing classifier is kept: skip it
    seen = []
    train_bundled_model(config, tmp_path, log=lambda _: None, on_checkpoint=lambda step, model: seen.append(step))
    assert seen == [1, 2]
    initial = build_model(config, _small())
    trained = load_model(tmp_path)
    same_text = all(torch.equal(a, b) for a, b in zip(initial.text_encoder.state_dict().values(),
                                                       trained.text_encoder.state_dict().values()))  # fmt: skip
    same_unet = all(torch.equal(a, b) for a, b in zip(initial.unet.state_dict().values(),
                                                       trained.unet.state_dict().values()))  # fmt: skip
    assert same_text == (text_lr_scale == 0) and not same_unet


def test_the_attribute_classifier_trains_on_until_it_reaches_its_bar():
    from dori.toy.classifier import train_classifier

    kwargs = dict(seed=0, steps=3, n_images=64, batch_size=8, max_rounds=3)
    met, met_info = train_classifier(bar=0.0, **kwargs)  # any accuracy meets it: one round
    missed, missed_info = train_classifier(bar=1.01, **kwargs)  # none does: every round
    assert met_info["steps"] == 3 and missed_info["steps"] == 9
    assert 0 <= met_info["accuracy_on_fresh_renders"] <= 1
    # the stop only decides whether to go on: a classifier that met the bar in round one is the
    # one-round run's, whatever the bar; more rounds give other weights
    one_round, _ = train_classifier(bar=1.01, **{**kwargs, "max_rounds": 1})
    same = [torch.equal(a, b) for a, b in zip(met.state_dict().values(), one_round.state_dict().values())]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(met.state_dict().values(), missed.state_dict().values()))


def test_the_sd_layout_has_cross_attention_at_every_resolution_on_packed_pixels(tmp_path):
    """Issue 37's layout: cross-attention down, mid and up at every resolution, GEGLU at 4x, on pixels
    packed 2x2 (a lossless stand-in for SD's VAE) that load back through load_model like SD."""
    from diffusers.models.activations import GEGLU

    from dori.models import load_model
    from dori.bundled.recipe import build_unet
    from dori.bundled.train import train_bundled_model
    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, steps=1, batch_size=4,
                            channels=(8, 16, 16), text_width=16, unet_layout="sd", space_to_depth=2, attention_heads=2)
    unet = build_unet(config)
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D"] * 3
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (16, 12, 12)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 3 + 1 + 3 * 2  # down (1 layer each), mid, up (layers + 1 each)
    for block in blocks:
        assert isinstance(block.ff.net[0], GEGLU)
        assert block.ff.net[2].in_features == 4 * block.ff.net[2].out_features
    fifth = build_unet(ToyTrainConfig(channels=(8, 16, 16), text_width=16))
    assert type(fifth.down_blocks[0]).__name__ == "DownBlock2D" and fifth.config.in_channels == 3

    (tmp_path / "attribute_classifier.safetensors").write_bytes(b"")  # skip the classifier
    train_bundled_model(config, tmp_path, log=lambda _: None)
    model = load_model(tmp_path)
    assert model.space_to_depth == 2 and model.latent_shape == (12, 16, 16) and model.image_size == (32, 32)
    assert len(model.value_sites()) == 4 and sum(s.width for s in model.value_sites()) == 8 + 16 + 16 + 16
    up = model.value_sites(("up_blocks.",))  # outside NeMo's sites: tools/value_routes.py zeroes them apart
    assert len(up) == 3 * 2 and all(s.name.startswith("up_blocks.") for s in up)
    assert sum(s.width for s in up) == 2 * (16 + 16 + 8)
    assert any(s.name.startswith("up_blocks.") for s in model.ffn_sites())
    images = torch.rand(2, 3, 32, 32)
    latents = model.to_latents(images)
    assert latents.shape == (2, 12, 16, 16)
    assert torch.allclose(model.from_latents(latents), images, atol=1e-6)
    # a pixel of the image sits in one latent position's channels, as the packing says
    assert torch.equal(latents[:, :, 0, 0].reshape(2, 3, 2, 2), images[:, :, :2, :2] * 2 - 1)
    generated = model.generate(model.encode(["a red circle, top left"]), [0], steps=2, guidance=2.0)
    assert generated.shape == (1, 3, 32, 32)


def test_a_packed_unet_without_its_packing_is_a_clear_error_at_load(tmp_path):
    import json

    from dori.errors import DoriError
    from dori.models import load_model
    from dori.bundled.train import train_bundled_model
    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, steps=1, batch_size=4,
                            channels=(8, 16, 16), text_width=16, space_to_depth=2)
    (tmp_path / "attribute_classifier.safetensors").write_bytes(b"")
    train_bundled_model(config, tmp_path, log=lambda _: None)
    meta_file = tmp_path / "dori_model.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "space_to_depth"}))
    with pytest.raises(DoriError, match="takes 12 channels.*pixel space \\(3 channels\\)"):
        load_model(tmp_path)
    meta_file.write_text(json.dumps({**meta, "space_to_depth": 4}))
    with pytest.raises(DoriError, match="packed 4x4 into channels \\(48 channels"):
        load_model(tmp_path)


@pytest.mark.parametrize("bad", [{"unet_layout": "sdxl"}, {"space_to_depth": 3}, {"layers_per_block": 0}])
def test_a_recipe_with_an_impossible_layout_is_refused(bad):
    from dori.errors import DoriError

    with pytest.raises(DoriError):
        ToyTrainConfig(**bad)


def test_the_card_s_own_checks_judge_by_their_bars():
    from dori.bundled.card import ALIGNMENT_BAR, CONTROL_BAR, MEMORIZED_BAR, REGIME_MARGIN, card_checks

    def numbers(**change):
        base = {"detector": {"tau": 0.66}, "copy_benchmark": {"passed": True},
                "memorized": {"mr": MEMORIZED_BAR}, "non_memorized": {"mr": CONTROL_BAR, "sscd_mean": 0.65 - REGIME_MARGIN},
                "held_out": {"mr": 0.0, "alignment": ALIGNMENT_BAR}}  # fmt: skip
        for key, value in change.items():
            part, _, field = key.partition("__")
            base[part] = {**base[part], field: value}
        return base

    assert card_checks(numbers())["passed"]  # every MR and the alignment exactly at its bar passes
    for change, failed in [({"memorized__mr": 0.89}, "memorized"), ({"held_out__mr": 0.06}, "control"),
                           ({"non_memorized__mr": 0.06}, "control"), ({"held_out__alignment": 0.94}, "alignment"),
                           ({"non_memorized__sscd_mean": 0.37}, "margin"), ({"copy_benchmark__passed": False}, "copy_benchmark")]:  # fmt: skip
        result = card_checks(numbers(**change))
        assert not result["passed"] and [k for k, ok in result["checks"].items() if not ok] == [failed]


def test_a_remeasured_card_keeps_the_recipe_seeds_section_and_nothing_else_of_the_old_card():
    from dori.bundled.card import RECIPE_SEEDS_END, RECIPE_SEEDS_HEADING, RECIPE_SEEDS_START, recipe_seeds_section

    table = "| seed | MR |\n|---|---|\n| 0 | 1.00 |\n"
    old = f"# card\n\nold numbers: MR 0.50\n\n{RECIPE_SEEDS_HEADING}\n\n{RECIPE_SEEDS_START}\n{table}{RECIPE_SEEDS_END}\n"
    kept = recipe_seeds_section(old)
    assert kept == f"\n{RECIPE_SEEDS_HEADING}\n\n{RECIPE_SEEDS_START}\n{table}{RECIPE_SEEDS_END}\n"
    assert "old numbers" not in kept
    assert recipe_seeds_section("# new card\n\nnew numbers" + kept) == kept  # measured again and again: unchanged
    assert recipe_seeds_section("# a card without the section\n") == ""
    assert recipe_seeds_section(f"# only one marker\n{RECIPE_SEEDS_START}\n") == ""


def test_a_timed_training_step_is_the_recipe_s_own_step_on_its_packed_shape():
    """The step benchmarks/recipe_step.py times and a GPU screen fits its steps to: the recipe's
    model at its batch and packing, trained (the U-Net moves, the frozen text encoder does not)."""
    from dori.bundled.recipe import build_model
    from dori.bundled.train import step_seconds
    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, batch_size=3, channels=(8, 16, 16),
                            text_width=16, unet_layout="sd", space_to_depth=2, attention_heads=2)  # fmt: skip
    model, times = step_seconds(config, 2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert model.space_to_depth == 2 and model.unet.config.in_channels == 12
    initial = build_model(config, _small())  # the same seed gives the same initial weights
    moved = [not torch.equal(a, b) for a, b in zip(initial.unet.state_dict().values(), model.unet.state_dict().values())]
    assert all(moved[:4])
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_a_checkpoint_recorded_before_a_recipe_option_existed_resumes_and_another_recipe_is_refused(tmp_path):
    import json

    from dori.errors import DoriError
    from dori.bundled.train import train_bundled_model
    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, steps=1, batch_size=2,
                            channels=(8, 16, 16), text_width=16, checkpoint_every=1)  # fmt: skip
    (tmp_path / "attribute_classifier.safetensors").write_bytes(b"")  # skip the classifier
    train_bundled_model(config, tmp_path, log=lambda _: None)
    record = tmp_path / "train_config.json"
    older = {k: v for k, v in json.loads(record.read_text()).items() if k not in ("unet_layout", "space_to_depth")}
    record.write_text(json.dumps(older))  # as a run from before issue 37 recorded it
    lines = []
    train_bundled_model(config, tmp_path, resume=True, log=lines.append)
    assert "resumed at step 1" in lines
    before_fifth = {k: v for k, v in older.items() if k != "text_lr_scale"}  # trained the text encoder then
    for recorded, named in [({**older, "batch_size": 3}, "batch_size"), ({**older, "space_to_depth": 2}, "space_to_depth"),
                            ({**older, "no_such_option": 1}, "no_such_option"), (before_fifth, "text_lr_scale")]:  # fmt: skip
        record.write_text(json.dumps(recorded))
        with pytest.raises(DoriError, match=rf"other parameters \({named}; see "):
            train_bundled_model(config, tmp_path, resume=True, log=lambda _: None)


def test_each_named_recipe_is_the_command_that_trains_it_and_an_old_record_is_the_fourth():
    from dori.bundled.recipe import RECIPES, recipe_command, recipe_of, recorded_config

    assert recipe_of(ToyTrainConfig(seed=3)) == "fifth"
    assert recipe_command(ToyTrainConfig(seed=3)) == "dori toy train --seed 3 --out DIR"
    fourth = ToyTrainConfig(seed=0, **RECIPES["fourth"])
    assert recipe_command(fourth) == "dori toy train --recipe fourth --seed 0 --out DIR"
    # a record written before the fifth recipe has no text_lr_scale: the encoder was trained then
    old = {"seed": 0, "steps": 6000, "batch_size": 32, "channels": [32, 64, 64], "seconds": 4872.0}
    assert recorded_config(old) == fourth and recipe_of(recorded_config(old)) == "fourth"
    assert recipe_of(ToyTrainConfig(steps=10)) is None and recipe_command(ToyTrainConfig(steps=10)) is None
    # channels-last training came with partial captions: the fourth recipe trained without it, the fifth with it
    assert not fourth.channels_last and ToyTrainConfig().channels_last
    fifth_record = {**old, "steps": 5000, "partial_caption_prob": 0.0, "text_lr_scale": 0.0}
    assert recorded_config(fifth_record).channels_last and recipe_of(recorded_config(fifth_record)) == "fifth"


def test_the_memory_format_follows_the_recipe():
    """Channels-last sums in another order, so the same seed gives other weights: the fourth recipe
    (the shipped weights) trains without it (docs/BUNDLED_MODEL.md measures the difference)."""
    from dori.bundled.train import memory_format

    assert memory_format(ToyTrainConfig(channels_last=False)) == torch.contiguous_format
    assert memory_format(ToyTrainConfig()) == torch.channels_last


def test_training_records_the_machine_of_each_part_and_the_card_names_it(tmp_path, monkeypatch):
    """A run's bits depend on the machine (instruction set, threads, library versions) as well as on
    its recipe, so the record names the machine of each part of a run: a part resumed on another
    machine adds its own, and a checkpoint written before the record reads as not recorded."""
    import json

    from dori.bundled import train
    from dori.bundled.card import machine_words

    config = ToyTrainConfig(n_ordinary=60, n_verbatim=3, n_template=2, copies=5, steps=2, batch_size=2,
                            channels=(8, 16, 16), text_width=16, checkpoint_every=1)  # fmt: skip

    class Stop(Exception):
        pass

    def stop(step, model):
        raise Stop

    here = train.training_machine("cpu")
    assert here["threads"] == torch.get_num_threads() and here["torch"] == torch.__version__
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and here["device"] == "cpu"
    elsewhere = {**here, "threads": here["threads"] + 1}
    for name, forget in (("moved", False), ("older", True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "attribute_classifier.safetensors").write_bytes(b"")  # skip the classifier
        with pytest.raises(Stop):
            train.train_bundled_model(config, folder, log=lambda _: None, on_checkpoint=stop)
        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert state["machines"] == [here]
        if forget:
            del state["machines"]
            torch.save(state, folder / "checkpoint.pt")
        with monkeypatch.context() as patch:
            patch.setattr(train, "training_machine", lambda device="cpu": elsewhere)
            train.train_bundled_model(config, folder, resume=True, log=lambda _: None)
        record = json.loads((folder / "dori_model.json").read_text())["train_config"]
        assert record["machines"] == (["not recorded", elsewhere] if forget else [here, elsewhere])
        words = machine_words(record)
        assert f"{elsewhere['threads']} CPU threads of {here['cpu']} ({here['cpu_capability']})" in words
        assert ("not recorded" in words) == forget and "then, resumed, " in words
    assert machine_words({"seed": 0}).startswith("not recorded (trained before dori recorded it). ")
