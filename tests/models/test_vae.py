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
