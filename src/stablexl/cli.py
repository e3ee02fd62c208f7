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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stablexl", description="Stable Diffusion XL, from scratch in PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"stablexl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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
