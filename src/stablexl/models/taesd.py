"""Tiny autoencoder ("AutoencoderTiny", TAESD / TAESDXL): scaled latent (B, 4, h, w) <-> image (B, 3, 8h, 8w).

A VAE-free stand-in for the KL-f8 VAE, distilled from it (madebyollin/taesd; facts read from its `taesd.py`
at 5cccb12 and diffusers' `AutoencoderTiny` / `EncoderTiny` / `DecoderTiny`, 0.42.1). No attention, no
normalisation: plain 3×3 convs and ReLUs, 1.2 M parameters per half at 64 channels, about 18× less decode
work than the SDXL VAE at 1024² (reference/performance.md §1).

Decoder: soft clamp tanh(z/3)·3 -> conv + ReLU -> levels of residual Blocks, nearest 2× upsampling and a
bias-free conv between levels -> conv to RGB. Encoder: conv -> levels of Blocks, a stride-2 bias-free conv
before each level after the first -> conv to latents.

Latent convention (the one thing to get right when swapping it for the VAE):
- TAESD reads and writes the latents *as the UNet sees them*, i.e. already multiplied by the VAE's
  scaling factor (0.18215 SD, 0.13025 SDXL). diffusers' AutoencoderTiny has `scaling_factor = 1.0`, so its
  pipelines' `latents / vae.config.scaling_factor` hands the UNet latents over unchanged; we do the same
  (`decode_tiny(model, unet_latents)`), where `decode_latents(vae, ...)` divides by the VAE's factor first.
- Images: the network itself works in [0, 1] (upstream); `decode` / `encode` here, like diffusers, take and
  return [-1, 1], the range of our VAE.
- `latent_magnitude` 3 and `latent_shift` 0.5 are not used by decoding: they only pack latents into uint8
  images (`pack_latents` / `unpack_latents`, upstream `scale_latents` / `unscale_latents`).

Attribute names follow diffusers (`encoder.layers.N`, `decoder.layers.N`, N counting nn.Sequential entries);
upstream's own files index the bare Sequential, the decoder's one higher because its clamp is entry 0
(`stablexl/io/tiny.py` maps both).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import TinyAutoencoderConfig
from .vae import DecodeResult, decode_in_fp32


def conv3(cin: int, cout: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)); skip is a bias-free 1×1 conv when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv3(cin, cout), nn.ReLU(), conv3(cout, cout), nn.ReLU(), conv3(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        ch, n = cfg.decoder_channels, cfg.decoder_blocks
        layers: list[nn.Module] = [conv3(cfg.latent_channels, ch[0]), nn.ReLU()]  # layers.0, layers.1
        for i, (c, blocks) in enumerate(zip(ch, n)):
            layers += [Block(c, c) for _ in range(blocks)]
            if i < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv3(c, ch[i + 1], bias=False)]
        layers.append(conv3(ch[-1], cfg.image_channels))  # the only conv after the first with a bias
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> image (B, 3, 8h, 8w), nominally in [0, 1]."""
        z = torch.tanh(z / 3) * 3  # soft clamp to (-3, 3) (upstream `Clamp`)
        return self.layers(z)  # (B, c_i, h·2^i, w·2^i) through the levels


class TinyEncoder(nn.Module):
    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        ch, n = cfg.encoder_channels, cfg.encoder_blocks
        layers: list[nn.Module] = []
        for i, (c, blocks) in enumerate(zip(ch, n)):
            # level 0 keeps the resolution; every later level halves it first
            layers.append(conv3(cfg.image_channels, c) if i == 0 else conv3(ch[i - 1], c, stride=2, bias=False))
            layers += [Block(c, c) for _ in range(blocks)]
        layers.append(conv3(ch[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [0, 1] -> scaled latents (B, C, H/8, W/8)."""
        return self.layers(x)


class AutoencoderTiny(nn.Module):
    """TAESD. Either half may be absent (`encoder=False` / `decoder=False`): users mostly have decoder files."""

    def __init__(self, cfg: TinyAutoencoderConfig, *, encoder: bool = True, decoder: bool = True):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("AutoencoderTiny needs an encoder, a decoder or both")
        self.config = cfg
        self.encoder = TinyEncoder(cfg) if encoder else None
        self.decoder = TinyDecoder(cfg) if decoder else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def decode(self, latents: Tensor) -> Tensor:
        """*Scaled* latents (B, C, h, w), as the UNet sees them -> image (B, 3, 8h, 8w) in about [-1, 1]."""
        if self.decoder is None:
            raise RuntimeError("this tiny autoencoder was loaded without its decoder; load a *_decoder file")
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"tiny decoder expects (B, {self.config.latent_channels}, h, w) latents, "
                             f"got {tuple(latents.shape)}")
        return self.decoder(latents.to(self.dtype)) * 2 - 1

    def encode(self, images: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> scaled latents (B, C, H/8, W/8)."""
        if self.encoder is None:
            raise RuntimeError("this tiny autoencoder was loaded without its encoder; load a *_encoder file too")
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.image_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"tiny encoder expects (B, {self.config.image_channels}, H, W) with H and W multiples "
                             f"of {f}; got {tuple(images.shape)}")
        return self.encoder((images.to(self.dtype) + 1) / 2)

    def pack_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> uint8, for storing latents as images (upstream `scale_latents` · 255)."""
        c = self.config
        return (latents / (2 * c.latent_magnitude) + c.latent_shift).clamp(0, 1).mul(255).round().to(torch.uint8)

    def unpack_latents(self, packed: Tensor) -> Tensor:
        c = self.config
        return (packed.float() / 255 - c.latent_shift) * (2 * c.latent_magnitude)


@torch.no_grad()
def decode_tiny(model: AutoencoderTiny, latents: Tensor) -> DecodeResult:
    """`decode_latents`' counterpart for the pipeline: UNet latents -> images in about [-1, 1] (float32), redone
    in fp32 when a reduced-precision decode is not finite."""
    images = model.decode(latents)
    if torch.isfinite(images).all():
        return DecodeResult(images.float(), upcast=False)
    if model.dtype == torch.float32:
        raise FloatingPointError("tiny decoder produced NaN/inf in float32: the latents themselves are not finite")
    return DecodeResult(decode_in_fp32(model, latents).float(), upcast=True)
