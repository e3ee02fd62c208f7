"""Load an fp16 SDXL base single file: stablexl vs diffusers `from_single_file`, time and peak RSS.

The file (random weights, official key layout, ≈ 6.9 GB) is written once by this script. Each loader
runs in a fresh subprocess that imports its library, loads the file in fp16, then touches every weight
(a checksum) so pages that a lazy loader has not read yet are counted too. Peak RSS is the process's
`ru_maxrss`. Run: `python benchmarks/load_sdxl_single_file.py [--file PATH] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _bench import run_child

OURS = r"""
import resource, sys, time, torch
t0 = time.perf_counter()
from stablexl.io.models import load_model
t1 = time.perf_counter()
parts = load_model(sys.argv[1], dtype="fp16")
t2 = time.perf_counter()
mods = parts.modules().values()
s = sum(float(p.float().sum()) for m in mods for p in m.parameters())
t3 = time.perf_counter()
print({"import_s": t1 - t0, "load_s": t2 - t1, "touch_s": t3 - t2,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "checksum": s})
"""

DIFFUSERS = r"""
import resource, sys, time, torch, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
from diffusers import StableDiffusionXLPipeline
t1 = time.perf_counter()
pipe = StableDiffusionXLPipeline.from_single_file(sys.argv[1], config=sys.argv[2], torch_dtype=torch.float16,
                                                  local_files_only=True)
t2 = time.perf_counter()
mods = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
s = sum(float(p.float().sum()) for m in mods for p in m.parameters())
t3 = time.perf_counter()
print({"import_s": t1 - t0, "load_s": t2 - t1, "touch_s": t3 - t2,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "checksum": s})
"""


def write_random_sdxl(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from stablexl.config import preset
    from stablexl.io.keymaps import foreign_shape
    from stablexl.io.models import plans_for
    from stablexl.models.parts import build_parts

    parts = build_parts(preset("sdxl-base"), device="meta")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for plan in plans_for(parts, "single-file"):
        sd = plan.module.state_dict()
        for rule in plan.rules:
            shape = foreign_shape(rule, [tuple(sd[k].shape) for k in rule.ours])
            tensors[plan.prefix + rule.theirs] = (torch.randn(shape, generator=g) * 0.02).half()
    save_file(tensors, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=os.path.join(tempfile.gettempdir(), "stablexl_bench_sdxl_fp16.safetensors"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.file)
    if not path.exists():
        t = time.perf_counter()
        write_random_sdxl(path)
        print(f"wrote {path} in {time.perf_counter() - t:.0f}s")
    size_mb = path.stat().st_size / 2**20

    from stablexl.config import preset
    from stablexl.io.models import write_diffusers_configs

    cfg_dir = Path(tempfile.mkdtemp(prefix="sdxl_cfg_"))
    write_diffusers_configs(preset("sdxl-base"), cfg_dir)

    results: dict[str, list[dict]] = {"stablexl": [], "diffusers": []}
    for _ in range(args.repeats):  # interleaved, so both see the same page-cache state
        results["stablexl"].append(run_child(OURS, str(path)))
        results["diffusers"].append(run_child(DIFFUSERS, str(path), str(cfg_dir)))

    print(f"file: {path} ({size_mb:.0f} MB fp16, SDXL base with both text encoders and the VAE)")
    print(f"{'loader':10s} {'load s (median)':>16s} {'load+touch s':>13s} {'peak RSS MB':>12s} {'RSS / file':>11s}")
    summary = {}
    for name, runs in results.items():
        load = statistics.median(r["load_s"] for r in runs)
        total = statistics.median(r["load_s"] + r["touch_s"] for r in runs)
        rss = max(r["peak_rss_mb"] for r in runs)
        summary[name] = {"load_s": load, "load_touch_s": total, "peak_rss_mb": rss}
        print(f"{name:10s} {load:16.2f} {total:13.2f} {rss:12.0f} {rss / size_mb:11.2f}")
    o, d = summary["stablexl"], summary["diffusers"]
    print(f"ratios ours/diffusers: load time {o['load_s'] / d['load_s']:.2f}, load+touch {o['load_touch_s'] / d['load_touch_s']:.2f}, "
          f"peak RSS {o['peak_rss_mb'] / d['peak_rss_mb']:.2f}")
    print(f"target: peak RSS <= 1.3 x file size -> ours {o['peak_rss_mb'] / size_mb:.2f} x")
    assert abs(results["stablexl"][0]["checksum"] - results["diffusers"][0]["checksum"]) <= 1e-3 * abs(results["diffusers"][0]["checksum"]) + 1, \
        "the two loaders disagree on the weights"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
