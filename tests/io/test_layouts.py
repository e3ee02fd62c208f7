"""Our single-file export read by diffusers' own converters; our diffusers folders read by diffusers.

The converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) are the reference for the official layout: if they turn our file into
diffusers/transformers models that compute what ours compute, the layout is right.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import refconfigs as R
from stablexl.config import PRESETS, preset
from stablexl.io import diffusers_format as dfmt
from stablexl.io.keymaps import single_file_layout
from stablexl.io.models import load_model, plans_for, save_model
from stablexl.models.parts import build_parts

TINY = ["tiny-sdxl", "tiny-refiner", "tiny-sd15", "tiny-sd21"]


def random_parts(name, seed=0):
    """Parts whose every parameter is random (no 1/0 norm defaults that would hide swapped keys)."""
    torch.manual_seed(seed)
    parts = build_parts(preset(name), device="cpu", with_image_encoder=True)
    with torch.no_grad():
        for m in parts.modules().values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return parts.eval()


def unet_outputs(parts, ref, g):
    """Our UNet and a diffusers UNet on the same random inputs (vector fed to diffusers as text_embeds + time_ids)."""
    from stablexl.models.conditioning import micro_embedding

    cfg = parts.config
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([999, 5])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    kwargs, y = {}, None
    if cfg.family == "sd2-unclip":  # the vector goes in whole, as diffusers' class_labels
        y = torch.randn(2, cfg.unet.vector_dim, generator=g)
        kwargs["class_labels"] = y
    elif cfg.unet.vector_dim:
        pooled = torch.randn(2, cfg.text_encoders[-1].config.projection_dim, generator=g)
        n_ids = (cfg.unet.vector_dim - pooled.shape[1]) // 256
        time_ids = torch.randint(0, 1024, (2, n_ids), generator=g).float()
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = torch.cat([pooled, micro_embedding(time_ids)], dim=1)
    with torch.no_grad():
        return parts.unet(x, t, ctx, y), ref(x, t, encoder_hidden_states=ctx, **kwargs).sample


def _hf_text(cls_cfg, sd):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = dict(cls_cfg)
    cls = CLIPTextModelWithProjection if "WithProjection" in d.pop("architectures")[0] else CLIPTextModel
    d.pop("model_type")
    m = cls(CLIPTextConfig(**d)).eval()
    if sd is None:
        return m
    if not any(k.startswith("text_model.") for k in m.state_dict()):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    m.load_state_dict(sd, strict=True)
    return m


@pytest.mark.parametrize("name", TINY)
def test_single_file_export_opens_with_diffusers_converters(name, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
    )

    parts = random_parts(name)
    cfg = parts.config
    path = save_model(parts, tmp_path / "model.safetensors", "single-file")
    ckpt = load_file(path)
    g = torch.Generator().manual_seed(1)

    # UNet
    ucfg = dfmt.unet_to_diffusers(cfg.unet, cfg.family, 8)
    ref = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    err = R.rel_err(*unet_outputs(parts, ref, g))
    assert err <= 1e-5, f"UNet {err}"

    # VAE
    vcfg = dfmt.vae_to_diffusers(cfg.vae, cfg.resolution)
    vref = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")}).eval()
    vref.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert R.rel_err(parts.vae.encode(img).mean, vref.encode(img).latent_dist.mean) <= 1e-5
        z = torch.randn(1, 4, 4, 4, generator=g)
        assert R.rel_err(parts.vae.decode(z), vref.decode(z).sample) <= 1e-5

    # Text encoders, each through the converter diffusers uses for its slot
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 10] = 49407
    for comp, spec, te in zip(single_file_layout(cfg)[2:], cfg.text_encoders, parts.text_encoders):
        text_cfg = spec.config
        if cfg.family.startswith("sd2"):  # diffusers drops SD 2.x's unused OpenCLIP projection
            text_cfg = dataclasses.replace(text_cfg, projection_dim=0)
        hf_cfg = dfmt.text_to_transformers(text_cfg)
        if comp.prefix.endswith(".transformer."):
            sd = convert_ldm_clip_checkpoint(ckpt)
        else:
            probe = _hf_text(hf_cfg, None)  # the converter only reads its config
            sd = convert_open_clip_checkpoint(probe, ckpt, prefix=comp.prefix)
        ref_te = _hf_text(hf_cfg, sd)
        with torch.no_grad():
            out = ref_te(ids, output_hidden_states=True)
            mine = te(ids, layer=spec.layer, final_norm=spec.final_norm, pooled=spec.pooled)
            want = out.hidden_states[spec.layer]
            if spec.final_norm:
                want = ref_te.text_model.final_layer_norm(want) if hasattr(ref_te, "text_model") else ref_te.final_layer_norm(want)
            assert R.rel_err(mine.hidden, want) <= 1e-5, comp.prefix
            if spec.pooled:
                assert R.rel_err(mine.pooled, out.text_embeds) <= 1e-5


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner", "sd15", "sd21", "sd21-unclip-h"])
def test_full_size_single_file_keys_convert_to_diffusers_keys(name):
    """At full size, on the meta device: every key/shape we write converts to exactly diffusers' key set."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    parts = build_parts(PRESETS[name], device="meta")
    ckpt = {}
    from stablexl.io.keymaps import foreign_shape

    for plan in plans_for(parts, "single-file"):
        sd = plan.module.state_dict()
        for rule in plan.rules:
            ckpt[plan.prefix + rule.theirs] = torch.empty(foreign_shape(rule, [tuple(sd[k].shape) for k in rule.ours]), device="meta")
    ucfg, n_params = R.UNETS[name]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**ucfg)
    conv = convert_ldm_unet_checkpoint(ckpt, dict(ref.config))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conv.items()} == want
    vconv = convert_ldm_vae_checkpoint(ckpt, dict(R.VAE))
    assert {k: tuple(v.shape) for k, v in vconv.items()} == {k: tuple(v.shape) for k, v in parts.vae.state_dict().items()}
    assert sum(t.numel() for k, t in ckpt.items() if k.startswith("model.diffusion_model.")) == n_params


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-refiner", "tiny-sd15", "tiny-sd21", "tiny-unclip"])
def test_diffusers_folder_written_by_us_loads_in_diffusers(name, tmp_path):
    import diffusers

    parts = random_parts(name, seed=3)
    save_model(parts, tmp_path / "pipe", "diffusers")
    cls = getattr(diffusers, dfmt.model_index_for(parts.config)["_class_name"])
    pipe = cls.from_pretrained(tmp_path / "pipe")
    g = torch.Generator().manual_seed(4)
    assert R.rel_err(*unet_outputs(parts, pipe.unet, g)) <= 1e-5
    if parts.image_encoder is not None:  # unCLIP: the image tower and normalizer as diffusers reads them
        pix = torch.randn(2, 3, 28, 28, generator=g)
        with torch.no_grad():
            assert R.rel_err(parts.image_encoder(pix), pipe.image_encoder(pixel_values=pix).image_embeds) <= 1e-5
        assert torch.equal(pipe.image_normalizer.mean.detach(), parts.image_normalizer.mean.detach())
    ours = load_model(tmp_path / "pipe")
    assert ours.config.unet == parts.config.unet and ours.config.vae == parts.config.vae
    assert ours.config.unclip == parts.config.unclip
    for (n, a), b in zip(parts.modules().items(), ours.modules().values()):
        sa, sb = a.state_dict(), b.state_dict()
        # SD 2.x folders keep only the text blocks the model reads (as diffusers' converter does)
        assert (set(sb) <= set(sa)) if n.startswith("text_encoders") else (sa.keys() == sb.keys()), n
        assert all(torch.equal(sa[k], sb[k]) for k in sb), n
    from stablexl.models.conditioning import encode_text

    ids = [torch.randint(0, 49406, (2, 77), generator=g) for _ in parts.text_encoders]
    with torch.no_grad():
        want_ctx, want_pool = encode_text(parts.config, parts.text_encoders, ids)
        got_ctx, got_pool = encode_text(ours.config, ours.text_encoders, ids)
    assert torch.equal(want_ctx, got_ctx) and (want_pool is None or torch.equal(want_pool, got_pool))
    # the diffusers pipeline's tokenizers give our ids
    from stablexl.models.tokenizer import default_tokenizer

    toks = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
    toks = [t for t in toks if t is not None]
    for tok, spec in zip(toks, parts.config.text_encoders):
        want = tok(["a red apple, (oil painting)"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(default_tokenizer()(["a red apple, (oil painting)"], pad_id=spec.pad_id), want)
