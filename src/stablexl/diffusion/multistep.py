"""Multistep and consistency solvers in λ = log(α/σ) space: UniPC, DEIS and TCD, as pure sampler functions.

Same contract as samplers.py: `sample(model, x, sigmas, noise, callback)` with `model(x, σ)` the x0 estimate and x
the VE-form sample x = x0 + σ·ε. With α = 1/√(1+σ²) and σ_vp = σ·α, the half log-SNR is λ = log(α/σ_vp) = −log σ,
so a step σ → σ' has length h = λ' − λ = log(σ/σ'). The solvers integrate the probability-flow ODE exactly in its
linear part and approximate only the model output along λ (exponential integrators, as DPM-Solver++).

Why a module of its own: samplers.py holds the σ-form samplers of the k-diffusion lineage. These three are
written in λ after their papers and mirror diffusers' schedulers step for step (warm-up, predictor-corrector
history, lower-order final steps, the final noise level), and TCD picks an intermediate level on the training
timestep grid; that bookkeeping stays here. samplers.py registers `MULTISTEP` into its SAMPLERS table.

Final noise level (diffusers' defaults, mirrored): UniPC ends at σ = 0 (`final_sigmas_type="zero"`). DEIS and TCD
end on the training schedule's first timestep t = 0 (σ_min ≈ 0.0292), not σ = 0, and return the VP-form sample
there: their step to σ = 0 lands on σ_min and returns x/√(1+σ_min²), as our pipeline does for DDIM. The
intermediate levels of TCD and that σ_min come from the DDPM schedule every SD/SDXL checkpoint trains with
(schedule.py; for zero-terminal-SNR models σ_min is the same, the timestep grid slightly different).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor

from .steps import Callback, Model, Noise, sigma_batch as _s, step_done as _step_done
from .schedule import NoiseSchedule


_TRAIN = NoiseSchedule.ddpm()
SIGMA_MIN = _TRAIN.sigma_min  # σ at t = 0, where diffusers' DEIS and TCD stop




# --------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, arXiv 2302.04867), data-prediction form, as diffusers UniPCMultistepScheduler
# --------------------------------------------------------------------------------------------------


UniPCVariant = Literal["bh1", "bh2"]


def _unipc_b(hh: float, b_h: float, order: int) -> list[float]:
    """g_k / B(h) for k = 1..order with g_k = hh·φ_{k+1}(hh)·k! (UniPC: the right side of R_p(h)·a_p = g_p(h)/B(h)),
    by the recursion φ_{k+1}(z) = (φ_k(z) − 1/k!)/z from φ_1(z) = (e^z − 1)/z
    (diffusers `multistep_uni_p_bh_update`)."""
    out, h_phi, fact = [], math.expm1(hh) / hh - 1, 1  # h_phi = hh·φ_2(hh)
    for k in range(1, order + 1):
        out.append(h_phi * fact / b_h)
        fact *= k + 1
        h_phi = h_phi / hh - 1 / fact  # hh·φ_{k+2}(hh)
    return out


def _unipc_update(x: Tensor, s: float, s_next: float, m0: Tensor, prev: list[tuple[float, Tensor]],
                  variant: UniPCVariant, m_next: Tensor | None = None) -> Tensor:
    """One UniP-p step from (x, σ=s, x0 = m0) to s_next, or with m_next (the x0 at s_next) the UniC-p correction of
    that step. prev: (λ_k, x0_k) of the p − 1 steps before s, newest first.

    x' = (σ'/σ)·x − (e^{−h} − 1)·m0 − B(h)·Σ_k a_k·D_k, D_k = (m_k − m0)/r_k, r_k = (λ_k − λ_s)/h, the data-prediction
    UniPC update of diffusers `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` divided by α' (VE form).
    B(h) = hh (bh1) or e^{hh} − 1 (bh2) with hh = −h (UniPC's two choices of B(h)).
    """
    h = math.log(s) - math.log(s_next)  # λ' − λ
    hh = -h  # the data-prediction form runs on −h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    lam = -math.log(s)
    rks = [(lk - lam) / h for lk, _ in prev]
    ds = [(mk - m0) / r for r, (_, mk) in zip(rks, prev)]
    x_new = (s_next / s) * x - math.expm1(hh) * m0  # DPM-Solver++(1) = DDIM (Lu et al. 2022, arXiv 2211.01095)
    p = len(prev) + 1
    if m_next is not None:  # UniC-p: the new model output enters with r = 1
        rks, ds = rks + [1.0], ds + [m_next - m0]
        rhos = [0.5] if p == 1 else _solve_vandermonde(rks, _unipc_b(hh, b_h, p))
    elif p == 1:
        return x_new
    else:  # UniP-p: the same system without the r = 1 column; a_1 = 1/2 for p = 2 (diffusers' simplification)
        rhos = [0.5] if p == 2 else _solve_vandermonde(rks, _unipc_b(hh, b_h, p)[:-1])
    return x_new - b_h * sum(r * d for r, d in zip(rhos, ds))


def _solve_vandermonde(rks: list[float], b: list[float]) -> list[float]:
    """a with Σ_j r_j^(k−1)·a_j = b_k, k = 1..len(rks) (UniPC's R_p(h) system)."""
    r = torch.tensor(rks, dtype=torch.float64)
    mat = torch.stack([r**k for k in range(len(rks))])
    return torch.linalg.solve(mat, torch.tensor(b, dtype=torch.float64)).tolist()


def _sample_unipc(model: Model, x: Tensor, sigmas: Tensor, callback: Callback, variant: UniPCVariant,
                  order: int = 2) -> Tensor:
    """UniPC-p multistep: UniP predicts each step, and once the model has been evaluated at the new point UniC
    corrects it with that output (no extra evaluation). As diffusers with `predict_x0=True`: order 1 on the first
    step (warm-up) and on the step to σ = 0 (`lower_order_final`; also what `final_sigmas_type="zero"` needs); the
    model output is taken at the uncorrected sample; the correction starts from the sample before the last
    predictor (so a callback's replacement of x is superseded there, as in diffusers)."""
    n = len(sigmas) - 1
    hist: list[tuple[float, Tensor]] = []  # (λ, x0), oldest first
    x_last, p_last = None, 0
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        if x_last is not None:  # UniC on the step just taken, from σ_{i−1}
            prev = hist[-p_last:-1][::-1]
            x = _unipc_update(x_last, float(sigmas[i - 1]), s, hist[-1][1], prev, variant, m_next=x0)
        hist = (hist + [(-math.log(s), x0)])[-order:]
        p = 1 if s_next == 0 else len(hist)
        x_last, p_last = x, p
        # UniPC to σ = 0 is the limit h → ∞: x' = x0 (diffusers' bh1 computes (−∞)·0 there and returns NaN)
        x = x0 if s_next == 0 else _unipc_update(x, s, s_next, x0, hist[-p:-1][::-1], variant)
        x = _step_done(callback, i, n, x, x0)
    return x


def sample_uni_pc(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                  callback: Callback = None) -> Tensor:
    """UniPC-2 with B(h) = h ("bh1", ComfyUI `uni_pc`, A1111's default variant), diffusers `solver_type="bh1"`."""
    return _sample_unipc(model, x, sigmas, callback, "bh1")


def sample_uni_pc_bh2(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                      callback: Callback = None) -> Tensor:
    """UniPC-2 with B(h) = e^h − 1 ("bh2", ComfyUI `uni_pc_bh2`), diffusers' default `solver_type`."""
    return _sample_unipc(model, x, sigmas, callback, "bh2")


# --------------------------------------------------------------------------------------------------
# DEIS (Zhang & Chen 2022, arXiv 2204.13902), ρAB-DEIS with log-ρ polynomials, as diffusers DEISMultistepScheduler
# --------------------------------------------------------------------------------------------------


def _logrho_integral(t: float, b: float, c: float) -> float:
    """∫ (ln ρ − ln c)/(ln b − ln c) dρ at ρ = t: the Lagrange basis in log ρ through (b, c), integrated
    (diffusers `multistep_deis_second_order_update` `ind_fn`)."""
    return t * (math.log(t) - math.log(c) - 1) / (math.log(b) - math.log(c))


def sample_deis(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
                callback: Callback = None) -> Tensor:
    """DEIS-2, "logrho" (Zhang & Chen 2022: ρAB-DEIS). With ρ = σ_vp/α, which is our VE σ, the ODE is
    dx/dρ = ε(x, ρ); ε is extrapolated by its Lagrange polynomial in log ρ through the last two steps and integrated
    exactly over [ρ, ρ']. First order (= DDIM) on the first step, and on the last one when the run has fewer
    than 15 steps (diffusers `lower_order_final`). Like diffusers, the step to σ = 0 ends at σ_min and returns
    the VP-form sample there (module docstring); with Karras σ's, whose last level is σ_min, that step is a no-op.
    """
    n = len(sigmas) - 1
    eps_prev, s_prev = None, 0.0
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        eps = (x - x0) / s  # diffusers converts the x0 prediction to ε (algorithm_type "deis")
        t = s_next if s_next > 0 else min(SIGMA_MIN, s)  # never step back up past s
        if eps_prev is None or (s_next == 0 and n < 15):
            x = x + (t - s) * eps  # DEIS order 1 = DDIM: x' = x + (ρ' − ρ)·ε (diffusers `deis_first_order_update`)
        else:
            c0 = _logrho_integral(t, s, s_prev) - _logrho_integral(s, s, s_prev)
            c1 = _logrho_integral(t, s_prev, s) - _logrho_integral(s, s_prev, s)
            x = x + c0 * eps + c1 * eps_prev  # ρAB-DEIS order 2: ∫ε dρ with ε's log-ρ Lagrange polynomial
        if s_next == 0:
            x = x / math.sqrt(1 + t**2)  # VE at σ_min -> the VP-form sample diffusers returns
        eps_prev, s_prev = eps, s
        x = _step_done(callback, i, n, x, x0)
    return x


# --------------------------------------------------------------------------------------------------
# TCD (Zheng et al. 2024, arXiv 2402.19159), strategic stochastic sampling, as diffusers TCDScheduler
# --------------------------------------------------------------------------------------------------


def _tcd_sigma_s(sigma_next: float, gamma: float) -> float:
    """σ at TCD's intermediate timestep s = ⌊(1 − γ)·t'⌋ on the training grid, t' the (integer) timestep of
    σ_next (TCD's strategic stochastic sampling; diffusers `TCDScheduler.step` `timestep_s`, with the float32
    product and floor as there)."""
    t_next = _TRAIN.sigma_to_t(torch.tensor([sigma_next])).round()
    t_s = int(torch.floor((1 - gamma) * t_next.long()))
    return float(_TRAIN.sigmas[t_s])


def sample_tcd(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback: Callback = None,
               eta: float = 0.3) -> Tensor:
    """TCD's strategic stochastic sampling (Zheng et al. 2024), γ given as `eta` (0.3: diffusers'
    default). Each step predicts x0 and ε at σ, jumps along the consistency trajectory to the lower level σ_s of
    timestep ⌊(1 − γ)·t(σ')⌋, x_s = x0 + σ_s·ε, then diffuses forward to σ' with fresh noise:
    x' = x_s + √(σ'² − σ_s²)·z (the VP form √(ᾱ'/ᾱ_s)·x_s + √(1 − ᾱ'/ᾱ_s)·z). γ = 0 is deterministic (σ_s = σ'),
    γ = 1 renoises from σ_min each step. The last step, to σ = 0, lands on σ_min without noise and returns the
    VP-form sample there, as diffusers does (module docstring). Use it over the σ's of TCD's grid (its
    `original_inference_steps=50` subset: equal to "trailing" when steps divide 50) or any given σ's.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"tcd takes eta (TCD's gamma) in [0, 1], got {eta}")
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, _s(s, x))
        eps = (x - x0) / s
        if s_next == 0:
            s_mid = min(SIGMA_MIN, s)
        else:
            s_mid = s_next if eta == 0 else min(_tcd_sigma_s(s_next, eta), s_next)
        x = x0 + s_mid * eps  # the noised sample at s, α_s·x0 + σ_s·ε in VP form (diffusers `pred_noised_sample`)
        if s_next == 0:
            x = x / math.sqrt(1 + s_mid**2)
        elif eta > 0:  # diffusers draws z on every step but the last whenever γ > 0, even where σ_s = σ'
            assert noise is not None, "tcd with eta > 0 needs a noise source"
            x = x + noise() * math.sqrt(max(s_next**2 - s_mid**2, 0.0))
        x = _step_done(callback, i, n, x, x0)
    return x


MULTISTEP: dict[str, Callable[..., Tensor]] = {
    "uni_pc": sample_uni_pc, "uni_pc_bh2": sample_uni_pc_bh2, "deis": sample_deis, "tcd": sample_tcd,
}
MULTISTEP_STOCHASTIC = {"tcd"}
