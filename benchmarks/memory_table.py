"""Measure the activation memory of generation per model family: the table behind the server's memory admission.

Each measurement runs in a fresh process: load the model, note the resident set (VmRSS), reset the peak
(`/proc/self/clear_refs` 5), run one phase, and read the peak (VmHWM):
  unet  one sampler step with CFG (2 images per image asked) to latents: bytes per latent pixel per image
  vae   one VAE decode: bytes per output pixel per image
Fits intercept + slope per phase (the slope through the two largest sizes, the intercept raised until the line
bounds every point) and prints the line for src/stablexl/serve/admission.py's table.

    python benchmarks/memory_table.py --model tiny-sdxl --model mini
    python benchmarks/memory_table.py --model sdxl-base --sizes 256 384     # random weights, ~10 GB RAM
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from stablexl.config import PRESETS
from stablexl.models.parts import build_parts
from stablexl.models.vae import decode_latents
from stablexl.pipeline import Pipeline

name, phase, size, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

if name in PRESETS and not name.startswith("tiny-") and name != "mini":
    torch.manual_seed(0)
    with torch.no_grad():
        pipe = Pipeline(build_parts(PRESETS[name], device="cpu").eval(), device="cpu")
else:
    pipe = Pipeline.from_pretrained(name, device="cpu", dtype="fp32")
f = pipe.config.vae.downsample_factor
lat = torch.randn(batch, pipe.config.unet.out_channels, size // f, size // f)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
with torch.no_grad():
    if phase == "unet":
        pipe("a red apple", steps=1, cfg=5.0, seed=1, width=size, height=size, batch=batch, output_type="latent")
    else:
        decode_latents(pipe.parts.vae, lat)
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def measure(name: str, phase: str, size: int, batch: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, name, phase, str(size), str(batch)], capture_output=True,
                         text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak"] - r["base"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    from stablexl.config import PRESETS
    from stablexl.pipeline import Pipeline

    for name in a.model:
        cfg = PRESETS[name] if name in PRESETS else Pipeline.from_pretrained(name).config
        f = cfg.vae.downsample_factor
        entry = []
        for phase in ("unet", "vae"):
            points = []
            for size in a.sizes:
                grew = measure(name, phase, size, a.batch)
                pixels = a.batch * ((size // f) ** 2 if phase == "unet" else size * size)
                points.append((pixels, grew))
                print(f"{name} {phase} {size}^2 batch {a.batch}: +{grew / 2**20:.1f} MiB", flush=True)
            # a line through the two largest sizes; the intercept raised until the line bounds every point
            (p0, g0), (p1, g1) = points[-2], points[-1]
            slope = max(0.0, (g1 - g0) / (p1 - p0))
            intercept = max(g - slope * p for p, g in points)
            entry += [intercept, slope]
            print(f"  {phase}: {intercept / 2**20:.1f} MiB + {slope:.0f} B per {'latent ' if phase == 'unet' else ''}"
                  "pixel per image", flush=True)
        key = (cfg.family, cfg.unet.model_channels, cfg.vae.base_channels)
        print(f"    {key!r}: ({entry[0]:.0f}, {entry[1]:.0f}, {entry[2]:.0f}, {entry[3]:.0f}),  # {name}")


if __name__ == "__main__":
    main()
