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

import numpy as np
import torch
from torch import Tensor

from .steps import Callback, Model, Noise, sigma_batch as _s, step_done as _step_done
from .schedule import karras_sigmas
from ..names import ETA_SAMPLERS, SAMPLER_NAMES, resolve_sampler  # noqa: F401  (re-exported)





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


def _dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None, callback: Callback, eta: float,
                  solver: str) -> Tensor:
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
                if solver == "midpoint":
                    x = x + 0.5 * (-math.expm1(-h - eh)) * (1 / r) * (x0 - x0_prev)
                else:  # "heun": φ₂ = 1 − (1 − e^{−H})/H with H = (1 + η)h (k-diffusion solver_type="heun")
                    big_h = h + eh
                    x = x + (1 - (-math.expm1(-big_h)) / big_h) * (1 / r) * (x0 - x0_prev)
            if eta > 0:
                assert noise is not None, "dpmpp_2m_sde needs a noise source"
                x = x + noise() * s_next * math.sqrt(-math.expm1(-2 * eh))
            h_prev = h
        x0_prev = x0
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
                        eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`).

    k-diffusion draws the noise from a Brownian tree; one fresh N(0, I) per step has the same law (the steps'
    intervals are disjoint, so their Brownian increments are independent), only the numbers differ."""
    return _dpmpp_2m_sde(model, x, sigmas, noise, callback, eta, "midpoint")


def sample_dpmpp_2m_sde_heun(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                             callback: Callback = None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type second-order term (k-diffusion `sample_dpmpp_2m_sde`,
    solver_type="heun"; diffusers `DPMSolverMultistepScheduler(solver_type="heun")`); A1111 "DPM++ 2M SDE Heun".
    Noise as in `sample_dpmpp_2m_sde`."""
    return _dpmpp_2m_sde(model, x, sigmas, noise, callback, eta, "heun")


def sample_dpmpp_3m_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
                        eta: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion `sample_dpmpp_3m_sde`; Lu et al. 2022, arXiv 2211.01095).

    Multistep in λ = −log σ: first order on the first step, the Heun-type second order on the second, third order
    after; the step to σ = 0 returns x0. η = 0 is the deterministic DPM-Solver++(3M). Noise as in
    `sample_dpmpp_2m_sde` (k-diffusion: Brownian tree; here one fresh draw per step, the same law).
    diffusers' `DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++")` differs on the
    third-order steps: its D2 coefficient is k-diffusion's minus 1 (it does not vanish as h → 0), see
    tests/diffusion/test_sampler_parity.py. The D2 term here is the published one (k-diffusion, LuChengTHU/dpm-solver),
    which weights D2 ≈ h²·x0''/2 by φ₃ ≈ he/6 where the exact integral needs he/3: at η = 0 it measures second
    order on the Gaussian test (test_samplers.py); kept as is, so that images match A1111 and ComfyUI.
    """
    n = len(sigmas) - 1
    x0_1 = x0_2 = None
    h_1 = h_2 = None
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        if s_next == 0:
            x = x0
        else:
            h = math.log(s) - math.log(s_next)
            he = (eta + 1) * h  # the data-prediction SDE integrates e^{−(1+η)h} (exp(−he) = σ'/σ·e^{−ηh})
            phi_2 = math.expm1(-he) / he + 1  # φ₂ = (e^{−he} − 1)/he + 1
            x = math.exp(-he) * x + (-math.expm1(-he)) * x0
            if h_2 is not None:  # third order: divided differences over the last three x0 (k-diffusion d1, d2)
                assert x0_1 is not None and x0_2 is not None and h_1 is not None
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / he - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:  # second order
                assert x0_1 is not None
                x = x + phi_2 * (x0 - x0_1) / (h_1 / h)
            if eta > 0:
                assert noise is not None, "dpmpp_3m_sde needs a noise source"
                x = x + noise() * s_next * math.sqrt(-math.expm1(-2 * eta * h))
            h_1, h_2 = h, h_1
        x0_1, x0_2 = x0, x0_1
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_dpmpp_2s_ancestral(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                              callback: Callback = None, eta: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (k-diffusion `sample_dpmpp_2s_ancestral`; Lu et al. 2022,
    arXiv 2211.01095, Algorithm 1 with r = 1/2): a singlestep 2nd-order step to σ_down, then σ_up of fresh noise.
    The step to σ_down = 0 is Euler. η = 0 is the deterministic DPM-Solver++(2S)."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        down, up = _ancestral_split(s, s_next, eta)
        if down == 0:
            x = x + (x - x0) / s * (down - s)
        else:
            h = math.log(s) - math.log(down)
            s_mid = s * math.exp(-h / 2)  # λ_mid = λ + h/2
            x_2 = (s_mid / s) * x - math.expm1(-h / 2) * x0  # DPM-Solver++(1) to the midpoint
            x0_2 = model(x_2, _s(s_mid, x))
            x = (down / s) * x - math.expm1(-h) * x0_2  # the full step with the midpoint's x0
        if s_next > 0 and up > 0:
            assert noise is not None, "dpmpp_2s_ancestral needs a noise source"
            x = x + noise() * up
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_dpmpp_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
                     eta: float = 1.0) -> Tensor:
    """DPM-Solver++ (stochastic), singlestep with r = 1/2 (k-diffusion `sample_dpmpp_sde`; A1111 "DPM++ SDE").

    Each step: an ancestral DPM-Solver++(1) half step to the log-midpoint σ_mid (noise σ_up,1), a model call
    there, then an ancestral step to σ_next with x0 from the midpoint (noise σ_up,2); the step to σ = 0 is Euler.
    η = 0 is the deterministic DPM-Solver++(2S) (diffusers `DPMSolverSinglestepScheduler`, order 2, on a grid
    whose odd points are the log-midpoints).

    k-diffusion draws both noises from one Brownian tree over σ: z₁ = (W(σ_mid) − W(σ))/√(σ − σ_mid) and
    z₂ = (W(σ_next) − W(σ))/√(σ − σ_next) share the increment over [σ_mid, σ]. Two fresh draws a, b per step
    reproduce that joint law exactly: z₁ = a, z₂ = (√(σ − σ_mid)·a + √(σ_mid − σ_next)·b)/√(σ − σ_next)
    (steps' intervals are disjoint, so nothing is shared across steps); only the numbers differ from torchsde.
    """
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        if s_next == 0:
            x = x + (x - x0) / s * (s_next - s)
        else:
            h = math.log(s) - math.log(s_next)
            s_mid = s * math.exp(-h / 2)
            a = b = None
            if eta > 0:
                assert noise is not None, "dpmpp_sde needs a noise source"
                a, b = noise(), noise()
            # step 1: ancestral DPM-Solver++(1) from σ to σ_mid; with e^{−h} = σ_down/σ its update
            # σ_down/σ·x − (e^{−h} − 1)·x0 is written out (σ_down may be 0 for η > 1)
            down, up = _ancestral_split(s, s_mid, eta)
            x_2 = (down / s) * x + (1 - down / s) * x0
            if a is not None and up > 0:
                x_2 = x_2 + a * up
            x0_2 = model(x_2, _s(s_mid, x))
            # step 2: ancestral step from σ to σ_next with x0 = (1 − 1/2r)·x0 + 1/2r·x0_mid, r = 1/2
            down, up = _ancestral_split(s, s_next, eta)
            x = (down / s) * x + (1 - down / s) * x0_2
            if a is not None and b is not None and up > 0:
                z2 = (math.sqrt(s - s_mid) * a + math.sqrt(s_mid - s_next) * b) / math.sqrt(s - s_next)
                x = x + z2 * up
        x = _step_done(callback, i, n, x, x0)
    return x


def _lms_coeff(sig: list[float], i: int, j: int, order: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial through σ_i, …, σ_{i−order+1} that is 1 at σ_{i−j}
    (k-diffusion `linear_multistep_coeff`, which uses scipy's quad). The integrand has degree order − 1, so an
    `order`-point Gauss–Legendre rule integrates it exactly."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sig[i], sig[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod = prod * (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
    return float((b - a) / 2 * np.dot(weights, prod))


def sample_lms(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """Linear multistep, order 4, on dx/dσ = (x − D)/σ (k-diffusion `sample_lms`; diffusers
    `LMSDiscreteScheduler`): the derivative history is interpolated by a polynomial in σ and integrated over
    the step; the order ramps up 1, 2, 3, 4 over the first steps."""
    order = 4
    n = len(sigmas) - 1
    sig = [float(s) for s in sigmas]
    ds: list[Tensor] = []
    for i in range(n):
        x0 = model(x, _s(sig[i], x))
        ds = [*ds[-(order - 1):], (x - x0) / sig[i]]
        cur = len(ds)
        for j in range(cur):  # ds[-1 - j] is the derivative at σ_{i−j}
            x = x + _lms_coeff(sig, i, j, cur) * ds[-1 - j]
        x = _step_done(callback, i, n, x, x0)
    return x


def _dpm2_step(model: Model, x: Tensor, x0: Tensor, s: float, target: float) -> Tensor:
    """One DPM-Solver-2 step from σ = s (where the model gave x0) to `target`: Euler to the log-midpoint
    √(s·target), the full step with the derivative there; plain Euler when target = 0."""
    d = (x - x0) / s
    if target == 0:
        return x + d * (target - s)
    s_mid = math.exp(0.5 * (math.log(s) + math.log(target)))
    x_2 = x + d * (s_mid - s)
    d_2 = (x_2 - model(x_2, _s(s_mid, x))) / s_mid
    return x + d_2 * (target - s)


def sample_dpm_2(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None) -> Tensor:
    """DPM-Solver-2 in Karras form (k-diffusion `sample_dpm_2`, no churn; diffusers `KDPM2DiscreteScheduler`):
    an Euler step to the log-midpoint σ_mid = √(σ·σ_next), then the full step with the derivative there
    (Lu et al. 2022, arXiv 2206.00927, Algorithm 1 with r = 1/2; Karras et al. 2022 Algorithm 2). The step
    to σ = 0 is Euler."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        x = _dpm2_step(model, x, x0, s, s_next)
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_dpm_2_ancestral(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                           callback: Callback = None, eta: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`; diffusers
    `KDPM2AncestralDiscreteScheduler`): a DPM-2 step to σ_down (midpoint √(σ·σ_down)), then σ_up of fresh noise.
    The step to σ_down = 0 is Euler. (k-diffusion skips the noise there; that only differs for η > 1.)"""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        down, up = _ancestral_split(s, s_next, eta)
        x = _dpm2_step(model, x, x0, s, down)
        if up > 0:
            assert noise is not None, "dpm_2_ancestral needs a noise source"
            x = x + noise() * up
        x = _step_done(callback, i, n, x, x0)
    return x


def _restart_segments(sigmas: Tensor) -> list[tuple[float, float]]:
    """A1111's Restart plan (modules/sd_samplers_extra.py `restart_sampler`, default restart_list): under 20
    steps none, so Restart is Heun. From 20 steps on, the main schedule is replaced by Karras σ from σ_max to
    the last σ > 0 with steps − K·k steps, where K = 9, k = 1 (from 36 steps on: K = steps // 4, k = 2), and
    after the step that reaches the σ nearest 0.1, the segment from the σ nearest 2 down to it (Karras, K
    steps) is run k more times. A schedule that stops above σ = 0 (a hand-off to a refiner) is run as given,
    without restarts. Returns the (σ_from, σ_to) steps in order."""
    steps = len(sigmas) - 1
    sig = [float(s) for s in sigmas]
    restart: dict[int, tuple[int, int, float]] = {}
    if steps >= 20 and sig[-1] == 0:
        k_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        main = karras_sigmas(steps - k_steps * times, sig[-2], sig[0])
        sig = [float(s) for s in main] + [0.0]
        nearest = min(range(len(sig)), key=lambda j: abs(sig[j] - 0.1))  # first index on ties, as torch.argmin
        restart = {nearest: (k_steps + 1, times, 2.0)}
    plan = []
    for i in range(len(sig) - 1):
        plan.append((sig[i], sig[i + 1]))
        if i + 1 in restart:
            n_sig, times, s_max = restart[i + 1]
            hi = min(range(len(sig)), key=lambda j: abs(sig[j] - s_max))
            if hi < i + 1:
                seg = [float(s) for s in karras_sigmas(n_sig, sig[i + 1], sig[hi])]
                plan += list(zip(seg[:-1], seg[1:])) * times
    return plan


def sample_restart(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                   callback: Callback = None) -> Tensor:
    """Restart sampling (Xu et al. 2023, arXiv 2306.14878), as A1111's "Restart": Heun steps
    (Karras et al. 2022, Algorithm 1) along `_restart_segments`; on each jump back up from σ_lo to σ_hi, fresh
    noise of std √(σ_hi² − σ_lo²) is added (the forward process). Under 20 steps it is plain Heun, from 20 on
    it replaces the given schedule by A1111's Karras one. The callback counts every Heun step of the plan."""
    plan = _restart_segments(sigmas)
    n = len(plan)
    last = None
    for i, (s, s_next) in enumerate(plan):
        if last is not None and last < s:
            assert noise is not None, "restart needs a noise source"
            x = x + noise() * math.sqrt(s**2 - last**2)
        x0 = model(x, _s(s, x))
        d = (x - x0) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_2 = (x_euler - model(x_euler, _s(s_next, x))) / s_next
            x = x + (d + d_2) / 2 * (s_next - s)
        last = s_next
        x = _step_done(callback, i, n, x, x0)
    return x


def _with_uncond(model: Model, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(guided x0, unconditional x0) from a guided model (guidance.py `with_uncond`); a model without an
    unconditional branch gives its x0 twice, which turns CFG++ into the plain sampler."""
    pair = getattr(model, "with_uncond", None)
    if pair is None:
        x0 = model(x, sigma)
        return x0, x0
    return pair(x, sigma)


def sample_euler_ancestral_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                                  callback: Callback = None, eta: float = 1.0) -> Tensor:
    """Euler ancestral with CFG++ (Chung et al. 2024, arXiv 2406.08070; ComfyUI `sample_euler_ancestral_cfg_pp`):
    land on the guided x0 but re-noise along the unconditional noise estimate, x' = D_λ + σ_down·(x − D_u)/σ
    (the paper's DDIM step with ε_u in place of ε_λ, in σ form), then add σ_up of fresh noise; the step to
    σ = 0 returns D_λ.

    D_λ = D_u + λ·(D_c − D_u) with λ the request's cfg as given (ComfyUI's convention: no rescaling; CFG++'s
    λ ∈ [0, 1] is the cfg itself, and the unconditional branch runs even at cfg ≤ 1). A1111's "DDIM CFG++"
    divides cfg by 12.5 instead; that sampler is not this one.
    """
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, x0_u = _with_uncond(model, x, _s(s, x))
        if s_next == 0:
            x = x0
        else:
            down, up = _ancestral_split(s, s_next, eta)
            x = x0 + (x - x0_u) / s * down
            if up > 0:
                assert noise is not None, "euler_ancestral_cfg_pp needs a noise source"
                x = x + noise() * up
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_euler_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                        callback: Callback = None) -> Tensor:
    """Euler with CFG++ (Chung et al. 2024; ComfyUI `sample_euler_cfg_pp`, which is the ancestral one with
    η = 0): x' = D_λ + σ_next·(x − D_u)/σ. Guidance scale as in the ancestral variant."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, noise, callback, eta=0.0)


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
    "lms": sample_lms, "dpm_2": sample_dpm_2, "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral, "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun, "dpmpp_3m_sde": sample_dpmpp_3m_sde, "restart": sample_restart,
    "euler_cfg_pp": sample_euler_cfg_pp, "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
}
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
              "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "restart", "euler_ancestral_cfg_pp"}
# UniPC, DEIS and TCD: the multistep / consistency solvers of multistep.py, registered before the checks below
from .multistep import MULTISTEP, MULTISTEP_STOCHASTIC  # noqa: E402

SAMPLERS.update(MULTISTEP)
STOCHASTIC |= MULTISTEP_STOCHASTIC
assert set(SAMPLERS) == set(SAMPLER_NAMES)
assert ETA_SAMPLERS == {k for k, f in SAMPLERS.items() if "eta" in inspect.signature(f).parameters}
