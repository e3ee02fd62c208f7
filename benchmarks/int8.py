"""int8 SDXL on this CPU (issue 16), in one run: ours int8 against diffusers fp32 and ours fp32, with quality.

Random weights from the official SDXL base configuration (the diffusers folder of sdxl_txt2img.py, fp32,
≈ 14 GB, written once), and from it once our int8 file (`quantize="int8"` then `save_model`: the UNet's
Linear layers int8, the rest fp32). Each measurement runs in a fresh process, so peak RSS (`ru_maxrss`) is
its own:

  speed: text-to-image at each size, `--steps` Euler steps, CFG 5 (batch 2 through the UNet), decoded:
         load seconds, s/step (median of the step callbacks' intervals), total seconds (generation), peak RSS;
         ratios ours-int8 / diffusers and ours-int8 / ours-fp32 (targets: s/step <= 1/1.5 of diffusers'
         at 512² and 1024², peak RSS <= 0.5x diffusers').
  quality (reference/performance.md §4): relative error ||int8 - fp32|| / ||fp32|| of one UNet call (512²
         latents, CFG batch) and of a 4-step 512² generation's final latents, same seeds.
  turbo: the SDXL-Turbo setting (same UNet architecture): 512², 1 step, no CFG, euler_ancestral + trailing,
         to PIL: ours fp32 with the full VAE ("today"), and ours int8 with a TAESDXL-shaped tiny decoder
         (random weights): median wall of 3 calls after a warm-up, split into text encoders, UNet and the
         rest (decode and overheads). Target <= 8 s.

The int8 kernel is chosen per CPU (stablexl/quant.py: `_int_mm` with VNNI/AMX, fbgemm on AVX2-only x86)
and printed. Run: `python benchmarks/int8.py` (about 30 minutes on 2 cores at 512² and 1024², 4 steps);
`--sizes 512 --steps 3` for a first reading.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import run_child  # noqa: E402
from sdxl_txt2img import DIFFUSERS, write_folder  # noqa: E402

OURS = r"""
import resource, sys, time, torch
from stablexl.pipeline import Pipeline
path, size, steps, memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
pipe = Pipeline.from_pretrained(path, device="cpu", memory=memory)
load = time.perf_counter() - t0
marks = []
t0 = time.perf_counter()
pipe("a lighthouse at dusk", "blurry", steps=steps, cfg=5.0, seed=1, width=size, height=size, sampler="euler",
     schedule="leading", callback=lambda *a: marks.append(time.perf_counter()))
total = time.perf_counter() - t0
print({"load_s": load, "step_s": [b - a for a, b in zip([t0] + marks[:-1], marks)], "total_s": total,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
"""

QUANTIZE = r"""
import sys
from stablexl.pipeline import Pipeline
from stablexl.io.models import save_model
from stablexl.quant import int8_kernel
import torch
pipe = Pipeline.from_pretrained(sys.argv[1], device="cpu", quantize="int8")
save_model(pipe.parts, sys.argv[2])
print({"kernel": int8_kernel(torch.device("cpu")), "note": pipe.parts.notes[-1]})
"""

QUALITY = r"""
import sys, torch
from stablexl.pipeline import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1], device="cpu")
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 64, 64, generator=g)
ctx = torch.randn(2, 77, 2048, generator=g)
y = torch.randn(2, 2816, generator=g)
kw = dict(steps=4, cfg=5.0, seed=1, width=512, height=512, sampler="euler", schedule="leading")
with torch.no_grad():
    ref_call = pipe.parts.unet(x, torch.tensor([500.0, 500.0]), ctx, y)
ref_gen = pipe("a lighthouse at dusk", "blurry", **kw).latents
pipe.parts.quantize("int8")
with torch.no_grad():
    q_call = pipe.parts.unet(x, torch.tensor([500.0, 500.0]), ctx, y)
q_gen = pipe("a lighthouse at dusk", "blurry", **kw).latents
rel = lambda a, b: float((a - b).norm() / b.norm())
print({"unet_call": rel(q_call, ref_call), "generation_4_steps": rel(q_gen, ref_gen)})
"""

TURBO = r"""
import statistics, sys, time, torch
from stablexl.pipeline import Pipeline
path, tiny = sys.argv[1], sys.argv[2]
tiny_kw = {} if tiny == "none" else {"tiny_decoder": tiny}
pipe = Pipeline.from_pretrained(path, device="cpu", **tiny_kw)
kw = dict(steps=1, cfg=0.0, seed=1, width=512, height=512, sampler="euler_ancestral", schedule="trailing")
if tiny != "none":
    kw["decoder"] = "tiny"
walls, unet = [], []
for i in range(4):  # one warm-up, three measured
    marks = []
    t0 = time.perf_counter()
    pipe("a cinematic photo of a fox in the snow", **kw, callback=lambda *a: marks.append(time.perf_counter()))
    if i:
        walls.append(time.perf_counter() - t0)
t0 = time.perf_counter()
for _ in range(3):
    pipe.encode_prompt(["a cinematic photo of a fox in the snow"], None, size=(512, 512))
text = (time.perf_counter() - t0) / 3
x = torch.randn(1, 4, 64, 64)
ctx, y = torch.randn(1, 77, 2048), torch.randn(1, 2816)
with torch.no_grad():
    pipe.parts.unet(x, torch.tensor([999.0]), ctx, y)
    t0 = time.perf_counter()
    for _ in range(2):
        pipe.parts.unet(x, torch.tensor([999.0]), ctx, y)
unet = (time.perf_counter() - t0) / 2
wall = statistics.median(walls)
print({"wall_s": wall, "text_s": text, "unet_s": unet, "rest_s": wall - text - unet})
"""

TINY = r"""
import sys, torch
from stablexl.config import TINY_AUTOENCODERS
from stablexl.io.tiny import save_tiny_autoencoder
from stablexl.models.taesd import AutoencoderTiny
torch.manual_seed(0)
save_tiny_autoencoder(AutoencoderTiny(TINY_AUTOENCODERS["taesdxl"]), sys.argv[1])
print({})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "stablexl_bench_sdxl_diffusers"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--memory", choices=["keep", "low"], default="low",
                    help="our memory policy (stablexl/memory.py): low = file-backed weights leave RAM after each use")
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "quality", "turbo", "diffusers"])
    args = ap.parse_args()
    root = Path(args.folder)
    if not (root / "unet" / "config.json").exists() or not list((root / "unet").glob("*.safetensors*")):
        write_folder(root)
    int8_file = root.parent / (root.name + "_int8.safetensors")
    if not int8_file.exists():
        info = run_child(QUANTIZE, str(root), str(int8_file))
    else:
        info = run_child("import torch; from stablexl.quant import int8_kernel; "
                         "print({'kernel': int8_kernel(torch.device('cpu')), 'note': 'int8 file exists'})")
    print(f"SDXL base, random weights ({root}); int8 file {int8_file} ({int8_file.stat().st_size / 2**30:.2f} GiB); "
          f"int8 kernel on this CPU: {info['kernel']}; torch threads = cores")

    if "speed" not in args.skip:
        print(f"\nspeed: Euler, CFG 5, {args.steps} steps, decoded; our memory policy {args.memory}")
        print(f"{'size':>5s} {'impl':14s} {'load s':>7s} {'s/step':>7s} {'total s':>8s} {'peak RSS MB':>12s}")
        runs = [("ours int8", OURS, str(int8_file), args.memory), ("ours fp32", OURS, str(root), args.memory)]
        if "diffusers" not in args.skip:
            runs.insert(0, ("diffusers fp32", DIFFUSERS, str(root)))
        for size in args.sizes:
            res = {}
            for name, code, path, *extra in runs:
                res[name] = r = run_child(code, path, str(size), str(args.steps), *extra)
                load = f"{r['load_s']:7.1f}" if "load_s" in r else f"{'':>7s}"
                print(f"{size:5d} {name:14s} {load} {statistics.median(r['step_s']):7.2f} {r['total_s']:8.1f} "
                      f"{r['peak_rss_mb']:12.0f}", flush=True)
            step = {k: statistics.median(v["step_s"]) for k, v in res.items()}
            for ref in [k for k in res if k != "ours int8"]:
                print(f"{size:5d} ours int8 / {ref}: s/step {step['ours int8'] / step[ref]:.2f} "
                      f"(speed-up {step[ref] / step['ours int8']:.2f}x), total "
                      f"{res['ours int8']['total_s'] / res[ref]['total_s']:.2f}, peak RSS "
                      f"{res['ours int8']['peak_rss_mb'] / res[ref]['peak_rss_mb']:.2f}"
                      + ("   (targets: speed-up >= 1.5x, RSS <= 0.5)" if ref.startswith("diffusers") else ""),
                      flush=True)

    if "quality" not in args.skip:
        q = run_child(QUALITY, str(root))
        print(f"\nquality, int8 vs fp32 (relative error): one UNet call {q['unet_call']:.3e}; "
              f"4-step 512² generation, final latents {q['generation_4_steps']:.3e}", flush=True)

    if "turbo" not in args.skip:
        tiny = root.parent / (root.name + "_taesdxl.safetensors")
        if not tiny.exists():
            run_child(TINY, str(tiny))
        print("\nturbo: 512², 1 step, no CFG, euler_ancestral trailing, to PIL (median of 3 after a warm-up)")
        for name, path, dec in (("ours fp32 + VAE", str(root), "none"), ("ours int8 + tiny", str(int8_file), str(tiny))):
            t = run_child(TURBO, path, dec)
            print(f"  {name:18s} wall {t['wall_s']:6.2f} s = text {t['text_s']:.2f} + UNet {t['unet_s']:.2f} + "
                  f"decode and rest {t['rest_s']:.2f}   (target <= 8 s)", flush=True)


if __name__ == "__main__":
    main()
