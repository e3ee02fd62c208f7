"""The k-diffusion / A1111 samplers against diffusers' schedulers where diffusers has the method.

Pipeline level: the tiny SDXL folder, the same seeds, our `Pipeline` against diffusers' `StableDiffusionXLPipeline`
with the scheduler swapped (as tests/test_pipeline.py does), latents within 1e-4 relative. Solver level (where
diffusers' scheduler only corresponds on a grid its own `set_timesteps` cannot make): the scheduler driven by
hand on the closed-form Gaussian denoiser of test_samplers.py.
"""

import math
import os
import sys
import types

import pytest
import torch

import refconfigs as R
from stablexl.diffusion.samplers import SAMPLERS
from stablexl.diffusion.schedule import karras_sigmas
from stablexl.io.models import save_model
from stablexl.pipeline import Pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "io"))
from test_layouts import random_parts  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_samplers import MU, S, exact_denoiser  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity") / "tiny-sdxl"
    save_model(random_parts("tiny-sdxl", seed=5), root, "diffusers")
    return root


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def ref(sdxl_folder):
    """diffusers' pipeline on the same folder; each test swaps in its scheduler (built from the folder's config)."""
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler_config = pipe.scheduler.config
    return pipe


def _lms_scheduler(config):
    """diffusers' LMSDiscreteScheduler without scipy: its one scipy use is `integrate.quad` of a Lagrange
    basis polynomial of degree ≤ 3, which Simpson's rule integrates exactly (our sampler uses Gauss–Legendre)."""
    import diffusers.schedulers.scheduling_lms_discrete as lms

    if not hasattr(lms, "integrate"):
        lms.integrate = types.SimpleNamespace(  # type: ignore[attr-defined]
            quad=lambda f, a, b, epsrel=None: ((b - a) / 6 * (f(a) + 4 * f((a + b) / 2) + f(b)), 0.0))
    return lms.LMSDiscreteScheduler.from_config(config)


def _dpm_solver(config, **kw):
    import diffusers

    return diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, **kw)


def _diffusers(name):
    import diffusers

    return getattr(diffusers, name).from_config


# case -> (our sampler, schedule, steps, eta, diffusers scheduler factory, diffusers pipeline kwargs)
CASES = {
    "lms": ("lms", "leading", 6, None, _lms_scheduler, {}),
    "dpm_2": ("dpm_2", "leading", 6, None, _diffusers("KDPM2DiscreteScheduler"), {}),
    "dpm_2_ancestral": ("dpm_2_ancestral", "leading", 6, None, _diffusers("KDPM2AncestralDiscreteScheduler"), {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", "karras", 6, None,
                     lambda c: _dpm_solver(c, algorithm_type="sde-dpmsolver++"), {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde_heun", "karras", 6, None,
                          lambda c: _dpm_solver(c, algorithm_type="sde-dpmsolver++", solver_type="heun"), {}),
    # 16 steps: under 15, diffusers' lower_order_final also lowers the next-to-last step (k-diffusion does not)
    "dpmpp_3m_sde": ("dpmpp_3m_sde", "karras", 16, None,
                     lambda c: _dpm_solver(c, algorithm_type="sde-dpmsolver++", solver_type="heun", solver_order=3), {}),
    "ddim_eta": ("ddim", "leading", 6, 0.5, _diffusers("DDIMScheduler"), {"eta": 0.5}),
}


def _third_order_d2_as_k_diffusion(scheduler):
    """diffusers' third-order sde-dpmsolver++ update puts (1 − e^{−2h} − 2h)/(2h)² − 1/2 on D2; k-diffusion's
    `sample_dpmpp_3m_sde` (and the h → 0 limit: the coefficient must vanish like h/3) has + 1/2. Wrap the update
    to add the missing α_t·D2, with D2 recomputed as diffusers defines it; nothing else changes."""
    update = scheduler.multistep_dpm_solver_third_order_update

    def fixed(model_output_list, *args, sample=None, noise=None, **kw):
        x_t = update(model_output_list, *args, sample=sample, noise=noise, **kw)
        i = scheduler.step_index
        sig = [scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lam = [torch.log(a) - torch.log(s) for a, s in sig]
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h_0 / h, h_1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = (1.0 / (r0 + r1)) * ((1.0 / r0) * (m0 - m1) - (1.0 / r1) * (m1 - m2))
        return x_t + sig[0][0] * d2

    scheduler.multistep_dpm_solver_third_order_update = fixed
    return scheduler


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_diffusers_scheduler(ours, ref, case):
    sampler, schedule, steps, eta, make, ref_kw = CASES[case]
    ref.scheduler = make(ref.folder_scheduler_config)
    if case == "dpmpp_3m_sde":
        _third_order_d2_as_k_diffusion(ref.scheduler)
    want = ref(["a red apple"] * 2, negative_prompt=["blurry"] * 2, num_inference_steps=steps, guidance_scale=5.0,
               height=64, width=64, generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
               output_type="latent", **ref_kw).images
    got = ours("a red apple", "blurry", steps=steps, cfg=5.0, seed=7, batch=2, width=64, height=64, sampler=sampler,
               schedule=schedule, eta=eta, discard_penultimate=False)  # diffusers keeps every level
    err = R.rel_err(got.latents, want)
    print(f"{case} ({sampler}, {schedule}, {steps} steps): latent rel err {err:.2e}")
    assert err <= 1e-4


def test_dpmpp_3m_sde_differs_from_unpatched_diffusers(ours, ref):
    """Unpatched, diffusers' 3M SDE departs from k-diffusion's (ours) once the third-order steps start; with
    only its D2 coefficient changed it matches (the test above), so that coefficient is the whole difference."""
    sampler, schedule, _, _, make, _ = CASES["dpmpp_3m_sde"]
    steps = 8  # third order from the third step on
    ref.scheduler = make(ref.folder_scheduler_config)
    want = ref("a red apple", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0, height=64,
               width=64, generator=[torch.Generator().manual_seed(7)], output_type="latent").images
    got = ours("a red apple", "blurry", steps=steps, cfg=5.0, seed=7, width=64, height=64, sampler=sampler,
               schedule=schedule, discard_penultimate=False)
    err = R.rel_err(got.latents, want)
    print(f"dpmpp_3m_sde vs unpatched diffusers: latent rel err {err:.2e}")
    assert err > 1e-2


def _singlestep_reference(grid):
    """diffusers' DPMSolverSinglestepScheduler (order 2, DPM-Solver++, midpoint) driven on `grid` (σ descending,
    ending at 0) with the Gaussian denoiser: each pair of its steps is one DPM-Solver++(2S) step whose
    intermediate point is the grid's odd entry."""
    from diffusers import DPMSolverSinglestepScheduler

    sch = DPMSolverSinglestepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint")
    n = len(grid) - 1
    sch.set_timesteps(timesteps=list(range(999, 999 - 10 * n, -10)))  # distinct labels; σ replaced below
    assert len(sch.order_list) == n and sch.order_list[:2] == [1, 2] and sch.order_list[-1] == 1
    sch.sigmas = grid.clone()
    x = torch.linspace(-3, 3, 101, dtype=torch.float64).reshape(1, 1, 1, 101) * float(grid[0])
    sample = x / math.sqrt(1 + float(grid[0]) ** 2)  # VP form
    for i, t in enumerate(sch.timesteps):
        s = float(grid[i])
        x_ve = sample * math.sqrt(1 + s**2)
        eps = (x_ve - exact_denoiser(x_ve, s)) / s
        sample = sch.step(eps, t, sample).prev_sample
    return x, sample  # at σ = 0 the VP and VE forms agree


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2s_ancestral"])
def test_eta_zero_is_diffusers_singlestep_dpm_solver(name):
    """At η = 0, DPM++ SDE and DPM++ 2S a are DPM-Solver++(2S) with r = 1/2; diffusers' singlestep order-2
    solver is the same method when every second point of its grid is the log-midpoint of its neighbours."""
    sig = karras_sigmas(9, 0.03, 14.6).double()
    mids = (sig[:-1] * sig[1:]).sqrt()
    grid = torch.cat([torch.stack([sig[:-1], mids], 1).flatten(), sig[-1:], torch.zeros(1, dtype=torch.float64)])
    x, want = _singlestep_reference(grid)
    got = SAMPLERS[name](exact_denoiser, x.clone(), torch.cat([sig, torch.zeros(1, dtype=torch.float64)]), eta=0.0)
    err = float((got - want).norm() / want.norm())
    print(f"{name} eta=0 vs DPMSolverSinglestep: rel err {err:.2e}")
    assert err <= 1e-6
    exact = MU + S / math.sqrt(S**2 + float(sig[0]) ** 2) * (x - MU)  # the ODE map to σ = 0
    assert float((got - exact).abs().max()) < 0.1  # 8 steps, the last one Euler


def test_cfg_pp_is_euler_without_a_distinct_negative(ours):
    """With the negative prompt equal to the prompt, D_u = D_c = D_λ, and Euler CFG++ is Euler exactly."""
    pipe = ours
    kw = dict(steps=5, cfg=5.0, seed=3, width=64, height=64, schedule="leading")
    plain = pipe("a red apple", "a red apple", sampler="euler", **kw)
    cfgpp = pipe("a red apple", "a red apple", sampler="euler_cfg_pp", **kw)
    assert R.rel_err(cfgpp.latents, plain.latents) <= 1e-5
    other = pipe("a red apple", "blurry", sampler="euler_cfg_pp", **{**kw, "cfg": 0.8})  # CFG++ range: λ ≤ 1
    assert torch.isfinite(other.latents).all() and R.rel_err(other.latents, plain.latents) > 1e-3


def test_restart_under_20_steps_is_heun(ours):
    pipe = ours
    kw = dict(steps=6, cfg=5.0, seed=3, width=64, height=64, schedule="karras")
    assert R.rel_err(pipe("a red apple", sampler="restart", **kw).latents,
                     pipe("a red apple", sampler="heun", **kw).latents) == 0


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"])
def test_discard_penultimate_is_the_peers_schedule(ours, sampler, monkeypatch):
    """A1111 and ComfyUI run DPM2 (a) and (A1111) DPM++ 3M SDE on n + 1 Karras levels with the next-to-last
    dropped: by default on the peers' schedules, never on diffusers' spacings."""
    import stablexl.pipeline as P
    from stablexl.diffusion.schedule import make_sigmas

    seen, run = [], P.denoise

    def recording(model, x, sigmas, *a, **k):
        seen.append(sigmas)
        return run(model, x, sigmas, *a, **k)

    monkeypatch.setattr(P, "denoise", recording)
    kw = dict(steps=5, cfg=5.0, seed=3, width=64, height=64, sampler=sampler)
    full = make_sigmas(ours.schedule, 6, "karras")
    default = ours("a red apple", "blurry", schedule="karras", **kw)
    assert default.request.discard_penultimate is True
    assert torch.equal(seen[-1], torch.cat([full[:-2], full[-1:]]))  # 5 steps: 6 levels, the 6th of 7 dropped
    kept = ours("a red apple", "blurry", schedule="karras", discard_penultimate=False, **kw)
    assert torch.equal(seen[-1], make_sigmas(ours.schedule, 5, "karras"))
    assert R.rel_err(default.latents, kept.latents) > 1e-3
    assert ours("a red apple", schedule="leading", **kw).request.discard_penultimate is False  # diffusers' spacing
