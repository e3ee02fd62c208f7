"""A1111-style PNG `parameters` text ("infotext"), written on every image we save.

Grammar (reference/peers.md §2.3): prompt lines, an optional `Negative prompt: ` line, then one
line of comma-separated `Key: value` pairs; values containing `,` `:` or a newline are JSON-quoted.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .. import __version__

# our sampler / schedule names -> A1111 display names
A1111_SAMPLER = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                 "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddpm": "DDPM", "lcm": "LCM"}
A1111_SCHEDULE = {"karras": "Karras", "exponential": "Exponential", "leading": "Automatic",
                  "trailing": "SGM Uniform", "linspace": "Uniform"}


def _value(v) -> str:
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ",:\n") else s


def infotext(prompt: str, negative: str | None, params: dict) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def generation_infotext(settings: dict, index: int) -> str:
    """Infotext for image `index` of a GenerationResult's settings."""
    neg = settings.get("negative_prompt")
    params = {
        "Steps": settings["steps"], "Sampler": A1111_SAMPLER.get(settings["sampler"], settings["sampler"]),
        "Schedule type": A1111_SCHEDULE.get(settings["schedule"], settings["schedule"]), "CFG scale": settings["cfg"],
        "Seed": settings["seed"] + index, "Size": f"{settings['width']}x{settings['height']}",
        "Model": settings.get("model"),
        "Guidance rescale": settings.get("guidance_rescale") or None,
        "Version": f"stablexl {__version__}",
    }
    return infotext(settings["prompt"][index], neg[index] if neg else None, params)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
