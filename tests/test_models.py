"""The model interface on the Stable Diffusion backend (tiny random SD folders)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dori.errors import DoriError
from dori.models import load_model


def test_clip_tokenizer_gives_clips_real_ids():
    from dori.models.loading import clip_tokenizer

    ids = clip_tokenizer()("a red circle on a blue background, top left").input_ids
    assert ids == [49406, 320, 736, 7117, 525, 320, 1746, 5994, 267, 1253, 1823, 49407]


def test_shapes(tiny_sd):
    emb = tiny_sd.encode(["a photo of a cat", "a dog"])
    assert emb.shape == (2, 77, 32)
    assert tiny_sd.empty_embedding().shape == (1, 77, 32)
    assert tiny_sd.latent_shape == (4, 8, 8) and tiny_sd.image_size == (16, 16)
    assert tiny_sd.num_train_timesteps == 1000
    x_t = torch.randn(2, 4, 8, 8)
    assert tiny_sd.predict_noise(x_t, torch.tensor([10, 500]), emb).shape == (2, 4, 8, 8)
    images = torch.rand(3, 3, 16, 16)
    latents = tiny_sd.to_latents(images)
    assert latents.shape == (3, 4, 8, 8)
    assert tiny_sd.from_latents(latents).shape == (3, 3, 16, 16)


def test_value_sites_of_the_sd_v1_layout(tiny_sd):
    sites = tiny_sd.value_sites()
    assert len(sites) == 7
    assert all(site.name.endswith("attn2.to_v") for site in sites)
    assert [site.width for site in sites] == [8, 8, 16, 16, 16, 16, 16]
    assert sites[-1].name.startswith("mid_block.")
    ffn = tiny_sd.ffn_sites()
    assert len(ffn) == 16 and all(site.name.endswith("ff.net.2") for site in ffn)
    assert tiny_sd.sites([sites[0].name])[0].module is sites[0].module


def test_sd_v2_layout_loads(tiny_sd2_dir):
    model = load_model(tiny_sd2_dir)
    assert len(model.value_sites()) == 7
    assert model.prediction_type == "v_prediction"
    assert model.generate(model.encode(["x"]), [0], steps=2).shape == (1, 3, 16, 16)


def test_generation_is_deterministic_and_batch_independent(tiny_sd):
    emb = tiny_sd.encode(["a cat", "a dog"])
    batched = tiny_sd.generate(emb, [3, 4], steps=3)
    again = tiny_sd.generate(emb, [3, 4], steps=3)
    assert torch.equal(batched, again)
    one_by_one = torch.cat([tiny_sd.generate(emb[i : i + 1], [s], steps=3) for i in range(2) for s in (3, 4)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # different seeds, different images


def test_generation_callback_sees_every_step(tiny_sd):
    seen = []
    tiny_sd.generate(tiny_sd.encode(["a cat"]), [0, 1], steps=4, callback=lambda info: seen.append(info))
    assert [info.index for info in seen] == [0, 1, 2, 3]
    assert seen[0].noise_cond.shape == seen[0].noise_uncond.shape == (2, 4, 8, 8)


def test_predict_noise_is_differentiable_in_the_embedding(tiny_sd):
    emb = tiny_sd.encode(["a cat"]).clone().requires_grad_(True)
    out = tiny_sd.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([500]), emb)
    out.pow(2).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_sd.unet.parameters())


def test_v_prediction_target_converts_back_to_the_noise(tiny_sd2_dir):
    model = load_model(tiny_sd2_dir)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    x_t = model.add_noise(x0, noise, t)
    torch.testing.assert_close(model.output_to_noise(model.training_target(x0, noise, t), x_t, t), noise)


def test_missing_component_is_a_clear_error(tiny_sd_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(DoriError, match="'vae' folder"):
        load_model(partial)
    with pytest.raises(DoriError, match="model folder not found"):
        load_model(tmp_path / "nowhere")
    weights_file = tmp_path / "weights.ckpt"
    weights_file.write_bytes(b"not a folder")
    with pytest.raises(DoriError, match="is a file, not a folder"):
        load_model(weights_file)


def test_unknown_site_is_a_clear_error(tiny_sd):
    with pytest.raises(DoriError, match="no module named"):
        tiny_sd.sites(["down_blocks.9.nothing"])


def test_position_encoding_tells_every_pixel_where_it_is():
    from dori.models.position import sinusoidal_2d

    pe = sinusoidal_2d(32, 16, 16)[0]
    assert pe.shape == (32, 16, 16)
    flat = pe.flatten(1).T  # one code per pixel
    assert torch.cdist(flat, flat).add(torch.eye(256) * 1e3).min() > 0.1  # all codes distinct
    # rows vary only with the row, columns only with the column
    assert torch.equal(pe[:16, :, 0:1].expand(16, 16, 16), pe[:16])
    assert torch.equal(pe[16:, 0:1, :].expand(16, 16, 16), pe[16:])


@pytest.mark.parametrize("where", ["conv_in", "attention"])
def test_position_encoding_survives_save_and_load_once(tiny_sd_dir, tmp_path, where):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from dori.models import load_model
    from dori.models.base import DiffusionModel
    from dori.models.loading import save_model
    from dori.models.position import KIND as CONV_IN, KIND_ATTENTION

    KIND = CONV_IN if where == "conv_in" else KIND_ATTENTION

    plain = load_model(tiny_sd_dir)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = plain.encode(["a cat", "a dog"])
    t = torch.tensor([10, 500])
    before = plain.unet(x, t, encoder_hidden_states=emb).sample
    encoded = DiffusionModel(name="pe", unet=plain.unet, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                             scheduler_config=plain.scheduler_config, vae=plain.vae, meta={"position_encoding": KIND})  # fmt: skip
    once = encoded.unet(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(before, once)
    again = DiffusionModel(name="pe", unet=encoded.unet, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                           scheduler_config=plain.scheduler_config, vae=plain.vae, meta=encoded.meta)  # fmt: skip
    assert torch.equal(again.unet(x, t, encoder_hidden_states=emb).sample, once)  # added once, not twice
    reloaded = load_model(save_model(encoded, tmp_path / "pe"))
    assert reloaded.meta["position_encoding"] == KIND
    assert torch.allclose(reloaded.unet(x, t, encoder_hidden_states=emb).sample, once, atol=1e-6)
    blocks = [m for m in reloaded.unet.modules() if isinstance(m, Transformer2DModel)]
    assert blocks and all(len(b._forward_pre_hooks) == (KIND == KIND_ATTENTION) for b in blocks)
    if KIND == KIND_ATTENTION:  # more than the conv_in encoding alone
        conv_in_only = load_model(tiny_sd_dir)
        DiffusionModel(name="pe", unet=conv_in_only.unet, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                       scheduler_config=plain.scheduler_config, vae=plain.vae, meta={"position_encoding": CONV_IN})  # fmt: skip
        assert not torch.allclose(conv_in_only.unet(x, t, encoder_hidden_states=emb).sample, once)


def test_a_folder_with_the_position_encoding_warns_a_plain_diffusers_load(tiny_sd_dir, tmp_path, capsys):
    """Issue 22: the encoding is a hook dori adds at load; plain diffusers cannot add it, so the
    saved folder makes diffusers say so (through the notice in unet/config.json), and dori's own
    load stays quiet."""
    import logging

    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from dori.models import load_model
    from dori.models.base import DiffusionModel
    from dori.models.loading import save_model
    from dori.models.position import CONFIG_KEY, KIND

    plain = load_model(tiny_sd_dir)
    encoded = DiffusionModel(name="pe", unet=plain.unet, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                             scheduler_config=plain.scheduler_config, vae=plain.vae, meta={"position_encoding": KIND})  # fmt: skip
    folder = save_model(encoded, tmp_path / "pe")
    assert CONFIG_KEY in json.loads((folder / "unet" / "config.json").read_text())
    assert CONFIG_KEY not in json.loads((save_model(plain, tmp_path / "plain") / "unet" / "config.json").read_text())

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = diffusers_logging.get_logger("diffusers.configuration_utils")
    handler = Catch()
    logger.addHandler(handler)
    try:
        load_model(folder)
        assert not any(CONFIG_KEY in m for m in seen)  # dori reads the notice itself
        UNet2DConditionModel.from_pretrained(str(folder / "unet"))  # in the same process, after dori
        assert any("position encoding" in m and "dori.models.load_model" in m for m in seen), seen
    finally:
        logger.removeHandler(handler)


def _call_sizes(model):
    """A list that fills with the batch size of every U-Net call, and the hook's handle."""
    sizes = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_a_large_cpu_call_runs_in_near_equal_chunks_with_the_same_numbers(tiny_sd, monkeypatch):
    monkeypatch.setattr(tiny_sd, "max_rows", 8)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(20, 4, 8, 8, generator=g), torch.randn(20, 77, 32, generator=g)
    t = torch.randint(1000, (20,), generator=g)
    sizes, handle = _call_sizes(tiny_sd)
    try:
        with torch.no_grad():
            chunked = tiny_sd.model_output(x, t, emb)
            assert sizes == [7, 6, 7]
            with tiny_sd.whole_batches():
                whole = tiny_sd.model_output(x, t, emb)
            assert sizes[3:] == [20]
            tiny_sd.model_output(x[:8], t[:8], emb[:8])  # at the limit: one call
            assert sizes[4:] == [8]
    finally:
        handle.remove()
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_chunks_carry_the_gradient_to_the_embedding_but_never_split_weight_training(tiny_sd, monkeypatch):
    monkeypatch.setattr(tiny_sd, "max_rows", 8)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(16, 4, 8, 8, generator=g), torch.randint(1000, (16,), generator=g)

    def gradient():
        emb = torch.randn(16, 77, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        return torch.autograd.grad(tiny_sd.model_output(x, t, emb).pow(2).sum(), emb)[0]

    sizes, handle = _call_sizes(tiny_sd)
    try:
        chunked = gradient()
        assert sizes == [8, 8]
        with tiny_sd.whole_batches():
            whole = gradient()
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
        weight = next(tiny_sd.unet.parameters())
        weight.requires_grad_(True)  # a fine-tuning call: the weight gradient sums over every row at once
        try:
            tiny_sd.model_output(x, t, torch.randn(16, 77, 32))
        finally:
            weight.requires_grad_(False)
        assert sizes[-1] == 16
    finally:
        handle.remove()


def test_hooks_that_see_the_batch_keep_each_call_whole(tiny_sd, monkeypatch):
    from dori.interventions import capture, mask_neurons

    monkeypatch.setattr(tiny_sd, "max_rows", 8)
    x, t, emb = torch.randn(16, 4, 8, 8), torch.full((16,), 500), torch.randn(16, 77, 32)
    site = tiny_sd.value_sites()[0]
    with torch.no_grad():
        with capture(tiny_sd, [site.name]) as (handle, records):
            tiny_sd.model_output(x, t, emb)
        assert handle.calls[site.name] == 1 and records[site.name][0].shape[0] == 16
        per_sample = {site.name: torch.ones(16, site.width)}  # one mask row per sample of the call
        with mask_neurons(tiny_sd, per_sample) as handle:
            tiny_sd.model_output(x, t, emb)
        assert handle.calls[site.name] == 1
        with mask_neurons(tiny_sd, {site.name: torch.zeros(site.width)}) as handle:  # one mask for all: chunks
            tiny_sd.model_output(x, t, emb)
        assert handle.calls[site.name] == 2
