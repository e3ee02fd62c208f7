"""From command-line options to a task and a run: `stablexl train {clip,vae,unet,lora}` lands here."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..config import MINI_VISION, PAD_EOS, PAD_ZERO, PRESETS, preset
from .data import Augment, TrainData, make_buckets, scan_dataset
from .loop import TrainConfig, train

# Per-task defaults that differ from TrainConfig's (LDM/sgm values; reference/training.md §1.3, §2).
TASK_DEFAULTS = {
    "unet": {"lr": 1e-4, "ema_decay": 0.9999},
    "vae": {"lr": 4.5e-6, "ema_decay": 0.999},
    "clip": {"lr": 5e-4, "ema_decay": 0.0},
    "lora": {"lr": 1e-4, "ema_decay": 0.0},  # kohya's usual unet_lr; no EMA
    "add": {"lr": 2e-5, "ema_decay": 0.99},  # reference/distillation.md §3.2
    "lcm": {"lr": 2e-5, "ema_decay": 0.0},  # §6.9; its target network is an EMA of its own (0.95)
}


# ADD's option values, here (not in add.py) so that building the CLI parser does not import the trainers
STUDENT_TIMESTEPS = (999, 749, 499, 249)  # the trailing 4-step list (reference/distillation.md §0)
WEIGHT_SCHEDULES = ("exponential", "sds", "uniform")  # c(t) of the distillation loss


def load_config_file(path: str | None) -> dict:
    """--config: a JSON object of option defaults (dashes or underscores), e.g. a saved recipe."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {p}: no such file (a JSON object of options, e.g. {{\"lr\": 1e-4}})")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {p} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config {p} must hold a JSON object of options")
    return {k.replace("-", "_"): v for k, v in d.items()}


def train_config(a: argparse.Namespace) -> TrainConfig:
    d = TASK_DEFAULTS[a.task]
    return TrainConfig(
        steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
        lr=a.lr if a.lr is not None else d["lr"], warmup_steps=a.warmup_steps, decay_steps=a.decay_steps,
        weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, ema_decay=a.ema_decay if a.ema_decay is not None else d["ema_decay"], seed=a.seed,
        precision=a.precision, device=getattr(a, "device", "cpu") or "cpu", checkpoint_every=a.checkpoint_every,
        keep_checkpoints=a.keep_checkpoints, log_every=a.log_every, sample_every=a.sample_every, fsdp=a.fsdp,
    )


def make_data(a: argparse.Namespace, square: int | None = None) -> TrainData:
    report = scan_dataset(a.data)
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable image(s)")
    records = report.records
    if a.min_original_size:  # the SDXL paper's Table 2 baseline: discard low-resolution images (there: < 256 px)
        # by area, so that a wide native canvas (e.g. 40x96) is not mistaken for a small image
        n = a.min_original_size
        records = [r for r in records if math.prod(r.original_size or r.size) >= n * n]
        print(f"--min-original-size {a.min_original_size}: kept {len(records)} of {len(report.records)} images")
        if not records:
            raise ValueError(f"--min-original-size {a.min_original_size} leaves no images; lower it")
    buckets = [(square, square)] if square else make_buckets(a.bucket_size, a.bucket_step, a.max_aspect)
    aug = Augment(flip_p=0.0 if a.no_flip else 0.5, max_zoom=a.max_zoom, random_crop=not a.center_crop)
    return TrainData(records, buckets, a.batch_size, a.seed, aug)


def _init(seed: int):
    torch.manual_seed(seed)


def build_task(a: argparse.Namespace):
    if a.task == "clip":
        from ..io.components import load_component_file
        from ..models.clip import CLIPModel
        from .clip import CLIPTask

        cfg = preset(a.model)
        _init(a.seed)
        if a.init:
            model = load_component_file(a.init, "clip")
        else:
            vision = MINI_VISION if cfg.name == "mini" else None
            if vision is None:
                raise ValueError(f"no CLIP image tower is defined for {cfg.name!r}; train CLIP for --model mini")
            model = CLIPModel(vision, [spec.config for spec in cfg.text_encoders])
        pads = tuple(spec.pad_id for spec in cfg.text_encoders) if len(cfg.text_encoders) == len(model.texts) \
            else (PAD_EOS, PAD_ZERO)[: len(model.texts)]
        return CLIPTask(model, make_data(a, square=a.bucket_size), pads)
    if a.task == "vae":
        from ..io.components import load_component_file
        from ..models.vae import AutoencoderKL
        from .vae import VAETask, VAETrainOptions

        _init(a.seed)
        if a.init == "mini" and not Path(a.init).exists():  # the shipped miniature's VAE
            from ..mini.weights import load_mini_parts

            vae = load_mini_parts().vae
        else:
            vae = load_component_file(a.init, "vae") if a.init else AutoencoderKL(preset(a.model).vae)
        if a.decoder_only and not a.init:
            raise ValueError("--decoder-only fine-tunes a trained VAE's decoder: pass --init (a vae.safetensors, or 'mini')")
        opts = VAETrainOptions(kl_weight=a.kl_weight, perceptual=a.perceptual, perceptual_weight=a.perceptual_weight,
                               lpips_vgg=a.lpips_vgg, lpips_lin=a.lpips_lin, disc_start=a.disc_start,
                               disc_weight=a.disc_weight, disc_ndf=a.disc_ndf, decoder_only=a.decoder_only)
        return VAETask(vae, make_data(a), opts, grad_accum=a.grad_accum)
    if a.task == "lora":
        return _lora_task(a)
    if a.task in ("add", "lcm"):
        return _distill_task(a)
    from .unet import UNetTask

    return UNetTask(_unet_parts(a), make_data(a), _unet_options(a))


def _unet_options(a: argparse.Namespace):
    """The SDXL recipe's options, shared by `train unet` and `train lora`."""
    from .unet import UNetTrainOptions

    return UNetTrainOptions(
        prediction=a.prediction, dropout_text=a.dropout_text, dropout_original_size=a.dropout_size,
        dropout_crop=a.dropout_crop, dropout_target_size=a.dropout_target,
        size_conditioning=not a.no_size_conditioning, offset_noise=a.offset_noise,
        min_snr_gamma=a.min_snr_gamma, cache_latents=a.cache_latents, cache_text=not a.no_cache_text,
        sample_prompts=tuple(a.sample_prompt or ()), sample_steps=a.sample_steps,
        gradient_checkpointing=a.gradient_checkpointing, max_timestep=getattr(a, "max_timestep", None),
        aesthetic_proxy=getattr(a, "aesthetic_proxy", "blur"), dropout_image=getattr(a, "dropout_image", 0.1))


def _lora_task(a: argparse.Namespace):
    """LoRA on trained weights: a checkpoint / diffusers folder / HF cache id, "mini", or a tiny-* preset (its
    seed-0 weights, the same as `Pipeline.from_pretrained` gives), loaded in fp32."""
    from ..pipeline import Pipeline
    from .lora import LoraOptions, LoraTask

    if a.fsdp:
        raise ValueError("--fsdp is not supported for LoRA training (the factors are small: use DDP)")
    parts = Pipeline.from_pretrained(a.model, device="cpu", dtype="fp32").parts
    modules = tuple(m.strip() for m in a.modules.split(",") if m.strip())
    lora = LoraOptions(rank=a.rank, alpha=a.rank if a.alpha is None else a.alpha, modules=modules,
                       conv_rank=a.conv_rank, conv_alpha=a.conv_alpha, text_encoders=a.text_encoders,
                       save_dtype=a.save_dtype, output_name=a.output_name)
    return LoraTask(parts, make_data(a), _unet_options(a), lora, seed=a.seed, model_name=Path(a.model).name)


def _distill_task(a: argparse.Namespace):
    """ADD / LCM: the teacher (any checkpoint, "mini" or a tiny-* preset) in fp32 and its square full-resolution
    images (upscaled ones excluded: their blur would be "real" to ADD's discriminator; LCM uses the same images
    so that the two compare on one data set); ADD also loads its frozen ViT."""
    from ..pipeline import Pipeline
    from .unet import UNetTrainOptions

    if a.fsdp:
        raise ValueError(f"--fsdp is not supported for {a.task.upper()} (the teacher and the student are small: use DDP)")
    _init(a.seed)
    parts = Pipeline.from_pretrained(a.teacher, device="cpu", dtype="fp32").parts
    features = None
    if a.task == "add":
        from .add import load_features

        features = load_features(a.features, parts)  # before the data: a wrong path fails in a second
    res = parts.config.resolution
    data = make_data(a, square=res)
    keep = [r for r in data.records if r.size[0] == r.size[1] and tuple(r.original_size or r.size) == tuple(r.size)]
    if not keep:
        raise ValueError(f"{a.data}: no square images at their original size to distil on")
    print(f"{a.task.upper()}: {len(keep)} of {len(data.records)} images (square, not upscaled)")
    data = TrainData(keep, [(res, res)], a.batch_size, a.seed, data.augment)
    prompts = tuple(a.sample_prompt or ())
    if a.task == "lcm":
        from .lcm import LCMOptions, LCMTask

        opts = LCMOptions(ddim_steps=a.ddim_steps, teacher_cfg=a.teacher_cfg, target_ema=a.target_ema,
                          huber_c=a.huber_c, sample_prompts=prompts)
        return LCMTask(parts, data, opts, UNetTrainOptions(cache_latents=True), grad_accum=a.grad_accum)
    from .add import ADDOptions, ADDTask

    ts = tuple(int(t) for t in str(a.student_timesteps).split(",") if t.strip())
    opts = ADDOptions(student_timesteps=ts, teacher_cfg=a.teacher_cfg, distill_weight=a.distill_weight,
                      adv_weight=a.adv_weight, weight_schedule=a.weight_schedule, distill_space=a.distill_space,
                      r1_gamma=a.r1_gamma, disc_lr=a.disc_lr, reals=a.reals, augment=not a.no_augment,
                      sample_prompts=prompts)
    return ADDTask(parts, data, features, opts, UNetTrainOptions(cache_latents=True))


def _take_mini_networks(parts) -> None:
    """The shipped mini's VAE and the text towers whose specs the preset shares (e.g. the refiner's bigG-shaped
    one), frozen: the new UNet learns in mini's latent space from mini's text features."""
    from ..mini.weights import load_mini_parts

    mini = load_mini_parts()
    if parts.config.vae != mini.config.vae:
        raise ValueError(f"{parts.config.name} does not share mini's VAE")
    parts.vae = mini.vae
    towers = dict(zip(mini.config.text_encoders, mini.text_encoders))
    for i, spec in enumerate(parts.config.text_encoders):
        if spec not in towers:
            raise ValueError(f"{parts.config.name}'s text encoder {i} is none of mini's")
        parts.text_encoders[i] = towers[spec]
    if parts.config.unclip is not None:  # unCLIP: the mini CLIP's image tower gives the image embeddings
        from ..mini.weights import mini_clip

        vision = mini_clip(mini).vision
        if vision.config != parts.config.unclip.vision:
            raise ValueError(f"{parts.config.name}'s image tower is not the shipped mini CLIP's")
        parts.image_encoder = vision


def _init_unet(parts, source: str) -> None:
    """`train unet --init`: start the UNet from another model's (a checkpoint, or a shipped model such as 'mini').
    Tensors of the same name and shape are copied; those whose shape differs (e.g. the vector input of an unCLIP
    UNet made from a base UNet) start at zero, so the new input begins by changing nothing."""
    from ..io.models import load_model
    from ..mini.weights import SHIPPED, load_shipped

    theirs = (load_shipped(source) if source in SHIPPED and not Path(source).exists() else load_model(source)).unet
    theirs = theirs.state_dict()
    own = parts.unet.state_dict()
    missing = [k for k in own if k not in theirs]
    if missing:
        raise ValueError(f"--init {source}: its UNet has no {missing[0]} (and {len(missing) - 1} more of this model's "
                         f"tensors): it is not a {parts.config.name}-shaped UNet")
    zeroed = [k for k in own if theirs[k].shape != own[k].shape]
    parts.unet.load_state_dict({k: torch.zeros_like(v) if k in zeroed else theirs[k].float() for k, v in own.items()})
    parts.notes.append(f"UNet initialised from {source}" + (f"; zero-initialised (shape differs): {', '.join(zeroed)}"
                                                             if zeroed else ""))


def _unet_parts(a: argparse.Namespace):
    from ..io.components import load_component_file
    from ..io.models import load_model
    from ..models.parts import build_parts

    if a.model in PRESETS and not Path(a.model).exists():
        _init(a.seed)
        parts = build_parts(PRESETS[a.model], device="cpu")
        if a.model.startswith("mini-"):  # a member of the miniature family: mini's trained VAE and text towers
            _take_mini_networks(parts)
    else:
        parts = load_model(a.model, dtype=torch.float32)
    cfg = parts.config
    if a.vae:
        vae = load_component_file(a.vae, "vae")
        if vae.config != cfg.vae:
            raise ValueError(f"--vae {a.vae} has a different architecture from {cfg.name}'s VAE")
        parts.vae = vae
    if a.text_encoders:
        clip = load_component_file(a.text_encoders, "clip")
        towers = list(clip.texts)
        want = [spec.config for spec in cfg.text_encoders]
        if [t.config for t in towers] != want:
            raise ValueError(f"--text-encoders {a.text_encoders}: its text towers do not match {cfg.name}'s text encoders")
        parts.text_encoders = towers
    if getattr(a, "init", None):
        _init_unet(parts, a.init)
        print(parts.notes[-1])
    return parts


def main(a: argparse.Namespace) -> int:
    torch.set_flush_denormal(True)  # subnormal floats are up to 50x slower on CPUs (see pipeline.py)
    if a.threads:
        torch.set_num_threads(a.threads)
    task = build_task(a)
    cfg = train_config(a)
    out = train(task, cfg, a.output, resume=a.resume, progress=not a.quiet)
    if out is not None:
        print(f"wrote {out}")
    return 0
