"""Memory admission: a job's peak memory is estimated before it runs, so that a request too large for the machine
is made to fit (smaller batches in sequence, a tiled VAE decode) or refused, never run into the kernel's OOM killer.

peak = resident (the server's RSS once every model is loaded) + UNet phase + VAE phase, each phase a
measured intercept + slope x pixels x images (benchmarks/memory_table.py: one process per measurement, peak RSS
above the loaded model). Jobs that run at the same time (several models or devices) reserve their estimate
from one budget, so together they stay under `--max-memory` too.

Only memory on the host is admitted here: for a pipeline on a GPU, its activations live in VRAM (the CUDA
allocator raises OutOfMemoryError instead of the process dying, and the VAE then retries tiled).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

from ..request import GenerationRequest
from .generation import InputError

MiB = 2**20
SAFETY = 1.25  # measurements vary ~10 % run to run (allocator, thread pools); the estimate stays above them
# A process's first generation also pays one-time costs the table's phases do not see: modules imported (and, in a
# fresh install, compiled) on first use, thread pools, allocator arenas. Measured: a fresh clone's first job
# grew 18-35 MiB more than the same job in a warm checkout, under load from other processes.
FIRST_USE = 64 * MiB

# Measured (benchmarks/memory_table.py --sizes 64 256 512 --batch 2, fp32 on the CPU, 2 threads):
# (family, unet.model_channels, vae.base_channels) -> (UNet bytes: intercept, per latent pixel per image with
# CFG; VAE decode bytes: intercept, per output pixel per image).
MEASURED: dict[tuple[str, int, int], tuple[float, float, float, float]] = {
    ("sdxl-base", 32, 32): (20829952, 8722, 5534720, 1863),  # tiny-sdxl
    ("sdxl-base", 64, 32): (19009024, 13668, 11444480, 1189),  # mini
    ("sd1", 32, 32): (24076288, 9736, 25096192, 1387),  # tiny-sd15
    ("sdxl-refiner", 32, 32): (20829781, 7635, 80415403, 965),  # tiny-refiner
    # full size, random weights, --sizes 128 256 384 --batch 1 (the slopes from 256 and 384: above 384 px the
    # estimate is a linear extrapolation; the VAE decode grew faster than linearly from 128 to 384 px)
    ("sdxl-base", 320, 128): (208824730, 91894, 3848602, 8510),  # sdxl-base
}


def meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_max_memory() -> int | None:
    """What the machine has, minus a margin for the OS and other processes (10 %, at least 1 GiB)."""
    total = meminfo_total()
    return None if total is None else total - max(total // 10, 1 << 30)


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GiB', '100000000' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult != 1 else t) * mult)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 8G or 512M") from None


def coefficients(config) -> tuple[float, float, float, float]:
    """The measured row for this architecture, or the nearest measured one of its family scaled by width."""
    key = (config.family, config.unet.model_channels, config.vae.base_channels)
    if key in MEASURED:
        return MEASURED[key]
    rows = [(k, v) for k, v in MEASURED.items() if k[0] == config.family] or list(MEASURED.items())
    (_, mc, vc), (ui, us, vi, vs) = max(rows, key=lambda kv: kv[0][1])
    ru, rv = max(1.0, config.unet.model_channels / mc), max(1.0, config.vae.base_channels / vc)
    return ui * ru, us * ru, vi * rv, vs * rv


@dataclass(frozen=True)
class Estimate:
    unet: int  # bytes above the resident model during denoising
    vae: int  # bytes above it during the decode

    @property
    def peak(self) -> int:
        # summed, not the max: measured whole generations peak above either phase alone (the text encoders'
        # buffers, and heap the first phase freed in pieces the decode cannot all reuse)
        return self.unet + self.vae + FIRST_USE


def estimate(req: GenerationRequest, config) -> Estimate:
    """Activation memory of one iteration of a resolved request (iterations run one after another)."""
    ui, us, vi, vs = coefficients(config)
    f = config.vae.downsample_factor
    images = req.batch
    pixels = req.width * req.height
    unet = ui + us * images * pixels / (f * f)
    decoded = pixels
    if req.vae_tile is not None:  # one tile (with its overlap) at a time
        side = (req.vae_tile + 2 * min(16, req.vae_tile // 4)) * f
        decoded = min(pixels, side * side)
    vae = 0.0 if req.output_type == "latent" else vi + vs * images * decoded
    return Estimate(int(unet * SAFETY), int(vae * SAFETY))


def fit(req: GenerationRequest, config, budget: int | None) -> GenerationRequest:
    """`req` if it fits `budget` bytes of activations; else the same images in smaller sequential batches, then
    also with a tiled VAE decode (seeds unchanged); else InputError 413 naming the largest size that fits."""
    if budget is None or estimate(req, config).peak <= budget:
        return req
    divisors = sorted((d for d in range(1, req.batch + 1) if req.batch % d == 0), reverse=True)
    # smaller batches first (the same images up to float rounding), then a tiled decode (an approximation)
    tiled = req
    for candidate in _tilings(req, config):
        for b in divisors:
            # a divisor keeps every image's seed: image k of iteration i is seed + i*batch + k either way
            split = candidate.replace(batch=b, iterations=req.iterations * (req.batch // b))
            if estimate(split, config).peak <= budget:
                return split
        tiled = candidate
    one = tiled.replace(batch=1)  # not even one image fits, with the smallest tiles
    side = _largest_side(tiled, config, budget)
    hint = f"the largest square size that fits is {side}x{side}" if side else "even the smallest size does not fit"
    raise InputError("width", f"a {req.width}x{req.height} image needs about {estimate(one, config).peak / MiB:.0f} "
                              f"MiB beyond the loaded models; this server allows {budget / MiB:.0f} MiB "
                              f"(--max-memory): {hint}", status=413)


def _tilings(req: GenerationRequest, config):
    """The request as asked, then with ever smaller VAE tiles (512, 256, 128 px) where tiling applies."""
    yield req
    if req.output_type == "latent" or req.vae_tile is not None:
        return
    f = config.vae.downsample_factor
    for tile in (64, 32, 16):
        if tile * f < max(req.width, req.height):
            yield req.replace(vae_tile=tile)


def _largest_side(req: GenerationRequest, config, budget: int) -> int:
    f = config.vae.downsample_factor
    best, side = 0, f
    while side <= 16384:
        if estimate(req.replace(width=side, height=side, batch=1), config).peak > budget:
            break
        best, side = side, side + f
    return best


class MemoryBudget:
    """Bytes that running jobs reserve from; a job waits until its estimate fits beside the others'."""

    def __init__(self, total: int | None):
        self.total, self.used = total, 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        if self.total is None:
            yield
            return
        nbytes = min(nbytes, self.total)  # admitted jobs fit alone; never wait forever
        with self._cond:
            while self.used + nbytes > self.total:
                self._cond.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


def activation_budget(max_memory: int | None, resident: int) -> int | None:
    """What jobs may use: --max-memory less what the loaded server holds."""
    if max_memory is None:
        return None
    return max(0, max_memory - resident)


def is_host_device(pipe) -> bool:
    dev = getattr(pipe, "device", None)
    return dev is None or getattr(dev, "type", str(dev)) == "cpu"

