"""Images over HTTP: base64 in (with the checks a public endpoint needs), PNG + infotext out, and the
cheap latent -> RGB preview shown while a job runs."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, PngImagePlugin

# Pillow's own bomb guard warns at 89 Mpx and raises at twice that; we refuse far earlier (and before the
# pixels are decoded): no request needs more than this many pixels in an input image.
MAX_INPUT_PIXELS = 4096 * 4096
MAX_INPUT_BYTES = 48 * 1024 * 1024  # of base64 text
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.ASCII)


class ImageInputError(ValueError):
    """A base64 field that is not a usable image (the HTTP layer names the field)."""


def open_image(text: str) -> Image.Image:
    """Base64 (optionally a `data:image/...;base64,` URL, as webuiapi sends) -> loaded PIL image, metadata kept."""
    if not isinstance(text, str) or not text.strip():
        raise ImageInputError("expected a base64-encoded image, got an empty value")
    if len(text) > MAX_INPUT_BYTES:
        raise ImageInputError(f"image is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB of base64")
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)  # line breaks (MIME base64) are fine
    except (binascii.Error, ValueError):
        raise ImageInputError("not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - Pillow raises many types for non-images
        raise ImageInputError("base64 data is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageInputError("image is empty")
    if w * h > MAX_INPUT_PIXELS:  # checked from the header, before any pixel is decoded
        raise ImageInputError(f"image is {w}x{h}; at most {MAX_INPUT_PIXELS} pixels are accepted")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data
        raise ImageInputError(f"image data is truncated or corrupt ({type(e).__name__})") from None
    return img


def decode_image(text: str, mode: str = "RGB") -> Image.Image:
    """Base64 image -> PIL image in `mode` (RGB for pictures, L for masks)."""
    img = open_image(text)
    try:
        return img.convert(mode)
    except Exception as e:  # noqa: BLE001 - exotic modes Pillow cannot convert
        raise ImageInputError(f"cannot convert a {img.mode} image to {mode} ({type(e).__name__})") from None


def png_bytes(img: Image.Image, parameters: str | None = None) -> bytes:
    """PNG with the A1111 `parameters` text chunk (reference/peers.md §2.3), as `save_png` writes files."""
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_texts(img: Image.Image) -> dict[str, str]:
    """Text chunks of an opened image (PNG tEXt/iTXt) as str -> str."""
    return {str(k): v for k, v in img.info.items() if isinstance(v, str)}
