"""Live previews: the fitted latent -> RGB map, and the three preview modes."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stablexl.models.vae import decode_latents
from stablexl.serve.preview import Previewer, fit_latent_rgb

from .conftest import tiny_loader


class _LinearVAE:
    """A VAE whose latent is a known linear function of the 8x8-pooled colour: the fit must invert it."""

    def __init__(self):
        self.config = SimpleNamespace(downsample_factor=8, scaling_factor=0.5)
        self.mix = torch.tensor([[0.9, -0.2, 0.1], [0.3, 0.8, -0.4], [-0.5, 0.1, 0.7], [0.2, 0.2, 0.2]])
        self.shift = torch.tensor([0.1, -0.3, 0.2, 0.05])

    def encode(self, images):
        pooled = F.avg_pool2d(images, 8)  # (n, 3, h, w)
        mean = torch.einsum("kc,nchw->nkhw", self.mix, pooled) + self.shift.view(1, 4, 1, 1)
        return SimpleNamespace(mean=mean)


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_fit_recovers_a_linear_vae():
    pipe = SimpleNamespace(parts=SimpleNamespace(vae=_LinearVAE()), config=SimpleNamespace(resolution=64))
    assert fit_latent_rgb(pipe).shape == (5, 3)  # 4 latent channels + bias -> RGB
    preview = Previewer(pipe, "approx")  # fits the map on construction
    vae = pipe.parts.vae
    for colour in ((0.8, -0.6, 0.1), (-1.0, 1.0, 0.0), (0.0, 0.0, 0.0)):
        img = torch.tensor(colour).view(1, 3, 1, 1).expand(1, 3, 64, 64)
        lat = vae.encode(img).mean * vae.config.scaling_factor
        px = _png_pixels(preview(lat, 64, 48))
        assert px.shape == (48, 64, 3)  # the output's aspect, not the latent's
        expected = (np.array(colour) + 1) * 127.5
        assert np.abs(px.reshape(-1, 3).mean(0) - expected).max() < 1.5, (colour, px.reshape(-1, 3).mean(0))


@pytest.mark.parametrize("mode", ["approx", "full", "none"])
def test_preview_modes_on_tiny_model(mode):
    pipe = tiny_loader("tiny-sdxl")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = Previewer(pipe, mode)(x0, 64, 64, last=True)
    if mode == "none":
        assert out is None
        return
    px = _png_pixels(out)
    assert px.shape == (64, 64, 3)
    if mode == "full":  # exactly the VAE decode of the first image
        ref = ((decode_latents(pipe.parts.vae, x0[:1]).images[0].clamp(-1, 1) + 1) * 127.5).round()
        assert np.abs(px - ref.permute(1, 2, 0).numpy()).max() <= 1
    with pytest.raises(ValueError, match="preview mode"):
        Previewer(pipe, "taesd")


def _tiny_pipe():
    """A tiny-sdxl pipeline plus a random tiny decoder (the session's shared pipeline is left alone)."""
    from stablexl.config import TAESDXL
    from stablexl.models.taesd import AutoencoderTiny
    from stablexl.pipeline import Pipeline

    base = tiny_loader("tiny-sdxl")
    torch.manual_seed(0)
    return Pipeline(base.parts, name="tiny-sdxl", tiny_decoder=AutoencoderTiny(TAESDXL, encoder=False).eval())


def test_tiny_preview_is_the_tiny_decode_and_the_default():
    from stablexl.models.taesd import decode_tiny

    pipe = _tiny_pipe()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    auto = Previewer(pipe)
    assert auto.mode == "tiny"
    ref = ((decode_tiny(pipe.tiny_decoder, x0).images[0].clamp(-1, 1) + 1) * 127.5).round()
    assert np.abs(_png_pixels(auto(x0, 64, 64, last=True)) - ref.permute(1, 2, 0).numpy()).max() <= 1
    assert Previewer(tiny_loader("tiny-sdxl")).mode == "approx"  # no tiny decoder: the fitted map
    with pytest.raises(ValueError, match="needs a tiny decoder"):
        Previewer(tiny_loader("tiny-sdxl"), "tiny")
