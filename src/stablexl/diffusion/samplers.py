"""Samplers as pure functions: sample(model, x, sigmas, noise, callback) -> x.

`model(x, σ)` returns the x0 estimate (a guided Denoiser), `x` is the VE-form sample at sigmas[0],
`sigmas` is descending and ends at the final level (usually 0). Stochastic samplers draw fresh noise
from `noise()`, which gives a (B, C, H, W) N(0, I) tensor from per-sample generators, so image k of a
batch equals the same seed run alone. `callback(i, n, x, x0)` is called after each step (progress,
previews, cancellation by raising); if it returns a tensor, that tensor replaces x (inpainting blends the
known region back in this way).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor

from ..names import ETA_SAMPLERS, SAMPLER_NAMES, resolve_sampler  # noqa: F401  (re-exported)

Model = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], Tensor | None] | None


def _s(sigma: Tensor | float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)


def _step_done(callback: Callback, i: int, n: int, x: Tensor, x0: Tensor) -> Tensor:
    if callback is None:
        return x
    out = callback(i, n, x, x0)
    return x if out is None else out


def sample_euler(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """Euler on the probability-flow ODE, dx/dσ = (x − D(x, σ))/σ (Karras et al. 2022, Algorithm 2 without churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        x0 = model(x, _s(sigmas[i], x))
        d = (x - x0) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = _step_done(callback, i, n, x, x0)
    return x


def _ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """σ_up = min(σ_next, η·√(σ_next²(σ² − σ_next²)/σ²)), σ_down = √(σ_next² − σ_up²) (k-diffusion)."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def sample_euler_ancestral(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
                           eta: float = 1.0) -> Tensor:
    """Euler step to σ_down, then add σ_up of fresh noise (diffusers EulerAncestralDiscreteScheduler)."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        down, up = _ancestral_split(s, s_next, eta)
        x = x + (x - x0) / s * (down - s)
        if up > 0:
            assert noise is not None, "euler_ancestral needs a noise source"
            x = x + noise() * up
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_heun(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method; the last step to σ = 0 is plain Euler (Karras et al. 2022, Algorithm 1)."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _s(s, x))
        d = (x - x0) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            x0_2 = model(x_euler, _s(s_next, x))
            d_2 = (x_euler - x0_2) / s_next
            x = x + (d + d_2) / 2 * (s_next - s)
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), in σ form with λ = −log σ.

    First order on the first step and on the step to σ = 0 (diffusers `lower_order_final`).
    """
    n = len(sigmas) - 1
    x0_prev, h_prev = None, None
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        if s_next == 0:
            x = x0
        else:
            h = math.log(s) - math.log(s_next)
            d = x0
            if x0_prev is not None and h_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_next / s) * x - math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
                        eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`)."""
    n = len(sigmas) - 1
    x0_prev, h_prev = None, None
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        if s_next == 0:
            x = x0
        else:
            h = math.log(s) - math.log(s_next)
            eh = eta * h
            x = (s_next / s) * math.exp(-eh) * x + (-math.expm1(-h - eh)) * x0
            if x0_prev is not None and h_prev is not None:
                r = h_prev / h
                x = x + 0.5 * (-math.expm1(-h - eh)) * (1 / r) * (x0 - x0_prev)
            if eta > 0:
                assert noise is not None, "dpmpp_2m_sde needs a noise source"
                x = x + noise() * s_next * math.sqrt(-math.expm1(-2 * eh))
            h_prev = h
        x0_prev = x0
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_ddim(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) written in σ form; η = 0 is deterministic, η = 1 is DDPM's posterior.

    With ᾱ = 1/(1 + σ²): x_prev = √ᾱ_prev·x0 + √(1 − ᾱ_prev − s²)·ε + s·z in VP space, where
    s = η·√((1 − ᾱ_prev)/(1 − ᾱ))·√(1 − ᾱ/ᾱ_prev); converted back by dividing by √ᾱ_prev.
    """
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        eps = (x - x0) / s
        a, a_prev = 1 / (1 + s**2), 1 / (1 + s_next**2)
        std = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(max(1 - a / a_prev, 0.0)) if s_next > 0 else 0.0
        x_vp = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps
        if std > 0:
            assert noise is not None, "DDIM with eta > 0 needs a noise source"
            x_vp = x_vp + std * noise()
        x = x_vp / math.sqrt(a_prev)
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_ddpm(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020): the posterior q(x_prev | x, x0) is DDIM with η = 1."""
    return sample_ddim(model, x, sigmas, noise, callback, eta=1.0)


def sample_lcm(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """Few-step sampling for distilled models (LCM / Turbo): predict x0, re-noise to the next level."""
    n = len(sigmas) - 1
    for i in range(n):
        x0 = model(x, _s(sigmas[i], x))
        s_next = float(sigmas[i + 1])
        if s_next > 0:
            assert noise is not None, "lcm needs a noise source"
            x = x0 + noise() * s_next
        else:
            x = x0
        x = _step_done(callback, i, n, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler, "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde, "lcm": sample_lcm,
}
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm"}
assert set(SAMPLERS) == set(SAMPLER_NAMES)
assert ETA_SAMPLERS == {k for k, f in SAMPLERS.items() if "eta" in inspect.signature(f).parameters}
