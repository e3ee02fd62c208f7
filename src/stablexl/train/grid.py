"""Sample grids: images in rows with their captions underneath."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, cols: int | None = None,
               scale: int = 2, label_h: int = 14) -> Image.Image:
    n = len(images)
    cols = cols or min(n, 8)
    rows = math.ceil(n / cols)
    cw = max(im.width for im in images) * scale
    ch = max(im.height for im in images) * scale + (label_h if captions else 0)
    grid = Image.new("RGB", (cols * cw, rows * ch), "white")
    d = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        x, y = (k % cols) * cw, (k // cols) * ch
        grid.paste(im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST), (x, y))
        if captions:
            text = captions[k] if len(captions[k]) * 6 < cw else captions[k][: max(1, cw // 6 - 1)] + "…"
            d.text((x + 2, y + ch - label_h + 1), text, fill="black")
    return grid
