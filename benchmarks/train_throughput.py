"""Training throughput of the miniature base UNet on this CPU: our trainer vs a plain diffusers loop.

- ours: `stablexl.train.loop.train` with the UNet task (the `mini` architecture, random init) on a
  made-up dataset of 64x64 images with cached latents and text embeddings, i.e. everything a real run
  does per step: batch assembly, posterior sampling, noise/timesteps/dropout, micro-conditioning, UNet
  forward+backward, gradient clipping, AdamW, EMA.
- diffusers: `UNet2DConditionModel` built from the same configuration (our config translated to diffusers'),
  a plain loop on random tensors of the same shapes: forward, MSE, backward, clipping, AdamW. No data,
  no EMA: the cheapest loop diffusers' model allows.
  Its AdamW is PyTorch's default (a Python loop over parameters on CPU); `--reference-adam fused` gives it
  the one-kernel AdamW our trainer uses, to show how much of the difference is the optimizer.
Each runs in a fresh process with the same thread count; the order alternates between rounds (ours first in
odd rounds, diffusers first in even ones). Reported: images/s from the median seconds per step after warm-up,
and the median [min-max] of the per-round ratios ours/diffusers.

Run: `python benchmarks/train_throughput.py [--batch 32] [--steps 12] [--threads 2] [--rounds 2]
      [--reference-adam default|fused]`
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _bench import run_child

OURS = r"""
import json, shutil, sys, tempfile, time, torch
from pathlib import Path
import numpy as np
from PIL import Image
torch.set_num_threads(int(sys.argv[3])); torch.set_flush_denormal(True)
from stablexl.config import PRESETS
from stablexl.models.parts import build_parts
from stablexl.train.data import TrainData, make_buckets, scan_dataset
from stablexl.train.loop import TrainConfig, train
from stablexl.train.unet import UNetTask, UNetTrainOptions
batch, steps = int(sys.argv[1]), int(sys.argv[2])
root = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
(root / "images").mkdir()
lines = []
for i in range(4 * batch):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"images/{i}.png")
    lines.append(json.dumps({"file": f"images/{i}.png", "caption": f"emoji number {i % 50}"}))
(root / "metadata.jsonl").write_text("\n".join(lines))
torch.manual_seed(0)
parts = build_parts(PRESETS["mini"], device="cpu")
data = TrainData(scan_dataset(root).records, make_buckets(64, 8, 2.5), batch, seed=0)
task = UNetTask(parts, data, UNetTrainOptions(cache_latents=True))
marks = []
cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-4, ema_decay=0.999, checkpoint_every=10**9, log_every=10**9)
train(task, cfg, root / "run", progress=False, on_step=lambda s, logs: marks.append(time.perf_counter()),
      stop_after=steps)
dts = [b - a for a, b in zip(marks, marks[1:])][4:]  # the first steps also fill the latent cache
shutil.rmtree(root)
import statistics
print({"step_s": statistics.median(dts), "n": len(dts)})
"""

DIFFUSERS = r"""
import sys, time, torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[3])); torch.set_flush_denormal(True)
from diffusers import UNet2DConditionModel
from stablexl.config import PRESETS
from stablexl.io.diffusers_format import unet_to_diffusers
batch, steps = int(sys.argv[1]), int(sys.argv[2])
cfg = PRESETS["mini"].unet
d = {k: v for k, v in unet_to_diffusers(cfg, "sdxl-base", 8).items() if not k.startswith("_")}
torch.manual_seed(0)
unet = UNet2DConditionModel(**d).train()
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=sys.argv[4] == "fused" or None)
x, ctx = torch.randn(batch, 4, 8, 8), torch.randn(batch, 77, cfg.context_dim)
pooled, ids = torch.randn(batch, cfg.vector_dim - 6 * 256), torch.full((batch, 6), 64.0)
marks = []
for i in range(steps):
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x)
    out = unet(x + noise, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    loss = (out - noise).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
import statistics
dts = [b - a for a, b in zip(marks, marks[1:])][4:]
print({"step_s": statistics.median(dts), "n": len(dts)})
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reference-adam", choices=("default", "fused"), default="default")
    a = ap.parse_args()
    res: dict[str, list[float]] = {"ours": [], "diffusers": []}
    codes = {"ours": OURS, "diffusers": DIFFUSERS}
    for r in range(a.rounds):
        for name in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
            out = run_child(codes[name], str(a.batch), str(a.steps), str(a.threads), a.reference_adam)
            res[name].append(out["step_s"])
            print(f"round {r + 1} {name:9s}: {out['step_s']:.3f} s/step ({a.batch / out['step_s']:.1f} images/s)", flush=True)
    ours, ref = statistics.median(res["ours"]), statistics.median(res["diffusers"])
    ratios = [d / o for o, d in zip(res["ours"], res["diffusers"])]
    print(f"\nmini base UNet, batch {a.batch}, {a.threads} threads, reference AdamW {a.reference_adam}: "
          f"ours {a.batch / ours:.1f} images/s, diffusers {a.batch / ref:.1f} images/s; "
          f"ours/diffusers per round: median {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}] (target >= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
