"""The DDPM training schedule shared by the SD family, and the σ schedules samplers walk.

Training: β_t = linspace(√0.00085, √0.012, 1000)², ᾱ_t = Π(1 − β), σ_t = √((1 − ᾱ_t)/ᾱ_t)
(LDM "linear" = diffusers "scaled_linear"; reference/architecture.md §5.1). Samplers work on the
variance-exploding form x = x0 + σ·ε (Karras et al. 2022, "Elucidating the Design Space", §2).
Timestep spacings follow diffusers' `EulerDiscreteScheduler.set_timesteps` (leading / trailing /
linspace, σ linearly interpolated over t); Karras and exponential schedules span the training σ range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..names import SCHEDULE_NAMES

Spacing = Literal["leading", "trailing", "linspace", "karras", "exponential"]
SPACINGS: tuple[str, ...] = SCHEDULE_NAMES


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: Tensor  # (T,) float32, as diffusers computes it

    @staticmethod
    def ddpm(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            ac = _rescale_zero_terminal_snr(ac)
        return NoiseSchedule(ac)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> Tensor:
        """(T,) training σ_t, increasing with t."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of σ by linear interpolation in log σ (diffusers `_sigma_to_t`)."""
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.float().clamp(min=1e-10).log()
        dists = log_sigma[None] - log_sigmas[:, None]  # (T, N)
        low = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return (1 - w) * low + w * high

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at (fractional) timesteps, linearly interpolated over t (diffusers `interpolation_type="linear"`)."""
        s = self.sigmas.to(t.device)
        t = t.float().clamp(0, s.shape[0] - 1)
        lo = t.floor().long().clamp(max=s.shape[0] - 2)
        w = t - lo
        return (1 - w) * s[lo] + w * s[lo + 1]


def _rescale_zero_terminal_snr(ac: Tensor) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1."""
    s = ac.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    ac = s**2
    ac[-1] = 2.0**-24  # ᾱ_T = 0 would make σ_T infinite; diffusers' Euler schedulers use 2^-24 (σ_T ≈ 4096)
    return ac


def spaced_timesteps(n: int, spacing: str, num_train: int = 1000, steps_offset: int = 1) -> Tensor:
    """Descending timesteps for n steps (diffusers EulerDiscreteScheduler spacings)."""
    if spacing == "leading":
        ratio = num_train // n
        return (torch.arange(n, dtype=torch.float64) * ratio).round().flip(0).float() + steps_offset
    if spacing == "trailing":
        # float steps of 1000/n from 1000 down, rounded (numpy's arange, as diffusers uses)
        return torch.from_numpy(np.arange(num_train, 0, -num_train / n).round()).float() - 1
    if spacing == "linspace":
        return torch.linspace(0, num_train - 1, n, dtype=torch.float64).flip(0).float()
    raise ValueError(f"unknown timestep spacing {spacing!r}; use leading, trailing or linspace")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Log-uniform σ from σ_max to σ_min (k-diffusion `get_sigmas_exponential`)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp().float()


def make_sigmas(schedule: NoiseSchedule, n: int, spacing: str = "leading", rho: float = 7.0, final: float = 0.0) -> Tensor:
    """n + 1 descending σ's ending in `final` (0, or σ_min for DDIM): the steps a sampler takes.

    leading / trailing / linspace: σ at the spaced timesteps. karras / exponential: spanning the whole
    training range [σ_min, σ_max] = [0.0292, 14.6146], as k-diffusion, A1111, ComfyUI and diffusers'
    DPM-Solver do (diffusers' Euler scheduler alone spans its spaced σ's; reference/architecture.md §5.3).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {n!r}")
    if spacing in ("leading", "trailing", "linspace"):
        sigmas = schedule.t_to_sigma(spaced_timesteps(n, spacing, schedule.num_train_timesteps))
    elif spacing in ("karras", "exponential"):
        lo, hi = schedule.sigma_min, schedule.sigma_max
        sigmas = karras_sigmas(n, lo, hi, rho) if spacing == "karras" else exponential_sigmas(n, lo, hi)
    else:
        raise ValueError(f"unknown schedule {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    return torch.cat([sigmas.float(), torch.full((1,), float(final))])
