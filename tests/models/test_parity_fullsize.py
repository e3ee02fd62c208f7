"""Parity with diffusers / transformers at the official full-size configurations, random weights.

Each test builds the reference model, runs it, saves it in the reference's own folder format, frees it,
loads those files through our loader, runs ours on the same inputs, and requires
max |ours - reference| <= 1e-4 * max |reference| in fp32. Reference and ours never sit in memory at once.
"""

import gc

import pytest
import torch

import refconfigs as R
from stablexl.config import PRESETS
from stablexl.io.models import load_component
from stablexl.models.conditioning import micro_embedding, sdxl_vector, refiner_vector

pytestmark = pytest.mark.fullsize
TOL = 1e-4


@pytest.mark.parametrize("name", list(R.UNETS))
def test_unet_parity(name, tmp_path):
    from diffusers import UNet2DConditionModel

    ref_cfg, n_params = R.UNETS[name]
    preset = PRESETS[name]
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**ref_cfg).eval()
    assert sum(p.numel() for p in ref.parameters()) == n_params

    g = torch.Generator().manual_seed(1)
    b, size = 2, 16  # latent 16x16 (128 px): every level and the mid block run
    x = torch.randn(b, ref_cfg["in_channels"], size, size, generator=g)
    t = torch.tensor([999, 37])
    ctx = torch.randn(b, 77, ref_cfg["cross_attention_dim"], generator=g)
    kwargs, y = {}, None
    if name == "sdxl-base":
        pooled = torch.randn(b, 1280, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512.0, 768, 64, 32, 1024, 896]])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = sdxl_vector(pooled, time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6])
    elif name == "sdxl-refiner":
        pooled = torch.randn(b, 1280, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 6.0], [768.0, 512, 16, 8, 2.5]])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = refiner_vector(pooled, time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4])
    elif name.startswith("sd21-unclip"):
        y = torch.randn(b, ref_cfg["projection_class_embeddings_input_dim"], generator=g)
        kwargs["class_labels"] = y

    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, **kwargs).sample
    ref.save_pretrained(tmp_path / "unet")
    del ref
    gc.collect()

    ours = load_component(tmp_path / "unet")
    assert ours.config == preset.unet, "config.json translated to a config different from the preset"
    assert sum(p.numel() for p in ours.parameters()) == n_params
    with torch.no_grad():
        got = ours(x, t, ctx, y)
    err = R.rel_err(got, want)
    print(f"{name}: UNet rel err {err:.2e}")
    assert err <= TOL


def test_vae_parity(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(**R.VAE).eval()
    assert sum(p.numel() for p in ref.parameters()) == R.VAE_PARAMS
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        post = ref.encode(img).latent_dist
        want_mean, want_logvar = post.mean, post.logvar
        want_dec = ref.decode(z).sample
    ref.save_pretrained(tmp_path / "vae")
    del ref, post
    gc.collect()

    ours = load_component(tmp_path / "vae")
    assert ours.config == PRESETS["sdxl-base"].vae
    with torch.no_grad():
        p = ours.encode(img)
        dec = ours.decode(z)
    errs = {"mean": R.rel_err(p.mean, want_mean), "logvar": R.rel_err(p.logvar, want_logvar), "decode": R.rel_err(dec, want_dec)}
    print("VAE rel errs", errs)
    assert max(errs.values()) <= TOL


def _prompt_ids(pad_id):
    from stablexl.models.tokenizer import default_tokenizer

    prompts = ["a photograph of an astronaut riding a horse, highly detailed", "", "grinning face " * 40]
    return default_tokenizer()(prompts, pad_id=pad_id)


@pytest.mark.parametrize("which", ["clip-l", "openclip-h-23", "openclip-bigg"])
def test_text_encoder_parity(which, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg, cls, pad = {
        "clip-l": (R.CLIP_L_TEXT, CLIPTextModel, 49407),
        "openclip-h-23": (R.OPENCLIP_H_TEXT_23, CLIPTextModel, 0),
        "openclip-bigg": (R.OPENCLIP_BIGG_TEXT, CLIPTextModelWithProjection, 0),
    }[which]
    torch.manual_seed(0)
    ref = cls(CLIPTextConfig(**cfg)).eval()
    assert sum(p.numel() for p in ref.parameters()) == R.TEXT_PARAMS[which]
    ids = _prompt_ids(pad)
    n = cfg["num_hidden_layers"]
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        want = {"last+norm": out.last_hidden_state, "penultimate": out.hidden_states[n - 1]}
        if which == "openclip-bigg":
            want["pooled"] = out.text_embeds
    ref.save_pretrained(tmp_path / "te", safe_serialization=True)
    del ref, out
    gc.collect()

    ours = load_component(tmp_path / "te")
    with torch.no_grad():
        got = {"last+norm": ours(ids).hidden, "penultimate": ours(ids, layer=n - 1, final_norm=False).hidden}
        if which == "openclip-bigg":
            got["pooled"] = ours(ids, layer=n - 1, final_norm=False, pooled=True).pooled
    errs = {k: R.rel_err(got[k], want[k]) for k in want}
    print(which, "rel errs", errs)
    assert max(errs.values()) <= TOL


@pytest.mark.parametrize("which", ["clip-l", "openclip-h"])
def test_vision_encoder_parity(which, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = {"clip-l": R.CLIP_L_VISION, "openclip-h": R.OPENCLIP_H_VISION}[which]
    torch.manual_seed(0)
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).eval()
    assert sum(p.numel() for p in ref.parameters()) == R.VISION_PARAMS[which]
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(pixel_values=pixels).image_embeds
    ref.save_pretrained(tmp_path / "ie", safe_serialization=True)
    del ref
    gc.collect()

    ours = load_component(tmp_path / "ie")
    preset = PRESETS["sd21-unclip-l" if which == "clip-l" else "sd21-unclip-h"]
    assert ours.config == preset.unclip.vision
    with torch.no_grad():
        got = ours(pixels)
    err = R.rel_err(got, want)
    print(which, "vision rel err", err)
    assert err <= TOL


def test_micro_conditioning_matches_diffusers_time_proj():
    """Our micro-condition embedding equals diffusers' add_time_proj (Timesteps(256, True, 0)) on flattened ids."""
    from diffusers.models.embeddings import Timesteps

    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [333.0, 4096, 17, 5, 64, 72]])
    want = Timesteps(256, True, 0)(ids.flatten()).reshape(2, -1)
    assert torch.allclose(micro_embedding(ids), want, atol=1e-6)
