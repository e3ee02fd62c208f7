"""Load and save tiny autoencoders (TAESD / TAESDXL / our miniature's), strictly, from three layouts:

1. a diffusers folder: `config.json` (`_class_name: AutoencoderTiny`) + `diffusion_pytorch_model.safetensors`
   with keys `encoder.layers.N...` / `decoder.layers.N...` (our attribute names);
2. our component file: the same keys, the config as JSON in the `stablexl.component` metadata;
3. upstream's bare files (madebyollin/taesd: `taesd_decoder.safetensors`, `taesdxl_encoder.safetensors`, ...):
   one half per file, keys indexing its nn.Sequential (`1.weight`, `3.conv.0.weight`, `3.skip...`). The
   decoder's entry 0 is the parameter-free clamp, so upstream decoder index N is our `decoder.layers.{N-1}`;
   encoder indices are the same (taesd.py @5cccb12). Which half it is: a first conv reading 3 image channels
   (encoder, key `0.weight`) or the latent channels (decoder, key `1.weight`).
Such a bare file carries no config: it is read with TAESD's shape (or `config`), and its latent space is what
the caller says (`latent_space`), never a guess from the file name.

Pickled `.pth` files (upstream's repo ships those too) are refused unless `allow_pickle=True`.
A name that is not a path: "taesd" / "taesdxl" are looked up as madebyollin/taesd and madebyollin/taesdxl
(diffusers folders) in the local Hugging Face cache, "mini" is the shipped miniature's decoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..config import TAESD, TinyAutoencoderConfig, component_from_dict
from ..models.taesd import AutoencoderTiny
from . import diffusers_format as dfmt
from .checkpoint import (
    CheckpointError, Plan, SafetensorsSource, TensorSource, atomic_save_safetensors, check_finite, check_plans,
    load_plans, open_tensor_file, parse_dtype,
)
from .components import KEY
from .keymaps import Rule

KIND = "tiny-autoencoder"
# Short names -> (hub repo id, latent space). Hub folders are diffusers AutoencoderTiny folders.
HUB_NAMES = {"taesd": ("madebyollin/taesd", "sd"), "taesdxl": ("madebyollin/taesdxl", "sdxl")}


def mini_tiny_decoder_file() -> Path:
    from ..mini.weights import ASSET_DIR

    return ASSET_DIR / "tiny-decoder.safetensors"


def model_latent_space(config) -> str | None:
    """Which tiny decoders fit a model (`ModelConfig`): told by its VAE's architecture and family, never its name.
    None for VAEs no tiny decoder is known for (e.g. the random tiny-* test presets)."""
    from ..config import MINI, SD_VAE, SDXL_VAE

    if config.vae == MINI.vae:
        return "mini"
    if config.vae == SDXL_VAE and config.family.startswith("sdxl"):
        return "sdxl"
    if config.vae == SD_VAE and config.family.startswith(("sd1", "sd2")):
        return "sd"
    return None


def shipped_tiny_decoder(config) -> Path | None:
    """The tiny decoder that comes with a model: the miniature's, once it is in the package; else None."""
    path = mini_tiny_decoder_file()
    return path if model_latent_space(config) == "mini" and path.is_file() else None


def load_tiny_autoencoder(
    name_or_path: str | os.PathLike, *, config: TinyAutoencoderConfig | None = None,
    latent_space: str | None = None, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> AutoencoderTiny:
    """A tiny autoencoder (one half or both) from any of the layouts above; every tensor shape-checked.

    `config` only applies to bare upstream files (default: TAESD's shape). `latent_space` ("sd", "sdxl",
    "mini") fills in what a file does not say; a file that says something else is an error."""
    from .models import resolve

    name, known = str(name_or_path), None  # known: the latent space a hub name stands for
    if name == "mini" and not Path(name).exists():
        path = mini_tiny_decoder_file()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the miniature's tiny decoder is not in this install; train one with "
                                    "scripts/train_tiny_decoder.py or pass a file")
    elif name in HUB_NAMES and not Path(name).exists():
        repo, known = HUB_NAMES[name]
        path = resolve(repo)
    else:
        path = resolve(name_or_path)
    if path.is_dir():
        model = _load_folder(path, dtype, device)
    else:
        shape = config or dataclasses.replace(TAESD, latent_space=None)  # a bare file says nothing of it
        model = _load_file(open_tensor_file(path, allow_pickle=allow_pickle), shape, dtype, device)
    declared = model.config.latent_space or known
    if latent_space is not None and declared is not None and declared != latent_space:
        raise CheckpointError(f"{path}: a tiny autoencoder for the {declared!r} latent space, but {latent_space!r} "
                              "was asked for; use the one distilled from this model's VAE")
    if model.config.latent_space is None and (declared or latent_space) is not None:
        model.config = dataclasses.replace(model.config, latent_space=declared or latent_space)  # type: ignore[arg-type]
    check_finite(model, str(path))
    return model.eval().requires_grad_(False)


def _load_file(source: TensorSource, default: TinyAutoencoderConfig, dtype, device) -> AutoencoderTiny:
    raw = source.metadata.get(KEY)
    if raw is not None:  # ours
        info = json.loads(raw)
        if info.get("kind") != KIND:
            raise CheckpointError(f"{source.path}: holds a stablexl {info.get('kind')}, not a tiny autoencoder")
        cfg = component_from_dict(TinyAutoencoderConfig, info["config"])
        halves = {h for h in ("encoder", "decoder") if any(k.startswith(h + ".") for k in source.keys())}
        return _fill(source, cfg, halves, {}, dtype, device)
    keys = source.keys()
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):  # diffusers keys, no config
        halves = {h for h in ("encoder", "decoder") if any(k.startswith(h + ".") for k in keys)}
        return _fill(source, default, halves, {}, dtype, device)
    first_enc, first_dec = "0.weight", "1.weight"
    if first_enc in source and len(source.shape(first_enc)) == 4 and source.shape(first_enc)[1] == default.image_channels:
        half, shift = "encoder", 0
    elif first_dec in source and len(source.shape(first_dec)) == 4:
        half, shift = "decoder", 1
        lat = source.shape(first_dec)[1]
        if lat != default.latent_channels:  # e.g. TAESD3 / TAEF1 (16 channels): same network, wider input
            default = dataclasses.replace(default, latent_channels=lat)
    else:
        sample = sorted(keys)[:6]
        raise CheckpointError(f"{source.path}: not a tiny autoencoder (no diffusers `decoder.layers.*` keys and no "
                              f"upstream TAESD `0.weight` / `1.weight` first conv; keys start {sample})")
    renames = {}
    for k in keys:
        idx, _, rest = k.partition(".")
        if not idx.isdigit():
            raise CheckpointError(f"{source.path}: unexpected key {k!r} in an upstream TAESD {half} file")
        renames[f"{half}.layers.{int(idx) - shift}.{rest}"] = k
    return _fill(source, default, {half}, renames, dtype, device)


def _fill(source: TensorSource, cfg: TinyAutoencoderConfig, halves: set[str], renames: dict[str, str],
          dtype, device) -> AutoencoderTiny:
    """Strictly load `halves` of a model of `cfg` from `source` (`renames`: our key -> the file's)."""
    if not halves:
        raise CheckpointError(f"{source.path}: holds neither an encoder nor a decoder")
    with torch.device("meta"):
        module = AutoencoderTiny(cfg, encoder="encoder" in halves, decoder="decoder" in halves)
    plan = Plan(module, [Rule((k,), renames.get(k, k)) for k in module.state_dict()], "")
    try:
        check_plans(source, [plan], allow_ignorable=False)
    except CheckpointError as e:
        raise CheckpointError(f"not a tiny autoencoder of this shape ({cfg.decoder_channels} channels, "
                              f"{cfg.decoder_blocks} decoder blocks): {e}") from None
    load_plans(source, [plan], parse_dtype(dtype), device)
    return module


def _load_folder(folder: Path, dtype, device) -> AutoencoderTiny:
    if (folder / "vae" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "vae"
    cfg = tiny_from_diffusers(dfmt.read_json(folder / "config.json"), str(folder / "config.json"))
    files = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")]
    found = [p for p in files if p.is_file()]
    if not found:
        pickles = [p.name for p in folder.glob("*.bin")]
        hint = f" It has {pickles}: pickled weights are refused; convert them to safetensors first." if pickles else ""
        raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors.{hint}")
    source = SafetensorsSource(found[0])
    halves = {h for h in ("encoder", "decoder") if any(k.startswith(h + ".") for k in source.keys())}
    return _fill(source, cfg, halves, {}, dtype, device)


def tiny_from_diffusers(d: dict, where: str) -> TinyAutoencoderConfig:
    """diffusers AutoencoderTiny config.json -> our config; refuses settings our network does not implement."""
    if d.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise CheckpointError(f"{where}: holds a {d['_class_name']}, not an AutoencoderTiny")
    fixed = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "scaling_factor": 1.0,
             "shift_factor": 0.0}
    for k, want in fixed.items():
        if k in d and d[k] != want:  # diffusers' defaults; TAESD never changes them
            raise CheckpointError(f"{where}: {k}={d[k]!r} is not supported (only {want!r}, as in every TAESD)")
    enc, dec = tuple(d.get("encoder_block_out_channels", (64,) * 4)), tuple(d.get("decoder_block_out_channels", (64,) * 4))
    return TinyAutoencoderConfig(
        latent_channels=d.get("latent_channels", 4), image_channels=d.get("in_channels", 3),
        encoder_channels=enc, encoder_blocks=tuple(d.get("num_encoder_blocks", (1, 3, 3, 3))),
        decoder_channels=dec, decoder_blocks=tuple(d.get("num_decoder_blocks", (3, 3, 3, 1))),
        latent_magnitude=float(d.get("latent_magnitude", 3.0)), latent_shift=float(d.get("latent_shift", 0.5)),
    )


def tiny_to_diffusers(cfg: TinyAutoencoderConfig) -> dict:
    """Our config -> diffusers AutoencoderTiny config.json (loadable there only with equal widths per level)."""
    return {"_class_name": "AutoencoderTiny", "in_channels": cfg.image_channels, "out_channels": cfg.image_channels,
            "encoder_block_out_channels": list(cfg.encoder_channels), "decoder_block_out_channels": list(cfg.decoder_channels),
            "num_encoder_blocks": list(cfg.encoder_blocks), "num_decoder_blocks": list(cfg.decoder_blocks),
            "latent_channels": cfg.latent_channels, "latent_magnitude": cfg.latent_magnitude,
            "latent_shift": cfg.latent_shift, "act_fn": "relu", "upsample_fn": "nearest",
            "upsampling_scaling_factor": 2, "scaling_factor": 1.0, "shift_factor": 0.0, "force_upcast": False}


def save_tiny_autoencoder(model: AutoencoderTiny, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
    """Our component file: diffusers key names, the config in the metadata (`dtype`: e.g. fp16 to ship)."""
    dt = parse_dtype(dtype)
    path = Path(path)
    tensors = {k: (v.to(dt) if dt is not None else v) for k, v in model.state_dict().items()}
    atomic_save_safetensors(tensors, path, {KEY: json.dumps({"kind": KIND, "config": dataclasses.asdict(model.config)})})
    return path
