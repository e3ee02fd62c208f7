"""SDXL base on one GPU, stablexl against diffusers, in one run (planned to fit 8 minutes on an H100/H200), one table.

Random weights from the official SDXL base configuration are built once (seed 0) and written as a diffusers
folder in fp16; ours (`Pipeline.from_pretrained(folder, ...)`) and diffusers
(`StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16)`) both load that folder.

  (a) accuracy: one UNet call and a 4-step 512^2 generation (Euler, CFG 5) in fp16 on the GPU, against ours
      in fp32 on the CPU: ||a - b|| / ||b|| of the outputs / final latents. The diffusers column is diffusers
      fp16 on the GPU against the same fp32 CPU reference (what fp16 costs there, for scale).
  (b) speed and memory at 1024^2, 30 Euler steps, CFG 5, decoded to pixels: s/step (median of the intervals
      between step callbacks, each after torch.cuda.synchronize), total seconds (call to PIL images) and
      peak VRAM (torch.cuda.max_memory_allocated, reset before each measured run), for ours eager, ours with
      compile=True (its first call, the compile warm-up, is reported on its own row) and diffusers eager (SDPA
      attention). Every implementation gets one short warm-up call before its measured run.
  (c) the SDXL-Turbo configuration: 512^2, 1 step, batch 1, cfg 0, euler_ancestral with the trailing schedule,
      text to PIL pixels: median latency of several calls after warm-up.
  (d) (b) with ours offload="model" (weights in CPU RAM, each component on the GPU only while it runs);
      the diffusers column is diffusers' enable_model_cpu_offload().
Ratios are ours/diffusers; targets are printed beside them.

GPU run, from the repository root (the code runs uninstalled; the GPU machine's own torch and transformers
serve, and diffusers 0.42.1 travels as a wheel). Here, once:
    pip download diffusers==0.42.1 --no-deps -d .whl && echo /.whl/ >> .git/info/exclude
then on the device (the `run` tool with carry [".whl"], timeout ~480 s; planned to take about 6 minutes):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=src:/tmp/site python3 benchmarks/gpu.py --deadline-s 450 --json $OUT/gpu_bench.json
CPU smoke run (tests/test_gpu_benchmark.py): tiny preset, 64^2, a few steps, exceptions propagate:
    python benchmarks/gpu.py --device cpu --tiny --strict --no-compile --out DIR
Without --strict each measurement catches its own exception and prints 'failed: <Type: message>' in its cells.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PROMPT = "a lighthouse at dusk"
NEGATIVE = "blurry"
MARKER = "stablexl_gpu_bench.json"  # written into the weights folder: which preset and seed it holds

# sizes per mode: (a) resolution and steps, (b)/(d) resolution and steps, warm-up steps, (c) resolution,
# (c) warm-up calls and timed calls
FULL = dict(preset="sdxl-base", a_size=512, a_steps=4, b_size=1024, b_steps=30, warm_steps=3, c_size=512,
            c_warm=3, c_runs=10)
TINY = dict(preset="tiny-sdxl", a_size=64, a_steps=3, b_size=64, b_steps=3, warm_steps=2, c_size=64,
            c_warm=1, c_runs=3)

# every cell of the table: section.measure[.detail].side
ALL_CELLS = [f"{k}.{side}" for k in ("a.unet", "a.gen", "b.eager.step", "b.eager.total", "b.eager.vram", "c.turbo",
                                     "d.step", "d.total", "d.vram") for side in ("ours", "diff")] + \
    [f"b.comp.{k}.ours" for k in ("step", "total", "vram", "warmup")]

UNMEASURED = "unmeasured"
NA = "n/a"
SKIPPED = "skipped"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius, in float64)."""
    if got.shape != want.shape:
        raise ValueError(f"shape mismatch: {tuple(got.shape)} vs {tuple(want.shape)}")
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm())


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.S = TINY if args.tiny else FULL
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.cells: dict[str, float | str] = {}
        self.store: dict[str, object] = {}  # tensors / images kept between sections
        self.details: dict[str, object] = {}  # everything else worth keeping (JSON only)
        self.failures: list[str] = []
        self.folder: Path | None = None
        self.diffusers = None
        self.expired = False  # --deadline-s passed

    # ---------------------------------------------------------------------------------------- plumbing

    def guard(self, cells: list[str], what: str, fn):
        """Run fn(); on an exception, every cell of `cells` not yet filled says 'failed: <Type: message>'.
        Under --strict the exception propagates. Past --deadline-s nothing more runs."""
        if self.expired:
            self.skipped(cells, "skipped (deadline)")
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one measurement must not lose the table
            if self.args.strict:
                raise
            text = f"failed: {type(e).__name__}: {e}"
            self.failures.append(f"{what}: {text}\n{traceback.format_exc()}")
            log(f"{what} {text}")
            for c in cells:
                self.cells.setdefault(c, text)
            return None
        finally:
            self.free()
            self.write_json()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> float | str:
        if not self.cuda:
            return NA
        self.sync()
        return torch.cuda.max_memory_allocated(self.dev) / 2**30

    def put(self, key: str, value) -> None:
        self.cells[key] = value

    def skipped(self, cells: list[str], why: str = SKIPPED) -> None:
        for c in cells:
            self.cells.setdefault(c, why)

    # ---------------------------------------------------------------------------------------- weights

    def build_weights(self) -> bool:
        """Random weights of the preset (seed 0) as a diffusers folder in fp16; reused if already there."""
        from stablexl.config import PRESETS
        from stablexl.io.models import save_model
        from stablexl.models.parts import build_parts

        a = self.args
        self.folder = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="stablexl_gpu_bench_"))
        # full size: initialise on the GPU (seconds instead of a minute of CPU), then write from CPU memory
        build_dev = "cuda" if self.cuda and not a.tiny else "cpu"
        want = {"preset": self.S["preset"], "seed": 0, "dtype": "fp16", "built_on": build_dev}
        marker = self.folder / MARKER
        if marker.exists() and json.loads(marker.read_text()) == want and \
                (self.folder / "unet" / "diffusion_pytorch_model.safetensors").exists():
            log(f"weights: reusing {self.folder} ({want})")
            return True
        t = time.perf_counter()
        torch.manual_seed(0)
        parts = build_parts(PRESETS[self.S["preset"]], device=build_dev)
        if build_dev != "cpu":
            parts.to(device="cpu", dtype=torch.float16)
        self.free()
        save_model(parts, self.folder, "diffusers", dtype="fp16")
        del parts
        self.free()
        marker.write_text(json.dumps(want))
        self.details["weights_build_s"] = time.perf_counter() - t
        log(f"weights: {want['preset']} random (seed 0) written as a diffusers folder to {self.folder} "
            f"in {time.perf_counter() - t:.1f} s")
        return True

    # ---------------------------------------------------------------------------------------- ours

    def load_ours(self, what: str, **kw):
        from stablexl.pipeline import Pipeline

        t = time.perf_counter()
        kw = {"device": self.args.device, "dtype": self.args.dtype, **kw}
        pipe = Pipeline.from_pretrained(self.folder, **kw)
        self.details[f"load_s.{what}"] = time.perf_counter() - t
        log(f"ours {what}: loaded in {time.perf_counter() - t:.1f} s ({kw}); device {pipe.device}, dtype {pipe.dtype}")
        return pipe

    def unet_inputs(self) -> dict[str, torch.Tensor]:
        """Fixed random UNet inputs at the (a) size (CPU, fp32), for ours and diffusers alike."""
        if "unet_inputs" in self.store:
            return self.store["unet_inputs"]
        from stablexl.config import PRESETS
        from stablexl.models.conditioning import sdxl_vector

        cfg = PRESETS[self.S["preset"]]
        u, n = cfg.unet, self.S["a_size"]
        h = n // cfg.vae.downsample_factor
        g = torch.Generator("cpu").manual_seed(123)
        pooled = torch.randn(1, u.vector_dim - 6 * 256, generator=g)
        inputs = {
            "x": torch.randn(1, u.in_channels, h, h, generator=g),
            "t": torch.tensor([500.0]),
            "context": torch.randn(1, 77, u.context_dim, generator=g),
            "pooled": pooled,
            "time_ids": torch.tensor([[n, n, 0, 0, n, n]], dtype=torch.float32),
            "y": sdxl_vector(pooled, (n, n), (0, 0), (n, n)),
        }
        self.store["unet_inputs"] = inputs
        return inputs

    @torch.no_grad()
    def ours_unet_call(self, pipe) -> torch.Tensor:
        inp = self.unet_inputs()
        unet, dev, dt = pipe.parts.unet, pipe.device, pipe.dtype
        out = unet(inp["x"].to(dev, dt), inp["t"].to(dev), inp["context"].to(dev, dt), inp["y"].to(dev, dt))
        self.sync()
        return out.float().cpu()

    def ours_generate(self, pipe, steps: int, size: int, output_type: str = "pil"):
        """One CFG-5 Euler generation; returns (result, seconds per step list, total seconds, peak GiB)."""
        marks: list[float] = []

        def on_step(i, n, x, x0):
            self.sync()
            marks.append(time.perf_counter())

        self.reset_peak()
        self.sync()
        t0 = time.perf_counter()
        res = pipe(PROMPT, NEGATIVE, steps=steps, cfg=5.0, seed=1, width=size, height=size, sampler="euler",
                   schedule="leading", output_type=output_type, callback=on_step)
        self.sync()
        total = time.perf_counter() - t0
        if len(marks) != steps:
            raise RuntimeError(f"callback ran {len(marks)} times for {steps} steps")
        if not torch.isfinite(res.latents).all():
            raise FloatingPointError("non-finite latents")
        notes = self.details.setdefault("ours.notes", [])
        notes += [n for n in res.notes if n not in notes]  # e.g. a VAE decode redone in fp32
        return res, [b - a for a, b in zip(marks, marks[1:])], total, self.peak_gib()

    def ours_turbo(self, pipe):
        s = self.S

        def call():
            self.sync()
            t = time.perf_counter()
            res = pipe(PROMPT, steps=1, cfg=0.0, seed=1, width=s["c_size"], height=s["c_size"],
                       sampler="euler_ancestral", schedule="trailing", output_type="pil")
            self.sync()
            return time.perf_counter() - t, res

        for _ in range(s["c_warm"]):
            call()
        runs = [call() for _ in range(s["c_runs"])]
        self.store["turbo_image.ours"] = runs[-1][1].images[0]
        return [r[0] for r in runs]

    def record_generation(self, prefix: str, side: str, step_s: list[float], total: float, peak) -> None:
        """Cells `{prefix}.step|total|vram.{side}` from one measured generation."""
        self.put(f"{prefix}.step.{side}", statistics.median(step_s))
        self.put(f"{prefix}.total.{side}", total)
        self.put(f"{prefix}.vram.{side}", peak)
        self.details[f"{prefix}.{side}.step_s"] = step_s
        if max(step_s) > 3 * statistics.median(step_s):
            self.details[f"{prefix}.{side}.note"] = (f"slowest step {max(step_s):.3f} s > 3x the median "
                                                     "(a recompile or a transfer inside the loop?)")
        peak_text = f"{peak:.2f} GiB" if isinstance(peak, float) else peak
        log(f"{prefix} {side}: {statistics.median(step_s):.4f} s/step, {total:.2f} s total, peak VRAM {peak_text}")

    def section_ours_eager(self) -> None:
        """(a) device half, (b) ours eager, (c) ours: one pipeline."""
        s, a = self.S, self.args
        a_cells = ["a.unet.ours", "a.gen.ours"]
        b_cells = ["b.eager.step.ours", "b.eager.total.ours", "b.eager.vram.ours"]
        c_cells = ["c.turbo.ours"]
        want = (a_cells if "a" in a.sections else []) + (b_cells if "b" in a.sections else []) + \
            (c_cells if "c" in a.sections else [])
        if not want:
            return
        pipe = self.guard(want, "ours eager: load", lambda: self.load_ours("eager"))
        if pipe is None:
            return
        self.details["ours.dtype"] = str(pipe.dtype)
        if "a" in a.sections:
            def run_a():
                self.store["a.unet.ours"] = self.ours_unet_call(pipe)
                res, *_ = self.ours_generate(pipe, s["a_steps"], s["a_size"], output_type="latent")
                self.store["a.gen.ours"] = res.latents.float().cpu()
                log("ours eager: (a) UNet call and generation done")
            self.guard(a_cells, "(a) ours on device", run_a)
        if "b" in a.sections:
            def run_b():
                self.ours_generate(pipe, s["warm_steps"], s["b_size"])  # warm-up
                _, step_s, total, peak = self.ours_generate(pipe, s["b_steps"], s["b_size"])
                self.record_generation("b.eager", "ours", step_s, total, peak)
            self.guard(b_cells, "(b) ours eager", run_b)
        if "c" in a.sections:
            def run_c():
                times = self.ours_turbo(pipe)
                self.put("c.turbo.ours", 1000 * statistics.median(times))
                self.details["c.turbo.ours.ms"] = [1000 * t for t in times]
                log(f"ours eager: (c) turbo median {1000 * statistics.median(times):.1f} ms")
            self.guard(c_cells, "(c) ours", run_c)
        del pipe

    def section_ours_offload(self) -> None:
        s = self.S
        cells = ["d.step.ours", "d.total.ours", "d.vram.ours"]
        if "d" not in self.args.sections:
            return

        def run():
            pipe = self.load_ours("offload=model", offload="model")
            self.ours_generate(pipe, s["warm_steps"], s["b_size"])
            _, step_s, total, peak = self.ours_generate(pipe, s["b_steps"], s["b_size"])
            self.record_generation("d", "ours", step_s, total, peak)

        self.guard(cells, "(d) ours offload=model", run)

    def section_ours_compiled(self) -> None:
        s = self.S
        cells = ["b.comp.step.ours", "b.comp.total.ours", "b.comp.vram.ours", "b.comp.warmup.ours"]
        if "b" not in self.args.sections:
            return
        if self.args.no_compile:
            self.skipped(cells, "skipped (--no-compile)")
            return

        def run():
            pipe = self.load_ours("compile=True", compile=True)
            _, _, warm, _ = self.ours_generate(pipe, s["warm_steps"], s["b_size"])
            self.put("b.comp.warmup.ours", warm)
            log(f"ours compile=True: warm-up call ({s['warm_steps']} steps) {warm:.1f} s")
            # a second short call: anything compiled lazily or recompiled on a second call lands here, not in
            # the measured run (once seen on the CPU with a cold inductor cache: +1.5 s in the next call)
            _, _, again, _ = self.ours_generate(pipe, s["warm_steps"], s["b_size"])
            self.details["b.comp.second_call_s"] = again
            _, step_s, total, peak = self.ours_generate(pipe, s["b_steps"], s["b_size"])
            self.record_generation("b.comp", "ours", step_s, total, peak)

        self.guard(cells, "(b) ours compile=True", run)

    def section_reference(self) -> None:
        """(a) reference: ours in fp32 on the CPU; then every relative error."""
        if "a" not in self.args.sections:
            return
        s = self.S
        cells = ["a.unet.ours", "a.gen.ours", "a.unet.diff", "a.gen.diff"]
        if not any(k in self.store for k in ("a.unet.ours", "a.gen.ours", "a.unet.diff", "a.gen.diff")):
            return  # nothing to compare: the device halves failed, their cells say why

        def run():
            from stablexl.pipeline import Pipeline

            t = time.perf_counter()
            ref = Pipeline.from_pretrained(self.folder, device="cpu", dtype="fp32")
            log(f"reference: ours fp32 on CPU loaded in {time.perf_counter() - t:.1f} s")
            t = time.perf_counter()
            want_unet = self.ours_unet_call(ref)
            want_gen = ref(PROMPT, NEGATIVE, steps=s["a_steps"], cfg=5.0, seed=1, width=s["a_size"],
                           height=s["a_size"], sampler="euler", schedule="leading", output_type="latent")
            want_gen = want_gen.latents.float()
            self.details["reference_cpu_s"] = time.perf_counter() - t
            log(f"reference: UNet call + {s['a_steps']}-step generation on CPU in {time.perf_counter() - t:.1f} s")
            del ref
            for key, want in (("a.unet", want_unet), ("a.gen", want_gen)):
                for side in ("ours", "diff"):
                    got = self.store.get(f"{key}.{side}")
                    if got is not None:
                        self.put(f"{key}.{side}", rel_err(got, want))

        self.guard(cells, "(a) fp32 CPU reference", run)

    # ---------------------------------------------------------------------------------------- diffusers

    def import_diffusers(self) -> bool:
        if self.args.skip_diffusers:
            self.details["diffusers"] = "skipped (--skip-diffusers)"
            return False
        # their loading progress bars and per-call warnings (fp16 on CPU, VAE upcasting) would bury the table
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import diffusers

            diffusers.utils.logging.set_verbosity_error()
            diffusers.utils.logging.disable_progress_bar()
        except Exception as e:  # noqa: BLE001
            if self.args.strict:
                raise
            self.details["diffusers"] = f"not importable: {type(e).__name__}: {e}"
            log(f"diffusers {self.details['diffusers']}: its cells stay '{UNMEASURED}'")
            return False
        self.diffusers = diffusers
        self.details["diffusers"] = diffusers.__version__
        self.details["diffusers.path"] = os.path.dirname(diffusers.__file__)
        return True

    def diffusers_generate(self, dp, steps: int, size: int, output_type: str = "pil"):
        marks: list[float] = []

        def on_step(p, i, t, kw):
            self.sync()
            marks.append(time.perf_counter())
            return kw

        self.reset_peak()
        self.sync()
        t0 = time.perf_counter()
        out = dp(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0, height=size,
                 width=size, generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=on_step,
                 output_type=output_type)
        self.sync()
        total = time.perf_counter() - t0
        return out, [b - a for a, b in zip(marks, marks[1:])], total, self.peak_gib()

    def section_diffusers(self) -> None:
        """(a) diffusers on device, (b) diffusers eager, (c) diffusers Turbo, (d) diffusers model offload."""
        a, s = self.args, self.S
        all_cells = {"a": ["a.unet.diff", "a.gen.diff"],
                     "b": ["b.eager.step.diff", "b.eager.total.diff", "b.eager.vram.diff"],
                     "c": ["c.turbo.diff"], "d": ["d.step.diff", "d.total.diff", "d.vram.diff"]}
        want = [c for k, v in all_cells.items() if k in a.sections for c in v]
        if not want or not self.import_diffusers():
            return
        D = self.diffusers

        def load():
            import warnings

            warnings.filterwarnings("ignore")
            t = time.perf_counter()
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
            dp = D.StableDiffusionXLPipeline.from_pretrained(self.folder, torch_dtype=dtype)
            dp.set_progress_bar_config(disable=True)
            dp.to(self.dev)
            try:  # SDPA attention, explicitly (it is diffusers' default with torch 2)
                from diffusers.models.attention_processor import AttnProcessor2_0

                dp.unet.set_attn_processor(AttnProcessor2_0())
                dp.vae.set_attn_processor(AttnProcessor2_0())
            except Exception as e:  # noqa: BLE001
                self.details["diffusers.sdpa"] = f"could not set AttnProcessor2_0: {type(e).__name__}: {e}"
            procs = sorted({type(p).__name__ for p in dp.unet.attn_processors.values()})
            self.details["diffusers.attn_processor"] = procs
            self.details["diffusers.vae_force_upcast"] = bool(dp.vae.config.force_upcast)
            self.details["load_s.diffusers"] = time.perf_counter() - t
            log(f"diffusers: loaded in {time.perf_counter() - t:.1f} s; attention {procs}"
                f", VAE force_upcast={dp.vae.config.force_upcast}")
            return dp

        dp = self.guard(want, "diffusers: load", load)
        if dp is None:
            return

        if "a" in a.sections:
            @torch.no_grad()
            def run_a():
                inp = self.unet_inputs()
                dt = dp.unet.dtype
                out = dp.unet(inp["x"].to(self.dev, dt), inp["t"].to(self.dev),
                              encoder_hidden_states=inp["context"].to(self.dev, dt),
                              added_cond_kwargs={"text_embeds": inp["pooled"].to(self.dev, dt),
                                                 "time_ids": inp["time_ids"].to(self.dev, dt)}).sample
                self.sync()
                self.store["a.unet.diff"] = out.float().cpu()
                lat, *_ = self.diffusers_generate(dp, s["a_steps"], s["a_size"], output_type="latent")
                self.store["a.gen.diff"] = lat.images.float().cpu()
                log("diffusers: (a) UNet call and generation done")
            self.guard(all_cells["a"], "(a) diffusers on device", run_a)
        if "b" in a.sections:
            def run_b():
                self.diffusers_generate(dp, s["warm_steps"], s["b_size"])
                _, step_s, total, peak = self.diffusers_generate(dp, s["b_steps"], s["b_size"])
                self.record_generation("b.eager", "diff", step_s, total, peak)
            self.guard(all_cells["b"], "(b) diffusers eager", run_b)
        if "c" in a.sections:
            def run_c():
                original = dp.scheduler
                dp.scheduler = D.EulerAncestralDiscreteScheduler.from_config(original.config,
                                                                             timestep_spacing="trailing")
                try:
                    def call():
                        self.sync()
                        t = time.perf_counter()
                        img = dp(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=s["c_size"],
                                 width=s["c_size"], generator=torch.Generator("cpu").manual_seed(1)).images[0]
                        self.sync()
                        return time.perf_counter() - t, img

                    for _ in range(s["c_warm"]):
                        call()
                    runs = [call() for _ in range(s["c_runs"])]
                finally:
                    dp.scheduler = original
                times = [r[0] for r in runs]
                self.put("c.turbo.diff", 1000 * statistics.median(times))
                self.details["c.turbo.diff.ms"] = [1000 * t for t in times]
                ours = self.store.get("turbo_image.ours")
                if ours is not None:  # parity of the two Turbo images, 0-255 scale
                    import numpy as np

                    d = np.abs(np.asarray(ours, dtype=np.float32) - np.asarray(runs[-1][1], dtype=np.float32))
                    self.details["c.turbo.pixel_diff_mean_max"] = [float(d.mean()), float(d.max())]
                log(f"diffusers: (c) turbo median {1000 * statistics.median(times):.1f} ms")
            self.guard(all_cells["c"], "(c) diffusers", run_c)
        if "d" in a.sections:
            if not self.cuda:
                self.skipped(all_cells["d"], NA)
            else:
                def run_d():
                    dp.enable_model_cpu_offload(device=self.dev)
                    self.free()
                    self.diffusers_generate(dp, s["warm_steps"], s["b_size"])
                    _, step_s, total, peak = self.diffusers_generate(dp, s["b_steps"], s["b_size"])
                    self.record_generation("d", "diff", step_s, total, peak)
                self.guard(all_cells["d"], "(d) diffusers enable_model_cpu_offload", run_d)
        del dp

    # ---------------------------------------------------------------------------------------- table

    def rows(self) -> list[dict]:
        s, cuda = self.S, self.cuda
        a2, b2, c2 = f"{s['a_size']}^2", f"{s['b_size']}^2", f"{s['c_size']}^2"
        dt, dev = self.args.dtype, self.args.device
        E, F3, G2, MS = "%.2e", "%.4f", "%.2f", "%.1f"
        R = [
            # section, metric, ours cell, diffusers cell, number format, target (kind, value, text)
            ("a", f"UNet call {a2}: rel err {dt} {dev} vs fp32 CPU", "a.unet.ours", "a.unet.diff", E, None),
            ("a", f"{s['a_steps']}-step {a2} latents: rel err {dt} {dev} vs fp32 CPU", "a.gen.ours", "a.gen.diff",
             E, None),
            ("b", f"eager {b2} {s['b_steps']} steps: s/step", "b.eager.step.ours", "b.eager.step.diff", F3,
             ("ratio", 1.0, "<= 1.0x diffusers eager")),
            ("b", "eager: total s (to PIL)", "b.eager.total.ours", "b.eager.total.diff", G2, None),
            ("b", "eager: peak VRAM GiB", "b.eager.vram.ours", "b.eager.vram.diff", G2,
             ("ratio", 1.0, "<= diffusers'")),
            ("b", "compile=True: s/step (vs diffusers eager)", "b.comp.step.ours", "b.eager.step.diff", F3,
             ("ratio", 0.8, "<= 0.8x diffusers eager")),
            ("b", "compile=True: total s (vs diffusers eager)", "b.comp.total.ours", "b.eager.total.diff", G2, None),
            ("b", "compile=True: peak VRAM GiB (vs diffusers eager)", "b.comp.vram.ours", "b.eager.vram.diff", G2,
             ("ratio", 1.0, "<= diffusers'")),
            ("b", f"compile=True: warm-up s (first call, {s['warm_steps']} steps)", "b.comp.warmup.ours", None, G2,
             None),
            ("c", f"Turbo {c2} 1 step text->PIL: ms (median of {s['c_runs']})", "c.turbo.ours", "c.turbo.diff", MS,
             ("abs", 100.0, "<= 100 ms")),
            ("d", f"offload=model {b2} {s['b_steps']} steps: s/step", "d.step.ours", "d.step.diff", F3, None),
            ("d", "offload=model: total s (to PIL)", "d.total.ours", "d.total.diff", G2, None),
            ("d", "offload=model: peak VRAM GiB", "d.vram.ours", "d.vram.diff", G2, None),
        ]
        out = []
        unset = "skipped (deadline)" if self.expired else UNMEASURED
        for sec, metric, ok, dk, fmt, target in R:
            ours = self.cells.get(ok, unset if sec in self.args.sections else SKIPPED)
            diff = NA if dk is None else self.cells.get(dk, unset if sec in self.args.sections else SKIPPED)
            if not cuda and "VRAM" in metric:
                ours, diff = NA, NA
            ratio = ours / diff if isinstance(ours, float) and isinstance(diff, float) and diff > 0 else None
            met = None
            if target is not None:
                kind, value, _ = target
                if kind == "ratio" and ratio is not None:
                    met = ratio <= value
                elif kind == "abs" and isinstance(ours, float):
                    met = ours <= value
            out.append({"section": sec, "metric": metric, "ours": ours, "diffusers": diff, "ratio": ratio,
                        "target": target[2] if target else None, "met": met, "format": fmt})
        return out

    def table(self) -> str:
        def cell(v, fmt):
            if isinstance(v, float):
                return fmt % v
            text = str(v).replace("|", "/").replace("\n", " ")
            return text if len(text) <= 60 else text[:57] + "..."

        rows = self.rows()
        lines = []
        head = ["sec", "metric", "ours", "diffusers", "ours/diff", "target", "met"]
        body = [[f"({r['section']})", r["metric"], cell(r["ours"], r["format"]), cell(r["diffusers"], r["format"]),
                 "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["target"] or "-",
                 {None: "", True: "yes", False: "NO"}[r["met"]]] for r in rows]
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        fmt_line = lambda xs: " | ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
        lines.append(fmt_line(head))
        lines.append("-+-".join("-" * w for w in widths))
        lines += [fmt_line(b) for b in body]
        return "\n".join(lines)

    def header(self) -> str:
        dev = self.dev
        name = torch.cuda.get_device_name(dev) if self.cuda else "CPU"
        what = "tiny-sdxl (random weights, seed 0)" if self.args.tiny else \
            "SDXL base, official config, random weights (seed 0)"
        diff = self.details.get("diffusers", "unmeasured")
        return (f"stablexl GPU benchmark: {what}; {self.args.dtype} on {dev} ({name}); torch {torch.__version__}; "
                f"diffusers {diff}; prompt {PROMPT!r}, negative {NEGATIVE!r}, seed 1; Euler leading CFG 5 unless "
                f"noted; ratios = ours / diffusers")

    def notes(self) -> list[str]:
        n = []
        if "diffusers.vae_force_upcast" in self.details:
            n.append(f"diffusers VAE force_upcast={self.details['diffusers.vae_force_upcast']} (the official SDXL VAE "
                     "config; True means diffusers decodes in fp32)")
        if "diffusers.attn_processor" in self.details:
            n.append(f"diffusers attention processors: {', '.join(self.details['diffusers.attn_processor'])}")
        if "c.turbo.pixel_diff_mean_max" in self.details:
            m, x = self.details["c.turbo.pixel_diff_mean_max"]
            n.append(f"(c) ours vs diffusers Turbo image: mean |diff| {m:.2f}, max {x:.0f} (0-255)")
        n += [f"{k}: {v}" for k, v in self.details.items() if k.endswith(".note")]
        n += [f"ours: {x}" for x in self.details.get("ours.notes", [])]
        for k in ("weights_build_s", "reference_cpu_s", "b.comp.second_call_s"):
            if k in self.details:
                n.append(f"{k} = {self.details[k]:.1f}")
        loads = {k[len('load_s.'):]: round(v, 1) for k, v in self.details.items() if k.startswith("load_s.")}
        if loads:
            n.append(f"load seconds: {loads}")
        n.append(f"wall time {time.perf_counter() - T0:.0f} s")
        return n

    def write_json(self) -> None:
        if not self.args.json:
            return
        doc = {"header": self.header(), "rows": self.rows(), "details": self.details,
               "failures": self.failures, "elapsed_s": time.perf_counter() - T0}
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True))

    # ---------------------------------------------------------------------------------------- run

    def _expire(self, signum, frame) -> None:
        self.expired = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise TimeoutError(f"--deadline-s {self.args.deadline_s:g} reached after {time.perf_counter() - T0:.0f} s")

    def run(self) -> None:
        a = self.args
        if self.cuda:
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda but torch.cuda.is_available() is False")
            self.details["gpu"] = torch.cuda.get_device_name(self.dev)
        self.details["torch"] = torch.__version__
        if a.deadline_s:  # past it, the running measurement fails with TimeoutError and the rest is skipped
            signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, max(1.0, a.deadline_s - (time.perf_counter() - T0)))
        try:
            if self.guard(ALL_CELLS, "weights", self.build_weights):
                # Most wanted first; the CPU reference (about a minute) and the compile (minutes) last.
                for section in (self.section_ours_eager, self.section_diffusers, self.section_ours_offload,
                                self.section_reference, self.section_ours_compiled):
                    if self.expired:
                        break
                    section()
        finally:
            if a.deadline_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.details["cudnn.benchmark"] = torch.backends.cudnn.benchmark
            self.write_json()
            if not a.out and self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
        print(self.header())
        print(self.table())
        for line in self.notes():
            print(f"  {line}")
        for f in self.failures:
            print(f"\n{f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                    help="compute dtype of the measured runs (the (a) reference is always fp32 on the CPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny-sdxl preset, 64^2, a few steps (smoke test)")
    ap.add_argument("--out", help="folder for the weights (kept, and reused if it holds the same preset); "
                                  "default: a temporary folder, deleted at the end")
    ap.add_argument("--skip-diffusers", action="store_true",
                    help="measure ours only ('unmeasured' in diffusers' cells)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile=True rows of (b)")
    ap.add_argument("--sections", default="abcd", help="which of a, b, c, d to run (default abcd)")
    ap.add_argument("--turbo-runs", type=int, help="timed calls in (c) (default 10, tiny 3)")
    ap.add_argument("--deadline-s", type=float, default=0,
                    help="wall-clock budget: past it the running measurement fails (TimeoutError), the rest is "
                         "skipped and the table is printed (default: none)")
    ap.add_argument("--json", help="also write the table (and per-step times) as JSON here")
    ap.add_argument("--strict", action="store_true", help="let exceptions propagate (the smoke test passes this)")
    args = ap.parse_args(argv)
    bad = set(args.sections) - set("abcd")
    if bad:
        ap.error(f"--sections takes letters of abcd, got {''.join(sorted(bad))}")
    bench = Bench(args)
    if args.turbo_runs:
        bench.S = dict(bench.S, c_runs=args.turbo_runs)
    bench.run()


if __name__ == "__main__":
    main()
