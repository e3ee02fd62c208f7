"""Full-size SDXL base text-to-image on this CPU: stablexl vs diffusers, in one run.

Random weights from the official configurations are written once as a diffusers folder (fp32, ≈ 14 GB).
For each size, each implementation runs in a fresh process: load the folder, generate `--steps` Euler
steps with CFG 5 (batch 2 through the UNet), decode. Reported: seconds per denoising step (median of the
step callbacks' intervals), total seconds (generation, load excluded), and peak RSS (`ru_maxrss`), with
ours/diffusers ratios. With `--rounds R` each size is measured R times, the order of the two
implementations alternating between rounds (process-to-process spread on this machine is 15-25 %);
the summary line gives the median of the per-round ratios and their range.

Run: `python benchmarks/sdxl_txt2img.py --sizes 512 1024 --steps 20` (hours at 1024 px on 2 cores;
`--steps 3 --sizes 512` gives a first reading in minutes).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _bench import run_child

OURS = r"""
import resource, sys, time, torch
from stablexl.pipeline import Pipeline
root, size, steps, memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = Pipeline.from_pretrained(root, memory=memory)
marks = []
t0 = time.perf_counter()
pipe("a lighthouse at dusk", "blurry", steps=steps, cfg=5.0, seed=1, width=size, height=size, sampler="euler",
     schedule="leading", callback=lambda *a: marks.append(time.perf_counter()))
total = time.perf_counter() - t0
print({"step_s": [b - a for a, b in zip([t0] + marks[:-1], marks)], "total_s": total,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
"""

DIFFUSERS = r"""
import resource, sys, time, torch, warnings
warnings.filterwarnings("ignore")
from diffusers import StableDiffusionXLPipeline
root, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = StableDiffusionXLPipeline.from_pretrained(root)
pipe.set_progress_bar_config(disable=True)
marks = []
def on_step(p, i, t, kw):
    marks.append(time.perf_counter())
    return kw
t0 = time.perf_counter()
pipe("a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0, height=size,
     width=size, generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
total = time.perf_counter() - t0
print({"step_s": [b - a for a, b in zip([t0] + marks[:-1], marks)], "total_s": total,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
"""


def write_folder(root: Path) -> None:
    """Reference components from the official configs, one at a time, into a diffusers folder."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import refconfigs as R

    from stablexl.config import preset
    from stablexl.io.models import write_diffusers_configs

    write_diffusers_configs(preset("sdxl-base"), root)
    torch.manual_seed(0)
    for folder, build in [
        ("unet", lambda: diffusers.UNet2DConditionModel(**R.SDXL_BASE_UNET)),
        ("vae", lambda: diffusers.AutoencoderKL(**R.VAE)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**R.CLIP_L_TEXT))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**R.OPENCLIP_BIGG_TEXT))),
    ]:
        m = build()
        m.save_pretrained(root / folder)
        del m
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "stablexl_bench_sdxl_diffusers"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory", choices=["keep", "low"], default="low",
                    help="our memory policy: low = file-backed weights leave RAM after each use (stablexl/memory.py)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each size, alternating which runs first")
    ap.add_argument("--first", choices=["stablexl", "diffusers"], default="stablexl",
                    help="which runs first in round 1 (the other runs first in round 2, and so on)")
    args = ap.parse_args()
    root = Path(args.folder)
    if not (root / "unet" / "config.json").exists() or not list((root / "unet").glob("*.safetensors*")):
        write_folder(root)
    print(f"SDXL base fp32, random weights ({root}); Euler, CFG 5, {args.steps} steps; torch threads = cores; "
          f"our memory policy: {args.memory}")
    print(f"{'size':>5s} {'impl':10s} {'s/step (median)':>16s} {'total s':>9s} {'peak RSS MB':>12s}")
    children = {"stablexl": (OURS, args.memory), "diffusers": (DIFFUSERS,)}
    for size in args.sizes:
        ratios = []
        for rnd in range(args.rounds):
            first, second = (args.first, "diffusers" if args.first == "stablexl" else "stablexl")
            order = [first, second] if rnd % 2 == 0 else [second, first]
            res = {}
            for name in order:
                code, *extra = children[name]
                res[name] = r = run_child(code, str(root), str(size), str(args.steps), *extra)
                print(f"{size:5d} {name:10s} {statistics.median(r['step_s']):16.2f} {r['total_s']:9.1f} "
                      f"{r['peak_rss_mb']:12.0f}   (round {rnd + 1}, run {len(res)} of 2)", flush=True)
            o, d = res["stablexl"], res["diffusers"]
            ratios.append((statistics.median(o["step_s"]) / statistics.median(d["step_s"]), o["total_s"] / d["total_s"],
                           o["peak_rss_mb"] / d["peak_rss_mb"]))
            print(f"{size:5d} round {rnd + 1} ours/diffusers: s/step {ratios[-1][0]:.2f}, total {ratios[-1][1]:.2f}, "
                  f"peak RSS {ratios[-1][2]:.2f}", flush=True)
        summary = ", ".join(f"{label} {statistics.median(c):.2f} [{min(c):.2f}-{max(c):.2f}]"
                            for label, c in zip(("s/step", "total", "peak RSS"), zip(*ratios)))
        print(f"{size:5d} ours/diffusers over {args.rounds} round(s), median [min-max]: {summary} "
              "(targets: <= 1.0 time, <= 0.8 memory)", flush=True)


if __name__ == "__main__":
    main()
