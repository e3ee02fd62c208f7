"""Classifier-free guidance as a wrapper: (denoiser, cond, uncond, scale) -> model(x, σ) -> x0.

out = u + s·(c − u) on the network output (Ho & Salimans 2022), with optional guidance rescale
(Lin et al. 2023 §3.4): out' = φ·out·std(c)/std(out) + (1 − φ)·out, std over all non-batch dims.
Scale ≤ 1 runs the conditional branch only, as diffusers does. The returned model also has
`with_uncond(x, σ) -> (guided x0, unconditional x0)`, which runs both branches at any scale (CFG++ samplers
need the unconditional prediction; ComfyUI's `disable_cfg1_optimization`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..models.conditioning import Conditioning
from .denoiser import Denoiser

Model = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), σ (B,)) -> x0


def guided(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, scale: float, rescale: float = 0.0) -> Model:
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    use_cfg = uncond is not None and scale > 1.0
    both = Conditioning.cat([uncond, cond]) if use_cfg else None  # type: ignore[list-item]

    def combine(out_u: Tensor, out_c: Tensor) -> Tensor:
        out = out_u + scale * (out_c - out_u)
        if rescale > 0:
            dims = tuple(range(1, out.ndim))
            out_r = out * (out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = rescale * out_r + (1 - rescale) * out
        return out

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        if not use_cfg:
            return denoiser(x, sigma, cond)
        out_u, out_c = denoiser.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)  # type: ignore[arg-type]
        return denoiser.to_x0(x, sigma, combine(out_u, out_c))

    pair = both

    def with_uncond(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal pair
        if uncond is None:
            x0 = denoiser(x, sigma, cond)
            return x0, x0
        if pair is None:
            pair = Conditioning.cat([uncond, cond])
        out_u, out_c = denoiser.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), pair).chunk(2)
        return denoiser.to_x0(x, sigma, combine(out_u, out_c)), denoiser.to_x0(x, sigma, out_u)

    model.with_uncond = with_uncond  # type: ignore[attr-defined]
    return model
