"""Small building blocks shared by the UNet, the VAE and the CLIP towers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, *, causal: bool = False, upcast: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention on (B, N, heads*d) tensors -> (B, N, heads*d).

    `upcast` computes in float32 when inputs are half precision (SD 2.1-768 needs it:
    ATTN_PRECISION=fp32 in Stability-AI/stablediffusion ldm/modules/attention.py).
    """
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, h, N, d)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # (B, h, M, d)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)  # (B, h, M, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)  # (B, N, h*d)


def attention_via_context(q: Tensor, context: Tensor, wk: Tensor, wv: Tensor, heads: int, *,
                          upcast: bool = False) -> Tensor:
    """Cross-attention with the key/value projections applied on the query side: (B, N, h*d) queries,
    (B, M, C) context, (h*d, C) projection weights -> (B, N, h*d). The same function as
    `attention(q, context @ wk.T, context @ wv.T, heads)`, by associativity:

        q_h k_h^T = q_h (ctx wk_h^T)^T = (q_h wk_h) ctx^T        p_h v_h = p_h (ctx wv_h^T) = (p_h ctx) wv_h^T

    Cost N*C*(h*d + h*M) per sample instead of M*h*d*(C + N): cheaper when the image tokens are fewer
    than the context tokens (see `via_context_is_cheaper`), as in the miniature's 4x4 and 2x2 levels.
    """
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, context, wk, wv = q.float(), context.float(), wk.float(), wv.float()
    c = context.shape[-1]
    # batched as few large products: per head over all B*N queries, per sample over all h*N rows
    qk = torch.bmm(q.reshape(b * n, heads, d).transpose(0, 1), wk.view(heads, d, c))  # (h, B*N, C): q_h wk_h
    qk = qk.view(heads, b, n, c).permute(1, 0, 2, 3).reshape(b, heads * n, c)  # (B, h*N, C)
    p = (torch.bmm(qk, context.transpose(1, 2)) * d**-0.5).softmax(dim=-1)  # (B, h*N, M)
    pc = torch.bmm(p, context)  # (B, h*N, C): p_h ctx
    pc = pc.view(b, heads, n, c).permute(1, 0, 2, 3).reshape(heads, b * n, c)  # (h, B*N, C)
    out = torch.bmm(pc, wv.view(heads, d, c).transpose(1, 2))  # (h, B*N, d): (p_h ctx) wv_h^T
    return out.view(heads, b, n, d).permute(1, 2, 0, 3).reshape(b, n, inner).to(dtype)  # (B, N, h*d)


def via_context_is_cheaper(n: int, m: int, inner: int, context_dim: int, heads: int) -> bool:
    """Multiply-adds of `attention_via_context` vs projecting the context first, for N queries, M keys."""
    return n * context_dim * (inner + heads * m) < m * inner * (context_dim + n)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of a (B,) tensor -> (B, dim), in float32.

    freq_i = exp(-ln(max_period) * i / half), i < half (sgm util.py `timestep_embedding`; diffusers
    `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x), the activation of OpenAI CLIP (openai/CLIP clip/model.py QuickGELU)."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}; use 'quick_gelu' or 'gelu'")


class MLPEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (the UNet's time and vector embeddings; diffusers `TimestepEmbedding`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with an optional added embedding; 1x1 conv shortcut when widths differ.

    Shared by the UNet (with the time embedding, eps 1e-5) and the VAE (no embedding, eps 1e-6).
    """

    def __init__(self, cin: int, cout: int, emb_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, cout) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        if self.time_emb_proj is not None:
            assert emb is not None, "this ResBlock needs an embedding"
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nn.Module):
    """3x3 stride-2 conv. The VAE pads (0, 1, 0, 1) first and uses no conv padding (asymmetric)."""

    def __init__(self, ch: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 (or to `size`, the skip's size, when a side was odd on the way down) then 3x3 conv.

    Sizes not divisible by 2^(levels−1) round up on the way down; like diffusers' `upsample_size`, the
    way up then resizes to the skip connection's size instead of doubling."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling in bf16 is not supported everywhere
            x = x.float()
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, size=tuple(size), mode="nearest").to(dtype)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype)
        return self.conv(x)
