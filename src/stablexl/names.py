"""The names users type: our sampler and schedule names and their A1111 display names (one table).

Torch-free, so metadata reading (`stablexl info`) stays light. Facts: reference/peers.md §1c.
"""

from __future__ import annotations

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
SCHEDULE_NAMES = ("leading", "trailing", "linspace", "karras", "exponential")

# our sampler / schedule names -> A1111 display names
A1111_SAMPLER = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                 "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddpm": "DDPM", "lcm": "LCM"}
A1111_SCHEDULE = {"karras": "Karras", "exponential": "Exponential", "leading": "Automatic",
                  "trailing": "SGM Uniform", "linspace": "Uniform"}


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """Our name, or an A1111 display name (any case, optionally with a " Karras" / " Exponential" suffix as
    in "DPM++ 2M Karras") -> (our sampler, schedule implied by the name or None)."""
    key = name.strip()
    if key in SAMPLER_NAMES:
        return key, None
    display = {v.lower(): k for k, v in A1111_SAMPLER.items()}
    low = key.lower()
    if low in display:
        return display[low], None
    for schedule in ("karras", "exponential"):
        base = low.removesuffix(" " + schedule)
        if base != low and base in display:
            return display[base], schedule
    raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)} "
                     f"(A1111 names such as 'Euler a' and 'DPM++ 2M Karras' are accepted too)")
