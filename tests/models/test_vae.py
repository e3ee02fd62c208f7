"""VAE behaviour beyond parity: posterior, scaling, and NaN-safe reduced-precision decoding."""

import copy
import logging

import pytest
import torch

from stablexl.config import preset
from stablexl.models.vae import AutoencoderKL, decode_latents


def _vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(preset("tiny-sdxl").vae).eval()


def test_posterior_clamps_logvar_and_samples_with_generator():
    vae = _vae()
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 100.0  # logvar channels far above the clamp
        post = vae.encode(torch.zeros(1, 3, 16, 16))
    assert post.logvar.max() <= 20.0
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mean)


def test_encode_rejects_sizes_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiples of 8"):
        _vae().encode(torch.zeros(1, 3, 20, 16))


def test_decode_applies_scaling_factor():
    vae = _vae()
    z = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor)
    assert torch.allclose(decode_latents(vae, z).images, want)


def test_fp16_overflow_is_redone_in_fp32(caplog):
    vae = _vae()
    with torch.no_grad():
        # Activations that fit fp32 but overflow fp16 (max 65504), as the SDXL VAE's do.
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = decode_latents(vae, z)
    assert not ref.upcast and torch.isfinite(ref.images).all()
    vae.half()
    with torch.no_grad():
        raw = vae.decode(z.half() / vae.config.scaling_factor)
    assert not torch.isfinite(raw).all(), "test setup: fp16 decode was expected to overflow"
    with caplog.at_level(logging.WARNING), torch.no_grad():
        res = decode_latents(vae, z)
    assert res.upcast and "float32" in caplog.text
    assert torch.isfinite(res.images).all()
    # the redo is an fp32 decode of the stored (fp16-rounded) weights
    exact = decode_latents(copy.deepcopy(vae).float(), z)
    assert torch.allclose(res.images, exact.images, atol=1e-6)
    assert (res.images - ref.images).abs().max() < 2e-3  # and close to the never-rounded model
    assert vae.dtype == torch.float16, "the VAE keeps its dtype after the fp32 redo"


def test_nan_latents_fail_loudly():
    with pytest.raises(FloatingPointError, match="latents"):
        decode_latents(_vae(), torch.full((1, 4, 2, 2), float("nan")))


def test_tiled_decode_converges_to_untiled_and_shows_no_seam():
    """Tiled decoding of a 40x40 latent (320 px) with 6 latents of overlap.

    Independent tiles see only themselves through the decoder's GroupNorm statistics and global mid-block
    attention, so tiled decoding approximates the untiled one (diffusers' `tiled_decode` too). Checked:
    the error falls as tiles grow, at 16-latent tiles it is no worse than diffusers' tiled decode on the
    same weights (measured here), and the pixel jump across tile borders is no larger than elsewhere.
    """
    import diffusers

    from stablexl.io.diffusers_format import vae_to_diffusers

    vae = _vae(3)
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = decode_latents(vae, z).images
        tiled = {t: decode_latents(vae, z, tile=t, overlap=6).images for t in (12, 16, 24, 32)}
    rel = {t: float((img - full).abs().mean() / full.abs().mean()) for t, img in tiled.items()}
    ref = diffusers.AutoencoderKL(**{k: v for k, v in vae_to_diffusers(vae.config, 128).items() if not k.startswith("_")})
    ref.load_state_dict(vae.state_dict())
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 16, 128, 6 / 16
    with torch.no_grad():
        theirs = ref.tiled_decode(z / vae.config.scaling_factor).sample
    rel_diffusers = float((theirs - full).abs().mean() / full.abs().mean())
    print("tiled vs untiled mean rel error by tile size:", {t: round(v, 4) for t, v in rel.items()},
          f"diffusers tiled_decode at 16: {rel_diffusers:.4f}")
    assert rel[12] > rel[16] > rel[24] > rel[32]
    assert rel[16] <= rel_diffusers
    # seams: horizontal jumps between adjacent pixel columns, at tile borders vs the image's median jump
    img = tiled[16]
    jumps = (img[..., :, 1:] - img[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # (W-1,)
    borders = [8 * x - 1 for x in (10, 16, 20, 26, 30)]
    assert float(jumps[borders].max()) <= 2.0 * float(jumps.median())


def test_tiled_decode_is_exact_when_one_tile_covers_everything():
    vae = _vae(3)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(decode_latents(vae, z, tile=8).images, decode_latents(vae, z).images)
