"""Samplers on a closed-form case, and schedules against diffusers' schedulers.

Data x0 ~ N(μ, s²) per dimension has the exact denoiser D(x, σ) = μ + s²/(s² + σ²)·(x − μ), and the
probability-flow ODE from σ_0 to 0 maps x to μ + s/√(s² + σ_0²)·(x − μ) (Karras et al. 2022, eq. 1-3).
Deterministic samplers must converge to that map at their order; the measured orders are printed.
"""

import math

import numpy as np
import pytest
import torch

from stablexl.diffusion.samplers import SAMPLERS, resolve_sampler
from stablexl.diffusion.schedule import NoiseSchedule, karras_sigmas, make_sigmas, spaced_timesteps

MU, S = 0.3, 0.5


def exact_denoiser(x, sigma):
    s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def ode_error(name, n):
    """Max error after integrating from σ_0 = 14.6 to σ_min = 0.03 (all steps regular, none to σ = 0,
    whose single first-order step would put a floor under the error)."""
    sigmas = karras_sigmas(n + 1, 0.03, 14.6).double()
    x = torch.linspace(-3, 3, 101, dtype=torch.float64).reshape(1, 1, 1, 101) * float(sigmas[0])
    scale = math.sqrt(S**2 + float(sigmas[-1]) ** 2) / math.sqrt(S**2 + float(sigmas[0]) ** 2)
    want = MU + scale * (x - MU)
    got = SAMPLERS[name](exact_denoiser, x.clone(), sigmas)
    return float((got - want).abs().max())


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_gaussian_data(name, order):
    ns = [10, 20, 40, 80]
    errs = [ode_error(name, n) for n in ns]
    slopes = -np.diff(np.log(errs)) / np.diff(np.log(ns))
    measured = float(slopes[-1])
    print(f"{name}: errors {['%.2e' % e for e in errs]}, measured order {measured:.2f} (expected {order})")
    assert all(b < a for a, b in zip(errs, errs[1:])), "error must fall with more steps"
    assert abs(measured - order) < 0.35


def _sample_stats(name, n):
    g = torch.Generator().manual_seed(0)
    sigmas = torch.cat([karras_sigmas(n, 0.03, 14.6).double(), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(1, 1, 1, 20000, generator=g, dtype=torch.float64) * math.sqrt(float(sigmas[0]) ** 2 + S**2)
    noise = lambda: torch.randn(1, 1, 1, 20000, generator=g, dtype=torch.float64)  # noqa: E731
    out = SAMPLERS[name](exact_denoiser, x, sigmas, noise=noise)
    return float(out.mean()), float(out.std())


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm", "dpmpp_2m_sde"])
def test_stochastic_samplers_reach_the_data_distribution(name):
    """From pure noise, samples must approach the data's mean and std as steps grow (Monte Carlo error ~0.004)."""
    (_, s25), (m200, s200) = _sample_stats(name, 25), _sample_stats(name, 200)
    print(f"{name}: std after 25 steps {s25:.4f}, after 200 {s200:.4f} (data {S})")
    assert abs(m200 - MU) < 0.01
    assert abs(s200 - S) < 0.015 and abs(s200 - S) <= abs(s25 - S)


def test_lcm_predicts_then_renoises():
    """One LCM step returns D(x, σ_0); two steps re-noise D to σ_1 with the drawn noise, then denoise."""
    x = torch.full((1, 1, 1, 4), 2.0, dtype=torch.float64)
    sig = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    z = torch.full_like(x, 0.5)
    one = SAMPLERS["lcm"](exact_denoiser, x, sig[[0, 2]])
    assert torch.allclose(one, exact_denoiser(x, 10.0))
    two = SAMPLERS["lcm"](exact_denoiser, x, sig, noise=lambda: z)
    assert torch.allclose(two, exact_denoiser(exact_denoiser(x, 10.0) + z * 1.0, 1.0))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 4, 20, 25, 30, 50])
def test_spacings_match_diffusers_euler(spacing, n):
    from diffusers import EulerDiscreteScheduler

    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 timestep_spacing=spacing, steps_offset=1)
    sch.set_timesteps(n)
    ours = NoiseSchedule.ddpm()
    assert torch.allclose(spaced_timesteps(n, spacing), sch.timesteps.float())
    assert torch.allclose(make_sigmas(ours, n, spacing), sch.sigmas, rtol=1e-5)
    # We recover t from σ by log-σ interpolation; diffusers hands the UNet its spaced t directly. For integer
    # t (leading, trailing) the two agree; for linspace's fractional t, σ was interpolated linearly over t,
    # so the inverse differs by up to ~0.002 of a timestep.
    tol = 1e-3 if spacing != "linspace" else 5e-3
    assert torch.allclose(ours.sigma_to_t(sch.sigmas[:-1]), sch.timesteps.float(), atol=tol)


def test_karras_matches_diffusers_dpm_solver():
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      use_karras_sigmas=True)
    sch.set_timesteps(25)
    ours = NoiseSchedule.ddpm()
    assert torch.allclose(make_sigmas(ours, 25, "karras"), sch.sigmas, rtol=1e-5)
    assert torch.equal(ours.sigma_to_t(sch.sigmas[:-1]).round(), sch.timesteps.float())


def test_training_sigma_range():
    s = NoiseSchedule.ddpm().sigmas
    assert abs(float(s[0]) - 0.029167) < 1e-5 and abs(float(s[-1]) - 14.614641) < 1e-4


def test_sampler_names_and_a1111_aliases():
    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("Euler a") == ("euler_ancestral", None)
    assert resolve_sampler("heun") == ("heun", None)
    with pytest.raises(ValueError, match="unknown sampler 'foo'.*euler_ancestral"):
        resolve_sampler("foo")
