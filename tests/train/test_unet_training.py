"""UNet pieces training relies on: odd latent sizes (56x72 px buckets) as diffusers handles them, gradient
checkpointing that changes memory but not gradients, and the optional loss terms running end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from stablexl.config import PRESETS
from stablexl.io import diffusers_format as dfmt
from stablexl.models.parts import build_parts


def _inputs(cfg, b, h, w, g):
    return (torch.randn(b, 4, h, w, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randn(b, 77, cfg.unet.context_dim, generator=g), torch.randn(b, cfg.unet.vector_dim, generator=g))


def test_odd_latent_sizes_match_diffusers():
    from diffusers import UNet2DConditionModel

    cfg = PRESETS["tiny-sdxl"]
    torch.manual_seed(0)
    unet = build_parts(cfg, "cpu").unet.eval()
    d = {k: v for k, v in dfmt.unet_to_diffusers(cfg.unet, cfg.family, 8).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**d).eval()
    ref.load_state_dict({dfmt.unet_key_renames(d).get(k, k): v for k, v in unet.state_dict().items()}, strict=False)
    missing = set(ref.state_dict()) - {dfmt.unet_key_renames(d).get(k, k) for k in unet.state_dict()}
    assert not missing
    g = torch.Generator().manual_seed(0)
    for h, w in ((7, 9), (5, 12), (8, 8)):  # 56x72, 40x96, 64x64 px
        x, t, c, y = _inputs(cfg, 2, h, w, g)
        with torch.no_grad():
            ours = unet(x, t, c, y)
            # diffusers builds the vector from time_ids itself; give its add_embedding our vector instead
            emb = ref.time_embedding(ref.time_proj(t).to(x.dtype)) + ref.add_embedding(y)
            theirs = _diffusers_with_emb(ref, x, emb, c)
        assert ours.shape == (2, 4, h, w)
        assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5


def _diffusers_with_emb(ref, x, emb, c):
    """diffusers' UNet2DConditionModel forward with a given time embedding and forwarded upsample sizes."""
    h = ref.conv_in(x)
    res = (h,)
    for block in ref.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=c)
        else:
            h, r = block(hidden_states=h, temb=emb)
        res += r
    h = ref.mid_block(h, emb, encoder_hidden_states=c)
    n = len(ref.up_blocks)
    for i, block in enumerate(ref.up_blocks):
        k = len(block.resnets)
        skips, res = res[-k:], res[:-k]
        size = res[-1].shape[2:] if i < n - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=c, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)
    return ref.conv_out(ref.conv_act(ref.conv_norm_out(h)))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = PRESETS["tiny-sdxl"]
    torch.manual_seed(0)
    unet = build_parts(cfg, "cpu").unet.train()
    g = torch.Generator().manual_seed(1)
    x, t, c, y = _inputs(cfg, 2, 7, 9, g)
    grads = []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = ckpt
        unet(x, t, c, y).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in unet.named_parameters()})
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7) for k in grads[0])


def test_optional_loss_terms_and_precision_run(shapes_data, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "stablexl.cli", "train", "unet", "--model", "tiny-sdxl", "--data", str(shapes_data),
                        "--output", str(out), "--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--precision", "bf16",
                        "--gradient-checkpointing", "--min-snr-gamma", "5", "--offset-noise", "0.05", "--prediction", "v",
                        "--warmup-steps", "2", "--log-every", "1", "--sample-steps", "1", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[0]["lr"] < rows[1]["lr"] == rows[2]["lr"]  # linear warm-up, then constant
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)


def test_mini_refiner_recipe_low_noise_timesteps_and_the_aesthetic_proxy(shapes_data, tmp_path):
    """`--model mini-refiner`: mini's VAE and bigG-shaped tower (frozen), timesteps below 200, the refiner vector
    (pooled ‖ original size ‖ crop ‖ aesthetic score) with the blur proxy's scores; the result loads as a refiner
    and refines the base's latents through the pipeline."""
    import argparse

    from stablexl.mini.weights import load_mini_parts
    from stablexl.train.loop import Context, TrainConfig
    from stablexl.train.run import _unet_parts
    from stablexl.train.unet import UNetTask, UNetTrainOptions
    from stablexl.train.data import TrainData, scan_dataset

    parts = _unet_parts(argparse.Namespace(model="mini-refiner", seed=0, vae=None, text_encoders=None))
    mini = load_mini_parts()
    assert parts.config.family == "sdxl-refiner" and len(parts.text_encoders) == 1
    assert all(torch.equal(a, b) for a, b in zip(parts.text_encoders[0].state_dict().values(),
                                                  mini.text_encoders[1].state_dict().values()))
    recs = [r for r in scan_dataset(shapes_data).records if r.size == (64, 64)]
    task = UNetTask(parts, TrainData(recs, [(64, 64)], 8, 0), UNetTrainOptions(cache_latents=True))
    seen = {}
    real = parts.unet.forward
    parts.unet.forward = lambda x, t, c, y: seen.update(t=t, y=y) or real(x, t, c, y)
    ctx = Context(TrainConfig(batch_size=8), models={"unet": parts.unet})
    for step in range(3):
        task.loss(ctx, step)
        assert seen["t"].max() < 200 and seen["y"].shape == (8, 128 + 5 * 256)
    scores = torch.tensor([r[6] for r in task._latents.values()])
    assert ((scores == 6.0) | ((scores >= 2.0) & (scores <= 5.0))).all() and (scores < 6).any() and (scores == 6).any()
    _, again = task._aesthetic(torch.zeros(2, 3, 64, 64), list(task._latents)[:2])
    assert again.tolist() == scores[:2].tolist()  # fixed per image
    # a trained refiner of this shape refines the base's output through the pipeline (hand-off at 0.8)
    from stablexl.io.models import save_model
    from stablexl.pipeline import Pipeline

    path = save_model(parts, tmp_path / "refiner.safetensors")
    base, refiner = Pipeline.from_pretrained("mini"), Pipeline.from_pretrained(str(path))
    out = base("red apple", steps=4, seed=0, refiner=refiner, switch_at=0.8)
    assert out.images[0].size == (64, 64)


def test_mini_unclip_recipe_image_vector_init_from_mini_and_variations(shapes_data, tmp_path):
    """`--model mini-unclip --init mini`: mini's UNet (its vector input zero-initialised, the only tensor whose shape
    differs), towers, VAE and the mini CLIP's image tower, all frozen but the UNet; the normalizer fitted to the
    training images' embeddings; the vector is the noise-augmented embedding of the very image whose latent is
    denoised (zeroed with the image dropout); dropped text is the caption ""; the result makes variations."""
    import argparse

    from stablexl.mini.weights import load_mini_parts
    from stablexl.train.data import TrainData, scan_dataset
    from stablexl.train.loop import Context, TrainConfig
    from stablexl.train.run import _unet_parts
    from stablexl.train.unet import UNetTask, UNetTrainOptions

    parts = _unet_parts(argparse.Namespace(model="mini-unclip", seed=0, vae=None, text_encoders=None, init="mini"))
    mini = load_mini_parts()
    own, base = parts.unet.state_dict(), mini.unet.state_dict()
    differ = [k for k in own if own[k].shape != base[k].shape]
    assert differ == ["add_embedding.linear_1.weight"] and not own[differ[0]].any()
    assert all(torch.equal(own[k], base[k].float()) for k in own if k not in differ)
    assert parts.image_encoder is not None and "zero-initialised" in parts.notes[-1]

    recs = [r for r in scan_dataset(shapes_data).records if r.size == (64, 64)]
    opts = UNetTrainOptions(cache_latents=True, dropout_text=0.5, dropout_image=0.5)
    task = UNetTask(parts, TrainData(recs, [(64, 64)], 8, 0), opts)
    norm = parts.image_normalizer
    assert not torch.all(norm.mean == 0) and not torch.all(norm.std == 1)  # fitted, not identity
    seen = {}
    real = parts.unet.forward
    parts.unet.forward = lambda x, t, c, y: seen.update(c=c, y=y) or real(x, t, c, y)
    ctx = Context(TrainConfig(batch_size=8), models={"unet": parts.unet})
    empty = task.encode_captions([""])[0][0]
    zero_rows = empty_rows = 0
    for step in range(4):
        loss = task.loss(ctx, step)[1]
        assert torch.isfinite(loss)
        y, c = seen["y"], seen["c"]
        assert y.shape == (8, 256)
        zero_rows += int((y.abs().sum(1) == 0).sum())
        empty_rows += sum(torch.equal(row, empty) for row in c)
    assert 0 < zero_rows < 32 and 0 < empty_rows < 32  # both dropouts happen, neither always
    # the cached embedding is the image tower's on the latent's own pixels
    i = next(iter(task._latents))
    s = task.data.sample(i, 0, (64, 64))
    assert torch.allclose(task._embeds[i], task.image_embeds(s.pixels[None])[0])

    from PIL import Image

    from stablexl.io.models import save_model
    from stablexl.pipeline import Pipeline

    path = save_model(parts, tmp_path / "unclip.safetensors")
    pipe = Pipeline.from_pretrained(str(path))
    assert torch.equal(pipe.parts.image_normalizer.mean, norm.mean)
    out = pipe("", image_prompt=Image.open(recs[0].path).convert("RGB"), noise_level=100, steps=2, seed=0)
    assert out.images[0].size == (64, 64)
