"""Loss curves from a run's log.jsonl as a PNG, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def plot_series(series: dict[str, list[tuple[float, float]]], out: str | Path, *, title: str = "",
                xlabel: str = "step", log_y: bool = False, size: tuple[int, int] = (720, 400)) -> None:
    W, H = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
    if not pts:
        d.text((W // 2 - 40, H // 2), "no data", fill="black")
        img.save(out)
        return
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in pts], [fy(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        d.line([left - 4, py(yv), left, py(yv)], fill="black")
        d.text((4, py(yv) - 6), label, fill="black")
        xv = x0 + (x1 - x0) * i / 4
        d.text((px(xv) - 15, H - bottom + 6), f"{xv:.0f}", fill="black")
    d.text((W // 2 - 20, H - 20), xlabel, fill="black")
    d.text((left, 8), title, fill="black")
    for k, (name, s) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        line = [(px(x), py(fy(y))) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=c)
        d.text((W - right - 160, top + 6 + 14 * k), name, fill=c)
    img.save(out)


def plot_log(log: str | Path, out: str | Path) -> None:
    rows = read_log(log)
    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    plot_series(series, out, title=f"training loss ({Path(log).parent.name})", log_y=True)
