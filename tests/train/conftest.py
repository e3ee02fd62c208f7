"""A tiny made-up image-caption dataset: coloured shapes on white, several sizes and aspect ratios."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square")


def make_dataset(root: Path, n: int = 32, seed: int = 0, sizes=((64, 64), (48, 80), (80, 48), (32, 32))) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        h, w = sizes[i % len(sizes)]
        im = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(im)
        r = min(h, w) // 3
        cy, cx = int(rng.integers(r, h - r + 1)), int(rng.integers(r, w - r + 1))
        box = [cx - r, cy - r, cx + r, cy + r]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
        file = f"images/{i:04d}.png"
        im.save(root / file)
        entry = {"file": file, "caption": f"a {color} {shape}"}
        if (h, w) == (32, 32):
            entry["original_size"] = [16, 16]
        lines.append(json.dumps(entry))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def shapes_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "shapes")
