"""What every sampler shares: the types of the sampler contract, a σ as a batch, and the per-step callback."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor], Tensor]  # (x, σ (B,)) -> x0 estimate
Noise = Callable[[], Tensor]  # fresh N(0, I) shaped like x, from per-sample CPU generators
Callback = Callable[[int, int, Tensor, Tensor], Tensor | None] | None


def sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ repeated over x's batch, on x's device."""
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)


def step_done(callback: Callback, i: int, n: int, x: Tensor, x0: Tensor) -> Tensor:
    """After step i of n: report to the callback; a tensor it returns replaces x (inpainting's blend)."""
    if callback is None:
        return x
    out = callback(i, n, x, x0)
    return x if out is None else out
