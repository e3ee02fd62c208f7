"""`stablexl info IMAGE [--json]`: the generation settings stored in an image, as text or JSON.

Reads our PNGs, A1111's (PNG `parameters`, JPEG/WebP EXIF UserComment), sd.cpp's and ComfyUI's
(`prompt` graph); see `stablexl.io.metadata.read_png_settings`. Light: no torch import.
"""

from __future__ import annotations

import json

from .io.metadata import MetadataError, read_png_settings

# normalised fields in listing order; prompt first
_ORDER = ("prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg", "seed", "width", "height",
          "model", "model_hash", "clip_skip", "guidance_rescale", "source")


def _show(v) -> str:
    """One line per value: empty text, or text with newlines or leading/trailing blanks, is JSON-quoted;
    lists and dicts are JSON."""
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if (not v or "\n" in v or "\r" in v or v != v.strip()) else v
    if isinstance(v, float) and v.is_integer():
        return str(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def format_settings(settings: dict) -> str:
    """Human-readable listing: one `key: value` per line, prompt first, then the source's other keys."""
    lines = []
    for k in _ORDER:
        v = settings.get(k)
        if v is None or (k == "negative_prompt" and v == ""):
            continue
        if k == "guidance_rescale" and not v:
            continue
        lines.append(f"{k}: {_show(v)}")
    for k, v in settings.get("extra", {}).items():
        lines.append(f"{k}: {_show(v)}")
    for k, v in settings.get("defaults", {}).items():
        lines.append(f"{k}: {_show(v)} (A1111 default, not in the file)")
    img = settings.get("image")
    if img:
        lines.append(f"image: {img.get('format')} {img.get('width')}x{img.get('height')}")
    return "\n".join(lines)


def main_info(path: str, as_json: bool = False) -> str:
    """Text to print for `stablexl info PATH [--json]`.

    Raises ValueError (MetadataError) with a one-line message for a missing file, a file that is not an
    image or is truncated/corrupt, and an image without generation metadata.
    """
    settings = read_png_settings(path)
    if as_json:
        return json.dumps({"file": str(path), **settings}, indent=2, ensure_ascii=False)
    return format_settings(settings)


__all__ = ["MetadataError", "format_settings", "main_info"]
