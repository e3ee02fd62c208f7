"""The denoising UNet of SD 1.x / SD 2.x / unCLIP / SDXL (LDM `UNetModel`).

Reads top-down like the architecture figure: attention -> transformer block -> spatial transformer
-> down / mid / up levels -> the UNet. Attribute names follow the diffusers `UNet2DConditionModel`
state-dict layout on purpose, so a diffusers folder loads without renaming; the official single-file
(LDM) layout is mapped by one table in `stablexl/io/keymaps.py`. Facts: reference/architecture.md §1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import UNetConfig
from .layers import (
    Downsample,
    MLPEmbedding,
    ResBlock,
    Upsample,
    attention,
    attention_via_context,
    timestep_embedding,
    via_context_is_cheaper,
)

# --------------------------------------------------------------------------------------------------
# Attention and the transformer blocks
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Self- or cross-attention: q/k/v without bias, output projection with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        # Inside UNet.reusing_context(): (context, its version, k, v) of the last context seen, or () if none yet.
        self._reused: tuple | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q = self.to_q(x)  # (B, N, inner)
        if context is None:  # self-attention
            out = attention(q, self.to_k(x), self.to_v(x), self.heads, upcast=self.upcast)
        elif self._reused is None and type(self.to_k) is nn.Linear and via_context_is_cheaper(x.shape[1], context.shape[1], q.shape[-1],
                                                             context.shape[-1], self.heads):
            out = attention_via_context(q, context, self.to_k.weight, self.to_v.weight, self.heads, upcast=self.upcast)
        else:
            k, v = self._context_kv(context)  # (B, M, inner) each
            out = attention(q, k, v, self.heads, upcast=self.upcast)  # (B, N, inner)
        return self.to_out[0](out)  # (B, N, dim)

    def _context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        r = self._reused
        if r is None or torch.is_grad_enabled() or context.is_inference():  # inference tensors have no version
            return self.to_k(context), self.to_v(context)
        if not r or r[0] is not context or r[1] != context._version:
            r = self._reused = (context, context._version, self.to_k(context), self.to_v(context))
        return r[2], r[3]


class GEGLU(nn.Module):
    """Linear to 2*hidden, split into (x, gate), x * GELU(gate) (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # `net.0` / `net.2` keep the checkpoint layout (index 1 is a parameter-free dropout upstream).
        self.net = nn.ModuleDict({"0": GEGLU(dim, mult * dim), "2": nn.Linear(mult * dim, dim)})

    def forward(self, x: Tensor) -> Tensor:
        return self.net["2"](self.net["0"](x))


class TransformerBlock(nn.Module):
    """x += self-attn(LN x); x += cross-attn(LN x, context); x += GEGLU-FF(LN x)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, HW, C)
        x = x + self.attn2(self.norm2(x), context)  # (B, HW, C)
        return x + self.ff(self.norm3(x))  # (B, HW, C)


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> depth x TransformerBlock -> proj_out, plus the block input."""

    def __init__(self, ch: int, depth: int, cfg: UNetConfig):
        super().__init__()
        heads, head_dim = cfg.heads_for(ch)
        self.linear = cfg.linear_proj
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        proj = (lambda: nn.Linear(ch, ch)) if self.linear else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, heads, head_dim, cfg.context_dim, cfg.upcast_attention) for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)  # (B, C, H, W)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)  # (B, HW, C)
        if self.linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            t = self.proj_out(t)
        return x + t


# --------------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------------


class DownLevel(nn.Module):
    """num_res_blocks x [ResBlock (+ SpatialTransformer of depths[j] blocks)], then a stride-2 conv unless last."""

    def __init__(self, cin: int, width: int, depths: tuple[int, ...], downsample: bool, cfg: UNetConfig):
        super().__init__()
        temb, g = cfg.time_embed_dim, cfg.norm_groups
        self.resnets = nn.ModuleList(
            ResBlock(cin if j == 0 else width, width, temb, g, 1e-5) for j in range(cfg.num_res_blocks)
        )
        self.attentions = nn.ModuleList(SpatialTransformer(width, d, cfg) for d in depths) if any(depths) else None
        self.downsamplers = nn.ModuleList([Downsample(width)]) if downsample else None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, res in enumerate(self.resnets):
            x = res(x, emb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResBlock -> SpatialTransformer -> ResBlock at the lowest resolution; with `attention=False` one ResBlock
    only (diffusers' UNetMidBlock2D as UNet2DConditionModel builds it: SSD-1B, Vega)."""

    def __init__(self, ch: int, depth: int, cfg: UNetConfig, attention: bool = True):
        super().__init__()
        temb, g = cfg.time_embed_dim, cfg.norm_groups
        self.resnets = nn.ModuleList(ResBlock(ch, ch, temb, g, 1e-5) for _ in range(2 if attention else 1))
        self.attentions = nn.ModuleList([SpatialTransformer(ch, depth, cfg)]) if attention else None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, emb)
        if self.attentions is None:
            return x
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpLevel(nn.Module):
    """(num_res_blocks + 1) x [concat skip -> ResBlock (+ SpatialTransformer of depths[j] blocks)], then upsample
    unless last."""

    def __init__(self, cin: int, skip_channels: list[int], width: int, depths: tuple[int, ...], upsample: bool,
                 cfg: UNetConfig):
        super().__init__()
        temb, g = cfg.time_embed_dim, cfg.norm_groups
        ins = [cin] + [width] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(ResBlock(i + s, width, temb, g, 1e-5) for i, s in zip(ins, skip_channels))
        self.attentions = nn.ModuleList(SpatialTransformer(width, d, cfg) for d in depths) if any(depths) else None
        self.upsamplers = nn.ModuleList([Upsample(width)]) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor) -> Tensor:
        n = len(self.resnets)
        size = skips[-n - 1].shape[-2:] if len(skips) > n else None  # the next level's skip size
        for j, res in enumerate(self.resnets):
            x = res(torch.cat([x, skips.pop()], dim=1), emb)  # (B, width, H, W)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)  # (B, width, 2H, 2W)
        return x


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """eps/v-predicting UNet: (x_t, t, context, y) -> prediction, all shapes (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, temb = cfg.model_channels, cfg.time_embed_dim
        widths = [mc * m for m in cfg.channel_mult]
        n = len(widths)

        self.time_embedding = MLPEmbedding(mc, temb)
        # The "vector" y (SDXL pooled text + micro-conditions, unCLIP image embedding) is added to the
        # time embedding (sgm `label_emb`; diffusers `add_embedding` / `class_embedding`).
        self.add_embedding = MLPEmbedding(cfg.vector_dim, temb) if cfg.vector_dim else None
        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)

        skip_channels = [mc]
        self.down_blocks = nn.ModuleList()
        ch = mc
        for level, width in enumerate(widths):
            last = level == n - 1
            self.down_blocks.append(DownLevel(ch, width, cfg.down_depths(level), not last, cfg))
            ch = width
            skip_channels += [width] * cfg.num_res_blocks + ([] if last else [width])

        self.mid_block = None if cfg.mid_block == "none" else \
            MidBlock(ch, cfg.mid_transformer_depth, cfg, attention=cfg.mid_block == "attention")

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            k = cfg.num_res_blocks + 1
            skips, skip_channels = skip_channels[-k:][::-1], skip_channels[:-k]
            self.up_blocks.append(
                UpLevel(ch, skips, widths[level], cfg.up_depths(level), level > 0, cfg)
            )
            ch = widths[level]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, mc, eps=1e-5)
        self.conv_out = nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        # Recompute each level's activations in the backward pass instead of storing them (training only).
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @contextlib.contextmanager
    def reusing_context(self) -> Iterator[None]:
        """Sampling scope: cross-attention projects a context tensor to keys/values once and reuses them
        while it is called with that same, unmodified tensor (a prompt's embedding is fixed for all steps).
        The outputs are identical; at 64 px this saves ~12 % of a mini UNet call, where the 77 context
        tokens outnumber the 64 latent pixels. No reuse while gradients are enabled or for inference-mode
        tensors (no version counter to see in-place changes by)."""
        cross = [b.attn2 for b in self.modules() if isinstance(b, TransformerBlock)]
        for m in cross:
            m._reused = ()
        try:
            yield
        finally:
            for m in cross:
                m._reused = None

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects {cfg.in_channels} input channels, got {x.shape[1]}")
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(f"UNet expects context width {cfg.context_dim}, got {context.shape[-1]}")
        if (y is None) != (self.add_embedding is None):
            raise ValueError(
                f"this UNet {'needs' if self.add_embedding is not None else 'takes no'} a conditioning vector y"
                + (f" of width {cfg.vector_dim}" if cfg.vector_dim else "")
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embedding(timestep_embedding(t, cfg.model_channels).to(self.dtype))  # (B, 4mc)
        if self.add_embedding is not None:
            assert y is not None
            emb = emb + self.add_embedding(y.to(self.dtype))  # (B, 4mc)
        context = context.to(self.dtype)

        run = self._checkpointed if self.gradient_checkpointing and self.training and torch.is_grad_enabled() else _call
        h = self.conv_in(x.to(self.dtype))  # (B, mc, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, s = run(block, h, emb, context)  # (B, w_l, H/2^l, W/2^l)
            skips += s
        if self.mid_block is not None:
            h = run(self.mid_block, h, emb, context)  # (B, w_last, H/2^(n-1), W/2^(n-1))
        for block in self.up_blocks:
            h = run(block, h, skips, emb, context)  # (B, w_l, ...)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out, H, W)

    @staticmethod
    def _checkpointed(block: nn.Module, *args):
        if isinstance(block, UpLevel):  # it pops its skips: hand it a copy so a recomputation sees the same list
            x, skips, emb, context = args
            n = len(block.resnets)
            mine = skips[-n - 1:]  # its n skips and the next one, whose size it upsamples to
            out = torch.utils.checkpoint.checkpoint(lambda x, e, c, *s: block(x, list(s), e, c), x, emb, context,
                                                    *mine, use_reentrant=False)
            del skips[-n:]
            return out
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _call(block: nn.Module, *args):
    return block(*args)
