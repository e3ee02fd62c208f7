"""The DDPM training schedule shared by the SD family, and the σ schedules samplers walk.

Training: β_t = linspace(√0.00085, √0.012, 1000)², ᾱ_t = Π(1 − β), σ_t = √((1 − ᾱ_t)/ᾱ_t)
(LDM "linear" = diffusers "scaled_linear"; reference/architecture.md §5.1). Samplers work on the
variance-exploding form x = x0 + σ·ε (Karras et al. 2022, "Elucidating the Design Space", §2).
Timestep spacings follow diffusers' `EulerDiscreteScheduler.set_timesteps` (leading / trailing /
linspace, σ linearly interpolated over t); Karras and exponential schedules span the training σ range.
The schedules named after ComfyUI's and A1111's (normal, simple, sgm_uniform, ddim_uniform, beta,
kl_optimal, align_your_steps, polyexponential, linear_quadratic) follow ComfyUI comfy/samplers.py,
comfy_extras/nodes_align_your_steps.py and k-diffusion sampling.py: the same index rules on the
1000 training σ's, the same float32 arithmetic. Their σ's agree with ComfyUI's to 1.3e-5 relative
(ComfyUI computes the training σ table in float64, we in float32 as diffusers does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np
import torch
from torch import Tensor

from ..names import SCHEDULE_NAMES

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


def log_interp_sigma(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """σ at fractional timesteps, linear in log σ between the neighbouring training σ's (k-diffusion and
    ComfyUI `t_to_sigma` / `ModelSamplingDiscrete.sigma`; diffusers interpolates σ itself, see t_to_sigma)."""
    log_sigmas = schedule.sigmas.log()
    t = t.float().clamp(0, log_sigmas.shape[0] - 1)
    w = t.frac()
    return ((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp()


def normal_sigmas(schedule: NoiseSchedule, n: int, sgm: bool = False) -> Tensor:
    """ComfyUI `normal_scheduler` (= A1111 "Normal" / "Uniform", sd.cpp "discrete"): n timesteps evenly from
    t_max to 0, σ log-interpolated. sgm=True (ComfyUI / A1111 "sgm_uniform"): n + 1 points, the last (t = 0)
    dropped, as SGM's discretization leaves out σ_min."""
    t_max = float(schedule.num_train_timesteps - 1)
    t = torch.linspace(t_max, 0.0, n + 1)[:-1] if sgm else torch.linspace(t_max, 0.0, n)
    return log_interp_sigma(schedule, t)


def simple_sigmas(schedule: NoiseSchedule, n: int) -> Tensor:
    """ComfyUI / A1111 `simple_scheduler`: every (T/n)-th training σ from the top, the index truncated."""
    sigmas, T = schedule.sigmas, schedule.num_train_timesteps
    ss = T / n
    return sigmas[[T - 1 - int(x * ss) for x in range(n)]]


def ddim_uniform_sigmas(schedule: NoiseSchedule, n: int) -> Tensor:
    """ComfyUI `ddim_scheduler` (A1111 "DDIM"): training σ's at t = 1, 1 + s, 1 + 2s, … < T with s = T // n,
    descending. Like ComfyUI this can give more than n steps (n = 30: s = 33, 31 steps) and starts below
    σ_max (n = 20: t = 951)."""
    T = schedule.num_train_timesteps
    return schedule.sigmas[list(range(1, T, max(T // n, 1)))[::-1]]


def beta_sigmas(schedule: NoiseSchedule, n: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI `beta_scheduler` (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173):
    t_i = rint(F⁻¹(1 − i/n)·(T − 1)) for i < n with F the Beta(α, β) CDF, repeated t's dropped (so large n
    can give fewer steps), σ = the training σ at t_i. α = β = 0.6 as ComfyUI."""
    T = schedule.num_train_timesteps
    ts = np.rint(np.array([beta_ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, n, endpoint=False)]) * (T - 1))
    keep = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return schedule.sigmas[keep]


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, "Align Your Steps", §3.3; ComfyUI `kl_optimal_scheduler`):
    σ_i = tan((1 − i/(n−1))·atan σ_max + i/(n−1)·atan σ_min), i = 0 … n−1 (one step: σ_max)."""
    adj = torch.arange(n, dtype=torch.float32).div_(n - 1) if n > 1 else torch.zeros(1)
    return (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_()


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """k-diffusion `get_sigmas_polyexponential` (A1111 "Polyexponential", default ρ = 1): log σ falls from
    log σ_max to log σ_min as a ρ-th power ramp (ρ = 1 is the exponential schedule up to rounding)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def linear_quadratic_sigmas(n: int, sigma_max: float, threshold_noise: float = 0.025,
                            linear_steps: int | None = None) -> Tensor:
    """ComfyUI `linear_quadratic_schedule` (from Mochi's inference code): σ/σ_max falls linearly by
    `threshold_noise` over the first half of the steps, then quadratically to 0; returns the n σ's before 0."""
    if n == 1:
        sched = [1.0, 0.0]
    else:
        linear_steps = n // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * n
        quad_steps = n - linear_steps
        a = diff / (linear_steps * quad_steps**2)
        b = threshold_noise / linear_steps - 2 * diff / quad_steps**2
        c = a * linear_steps**2
        sched = [1.0 - x for x in lin + [a * i**2 + b * i + c for i in range(linear_steps, n)] + [1.0]]
    return (torch.tensor(sched, dtype=torch.float32) * torch.tensor(sigma_max, dtype=torch.float32))[:-1]


# Align Your Steps (Sabour et al. 2024): the optimized 10-step σ's (11 points, σ_max … σ_min), as ComfyUI's
# nodes_align_your_steps.py and sd.cpp carry them (NVIDIA's AYS page prints them to 3 decimals).
AYS_SIGMAS = {
    "sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}


def ays_sigmas(n: int, family: str | None = None) -> Tensor:
    """ComfyUI `AlignYourStepsScheduler`: the 11-point table for 10 steps, else log-linearly interpolated to
    n + 1 points (NVIDIA's `loglinear_interp`); the last point is replaced by the final σ, so the n σ's
    before it are returned. SDXL families use the SDXL table, the others SD1.5's (as A1111 and sd.cpp do)."""
    table = AYS_SIGMAS["sdxl" if family is None or family.startswith("sdxl") else "sd1"]
    if n + 1 == len(table):
        sigmas = np.array(table)
    else:  # interpolate log σ over [0, 1] at n + 1 evenly spaced points (ascending for np.interp)
        xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
        sigmas = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, ys))[::-1]
    return torch.tensor(sigmas[:-1].copy(), dtype=torch.float32)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularized incomplete beta function I_x(a, b) (the Beta(a, b) quantile) by bisection;
    exact at q = 0, 1 and, for a = b, at q = ½. Agrees with scipy.stats.beta.ppf to ~1e-15."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:
        return 0.5
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _betainc(a, b, mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Press et al., Numerical Recipes §6.4),
    using I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly."""
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def make_sigmas(schedule: NoiseSchedule, n: int, spacing: str = "leading", rho: float | None = None,
                final: float = 0.0, family: str | None = None) -> Tensor:
    """The descending σ's a sampler takes, ending in `final` (0, or σ_min for DDIM): n + 1 of them, except
    where ComfyUI's own rule gives another count (ddim_uniform, beta; see there).

    leading / trailing / linspace: σ at the spaced timesteps. karras / exponential: spanning the whole
    training range [σ_min, σ_max] = [0.0292, 14.6146], as k-diffusion, A1111, ComfyUI and diffusers'
    DPM-Solver do (diffusers' Euler scheduler alone spans its spaced σ's; reference/architecture.md §5.3).
    The peers' schedules (normal … linear_quadratic) end where ComfyUI appends its 0 (or sets the last
    point to 0: kl_optimal, align_your_steps, linear_quadratic); that point is `final` here.
    rho: Karras ρ (default 7) or the polyexponential power (default 1). family: the model family, which
    picks the Align Your Steps table (SDXL for sdxl-*, SD1.5 otherwise; None: SDXL).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {n!r}")
    lo, hi = schedule.sigma_min, schedule.sigma_max
    if spacing in ("leading", "trailing", "linspace"):
        sigmas = schedule.t_to_sigma(spaced_timesteps(n, spacing, schedule.num_train_timesteps))
    elif spacing == "karras":
        sigmas = karras_sigmas(n, lo, hi, 7.0 if rho is None else rho)
    elif spacing == "exponential":
        sigmas = exponential_sigmas(n, lo, hi)
    elif spacing in ("normal", "sgm_uniform"):
        sigmas = normal_sigmas(schedule, n, sgm=spacing == "sgm_uniform")
    elif spacing == "simple":
        sigmas = simple_sigmas(schedule, n)
    elif spacing == "ddim_uniform":
        sigmas = ddim_uniform_sigmas(schedule, n)
    elif spacing == "beta":
        sigmas = beta_sigmas(schedule, n)
    elif spacing == "kl_optimal":
        sigmas = kl_optimal_sigmas(n, lo, hi)
    elif spacing == "align_your_steps":
        sigmas = ays_sigmas(n, family)
    elif spacing == "polyexponential":
        sigmas = polyexponential_sigmas(n, lo, hi, 1.0 if rho is None else rho)
    elif spacing == "linear_quadratic":
        sigmas = linear_quadratic_sigmas(n, hi)
    else:
        raise ValueError(f"unknown schedule {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    return torch.cat([sigmas.float(), torch.full((1,), float(final))])
