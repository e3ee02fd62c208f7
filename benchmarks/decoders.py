"""Decode time of the full-size SDXL VAE decoder vs TAESDXL (the tiny decoder), in one run.

Both with random weights from the official configurations (config.SDXL_VAE, config.TAESDXL), fp32, batch 1,
`torch.no_grad`, in this process, alternating the two decoders per size. Each size first runs a small
warm-up decode of both, then `--repeats` timed decodes of each; reported: the median seconds and the
VAE / tiny ratio measured in this run. Work per decode: reference/performance.md §1 (10.47 vs 0.57 TFLOP at
1024²).

Run: `python benchmarks/decoders.py --sizes 512 1024` (about 1.5 min of VAE decode at 1024² on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in pixels")
    p.add_argument("--repeats", type=int, default=1, help="timed decodes per decoder and size (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)

    from stablexl.config import SDXL_VAE, TAESDXL
    from stablexl.models.taesd import AutoencoderTiny
    from stablexl.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(SDXL_VAE).eval()
    tiny = AutoencoderTiny(TAESDXL, encoder=False).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; VAE decoder "
          f"{sum(q.numel() for q in vae.decoder.parameters()) / 1e6:.1f} M params, TAESDXL decoder "
          f"{sum(q.numel() for q in tiny.decoder.parameters()) / 1e6:.2f} M")
    rows = []
    with torch.no_grad():
        warm = torch.randn(1, 4, 16, 16)
        vae.decode(warm), tiny.decode(warm)
        for size in a.sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size))
            t_vae = _time(lambda: vae.decode(z / SDXL_VAE.scaling_factor), a.repeats)
            t_tiny = _time(lambda: tiny.decode(z), a.repeats)
            rows.append((size, t_vae, t_tiny))
            print(f"{size}x{size}: VAE {t_vae:.2f} s, TAESDXL {t_tiny:.3f} s, ratio {t_vae / t_tiny:.1f}x", flush=True)
    print({"sizes": [r[0] for r in rows], "vae_s": [round(r[1], 3) for r in rows],
           "tiny_s": [round(r[2], 4) for r in rows], "ratio": [round(r[1] / r[2], 2) for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
