"""The names users type: our sampler and schedule names and every peer spelling of them (the one table).

A1111 display names and aliases, sd.cpp methods, ComfyUI names. Every surface (the request resolve, the
A1111 API, the infotext readers) maps names through this module and nowhere else.

Torch-free, so metadata reading (`stablexl info`) stays light. Facts: reference/peers.md §1c.
"""

from __future__ import annotations

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
SCHEDULE_NAMES = ("leading", "trailing", "linspace", "karras", "exponential")
# the samplers that take an `eta` (the amount of fresh noise per step); samplers.py checks their signatures
ETA_SAMPLERS = frozenset({"ddim", "euler_ancestral", "dpmpp_2m_sde"})

# our sampler / schedule names -> A1111 display names
A1111_SAMPLER = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                 "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddpm": "DDPM", "lcm": "LCM"}
A1111_SCHEDULE = {"karras": "Karras", "exponential": "Exponential", "leading": "Automatic",
                  "trailing": "SGM Uniform", "linspace": "Uniform"}


# A1111 display names (any case, incl. pre-1.9 names with the schedule in them) -> (sampler, schedule)
_A1111_SAMPLER_IN: dict[str, tuple[str, str | None]] = {
    **{v.lower(): (k, None) for k, v in A1111_SAMPLER.items()},
    "dpm++ 2m karras": ("dpmpp_2m", "karras"), "dpm++ 2m exponential": ("dpmpp_2m", "exponential"),
    "dpm++ 2m sde karras": ("dpmpp_2m_sde", "karras"), "dpm++ 2m sde exponential": ("dpmpp_2m_sde", "exponential"),
    # A1111's short aliases from the k-diffusion era
    "k_euler": ("euler", None), "k_euler_a": ("euler_ancestral", None), "k_euler_ancestral": ("euler_ancestral", None),
    "k_heun": ("heun", None), "k_dpmpp_2m": ("dpmpp_2m", None), "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"),
    "k_dpmpp_2m_sde": ("dpmpp_2m_sde", None), "k_dpmpp_2m_sde_ka": ("dpmpp_2m_sde", "karras"),
}
# sd.cpp `sample_method` names (peers.md §1c) -> (sampler, schedule implied by the method or None)
_SDCPP_SAMPLER: dict[str, tuple[str, str | None]] = {
    "euler": ("euler", None), "euler_a": ("euler_ancestral", None), "heun": ("heun", None),
    "dpm++2m": ("dpmpp_2m", None), "dpm++2m_sde": ("dpmpp_2m_sde", None), "lcm": ("lcm", None),
    "ddim_trailing": ("ddim", "trailing"),
}
_SDCPP_SCHEDULES = {"default", "discrete", "karras", "exponential", "ays", "gits", "sgm_uniform", "simple",
                    "smoothstep", "lcm", "kl_optimal", "bong_tangent"}
# ComfyUI sampler_name -> ours; the `_gpu` variant is the same solver with its noise drawn on the GPU
COMFY_SAMPLER = {"euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpmpp_2m": "dpmpp_2m",
                  "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde", "ddim": "ddim",
                  "ddpm": "ddpm", "lcm": "lcm"}
# schedule names of A1111 ("Schedule type"), ComfyUI (`scheduler`) and sd.cpp, lower-cased -> ours.
# "Automatic" is what our writer emits for "leading" (A1111 itself lets the sampler choose).
# uniform / normal / discrete all space t evenly from 999 to 0 (= diffusers "linspace");
# sgm_uniform and simple are diffusers' timestep_spacing="trailing" (diffusers scheduler docs).
_SCHEDULE_IN = {
    **{v.lower(): k for k, v in A1111_SCHEDULE.items()},
    "leading": "leading", "trailing": "trailing", "linspace": "linspace", "karras": "karras",
    "exponential": "exponential", "sgm_uniform": "trailing", "simple": "trailing", "normal": "linspace",
    "discrete": "linspace",
}

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
    for suffix in (" karras", " exponential"):  # "<any A1111 sampler> Karras" (pre-1.9 names)
        if key.endswith(suffix) and key[: -len(suffix)] in _A1111_SAMPLER_IN:
            return _A1111_SAMPLER_IN[key[: -len(suffix)]][0], suffix.strip(), "a1111"
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
    """A sampler name as any surface spells it (ours, A1111's display names and aliases, sd.cpp's, any case,
    with an implied schedule as in "DPM++ 2M Karras") -> (our sampler, schedule implied or None); an
    unknown name raises ValueError listing ours."""
    ours, implied, dialect = parse_sampler(name)
    if dialect == "unknown" or ours not in SAMPLER_NAMES:
        if name.strip().lower() in COMFY_SAMPLER:  # ComfyUI's sampler_name spellings
            return COMFY_SAMPLER[name.strip().lower()], None
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)} "
                         f"(A1111 names such as 'Euler a' and 'DPM++ 2M Karras' are accepted too)")
    return ours, implied
