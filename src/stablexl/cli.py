"""Command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from . import __version__
from .names import SAMPLER_NAMES, SCHEDULE_NAMES


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


# GenerationRequest paths -> the `generate` flags, for error messages
FLAGS = {"prompt": "PROMPT", "negative_prompt": "--negative-prompt", "steps": "--steps", "cfg": "--cfg",
         "seed": "--seed", "width": "--width", "height": "--height", "sampler": "--sampler", "schedule": "--schedule",
         "batch": "--batch", "iterations": "--n-iter", "sigmas": "--sigmas", "eta": "--eta", "guidance_rescale": "--guidance-rescale", "model": "--model",
         "image.image": "--init-image", "image.strength": "--strength", "image.mask": "--mask",
         "image.mask_blur": "--mask-blur", "handoff.refiner": "--refiner", "handoff.switch_at": "--switch-at",
         "handoff.mode": "--refiner-mode", "handoff.refiner_strength": "--refiner-strength",
         "image_prompt": "--image-prompt", "image_prompt.image": "--image-prompt",
         "image_prompt.noise_level": "--noise-level", "vae_tile": "--vae-tile", "decoder": "--decoder",
         "conditions.original_size": "--original-size", "conditions.crop": "--crop",
         "conditions.target_size": "--target-size", "conditions.aesthetic_score": "--aesthetic-score",
         "conditions.negative_aesthetic_score": "--negative-aesthetic-score", "loras": "--lora",
         "hires": "--hires-scale", "hires.scale": "--hires-scale", "hires.steps": "--hires-steps",
         "hires.strength": "--hires-strength", "hires.upscaler": "--hires-upscaler", "hires.resize": "--hires-resize",
         "hires.sampler": "--hires-sampler"}


def request_from_args(args: argparse.Namespace):
    """The `generate` flags -> a GenerationRequest (the CLI's one translation)."""
    from .request import GenerationRequest, Handoff, Hires, ImageInput, ImagePrompt, MicroConditions

    hires = None
    hr_given = {k: v for k, v in (("scale", args.hires_scale), ("steps", args.hires_steps),
                                  ("strength", args.hires_strength), ("upscaler", args.hires_upscaler),
                                  ("resize", tuple(args.hires_resize) if args.hires_resize else None),
                                  ("sampler", args.hires_sampler)) if v is not None}
    if hr_given:  # any --hires-* flag turns the hires fix on
        hires = Hires(**hr_given)
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (the picture to inpaint)")
    pair = lambda v: tuple(v) if v else None  # noqa: E731
    return GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg, seed=args.seed,
        width=args.width, height=args.height, sampler=args.sampler, schedule=args.schedule, batch=args.batch,
        sigmas=_floats(args.sigmas, "--sigmas"), eta=args.eta,
        iterations=args.n_iter, guidance_rescale=args.guidance_rescale, vae_tile=args.vae_tile, decoder=args.decoder,
        conditions=MicroConditions(original_size=pair(args.original_size), crop=pair(args.crop) or (0, 0),
                                   target_size=pair(args.target_size), aesthetic_score=args.aesthetic_score,
                                   negative_aesthetic_score=args.negative_aesthetic_score),
        image=ImageInput(args.init_image, strength=args.strength, mask=args.mask, mask_blur=args.mask_blur)
        if args.init_image else None,
        image_prompt=ImagePrompt(args.image_prompt, args.noise_level) if args.image_prompt else None,
        handoff=Handoff(refiner=args.refiner, switch_at=args.switch_at, mode=args.refiner_mode,
                        refiner_strength=args.refiner_strength),
        hires=hires,
    )


def parse_lora_arg(text: str) -> tuple[str, float, float]:
    """`--lora PATH[:W]` or `PATH:TE_W:UNET_W` (A1111's order) -> (path or name, text strength, UNet strength).
    Only trailing numbers are weights, so paths with `:` (C:\\...) stay whole."""
    head, nums = text, []
    while len(nums) < 2 and ":" in head:
        rest, _, tail = head.rpartition(":")
        try:
            nums.insert(0, float(tail))
        except ValueError:
            break
        head = rest
    if not head:
        raise ValueError(f"--lora {text!r}: give a file (or a name in --lora-dir), optionally :WEIGHT")
    te = nums[0] if nums else 1.0
    return head, te, nums[1] if len(nums) > 1 else te


def _apply_lora_args(pipe, args: argparse.Namespace, request):
    """--lora: a file is loaded into the pipeline (pipe.load_lora); anything else is a name in --lora-dir and
    goes into the request, as a prompt tag would."""
    import os

    from .request import LoraSpec

    names = []
    for text in args.lora or []:
        target, te, unet = parse_lora_arg(text)
        if os.path.isfile(target):
            pipe.load_lora(target, unet, text_strength=te)
        else:
            names.append(LoraSpec(target, unet, te))
    return request.replace(loras=tuple(request.loras) + tuple(names)) if names else request


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def load_options(args: argparse.Namespace) -> dict:
    """The loading flags shared by generate, serve and eval -> Pipeline.from_pretrained keywords."""
    return dict(device=args.device, dtype=args.dtype, offload=args.offload, compile=args.compile, vae=args.vae,
                tiny_decoder=args.tiny_decoder, quantize=args.quantize, quantize_text=args.quantize_text)


def _generate(args: argparse.Namespace) -> int:
    from .io.metadata import save_png
    from .pipeline import Pipeline
    from .request import RequestError

    try:
        request = request_from_args(args)
        pipe = Pipeline.from_pretrained(args.model, memory=args.memory, lora_dir=args.lora_dir,
                                        embeddings_dir=args.embeddings_dir, **load_options(args))
        for note in pipe.parts.notes:
            print(note)
        request = _apply_lora_args(pipe, args, request)
        refiner = None
        if args.refiner:
            refiner = Pipeline.from_pretrained(args.refiner, memory=args.memory, **load_options(args))
            request = request.replace(handoff=dataclasses.replace(request.handoff, refiner=refiner.name))
        result = pipe.generate(request, refiner=refiner, callback=None if args.quiet else ProgressBar("generate"))
    except RequestError as e:
        raise ValueError(f"{FLAGS.get(e.field, e.field)}: {e.message}") from None
    for note in result.notes[len(pipe.parts.notes):]:
        print(note)
    for k, (img, path) in enumerate(zip(result.images, _output_paths(args.output, len(result.images)))):
        save_png(img, path, result.infotext(k))
        print(f"wrote {path} (seed {result.seeds[k]})")
    return 0


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["none", "int8"], default=None,
                   help="int8: the UNet's Linear weights as int8 (about 1/4 of their RAM; lossy: README \"int8\")")
    p.add_argument("--quantize-text", action="store_true", help="with --quantize int8: the text encoders' too")


def add_load_options(p: argparse.ArgumentParser, *, vae: bool = True, repeat_device: bool = False) -> None:
    """--device --dtype --offload --compile (--vae): where and how the model runs (docs: README "Devices")."""
    if repeat_device:
        p.add_argument("--device", action="append", default=None,
                       help="auto | cpu | cuda | cuda:N | mps; repeat to serve from several GPUs (a worker per model "
                            "and device; default: auto)")
    else:
        p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="compute dtype; auto: fp16 on CUDA/MPS, fp32 on the CPU (the stored dtype never decides)")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                   help="GPU memory: model = each component on the GPU only for its phase; sequential = weights "
                        "streamed layer by layer (slowest, least memory)")
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile (slow first call)")
    add_quantize_options(p)
    if vae:
        p.add_argument("--vae", default=None,
                       help="a separate VAE (file or diffusers folder) instead of the checkpoint's, e.g. an fp16-safe one")
    p.add_argument("--tiny-decoder", default=None,
                   help="a tiny (TAESD) decoder for --decoder tiny and live previews: a file (e.g. taesdxl_decoder."
                        "safetensors), a diffusers folder, or taesd / taesdxl from the HF cache; default: the model's "
                        "own if it ships one (mini does); none: no tiny decoder")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with one line naming the fix, not usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _info(args: argparse.Namespace) -> int:
    from .info import main_info

    print(main_info(args.image, as_json=args.json))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    serve(ServeConfig(models=args.model or ["mini"], host=args.host, port=args.port, api_key=args.api_key,
                      max_width=args.max_width, max_height=args.max_height, max_steps=args.max_steps,
                      max_batch=args.max_batch, queue_size=args.queue_size, job_ttl=args.job_ttl,
                      preview=args.preview, devices=args.device or ["auto"], dtype=args.dtype,
                      offload=args.offload, compile=args.compile, vae=args.vae, tiny_decoder=args.tiny_decoder,
                      quantize=args.quantize, quantize_text=args.quantize_text, drain_timeout=args.drain_timeout,
                      drain_grace=args.drain_grace, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                      max_memory=None if args.max_memory.lower() == "none" else args.max_memory))
    return 0


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="HTTP server: web page, job API (/v1) and an AUTOMATIC1111-compatible API (/sdapi/v1)",
                       description="Serve models over HTTP (FastAPI on uvicorn). OpenAPI schema at /openapi.json.")
    s.add_argument("--model", action="append", default=None,
                   help="model to serve (repeat for several, e.g. a base and a refiner; the first is the default); "
                        "none given: mini, the shipped miniature")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (localhost only by default)")
    s.add_argument("--port", type=int, default=7860, help="port")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but the page")
    s.add_argument("--max-width", type=int, default=2048, help="largest width accepted")
    s.add_argument("--max-height", type=int, default=2048, help="largest height accepted")
    s.add_argument("--max-steps", type=int, default=150, help="most sampling steps accepted")
    s.add_argument("--max-batch", type=int, default=8, help="most images per request (batch x iterations)")
    s.add_argument("--queue-size", type=int, default=32, help="jobs that may wait; more are refused with 429")
    s.add_argument("--job-ttl", type=float, default=600.0, help="seconds a finished job stays retrievable")
    s.add_argument("--preview", choices=["auto", "approx", "tiny", "full", "none"], default="auto",
                   help="live preview: tiny = the tiny decoder, approx = linear latent->RGB fit, full = VAE decode, "
                        "none; auto: tiny when the model has a tiny decoder, else approx")
    s.add_argument("--max-memory", default="auto",
                   help="RAM the server may use, models included (e.g. 16G); a job that would not fit runs in smaller "
                        "batches or with a tiled VAE, or is refused with 413. auto: the machine less 10 %% (at least "
                        "1 GiB); none: no limit")
    s.add_argument("--drain-timeout", type=float, default=120.0,
                   help="on SIGTERM/SIGINT: seconds to finish accepted jobs (new ones get 503) before cancelling the rest")
    s.add_argument("--drain-grace", type=float, default=5.0,
                   help="then seconds finished results stay retrievable before the process exits 0")
    s.add_argument("--lora-dir", default=None,
                   help="folder of LoRA .safetensors files that <lora:NAME:W> prompt tags and the APIs' `loras` name; "
                        "listed at GET /sdapi/v1/loras")
    s.add_argument("--embeddings-dir", default=None,
                   help="folder of textual-inversion .safetensors files, used in prompts by file name or "
                        "embedding:NAME; listed at GET /sdapi/v1/embeddings")
    add_load_options(s, repeat_device=True)
    s.set_defaults(func=_serve)


def _eval(args: argparse.Namespace) -> int:
    from .eval import evaluate, summary_lines

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    results = evaluate(args.model, args.data, args.clip, style=args.style, n_prompts=args.prompts, seed=args.seed,
                       steps=args.steps, cfg=args.cfg, sampler=args.sampler, schedule=args.schedule, batch=args.batch,
                       output=args.output, inception_path=args.inception, score_clip_path=args.score_clip, log=log,
                       device=args.device, dtype=args.dtype, decoder=args.decoder, tiny_decoder=args.tiny_decoder,
                       quantize=args.quantize, quantize_text=args.quantize_text)
    print("\n".join(summary_lines(results)))
    print(f"wrote {args.output}/results.json, contact_sheet.png and images/")
    return 0


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="score a model on the emoji dataset: FD-miniCLIP, CLIP score, prompt retrieval, pixel identity",
                       description="Generate one 64x64 image per emoji name (drawn with --seed) and score the set against "
                                   "the dataset's images of that style. Writes OUTPUT/results.json, contact_sheet.png "
                                   "and images/.")
    e.add_argument("--model", required=True, help="checkpoint file, diffusers folder, 'mini', or a tiny-* preset")
    e.add_argument("--data", required=True, help="dataset folder written by `stablexl data emoji`")
    e.add_argument("--clip", required=True, help="clip.safetensors from `stablexl train clip`, or 'mini' for the shipped one (FD-miniCLIP, CLIP score)")
    e.add_argument("--output", required=True, help="folder for results.json, contact_sheet.png and images/")
    e.add_argument("--style", default="twemoji", help="art style of the dataset to evaluate on")
    e.add_argument("--prompts", type=int, default=200, help="emoji names to generate, one image each")
    e.add_argument("--steps", type=int, default=30, help="sampling steps")
    e.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    e.add_argument("--sampler", default="dpmpp_2m", help="sampler name")
    e.add_argument("--schedule", default="karras", help="sigma schedule")
    e.add_argument("--seed", type=int, default=0, help="draws the names; image i uses seed + i")
    e.add_argument("--batch", type=int, default=25, help="images generated per call")
    e.add_argument("--inception", default=None, help="local inception-2015-12-05.pt (TorchScript) to also report FID")
    e.add_argument("--score-clip", default=None,
                   help="a second CLIP for CLIP score and retrieval: clip.safetensors or a local transformers CLIP folder")
    e.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    e.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="compute dtype; auto: fp16 on CUDA/MPS, fp32 on the CPU")
    e.add_argument("--decoder", choices=["full", "tiny"], default="full",
                   help="decode the generated latents with the VAE or the tiny decoder (same seeds: compare the two)")
    e.add_argument("--tiny-decoder", default=None, help="the tiny decoder for --decoder tiny; default: the model's own")
    add_quantize_options(e)
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    e.set_defaults(func=_eval)


def _data_emoji(args: argparse.Namespace) -> int:
    from .mini.emoji import build_dataset

    summary = build_dataset(args.dir, args.styles, skin_tones=args.skin_tones, upscaled_share=args.upscaled_share,
                            margin_share=args.margin_share, compositions=args.compositions, seed=args.seed,
                            limit=args.limit, categories=args.categories, cache_dir=args.cache,
                            overwrite=args.overwrite, log=print)
    print("\n".join(summary.lines()))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.run import main as train_main

    return train_main(args)


def _add_train(sub) -> None:
    from .train.run import TASK_DEFAULTS, load_config_file

    t = sub.add_parser("train", help="train a CLIP, a VAE, a UNet or a LoRA, or distil a UNet (ADD, LCM)", description=(
        "Train one part of a model. Runs as it is under `torchrun --nproc_per_node N` (DDP). "
        "Writes OUTPUT/log.jsonl, loss.png, samples/, state-*.safetensors (resumable) and the final weights."))
    tsub = t.add_subparsers(dest="task", required=True, parser_class=_Parser)
    for task, what in (("clip", "contrastive image tower + text towers (writes clip.safetensors)"),
                       ("vae", "KL-f8 autoencoder: L1 + perceptual + KL + PatchGAN (writes vae.safetensors)"),
                       ("unet", "diffusion UNet with the SDXL recipe (writes model.safetensors)"),
                       ("lora", "LoRA on a frozen model, UNet and optionally text towers, with the UNet's SDXL "
                                "recipe (writes a kohya-format lora.safetensors)"),
                       ("add", "Adversarial Diffusion Distillation: a 1-4-step student from a teacher, with a "
                               "discriminator on a frozen ViT's features (writes model.safetensors)"),
                       ("lcm", "Latent Consistency Distillation: a few-step student from a teacher's skipping-step "
                               "DDIM solver with CFG (writes model.safetensors)")):
        a = tsub.add_parser(task, help=what, description=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        d = TASK_DEFAULTS[task]
        g = a.add_argument_group("run")
        g.add_argument("--data", required=True, help="dataset folder: metadata.jsonl, or images with .txt captions")
        g.add_argument("--output", required=True, help="run folder (created); holds logs, states and weights")
        g.add_argument("--config", default=None, help="JSON file of option defaults (a recipe); flags override it")
        g.add_argument("--steps", type=int, default=1000, help="optimizer steps")
        g.add_argument("--batch-size", type=int, default=16, help="global images per micro-step")
        g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
        g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d['lr']})")
        g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up, then constant")
        g.add_argument("--decay-steps", type=int, default=0,
                       help="cosine LR decay to zero over the run's last N steps (0: constant to the end)")
        g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
        g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables")
        g.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay with warm-up; 0 = off (default {d['ema_decay']})")
        g.add_argument("--seed", type=int, default=0, help="seeds init, data order, noise, dropout")
        g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
        g.add_argument("--device", default="auto", help="outside torchrun: auto (CUDA, then MPS, then CPU) | cpu | "
                                                        "cuda | cuda:N | mps; under torchrun each process takes the "
                                                        "GPU of its LOCAL_RANK")
        g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
        g.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard weights, gradients, optimizer and EMA state over the processes "
                            "(FSDP2) instead of replicating them (DDP), for models that do not fit one device; "
                            "states and weights are written whole, so a run can resume with or without it")
        g.add_argument("--checkpoint-every", type=int, default=500, help="steps between resumable states")
        g.add_argument("--keep-checkpoints", type=int, default=2, help="newest states kept")
        g.add_argument("--log-every", type=int, default=10, help="steps between log.jsonl lines")
        g.add_argument("--sample-every", type=int, default=0, help="steps between sample grids (0: at the end)")
        g.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue the run in --output (or from the given state file)")
        g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        g.add_argument("--quiet", action="store_true", help="no progress line")
        g = a.add_argument_group("data")
        g.add_argument("--bucket-size", type=int, default=64, help="bucket area target (pixels per side)")
        g.add_argument("--bucket-step", type=int, default=8, help="bucket sides are multiples of this (64 at 1024 px)")
        g.add_argument("--max-aspect", type=float, default=2.5, help="largest bucket aspect ratio")
        g.add_argument("--max-zoom", type=float, default=1.0, help="random extra zoom before cropping (1 = none)")
        g.add_argument("--center-crop", action="store_true", help="centre crops instead of random ones")
        g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
        g.add_argument("--min-original-size", type=int, default=0,
                       help="drop images whose original area (before any upscaling) is below this squared, the "
                            "SDXL paper's discard-small-images baseline (0: keep all)")
        g = a.add_argument_group(task)
        if task in ("add", "lcm"):
            _add_distill_options(g, task)
            a.set_defaults(func=_train, _parser=a, _config_loader=load_config_file)
            continue
        g.add_argument("--model", default="mini", help={
            "unet": "preset architecture (random init; mini-* presets take mini's trained VAE and text towers) or "
                    "checkpoint to start from",
            "lora": "the frozen model: checkpoint file, diffusers folder, HF cache id, 'mini' (the shipped miniature) "
                    "or a tiny-* preset"}.get(task, "preset whose architecture to train"))
        init_help = f"start from this {task}.safetensors" + (" ('mini': the shipped miniature's)" if task == "vae" else "")
        if task == "unet":
            init_help = ("start the UNet from this model's (a checkpoint, or a shipped model such as 'mini'): same-shaped "
                         "tensors are copied, the others (e.g. an unCLIP vector input) start at zero")
        g.add_argument("--init", default=None, help=argparse.SUPPRESS if task == "lora" else init_help)
        if task == "unet":
            g.add_argument("--vae", default=None, help="vae.safetensors from `stablexl train vae` to use")
            g.add_argument("--text-encoders", default=None, help="clip.safetensors from `stablexl train clip`: its text towers")
        if task == "lora":
            g.add_argument("--rank", type=int, default=16, help="LoRA rank (kohya network_dim)")
            g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; the change is scaled by alpha/rank (default: rank)")
            g.add_argument("--modules", default="attn,ff,proj",
                           help="layers to adapt: attn (to_q/k/v/out), ff (GEGLU proj, out), proj (proj_in/out), "
                                "conv (resnet convs, time projection, shortcut, down/upsamplers: LoCon)")
            g.add_argument("--conv-rank", type=int, default=None, help="rank of the 3x3 convs (default: --rank)")
            g.add_argument("--conv-alpha", type=float, default=None, help="alpha of the 3x3 convs (default: --alpha)")
            g.add_argument("--text-encoders", action="store_true", help="also train LoRA on both text towers "
                                                                        "(q/k/v/out_proj, fc1, fc2); captions are then not cached")
            g.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the saved factors")
            g.add_argument("--output-name", default="lora", help="file name (OUTPUT/NAME.safetensors) and ss_output_name")
        if task in ("unet", "lora"):
            g.add_argument("--prediction", choices=["eps", "v"], default=None, help="default: the model's")
            g.add_argument("--dropout-text", type=float, default=0.1, help="P(zero the text context and pooled vector)")
            g.add_argument("--dropout-size", type=float, default=0.1, help="P(zero the original-size embedding)")
            g.add_argument("--dropout-crop", type=float, default=0.1, help="P(zero the crop embedding)")
            g.add_argument("--dropout-target", type=float, default=0.0, help="P(zero the target-size embedding)")
            g.add_argument("--no-size-conditioning", action="store_true",
                           help="give every image's original size as its target size (the SDXL paper's no-size-"
                                "conditioning baseline; inference's default original size then matches)")
            g.add_argument("--offset-noise", type=float, default=0.0, help="offset noise level (SDXL stage 3: 0.05)")
            g.add_argument("--min-snr-gamma", type=float, default=0.0, help="Min-SNR-γ loss weighting (5 is common); 0 = off")
            g.add_argument("--cache-latents", action="store_true", help="encode each image once (fixed crop/flip)")
            g.add_argument("--no-cache-text", action="store_true", help="re-encode captions every step")
            g.add_argument("--sample-prompt", action="append", default=None, help="prompt for sample grids (repeatable)")
            g.add_argument("--sample-steps", type=int, default=20, help="sampler steps for sample grids")
            g.add_argument("--max-timestep", type=int, default=None,
                           help="draw timesteps from [0, N) (default: 200 for refiners, the SDXL refiner's range; else 1000)")
            g.add_argument("--aesthetic-proxy", choices=["blur", "none"], default="blur",
                           help="refiners: the aesthetic-score label. blur: half of the images (fixed per image) "
                                "blurred by σ ~ U(0.5, 2) px and scored 6 − 2σ, the rest 6.0; none: all 6.0")
            g.add_argument("--dropout-image", type=float, default=0.1,
                           help="unCLIP models: P(zero the image-embedding vector), the unconditional vector of CFG")
        if task == "vae":
            g.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (SD/SDXL-VAE regime)")
            g.add_argument("--perceptual", choices=["rcf", "lpips", "none"], default="rcf",
                           help="rcf = random-conv-feature distance (a substitute, not LPIPS); lpips needs local weights")
            g.add_argument("--perceptual-weight", type=float, default=0.5, help="perceptual term weight")
            g.add_argument("--lpips-vgg", default=None, help="local VGG16 weights (torchvision keys features.N.*)")
            g.add_argument("--lpips-lin", default=None, help="local LPIPS heads (linK.model.1.weight)")
            g.add_argument("--disc-start", type=int, default=2000, help="step at which the PatchGAN term starts")
            g.add_argument("--disc-weight", type=float, default=0.5, help="GAN term weight")
            g.add_argument("--disc-ndf", type=int, default=64, help="discriminator base width")
            g.add_argument("--decoder-only", action="store_true",
                           help="fine-tune only the decoder of --init (the encoder and its latent space stay frozen, "
                                "so every UNet trained on them stays valid); --init mini takes the shipped one's")
        a.set_defaults(func=_train, _parser=a, _config_loader=load_config_file)


def _add_distill_options(g, task: str) -> None:
    from .train.run import STUDENT_TIMESTEPS, WEIGHT_SCHEDULES

    g.add_argument("--teacher", default="mini", help="the model to distil: checkpoint file, diffusers folder, 'mini' "
                                                     "or a tiny-* preset; the student starts from its weights")
    g.add_argument("--teacher-cfg", type=float, default=3.0, help="the teacher's CFG scale (Imagen form) for its targets")
    g.add_argument("--sample-prompt", action="append", default=None, help="prompt for sample grids (repeatable)")
    if task == "lcm":
        g.add_argument("--ddim-steps", type=int, default=50, help="the teacher's DDIM grid (skip = 1000 / N timesteps)")
        g.add_argument("--target-ema", type=float, default=0.95, help="EMA decay of the target network")
        g.add_argument("--huber-c", type=float, default=0.001, help="pseudo-Huber loss constant")
        return
    g.add_argument("--features", default="mini", help="the discriminator's frozen ViT: 'mini' (the miniature's CLIP "
                                                      "image tower), a clip.safetensors, or a local transformers CLIP folder")
    g.add_argument("--student-timesteps", default=",".join(map(str, STUDENT_TIMESTEPS)),
                   help="the timesteps the student is trained at (the trailing 4-step list)")
    g.add_argument("--distill-weight", type=float, default=2.5, help="λ, the distillation loss weight (0: adversarial only)")
    g.add_argument("--adv-weight", type=float, default=1.0, help="adversarial loss weight (0: distillation only)")
    g.add_argument("--weight-schedule", choices=WEIGHT_SCHEDULES, default="exponential",
                   help="c(t) of the distillation loss: α_t, α_t/(2σ_t) or 1")
    g.add_argument("--distill-space", choices=["pixel", "latent"], default="pixel",
                   help="distillation loss on decoded images (the paper) or on latents (no teacher decode)")
    g.add_argument("--r1-gamma", type=float, default=1e-5, help="R1 penalty weight on the heads' input features")
    g.add_argument("--disc-lr", type=float, default=1e-4, help="discriminator heads' learning rate")
    g.add_argument("--reals", choices=["roundtrip", "raw"], default="roundtrip",
                   help="the discriminator's real images: VAE round trips of the latents, or the dataset pixels")
    g.add_argument("--no-augment", action="store_true", help="no translation / cutout before the discriminator")


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
    g.add_argument("--model", default="mini",
                   help="checkpoint file, diffusers folder, HF cache id, 'mini' (the shipped miniature trained on emoji "
                        "art), or a tiny-* preset (random weights)")
    g.add_argument("--sampler", default=None, help=f"{' '.join(SAMPLER_NAMES)}, or an A1111 / ComfyUI name like "
                                                   "'DPM++ 2M Karras' (default: per model)")
    g.add_argument("--schedule", default=None, help=f"{' '.join(SCHEDULE_NAMES)}, or an A1111 / ComfyUI name "
                                                    "(default: per model)")
    g.add_argument("--sigmas", default=None,
                   help="a custom noise schedule instead of --schedule: comma-separated descending sigmas (0 appended)")
    g.add_argument("--eta", type=float, default=None,
                   help="noise of the stochastic samplers (DDIM eta; ancestral/SDE eta); default: the sampler's own")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: per model)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (<= 1 disables it)")
    g.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (0.7 suggested)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; image k uses seed + k")
    g.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's resolution)")
    g.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's resolution)")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--n-iter", type=int, default=1, help="batches run one after another (seeds continue)")
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
    g.add_argument("--switch-at", type=float, default=0.8,
                   help="handoff mode: fraction of the schedule the base runs before the refiner")
    g.add_argument("--refiner-mode", choices=["handoff", "sdedit"], default="handoff",
                   help="handoff: the refiner takes over the last steps (ensemble of experts); sdedit: the base runs "
                        "all steps, then the refiner does image-to-image on its result at --refiner-strength")
    g.add_argument("--refiner-strength", type=float, default=0.3, help="sdedit mode: image-to-image strength")
    g.add_argument("--aesthetic-score", type=float, default=6.0, help="refiner conditioning")
    g.add_argument("--negative-aesthetic-score", type=float, default=2.5, help="refiner conditioning")
    g.add_argument("--vae-tile", type=int, default=None,
                   help="decode in overlapping tiles of this many latents (64 = 512 px) to bound memory on large images")
    g.add_argument("--decoder", choices=["full", "tiny"], default=None,
                   help="final decode: the VAE (full), or the tiny decoder (faster, lossy; see --tiny-decoder)")
    g.add_argument("--lora", action="append", default=None, metavar="PATH[:W]",
                   help="apply a LoRA / LyCORIS .safetensors file (or a name in --lora-dir) at weight W (default 1; "
                        "PATH:TE_W:UNET_W sets the text encoders' and the UNet's apart); repeatable")
    g.add_argument("--lora-dir", default=None, help="folder that <lora:NAME:W> prompt tags and --lora names resolve in")
    g.add_argument("--embeddings-dir", default=None,
                   help="folder of textual-inversion .safetensors files; a prompt uses one by its file name (A1111) "
                        "or as embedding:NAME (ComfyUI)")
    g.add_argument("--hires-scale", type=float, default=None,
                   help="hires fix (any --hires-* flag turns it on): upscale the first pass by this factor (default 2) "
                        "and run an image-to-image pass at that size")
    g.add_argument("--hires-resize", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="hires fix: target size instead of --hires-scale (0 for one side keeps the aspect ratio)")
    g.add_argument("--hires-steps", type=int, default=None, help="hires fix: second-pass steps (default: --steps)")
    g.add_argument("--hires-strength", type=float, default=None,
                   help="hires fix: denoising strength of the second pass (default 0.7)")
    g.add_argument("--hires-upscaler", default=None,
                   help="hires fix: Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic "
                        "antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', or Lanczos / Nearest (pixels)")
    g.add_argument("--hires-sampler", default=None, help="hires fix: the second pass's sampler (default: --sampler)")
    add_load_options(g)
    g.add_argument("--memory", choices=["keep", "low"], default="keep",
                   help="low: file-backed weights leave RAM after each use (one component resident at a time)")
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

    d = sub.add_parser("data", help="build training datasets", description="Build training datasets.")
    dsub = d.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    e = dsub.add_parser(
        "emoji", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="text-to-image dataset from Twemoji and Noto emoji art (for the miniature, ~64 px)",
        description="Fetch the Twemoji and Noto emoji packages with npm (once, checksum-verified, cached) and write "
                    "DIR/images/*.png, DIR/metadata.jsonl, DIR/names.json, README, licences and a contact sheet.",
    )
    e.add_argument("dir", help="output folder")
    e.add_argument("--styles", nargs="+", choices=["twemoji", "noto"], default=["twemoji", "noto"], help="art styles")
    e.add_argument("--skin-tones", action="store_true", help="also draw the skin-tone variants")
    e.add_argument("--upscaled-share", type=float, default=0.25,
                   help="share of emoji also stored downscaled to 16-48 px and upscaled back to 64 (blurry)")
    e.add_argument("--margin-share", type=float, default=0.25,
                   help="share of emoji also stored at a random offset on a 72/80-px canvas")
    e.add_argument("--compositions", type=int, default=None,
                   help="multi-aspect images of one or two emoji per style; None = one per emoji")
    e.add_argument("--seed", type=int, default=0, help="every random choice follows from it")
    e.add_argument("--limit", type=int, default=None, help="only the first N emoji per style (quick runs)")
    e.add_argument("--categories", nargs="+", default=None, help="only these emoji categories, e.g. 'Food & Drink'")
    e.add_argument("--cache", default=None,
                   help="folder of the npm tarballs; None = $STABLEXL_CACHE/npm, else ~/.cache/stablexl/npm")
    e.add_argument("--overwrite", action="store_true", help="replace a dataset already in DIR")
    e.set_defaults(func=_data_emoji)
    _add_train(sub)
    _add_serve(sub)
    _add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .train.state import StateWriteError  # a disk that filled while a training state was written

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None) and args.command == "train":  # a recipe file supplies defaults; flags win
            args._parser.set_defaults(**args._config_loader(args.config))
            args = parser.parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, MemoryError, StateWriteError) as e:  # CheckpointError is a ValueError
        msg = str(e).replace("allow_pickle=True (CLI: --allow-pickle)", "--allow-pickle")
        print(f"stablexl {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
