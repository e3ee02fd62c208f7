"""The names users type: our sampler and schedule names and every peer spelling of them (the one table).

A1111 display names and aliases, sd.cpp methods, ComfyUI names. Every surface (the request resolve, the
A1111 API, the infotext readers) maps names through this module and nowhere else.

Torch-free, so metadata reading (`stablexl info`) stays light. Facts: reference/peers.md §1c.
"""

from __future__ import annotations

import difflib

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lcm",
                 "lms", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde_heun",
                 "dpmpp_3m_sde", "restart", "euler_cfg_pp", "euler_ancestral_cfg_pp",
                 "uni_pc", "uni_pc_bh2", "deis", "tcd")
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep spacings; the rest are the peers'
SCHEDULE_NAMES = ("leading", "trailing", "linspace", "karras", "exponential", "normal", "simple", "sgm_uniform",
                  "ddim_uniform", "beta", "kl_optimal", "align_your_steps", "polyexponential", "linear_quadratic")
# the samplers that take an `eta` (the amount of fresh noise per step); samplers.py checks their signatures
ETA_SAMPLERS = frozenset({"ddim", "euler_ancestral", "dpmpp_2m_sde", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                          "dpmpp_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "euler_ancestral_cfg_pp",
                          "tcd"})  # tcd: eta is TCD's gamma
# The samplers whose peers drop the next-to-last σ of the schedule (they make steps + 1 levels and remove the
# penultimate, so the last step goes from a moderate σ straight to 0 instead of taking a tiny second-order
# step near σ_min): A1111 for DPM2, DPM2 a and DPM++ 3M SDE (`discard_next_to_last_sigma` in
# modules/sd_samplers_kdiffusion.py), ComfyUI for dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 (KSampler.
# DISCARD_PENULTIMATE_SIGMA_SAMPLERS). Measured on the miniature, 10 steps of ComfyUI's "normal" schedule
# (whose last levels are 0.37 -> 0.029 -> 0): UniPC's final latents were 0.82 (relative) from a 30-step
# DPM++ 2M result with every level kept and 0.18 with the penultimate dropped.
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2"})

# our sampler / schedule names -> A1111 display names
A1111_SAMPLER = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                 "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddpm": "DDPM", "lcm": "LCM",
                 "lms": "LMS", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a",
                 "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE",
                 "restart": "Restart",
                 # A1111 itself has only "DDIM CFG++"; these two are Forge's / sd.cpp's display names
                 "euler_cfg_pp": "Euler CFG++", "euler_ancestral_cfg_pp": "Euler a CFG++",
                 # A1111 has "UniPC" only (its default variant is bh1); the other three are ours, in its style
                 "uni_pc": "UniPC", "uni_pc_bh2": "UniPC BH2", "deis": "DEIS", "tcd": "TCD"}
# A1111 v1.9+ "Schedule type" labels (modules/sd_schedulers.py); trailing / linspace (diffusers spacings A1111
# lacks) and linear_quadratic (ComfyUI's) get labels in the same style. "Automatic" is what our writer emits
# for "leading" (A1111 itself lets the sampler choose).
A1111_SCHEDULE = {"karras": "Karras", "exponential": "Exponential", "leading": "Automatic", "trailing": "Trailing",
                  "linspace": "Linspace", "normal": "Normal", "simple": "Simple", "sgm_uniform": "SGM Uniform",
                  "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
                  "align_your_steps": "Align Your Steps", "polyexponential": "Polyexponential",
                  "linear_quadratic": "Linear Quadratic"}
# A1111's scheduler ids (the `name` of /sdapi/v1/schedulers) where they differ from ours
A1111_SCHEDULE_ID = {"leading": "automatic", "ddim_uniform": "ddim"}


# A1111's sampler aliases (the `aliases` of modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py and
# sd_samplers_lcm.py, v1.10), by our sampler; pre-1.9 aliases with a schedule in them ("k_dpmpp_2m_ka",
# "k_dpmpp_3m_sde_exp") are these plus "_ka" / "_exp" and are parsed as such. Only registered samplers count.
_A1111_ALIASES = {
    "euler": ("k_euler",), "euler_ancestral": ("k_euler_a", "k_euler_ancestral"), "heun": ("k_heun",),
    "lms": ("k_lms",), "dpm_2": ("k_dpm_2",), "dpm_2_ancestral": ("k_dpm_2_a",),
    "dpmpp_2s_ancestral": ("k_dpmpp_2s_a",), "dpmpp_2m": ("k_dpmpp_2m",), "dpmpp_sde": ("k_dpmpp_sde",),
    "dpmpp_2m_sde": ("k_dpmpp_2m_sde",), "dpmpp_2m_sde_heun": ("k_dpmpp_2m_sde_heun",),
    "dpmpp_3m_sde": ("k_dpmpp_3m_sde",), "restart": ("restart",), "ddim": ("ddim",), "uni_pc": ("unipc",),
    "lcm": ("lcm",),
}
A1111_ALIASES = {s: _A1111_ALIASES.get(s, ()) for s in SAMPLER_NAMES}
# A1111 display names and aliases (any case; pre-1.9 names with the schedule in them, "DPM++ 2M Karras", are
# parsed by parse_sampler) -> (sampler, schedule)
_A1111_SAMPLER_IN: dict[str, tuple[str, str | None]] = {
    **{a: (s, None) for s, aliases in A1111_ALIASES.items() for a in aliases},
    **{v.lower(): (k, None) for k, v in A1111_SAMPLER.items() if k in SAMPLER_NAMES},
}
# sd.cpp `sample_method` names (sample_method_to_str in stable-diffusion.cpp) -> (sampler, schedule implied by
# the method or None), where we have the sampler (not: dpm++2mv2, ipndm(_v), res_multistep, res_2s, er_sde,
# euler_ge, dpm++2m_sde_bt)
_SDCPP_SAMPLER: dict[str, tuple[str, str | None]] = {k: v for k, v in {
    "euler": ("euler", None), "euler_a": ("euler_ancestral", None), "heun": ("heun", None), "dpm2": ("dpm_2", None),
    "dpm++2s_a": ("dpmpp_2s_ancestral", None), "dpm++2m": ("dpmpp_2m", None), "dpm++2m_sde": ("dpmpp_2m_sde", None),
    "lcm": ("lcm", None), "ddim_trailing": ("ddim", "trailing"), "tcd": ("tcd", None), "lms": ("lms", None),
    "euler_cfg_pp": ("euler_cfg_pp", None), "euler_a_cfg_pp": ("euler_ancestral_cfg_pp", None),
}.items() if v[0] in SAMPLER_NAMES}
_SDCPP_SCHEDULES = {"default", "discrete", "karras", "exponential", "ays", "gits", "sgm_uniform", "simple",
                    "smoothstep", "lcm", "kl_optimal", "bong_tangent"}
# ComfyUI sampler_name (comfy/samplers.py SAMPLER_NAMES = KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2) -> ours,
# where we have the sampler; a `_gpu` variant is the same solver with its noise drawn on the GPU. Not ours (an
# unknown name): heunpp2, exp_heun_2_x0(_sde), dpm_fast, dpm_adaptive, *_cfg_pp but euler's, ipndm(_v),
# cfgpp_ud10_ab, res_multistep*, gradient_estimation*, er_sde, seeds_2/3, sa_solver(_pece). (ComfyUI's "ddim"
# runs its Euler sampler, which DDIM with η = 0 equals up to the last step: ours ends at σ_min, Euler at 0.)
_COMFY_SPELLINGS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "dpm_2", "dpm_2_ancestral", "lms",
    "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "deis",
    "ddim", "uni_pc", "uni_pc_bh2",
)
COMFY_SAMPLER = {c: c.removesuffix("_gpu") for c in _COMFY_SPELLINGS if c.removesuffix("_gpu") in SAMPLER_NAMES}
# Schedule spellings of A1111 (ids, labels, aliases), ComfyUI (`scheduler`, SCHEDULER_NAMES: simple sgm_uniform
# karras exponential ddim_uniform beta normal linear_quadratic kl_optimal: all ours as spelled) and sd.cpp
# (scheduler_to_str), beyond our names and A1111_SCHEDULE's labels. A1111 "Uniform" (k-diffusion get_sigmas),
# "Normal", ComfyUI "normal" and sd.cpp "discrete" are one rule: t evenly from 999 to 0, σ log-interpolated
# (= our "normal"; diffusers' "linspace" interpolates σ linearly). Not ours: sd.cpp gits, smoothstep, lcm,
# bong_tangent. ("default", sd.cpp's per-model choice, stays as written.)
_SCHEDULE_SPELLINGS = {"normal": ("uniform", "discrete"), "sgm_uniform": ("sgmuniform",), "ddim_uniform": ("ddim",),
                       "align_your_steps": ("ays",)}
_SCHEDULE_IN = {
    **{s: s for s in SCHEDULE_NAMES},
    **{v.lower(): k for k, v in A1111_SCHEDULE.items() if k in SCHEDULE_NAMES},
    **{v: k for k, v in A1111_SCHEDULE_ID.items()},
    **{a: k for k, aliases in _SCHEDULE_SPELLINGS.items() for a in aliases},
}


def schedule_aliases(schedule: str) -> list[str]:
    """The peer spellings of one of our schedules (lower-case; its A1111 label aside), e.g. normal: uniform,
    discrete."""
    label = A1111_SCHEDULE.get(schedule, schedule).lower()
    return [k for k, v in _SCHEDULE_IN.items() if v == schedule and k not in (schedule, label)]


def parse_schedule(name: str | None) -> str | None:
    """A1111 / ComfyUI / sd.cpp schedule name -> ours where there is a clear equivalent, else unchanged."""
    if name is None:
        return None
    return _SCHEDULE_IN.get(name.strip().lower(), name.strip())


def parse_sampler(name: str) -> tuple[str, str | None, str]:
    """Sampler text as A1111, ComfyUI, sd.cpp or we write it -> (sampler, schedule implied or None, dialect).

    dialect is "a1111" for A1111 display names, "sd.cpp" for sd.cpp's `method schedule` form, "ours"
    for our own names and "unknown" (sampler returned as written) otherwise.
    """
    raw = name.strip()
    key = raw.lower()
    if raw in SAMPLER_NAMES:
        return raw, None, "ours"
    if key in _A1111_SAMPLER_IN:
        s, sch = _A1111_SAMPLER_IN[key]
        return s, sch, "a1111"
    # pre-1.9 names with the schedule in them: "<display name> Karras" / "... Exponential", "<alias>_ka" / "_exp"
    for suffix, sch in ((" karras", "karras"), (" exponential", "exponential"), ("_ka", "karras"),
                        ("_exp", "exponential")):
        if key.endswith(suffix) and key[: -len(suffix)] in _A1111_SAMPLER_IN:
            return _A1111_SAMPLER_IN[key[: -len(suffix)]][0], sch, "a1111"
    words = key.split()
    if len(words) in (1, 2) and words[0] in _SDCPP_SAMPLER and (len(words) == 1 or words[1] in _SDCPP_SCHEDULES):
        s, sch = _SDCPP_SAMPLER[words[0]]
        if len(words) == 2 and not (sch and words[1] in ("default", "discrete")):
            sch = parse_schedule(words[1])  # "default" (sd.cpp picks per model) stays as is
        return s, sch, "sd.cpp"
    if len(words) == 2 and words[1] in _SDCPP_SCHEDULES:  # sd.cpp method we have no equivalent for
        return words[0], parse_schedule(words[1]), "sd.cpp"
    return raw, None, "unknown"


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """A sampler name as any surface spells it (ours, A1111's display names and aliases, ComfyUI's, sd.cpp's,
    any case, with an implied schedule as in "DPM++ 2M Karras") -> (our sampler, schedule implied or None);
    an unknown name raises ValueError listing the nearest names, then ours."""
    ours, implied, dialect = parse_sampler(name)
    if dialect == "unknown" or ours not in SAMPLER_NAMES:
        if name.strip().lower() in COMFY_SAMPLER:  # ComfyUI's sampler_name spellings
            return COMFY_SAMPLER[name.strip().lower()], None
        raise ValueError(unknown_sampler_message(name))
    return ours, implied


def sampler_aliases(sampler: str) -> list[str]:
    """The peer spellings of one of our samplers (its A1111 display name aside): A1111's aliases, ComfyUI's
    names (e.g. the `_gpu` variants), sd.cpp's methods that imply no schedule."""
    names = [*A1111_ALIASES.get(sampler, ()), *(c for c, s in COMFY_SAMPLER.items() if s == sampler),
             *(m for m, (s, sch) in _SDCPP_SAMPLER.items() if s == sampler and sch is None)]
    return [n for n in dict.fromkeys(names) if n not in (sampler, A1111_SAMPLER.get(sampler, "").lower())]


# ---- "did you mean": the nearest accepted spellings of an unknown name ---------------------------------------

def sampler_spellings() -> dict[str, str]:
    """Every sampler spelling resolve_sampler accepts, lower-cased -> as written: ours, A1111's display names
    (also the pre-1.9 "<name> Karras" / "<name> Exponential") and aliases, ComfyUI's and sd.cpp's names."""
    a1111 = [A1111_SAMPLER[s] for s in SAMPLER_NAMES if s in A1111_SAMPLER]
    names = [*SAMPLER_NAMES, *a1111, *(a for s in SAMPLER_NAMES for a in A1111_ALIASES[s]), *COMFY_SAMPLER,
             *_SDCPP_SAMPLER, *(f"{d} {sch}" for d in a1111 for sch in ("Karras", "Exponential"))]
    return {n.lower(): n for n in reversed(names)}  # the first spelling of a lower-cased name wins


def schedule_spellings() -> dict[str, str]:
    """Every schedule spelling parse_schedule maps to one of ours, lower-cased -> as written."""
    names = [*SCHEDULE_NAMES, *(A1111_SCHEDULE[s] for s in SCHEDULE_NAMES if s in A1111_SCHEDULE), *_SCHEDULE_IN]
    return {n.lower(): n for n in reversed(names)}


def nearest_names(name: str, spellings: dict[str, str], n: int = 5) -> list[str]:
    """Up to n accepted spellings closest to `name` (difflib ratio >= 0.6, case-insensitive), nearest first."""
    near = difflib.get_close_matches(str(name).strip().lower(), list(spellings), n=n, cutoff=0.6)
    return list(dict.fromkeys(spellings[k] for k in near))


def _unknown(kind: str, name: str, spellings: dict[str, str], ours: tuple[str, ...]) -> str:
    near = nearest_names(name, spellings)
    return (f"unknown {kind} {name!r}; " + (f"nearest: {', '.join(near)}; " if near else "")
            + f"ours: {', '.join(ours)}")


def unknown_sampler_message(name: str) -> str:
    return _unknown("sampler", name, sampler_spellings(), SAMPLER_NAMES) + (
        " (A1111, ComfyUI and sd.cpp spellings such as 'Euler a', 'DPM++ 2M Karras', 'dpmpp_2m_sde_gpu' and "
        "'euler_a' are accepted too)")


def unknown_schedule_message(name: str) -> str:
    return _unknown("schedule", name, schedule_spellings(), SCHEDULE_NAMES) + (
        " (A1111, ComfyUI and sd.cpp spellings such as 'SGM Uniform', 'Align Your Steps' and 'ays' are accepted too)")
