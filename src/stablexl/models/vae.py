"""KL-f8 autoencoder ("AutoencoderKL"): image (B, 3, H, W) in [-1, 1] <-> latent (B, 4, H/8, W/8).

Encoder: conv_in -> levels of ResBlocks with asymmetric-pad stride-2 convs -> mid (Res, Attn, Res)
-> norm/SiLU/conv to mean ‖ logvar -> quant_conv. Decoder mirrors it with one extra ResBlock per
level and nearest-neighbour upsampling. Attribute names follow diffusers' `AutoencoderKL`; the
official single-file layout is mapped in `stablexl/io/keymaps.py`. Facts: reference/architecture.md §2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig
from .layers import Downsample, ResBlock, Upsample, attention

log = logging.getLogger(__name__)


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with GroupNorm and a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        t = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1, upcast=True)  # (B, HW, C)
        t = self.to_out[0](t).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + t


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, None, groups, 1e-6), ResBlock(ch, ch, None, groups, 1e-6)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n))
        self.downsamplers = nn.ModuleList([Downsample(cout, asymmetric_pad=True)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for res in self.resnets:
            x = res(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n))
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for res in self.resnets:
            x = res(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(widths[max(i - 1, 0)], w, cfg.num_res_blocks, g, i < len(widths) - 1)
            for i, w in enumerate(widths)
        )
        self.mid_block = VAEMidBlock(widths[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, 128, H, W)
        for level in self.down_blocks:
            h = level(h)  # (B, w_l, H/2^l, W/2^l)
        h = self.mid_block(h)  # (B, 512, H/8, W/8)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 8, H/8, W/8) = mean ‖ logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = VAEMidBlock(widths[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderLevel(widths[max(i - 1, 0)], w, cfg.num_res_blocks + 1, g, i < len(widths) - 1)
            for i, w in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, 512, h, w)
        for level in self.up_blocks:
            h = level(h)  # (B, w_l, ...)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, 8h, 8w)


@dataclass
class Posterior:
    """Diagonal Gaussian q(z|x); logvar clamped to [-30, 20] (sgm distributions.py)."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device="cpu")
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over latent dims, per sample."""
        return 0.5 * torch.sum(self.mean**2 + self.logvar.exp() - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode(self, x: Tensor) -> Posterior:
        """Image in [-1, 1], (B, 3, H, W) with H, W multiples of 8 -> posterior over unscaled z."""
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"VAE.encode expects (B, {self.config.in_channels}, H, W) with H and W multiples of {f}; "
                f"got {tuple(x.shape)}. Resize or crop the image to a multiple of {f}."
            )
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))  # (B, 8, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled z (B, 4, h, w) -> image (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> tuple[Tensor, Posterior]:
        """Reconstruct through a sample z = mean + std·noise (noise drawn from `generator` if not given)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean)
        return self.decode(z), posterior


@dataclass
class DecodeResult:
    images: Tensor  # (B, 3, H, W) in [-1, 1], float32
    upcast: bool  # True when reduced-precision decoding gave non-finite values and was redone in fp32


def decode_in_fp32(model: nn.Module, z: Tensor) -> Tensor:
    """`model.decode(z)` with the weights in float32 for this one call (the retry after a non-finite
    reduced-precision decode), then back to their dtype."""
    original = model.dtype
    try:
        model.to(torch.float32)
        return model.decode(z.float())
    finally:
        model.to(original)


def decode_latents(vae: AutoencoderKL, latents: Tensor, tile: int | None = None, overlap: int | None = None) -> DecodeResult:
    """Decode *scaled* latents (as the diffusion model sees them), never returning NaN/black images.

    The SDXL VAE overflows in float16 (reference/architecture.md §2, "SDXL VAE fp16 issue"). We decode
    in the VAE's own dtype; when the result is not finite we redo that decode with fp32 weights and
    report it, rather than upcasting every time as diffusers' `force_upcast` does.
    """
    if tile is not None and max(latents.shape[-2:]) > tile:
        return _decode_tiled(vae, latents, tile, min(16, tile // 4) if overlap is None else overlap)
    z = latents / vae.config.scaling_factor
    with torch.no_grad():
        images = vae.decode(z)
        if torch.isfinite(images).all():
            return DecodeResult(images.float(), upcast=False)
        if vae.dtype == torch.float32:
            raise FloatingPointError(
                "VAE decode produced NaN/inf in float32: the latents themselves are not finite or the VAE weights "
                "are corrupt; check the sampler output and the checkpoint"
            )
        log.warning("VAE decode in %s gave non-finite values; redoing it in float32", vae.dtype)
        images = decode_in_fp32(vae, z)
        if not torch.isfinite(images).all():
            raise FloatingPointError("VAE decode is not finite even in float32: the latents contain NaN/inf")
        return DecodeResult(images.float(), upcast=True)


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, n): every `stride`, the last tile flush with the end."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, stride)) + [n - tile]


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> Tensor:
    """1-D blend weight: linear ramps of `ramp` samples at edges shared with a neighbouring tile."""
    w = torch.ones(length)
    r = torch.arange(ramp, dtype=torch.float32).add_(0.5).div_(ramp)  # (0, 1), never exactly 0
    if rise:
        w[:ramp] = r
    if fall:
        w[length - ramp:] = torch.minimum(w[length - ramp:], r.flip(0))
    return w


def _decode_tiled(vae: AutoencoderKL, latents: Tensor, tile: int, overlap: int) -> DecodeResult:
    """Decode overlapping latent tiles and blend them with linear ramps over the overlaps.

    Memory is bounded by one tile's decode. The decoder's mid-block attention is global, so tiles see
    less context than a whole-image decode: results differ slightly from untiled decoding (measured in
    tests/models/test_vae.py), while the ramps leave no visible seam.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    f = vae.config.downsample_factor
    b, _, h, w = latents.shape
    ys, xs = _tile_starts(h, tile, tile - overlap), _tile_starts(w, tile, tile - overlap)
    out = torch.zeros(b, vae.config.out_channels, h * f, w * f)
    total = torch.zeros(1, 1, h * f, w * f)
    upcast = False
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            part = decode_latents(vae, latents[..., y0:y0 + th, x0:x0 + tw])
            upcast |= part.upcast
            ramp = max(1, overlap * f)
            wy = _ramp(th * f, ramp, rise=y0 > 0, fall=y0 + th < h)
            wx = _ramp(tw * f, ramp, rise=x0 > 0, fall=x0 + tw < w)
            weight = (wy[:, None] * wx[None, :])[None, None]
            out[..., y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += part.images * weight
            total[..., y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += weight
    return DecodeResult(out / total, upcast)
