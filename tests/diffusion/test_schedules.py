"""The peers' σ schedules against their published definitions, and the name table against the peers' lists.

Expected values are computed here from the definitions, independently of schedule.py: ComfyUI comfy/samplers.py
(Comfy-Org/ComfyUI 311c014: simple_scheduler, normal_scheduler(sgm=True), ddim_scheduler, beta_scheduler,
kl_optimal_scheduler, linear_quadratic_schedule), comfy_extras/nodes_align_your_steps.py, k-diffusion
get_sigmas_polyexponential; the Beta quantiles are scipy.stats.beta.ppf's (scipy 1.17), which ComfyUI calls.
"""

import math

import numpy as np
import pytest
import torch

from stablexl.config import PRESETS
from stablexl.diffusion.schedule import AYS_SIGMAS, NoiseSchedule, beta_ppf, make_sigmas
from stablexl.names import (
    A1111_SAMPLER, A1111_SCHEDULE, COMFY_SAMPLER, SAMPLER_NAMES, SCHEDULE_NAMES, parse_schedule, resolve_sampler,
)
from stablexl.request import GenerationRequest, RequestError, resolve

SCHED = NoiseSchedule.ddpm()
SIG = SCHED.sigmas.double()  # the 1000 training σ's, ascending in t
T = 1000
NEW = ("normal", "simple", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal", "align_your_steps",
       "polyexponential", "linear_quadratic")

# ComfyUI comfy/samplers.py (311c014): SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
COMFY_KSAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]
COMFY_SAMPLER_NAMES = COMFY_KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
COMFY_SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                         "linear_quadratic", "kl_optimal"]
# A1111 modules/sd_schedulers.py (v1.10): (name, label), plus the alias "SGMUniform"
A1111_SCHEDULERS = [("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
                    ("exponential", "Exponential"), ("polyexponential", "Polyexponential"),
                    ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
                    ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"),
                    ("ddim", "DDIM"), ("beta", "Beta")]
# A1111 v1.10 samplers (display name, aliases) and the sampler each is in our table
A1111_SAMPLERS = [
    ("DPM++ 2M", ["k_dpmpp_2m"], "dpmpp_2m"), ("DPM++ SDE", ["k_dpmpp_sde"], "dpmpp_sde"),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], "dpmpp_2m_sde"),
    ("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"], "dpmpp_2m_sde_heun"),
    ("DPM++ 2S a", ["k_dpmpp_2s_a"], "dpmpp_2s_ancestral"), ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"], "dpmpp_3m_sde"),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"], "euler_ancestral"), ("Euler", ["k_euler"], "euler"),
    ("LMS", ["k_lms"], "lms"), ("Heun", ["k_heun"], "heun"), ("DPM2", ["k_dpm_2"], "dpm_2"),
    ("DPM2 a", ["k_dpm_2_a"], "dpm_2_ancestral"), ("DPM fast", ["k_dpm_fast"], None),
    ("DPM adaptive", ["k_dpm_ad"], None), ("Restart", ["restart"], "restart"), ("DDIM", ["ddim"], "ddim"),
    ("DDIM CFG++", ["ddim_cfgpp"], None), ("PLMS", ["plms"], None), ("UniPC", ["unipc"], "uni_pc"),
    ("LCM", ["lcm"], "lcm")]


def log_interp(t):
    """k-diffusion / ComfyUI t_to_sigma in float64: linear in log σ between neighbouring integer t."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(SIG[lo]) + w * math.log(SIG[hi]))


def listed(x):
    return [float(v) for v in x]


# ---- each schedule against its definition -------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 7, 20, 30, 38])
def test_simple_takes_every_T_over_n_th_training_sigma(n):
    # ComfyUI / A1111: sigmas[-(1 + int(x * (len / n)))], the float product truncated
    want = [float(SIG[T - 1 - int(x * (T / n))]) for x in range(n)] + [0.0]
    assert listed(make_sigmas(SCHED, n, "simple")) == pytest.approx(want, rel=1e-7, abs=0)


def test_simple_index_quirks():
    t = lambda n: [int(SCHED.sigma_to_t(s).round()) for s in make_sigmas(SCHED, n, "simple")[:-1]]  # noqa: E731
    assert t(3) == [999, 666, 333]  # SGM's truncation; diffusers "trailing" rounds: 999, 666, 332
    assert t(38)[19] == 500  # 19 * (1000 / 38) = 499.99999…: the float product truncates to 499


@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_sgm_uniform_drops_t0_from_n_plus_1_points(n):
    want = [log_interp(999 * (1 - i / n)) for i in range(n)] + [0.0]  # linspace(999, 0, n + 1)[:-1]
    assert listed(make_sigmas(SCHED, n, "sgm_uniform")) == pytest.approx(want, rel=2e-6)
    if n == 4:  # fractional t, unlike diffusers' trailing 999, 749, 499, 249
        assert [float(t) for t in SCHED.sigma_to_t(make_sigmas(SCHED, 4, "sgm_uniform")[:-1])] == \
            pytest.approx([999, 749.25, 499.5, 249.75], abs=1e-3)


@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_normal_spaces_t_from_999_to_0(n):
    ts = [999.0] if n == 1 else [999 * (1 - i / (n - 1)) for i in range(n)]
    assert listed(make_sigmas(SCHED, n, "normal")) == pytest.approx([log_interp(t) for t in ts] + [0.0], rel=2e-6)


@pytest.mark.parametrize("n,steps,top", [(1, 1, 1), (3, 3, 667), (10, 10, 901), (20, 20, 951), (30, 31, 991),
                                         (50, 50, 981)])
def test_ddim_uniform_steps_from_t1_by_T_div_n(n, steps, top):
    ss = T // n
    ts = list(range(1, T, ss))[::-1]
    got = make_sigmas(SCHED, n, "ddim_uniform")
    assert len(got) == steps + 1 and ts[0] == top  # ComfyUI runs 31 steps for 30
    assert listed(got) == pytest.approx([float(SIG[t]) for t in ts] + [0.0], rel=1e-7)


# rint(scipy.stats.beta.ppf(1 - linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
BETA_T = {10: [999, 959, 876, 765, 637, 500, 362, 234, 123, 40],
          20: [999, 986, 959, 922, 876, 823, 765, 703, 637, 569, 500, 430, 362, 296, 234, 176, 123, 77, 40, 13]}


@pytest.mark.parametrize("n", sorted(BETA_T))
def test_beta_indexes_training_sigmas_at_beta_quantiles(n):
    assert listed(make_sigmas(SCHED, n, "beta")) == pytest.approx([float(SIG[t]) for t in BETA_T[n]] + [0.0], rel=1e-7)


def test_beta_quantile_and_repeats():
    # scipy.stats.beta.ppf(q, 0.6, 0.6)
    for q, x in [(0.01, 0.0008612388215429059), (0.1, 0.03958440558878085), (0.25, 0.17568037865269498),
                 (0.5, 0.5), (0.75, 0.824319621347305), (0.9, 0.9604155944112192), (0.99, 0.9991387611784571)]:
        assert beta_ppf(q, 0.6, 0.6) == pytest.approx(x, rel=1e-12, abs=1e-15)
    assert beta_ppf(0.0, 0.6, 0.6) == 0.0 and beta_ppf(1.0, 0.6, 0.6) == 1.0
    assert len(make_sigmas(SCHED, 200, "beta")) == 200  # t = 999 twice at the top: ComfyUI drops the repeat


@pytest.mark.parametrize("n", [1, 2, 10, 30])
def test_kl_optimal_is_tan_of_evenly_spaced_atan(n):
    lo, hi = float(SIG[0]), float(SIG[-1])
    ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    want = np.tan((1 - ramp) * math.atan(hi) + ramp * math.atan(lo)).tolist() + [0.0]
    assert listed(make_sigmas(SCHED, n, "kl_optimal")) == pytest.approx(want, rel=1e-5)


# comfy_extras/nodes_align_your_steps.py NOISE_LEVELS (NVIDIA's AYS tables: 10 steps, σ_max … σ_min)
AYS_SDXL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
            0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]
AYS_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
           0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]


@pytest.mark.parametrize("family,table", [("sdxl-base", AYS_SDXL), ("sdxl-refiner", AYS_SDXL), (None, AYS_SDXL),
                                          ("sd1", AYS_SD1), ("sd2", AYS_SD1)])
def test_align_your_steps_ten_steps_are_the_table(family, table):
    got = make_sigmas(SCHED, 10, "align_your_steps", family=family)
    assert torch.equal(got, torch.tensor(table[:-1] + [0.0], dtype=torch.float32))  # the last point becomes 0
    assert AYS_SIGMAS["sdxl" if table is AYS_SDXL else "sd1"] == tuple(table)


@pytest.mark.parametrize("n", [4, 15, 20, 40])
def test_align_your_steps_interpolates_log_sigma(n):
    # n + 1 points evenly over the table's 11, log σ linear between table entries; the last becomes 0
    want = []
    for i in range(n + 1):
        p = i * 10 / n
        k = min(int(p), 9)
        want.append(math.exp((1 - (p - k)) * math.log(AYS_SDXL[k]) + (p - k) * math.log(AYS_SDXL[k + 1])))
    got = listed(make_sigmas(SCHED, n, "align_your_steps", family="sdxl-base"))
    assert got == pytest.approx(want[:-1] + [0.0], rel=1e-6)


def test_polyexponential():
    lo, hi = float(SIG[0]), float(SIG[-1])
    exponential = listed(make_sigmas(SCHED, 12, "exponential"))
    assert listed(make_sigmas(SCHED, 12, "polyexponential")) == pytest.approx(exponential, rel=1e-5)  # ρ = 1
    ramp = np.linspace(1, 0, 12) ** 2.0
    want = np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).tolist() + [0.0]
    assert listed(make_sigmas(SCHED, 12, "polyexponential", rho=2.0)) == pytest.approx(want, rel=1e-5)


def test_linear_quadratic():
    hi = float(SIG[-1])
    got = [v / hi for v in listed(make_sigmas(SCHED, 10, "linear_quadratic"))]
    assert got[:5] == pytest.approx([1 - i * 0.025 / 5 for i in range(5)], rel=1e-6)  # linear to 1 - 0.025 …
    assert got[-1] == 0.0 and len(got) == 11
    q = np.polyfit(range(5, 11), [1 - v for v in got[5:]], 2)  # … then quadratic, reaching 1 at step 10
    assert np.polyval(q, [5, 10]) == pytest.approx([0.025, 1.0], abs=1e-5)
    assert listed(make_sigmas(SCHED, 1, "linear_quadratic")) == pytest.approx([hi, 0.0])


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("n", [1, 2, 5, 10, 25, 50])
def test_every_schedule_descends_to_its_final(schedule, n):
    for final in (0.0, SCHED.sigma_min):  # DDIM ends at σ_min
        s = make_sigmas(SCHED, n, schedule, final=final, family="sdxl-base")
        assert s.dtype == torch.float32 and float(s[-1]) == pytest.approx(final, abs=0)
        assert bool((s[1:-1] < s[:-2]).all()) and float(s[-2]) >= final
        assert len(s) == n + 1  # also ddim_uniform's and beta's for these n
        if schedule in NEW and schedule != "ddim_uniform":
            assert float(s[0]) == pytest.approx(SCHED.sigma_max, rel=1e-5)  # ComfyUI's "max denoise" start


# ---- the name table -------------------------------------------------------------------------------------------

def test_every_comfy_scheduler_is_ours():
    for name in COMFY_SCHEDULER_NAMES:
        assert parse_schedule(name) == name and name in SCHEDULE_NAMES


def test_a1111_schedulers_map_to_ours():
    want = {"automatic": "leading", "uniform": "normal", "ddim": "ddim_uniform"}
    for name, label in A1111_SCHEDULERS:
        ours = want.get(name, name)
        assert parse_schedule(name) == ours and parse_schedule(label) == ours and ours in SCHEDULE_NAMES
    assert parse_schedule("SGMUniform") == "sgm_uniform"
    for s in SCHEDULE_NAMES:  # our writer's labels read back
        assert parse_schedule(A1111_SCHEDULE[s]) == s


def test_sdcpp_schedulers_map_to_ours():
    want = {"discrete": "normal", "ays": "align_your_steps"}
    for name in ("discrete", "karras", "exponential", "ays", "sgm_uniform", "simple", "kl_optimal"):
        assert parse_schedule(name) == want.get(name, name)
    for name in ("gits", "smoothstep", "lcm", "bong_tangent"):  # not ours
        assert parse_schedule(name) not in SCHEDULE_NAMES


def test_comfy_sampler_names_resolve_to_registered_samplers_or_raise():
    claimed = set(COMFY_SAMPLER)
    assert claimed <= set(COMFY_SAMPLER_NAMES) and set(COMFY_SAMPLER.values()) <= set(SAMPLER_NAMES)
    for name in COMFY_SAMPLER_NAMES:
        if name in claimed:
            assert resolve_sampler(name) == (COMFY_SAMPLER[name], None)
            assert resolve_sampler(name.removesuffix("_gpu"))[0] == COMFY_SAMPLER[name]
        elif name not in SAMPLER_NAMES:  # a ComfyUI sampler we do not have
            with pytest.raises(ValueError, match=f"unknown sampler '{name}'"):
                resolve_sampler(name)
    # every ComfyUI name spelled like one of ours is claimed
    assert {n for n in COMFY_SAMPLER_NAMES if n in SAMPLER_NAMES} <= claimed


def test_a1111_sampler_names_and_aliases_resolve():
    for label, aliases, ours in A1111_SAMPLERS:
        if ours is None or ours not in SAMPLER_NAMES:
            with pytest.raises(ValueError):
                resolve_sampler(label)
            continue
        for name in (label, label.upper(), *aliases):
            assert resolve_sampler(name) == (ours, None), name
        assert resolve_sampler(f"{label} Karras") == (ours, "karras")
        assert resolve_sampler(f"{aliases[0]}_ka") == (ours, "karras")
        assert A1111_SAMPLER.get(ours) == label


def test_unknown_names_list_the_nearest_first_then_ours():
    with pytest.raises(ValueError) as e:
        resolve_sampler("DPM++ 2M Karas")
    msg = str(e.value)
    assert msg.startswith("unknown sampler 'DPM++ 2M Karas'; nearest: DPM++ 2M Karras")
    assert msg.index("nearest:") < msg.index("ours: " + ", ".join(SAMPLER_NAMES))
    with pytest.raises(ValueError, match=r"nearest: .*\bheun\b"):
        resolve_sampler("heunpp2")  # ComfyUI's, not ours
    with pytest.raises(RequestError) as e:
        resolve(GenerationRequest("x", schedule="align_your_step"), PRESETS["tiny-sdxl"])
    assert e.value.field == "schedule"
    assert "nearest: align_your_steps" in str(e.value) and "ours: " + ", ".join(SCHEDULE_NAMES) in str(e.value)
    with pytest.raises(RequestError, match="unknown schedule 'cosine'; ours: "):  # nothing near
        resolve(GenerationRequest("x", schedule="cosine"), PRESETS["tiny-sdxl"])
