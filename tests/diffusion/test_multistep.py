"""UniPC, DEIS and TCD (diffusion/multistep.py): parity with diffusers' schedulers in the SDXL pipeline on the
tiny random-weight folder, and convergence order on the Gaussian closed form of test_samplers.py."""

import math
import os
import sys

import numpy as np
import pytest
import torch

import refconfigs as R
from stablexl.diffusion.multistep import SIGMA_MIN
from stablexl.diffusion.samplers import ETA_SAMPLERS, SAMPLERS, STOCHASTIC, resolve_sampler
from stablexl.diffusion.schedule import NoiseSchedule, karras_sigmas, make_sigmas
from stablexl.io.models import save_model
from stablexl.pipeline import Pipeline

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "io"))
from test_layouts import random_parts  # noqa: E402
from test_samplers import MU, S, exact_denoiser  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("multistep") / "tiny-sdxl"
    save_model(random_parts("tiny-sdxl", seed=5), root, "diffusers")
    return root


# case -> (diffusers class, its config overrides, our sampler, our schedule or "custom", steps, seeds, eta)
# "custom": diffusers' own σ grid handed to our pipeline as `sigmas=` (its multistep "leading" spacing, 1000 // (n+1),
# and TCD's 50-step LCM-style grid are not among our schedules). "trailing" and "karras" are the same grids as ours.
CASES = {
    "uni_pc_karras": ("UniPCMultistepScheduler", dict(solver_type="bh1", use_karras_sigmas=True), "uni_pc", "karras",
                      6, (17,), None),
    "uni_pc_bh2_karras": ("UniPCMultistepScheduler", dict(use_karras_sigmas=True), "uni_pc_bh2", "karras", 6, (17,),
                          None),
    "uni_pc_bh2_trailing": ("UniPCMultistepScheduler", dict(timestep_spacing="trailing"), "uni_pc_bh2", "trailing", 6,
                            (17, 18), None),
    "uni_pc_bh2_default": ("UniPCMultistepScheduler", {}, "uni_pc_bh2", "custom", 8, (17,), None),
    "deis_karras": ("DEISMultistepScheduler", dict(use_karras_sigmas=True), "deis", "karras", 6, (17,), None),
    "deis_trailing": ("DEISMultistepScheduler", dict(timestep_spacing="trailing"), "deis", "trailing", 6, (17, 18),
                      None),
    "deis_default_16": ("DEISMultistepScheduler", {}, "deis", "custom", 16, (17,), None),  # >= 15: 2nd-order last step
    "tcd_5": ("TCDScheduler", {}, "tcd", "trailing", 5, (17, 18), 0.3),  # TCD's grid for 5 steps is "trailing"
    "tcd_4_custom": ("TCDScheduler", {}, "tcd", "custom", 4, (17,), 0.5),
    "tcd_2_eta0": ("TCDScheduler", {}, "tcd", "trailing", 2, (17,), 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_multistep_samplers_match_diffusers(sdxl_folder, case):
    import diffusers

    cls, overrides, sampler, schedule, steps, seeds, eta = CASES[case]
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **overrides)
    ref.scheduler.set_timesteps(steps)
    train = NoiseSchedule.ddpm()
    if schedule == "custom":
        # σ at diffusers' (integer) timesteps; our Denoiser recovers the same t from them
        sigmas = torch.cat([train.sigmas[ref.scheduler.timesteps], torch.zeros(1)])
    else:
        sigmas = make_sigmas(train, steps, schedule)
    kw = dict(prompt=["a red apple"] * len(seeds), num_inference_steps=steps, guidance_scale=5.0, height=64, width=64,
              output_type="latent", callback_on_step_end_tensor_inputs=["latents"])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if schedule == "custom":
        # our custom-σ start is x = σ0·noise (k-diffusion's convention), diffusers' VP start is noise·√(σ0²+1) in VE
        # terms: hand diffusers the same start as `latents`, drawn from the generators that then feed TCD's noise
        s0 = float(sigmas[0])
        shape = (1, ref.unet.config.in_channels, 64 // ref.vae_scale_factor, 64 // ref.vae_scale_factor)
        kw["latents"] = torch.cat([torch.randn(shape, generator=g) for g in gens]) * s0 / math.sqrt(1 + s0**2)
    if eta is not None:
        kw["eta"] = eta
    want_steps = []

    def grab(pipe, i, t, tensors):
        want_steps.append(tensors["latents"].clone())
        return tensors

    want = ref(**kw, generator=gens, callback_on_step_end=grab).images
    got_steps = []

    def watch(i, n, x, x0):  # VE at σ_{i+1} -> diffusers' VP latents
        got_steps.append(x / math.sqrt(1 + float(sigmas[i + 1]) ** 2))

    ours = (dict(sigmas=sigmas[:-1].tolist()) if schedule == "custom"
            else dict(steps=steps, schedule=schedule, discard_penultimate=False))  # diffusers keeps every level
    got = Pipeline.from_pretrained(sdxl_folder)("a red apple", cfg=5.0, seed=seeds[0], batch=len(seeds), width=64,
                                                height=64, sampler=sampler, eta=eta, callback=watch, **ours)
    assert len(got_steps) == len(want_steps) == steps
    per_step = [R.rel_err(g, w) for g, w in zip(got_steps, want_steps) if torch.isfinite(w).all()]
    if case == "uni_pc_karras":
        # diffusers' bh1 computes B(h)·0 = (−∞)·0 on its step to σ = 0 (final_sigmas_type "zero") and returns NaN;
        # ours takes the h → ∞ limit, x0. Every step before it is compared.
        assert not torch.isfinite(want).all() and len(per_step) == steps - 1
        assert torch.isfinite(got.latents).all()
        print(f"{case}: per-step latent rel err max {max(per_step):.2e} over steps 1..{steps - 1} "
              "(diffusers' last is NaN)")
    else:
        assert len(per_step) == steps
        err = R.rel_err(got.latents, want)
        print(f"{case}: latent rel err {err:.2e}, per-step max {max(per_step):.2e}")
        assert err <= 1e-4
    assert max(per_step) <= 1e-4


# ---- Gaussian closed form (test_samplers.py): the probability-flow ODE solved to σ_min ------------------------


def ode_error(name, n, **kw):
    """test_samplers.ode_error with sampler options (TCD needs eta = 0 to be an ODE solver)."""
    sigmas = karras_sigmas(n + 1, 0.03, 14.6).double()
    x = torch.linspace(-3, 3, 101, dtype=torch.float64).reshape(1, 1, 1, 101) * float(sigmas[0])
    scale = math.sqrt(S**2 + float(sigmas[-1]) ** 2) / math.sqrt(S**2 + float(sigmas[0]) ** 2)
    want = MU + scale * (x - MU)
    got = SAMPLERS[name](exact_denoiser, x.clone(), sigmas, **kw)
    return float((got - want).abs().max())


# UniPC-2: a 2nd-order predictor whose corrector adds one order (UniPC's "order p + 1"); DEIS-2: 2; TCD with γ = 0
# steps along the consistency trajectory with a DDIM-like first-order jump
@pytest.mark.parametrize("name,order,kw", [("uni_pc", 3, {}), ("uni_pc_bh2", 3, {}), ("deis", 2, {}),
                                           ("tcd", 1, {"eta": 0.0})])
def test_convergence_order_on_gaussian_data(name, order, kw):
    ns = [10, 20, 40, 80]
    errs = [ode_error(name, n, **kw) for n in ns]
    slopes = -np.diff(np.log(errs)) / np.diff(np.log(ns))
    measured = float(slopes[-1])
    print(f"{name}: errors {['%.2e' % e for e in errs]}, measured order {measured:.2f} (expected {order})")
    assert all(b < a for a, b in zip(errs, errs[1:])), "error must fall with more steps"
    assert abs(measured - order) < 0.35


def test_final_step_conventions():
    """UniPC's step to σ = 0 returns x0; DEIS and TCD land on σ_min and return the VP-form sample there."""
    x = torch.full((1, 1, 1, 4), 3.0, dtype=torch.float64)
    sig = torch.tensor([2.0, 0.0], dtype=torch.float64)
    x0 = exact_denoiser(x, 2.0)
    eps = (x - x0) / 2.0
    assert torch.allclose(SAMPLERS["uni_pc_bh2"](exact_denoiser, x, sig), x0)
    at_min = (x0 + SIGMA_MIN * eps) / math.sqrt(1 + SIGMA_MIN**2)
    assert torch.allclose(SAMPLERS["deis"](exact_denoiser, x, sig), at_min)
    assert torch.allclose(SAMPLERS["tcd"](exact_denoiser, x, sig), at_min)
    with pytest.raises(ValueError, match=r"eta \(TCD's gamma\) in \[0, 1\], got 1.5"):
        SAMPLERS["tcd"](exact_denoiser, x, sig, eta=1.5)


def test_names_and_registration():
    assert {"uni_pc", "uni_pc_bh2", "deis", "tcd"} <= set(SAMPLERS)
    assert "tcd" in ETA_SAMPLERS and "tcd" in STOCHASTIC and "uni_pc" not in ETA_SAMPLERS
    assert resolve_sampler("UniPC") == ("uni_pc", None)  # A1111's UniPC (default variant bh1)
    assert resolve_sampler("uni_pc_bh2") == ("uni_pc_bh2", None)  # ComfyUI's spelling = ours
    assert resolve_sampler("DEIS") == ("deis", None) and resolve_sampler("TCD") == ("tcd", None)
