"""Command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__


def _convert(args: argparse.Namespace) -> int:
    from .io.models import load_model, save_model

    t0 = time.perf_counter()
    parts = load_model(args.input, dtype=args.dtype, allow_pickle=args.allow_pickle, variant=args.variant,
                       prediction=args.prediction)
    out = save_model(parts, args.output, args.to, dtype=args.dtype)
    for note in parts.notes:
        print(note)
    print(f"wrote {out} ({args.to}, {parts.config.name}) in {time.perf_counter() - t0:.1f}s")
    return 0


class ProgressBar:
    """A one-line progress bar on stderr with steps/s and ETA."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream, self.t0 = label, stream, time.perf_counter()

    def __call__(self, i: int, n: int, *_):
        done = i + 1
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = (n - done) / rate if rate > 0 else 0.0
        bar = "#" * int(30 * done / n)
        self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{n} {rate:.2f} steps/s ETA {eta:.0f}s")
        if done == n:
            self.stream.write("\n")
        self.stream.flush()


def _output_paths(output: str, n: int) -> list[str]:
    if n == 1:
        return [output]
    stem, dot, ext = output.rpartition(".")
    return [f"{stem}-{k}.{ext}" if dot else f"{output}-{k}" for k in range(n)]


def _generate(args: argparse.Namespace) -> int:
    from .io.metadata import generation_infotext, save_png
    from .pipeline import Pipeline

    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (the picture to inpaint)")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype)
    for note in pipe.parts.notes:
        print(note)
    kwargs = dict(
        steps=args.steps, cfg=args.cfg, seed=args.seed, width=args.width, height=args.height, sampler=args.sampler,
        schedule=args.schedule, batch=args.batch, guidance_rescale=args.guidance_rescale, vae_tile=args.vae_tile,
        callback=None if args.quiet else ProgressBar("generate"),
    )
    if pipe.config.family.startswith("sdxl"):
        kwargs.update(original_size=tuple(args.original_size) if args.original_size else None,
                      crop=tuple(args.crop) if args.crop else (0, 0),
                      target_size=tuple(args.target_size) if args.target_size else None)
    if args.image_prompt:
        kwargs.update(image_prompt=args.image_prompt, noise_level=args.noise_level)
    if args.init_image:
        kwargs.update(init_image=args.init_image, strength=args.strength, mask=args.mask, mask_blur=args.mask_blur)
    if args.refiner:
        refiner = Pipeline.from_pretrained(args.refiner, dtype=args.dtype)
        result = pipe.refine(refiner, args.prompt, args.negative_prompt, switch_at=args.switch_at,
                             aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
                             **kwargs)
    else:
        if pipe.config.family == "sdxl-refiner":
            kwargs.update(aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score)
        result = pipe(args.prompt, args.negative_prompt, **kwargs)
    for note in result.notes[len(pipe.parts.notes):]:
        print(note)
    for k, (img, path) in enumerate(zip(result.images, _output_paths(args.output, len(result.images)))):
        save_png(img, path, generation_infotext(result.settings, k))
        print(f"wrote {path} (seed {result.seeds[k]})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with one line naming the fix, not usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _info(args: argparse.Namespace) -> int:
    from .info import main_info

    print(main_info(args.image, as_json=args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stablexl", description="Stable Diffusion XL, from scratch in PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"stablexl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="generate images: text-to-image, image-to-image, inpainting, refiner, variations",
                       description="Generate images from a prompt (and optionally an init image, a mask, a refiner).")
    g.add_argument("prompt")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (SDXL: none = zeroed uncond)")
    g.add_argument("--model", default="tiny-sdxl",
                   help="checkpoint file, diffusers folder, HF cache id, or a tiny-* preset (random weights)")
    g.add_argument("--sampler", default=None, help="ddpm ddim euler euler_ancestral heun dpmpp_2m dpmpp_2m_sde lcm, "
                                                   "or an A1111 name like 'DPM++ 2M Karras' (default: per model)")
    g.add_argument("--schedule", default=None, help="leading trailing linspace karras exponential (default: per model)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: per model)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (<= 1 disables it)")
    g.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (0.7 suggested)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; image k uses seed + k")
    g.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's resolution)")
    g.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's resolution)")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--init-image", default=None, help="image-to-image: the starting picture")
    g.add_argument("--strength", type=float, default=None,
                   help="image-to-image: share of the schedule re-run (0-1]; default 0.3 SDXL, 0.8 SD, 1.0 inpaint UNets")
    g.add_argument("--mask", default=None, help="inpainting: greyscale mask, white = repaint (same size as the image)")
    g.add_argument("--mask-blur", type=float, default=0.0, help="inpainting: Gaussian blur (pixels) of the mask edge")
    g.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-condition: the size the model should believe the source had (default: output size)")
    g.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                   help="SDXL micro-condition: crop coordinates (default 0 0 = centred, whole objects)")
    g.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-condition: target size (default: output size)")
    g.add_argument("--image-prompt", default=None, help="unCLIP models: make variations of this image")
    g.add_argument("--noise-level", type=int, default=0, help="unCLIP: noise added to the image embedding, 0-999")
    g.add_argument("--refiner", default=None, help="SDXL refiner checkpoint: hand off the last steps to it")
    g.add_argument("--switch-at", type=float, default=0.8, help="fraction of the schedule the base runs before the refiner")
    g.add_argument("--aesthetic-score", type=float, default=6.0, help="refiner conditioning")
    g.add_argument("--negative-aesthetic-score", type=float, default=2.5, help="refiner conditioning")
    g.add_argument("--vae-tile", type=int, default=None,
                   help="decode in overlapping tiles of this many latents (64 = 512 px) to bound memory on large images")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="compute dtype (default: stored)")
    g.add_argument("--output", default="output.png", help="PNG path; with --batch N, -0 -1 ... are appended")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="print the generation settings stored in an image (ours, A1111, ComfyUI, sd.cpp)")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print JSON instead of key: value lines")
    i.set_defaults(func=_info)

    c = sub.add_parser(
        "convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="convert a model between our format, the official single file and a diffusers folder",
        description="Read a model (official single-file .safetensors, diffusers folder, Hugging Face cache repo id, "
                    "or a stablexl file) strictly and write it in another layout.",
    )
    c.add_argument("input", help="model to read: file, folder, or org/name present in the local HF cache")
    c.add_argument("output", help="file (.safetensors) or folder (diffusers) to write")
    c.add_argument("--to", choices=["stablexl", "single-file", "diffusers"], default="stablexl", help="output layout")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="storage dtype (default: keep)")
    c.add_argument("--variant", default=None, help="diffusers weights variant to read, e.g. fp16")
    c.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="override the detected parameterisation (SD 2.1-768 vs 2.1-base cannot be told from weights)")
    c.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .ckpt/.pt/.bin files (tensors only, via torch.load(weights_only=True))")
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # CheckpointError is a ValueError
        msg = str(e).replace("allow_pickle=True (CLI: --allow-pickle)", "--allow-pickle")
        print(f"stablexl {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
