"""Load and save whole models in our format, the official single-file layout and diffusers folders.

Layout detection (documented rules, applied in this order):
1. A folder with `model_index.json` is a diffusers folder; its configs say everything.
2. A file whose metadata holds `stablexl.config` was written by us; that config rebuilds it.
3. Otherwise a single file is identified from its keys and shapes, as diffusers'
   `infer_diffusers_model_type` does (reference/architecture.md §4.3):
   - `conditioner.embedders.1.model.transformer.resblocks.*`  -> SDXL base (also SDXL-Turbo)
   - `conditioner.embedders.0.model.transformer.resblocks.*` and no embedder 1 -> SDXL refiner
   - `model.diffusion_model.label_emb.0.0.weight` with a 1024-wide context -> SD 2.1-unCLIP;
     its input width 2048 -> unCLIP-H, 1536 -> unCLIP-L
   - `cond_stage_model.model.transformer.resblocks.*` (1024-wide cross-attention) -> SD 2.x.
     SD 2.1-768 (v) and 2.1-base (eps) have identical weights; like diffusers we take v-prediction
     unless the caller says `prediction="eps"`.
   - `cond_stage_model.transformer.text_model.*` -> SD 1.x
   - a UNet `conv_in` with 9 input channels marks the inpainting variant of its family.
   The OpenCLIP tower's depth and projection are read from the file (SD 2.x files may hold 23 or 24 blocks).
   So are the UNet's transformer depths per ResBlock and its mid block (Segmind SSD-1B and Vega keep SDXL's
   widths with fewer blocks; counted as ComfyUI's model_detection counts them), and the micro-condition
   width from `label_emb`. Marker tensors: `v_pred` -> v-prediction, `ztsnr` -> zero terminal SNR (ComfyUI).
A name that is not a path is looked up in the local Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME/hub`,
`~/.cache/huggingface/hub`) in the `models--org--name/snapshots/<rev>/` layout; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Literal

import torch

from ..config import ModelConfig, PRESETS, UNetConfig, as_turbo, looks_like_turbo, preset
from ..models.parts import ModelParts, build_parts
from . import diffusers_format as dfmt
from .checkpoint import (
    CheckpointError, Plan, SafetensorsSource, TensorSource, atomic_save_safetensors, check_finite, check_plans,
    iter_rules_out, load_plans, open_tensor_file, parse_dtype,
)
from .keymaps import Rule, ldm_vae_rules, single_file_layout

FORMAT_KEY, CONFIG_KEY, FORMAT_VERSION = "stablexl.format", "stablexl.config", "1"
QUANTIZE_KEY = "stablexl.quantize"  # JSON {component: "int8"} for files with int8 Linear layers (stablexl/quant.py)
Format = Literal["stablexl", "single-file", "diffusers"]


# --------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve(name_or_path: str | os.PathLike, revision: str = "main") -> Path:
    """A local path, or a hub repo id ("org/name") found in the local Hugging Face cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    name = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        folder = "models--" + name.replace("/", "--")
        for cache in hf_cache_dirs():
            repo = cache / folder
            if not repo.is_dir():
                continue
            ref = repo / "refs" / revision
            snap = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
            if snap.is_dir():
                return snap
            snaps = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
            if len(snaps) == 1:
                return snaps[0]
        raise CheckpointError(
            f"{name!r} is not a local path and is not in the local Hugging Face cache ({', '.join(map(str, hf_cache_dirs()))}). "
            "stablexl never downloads at run time: fetch it with `huggingface-cli download "
            f"{name}` where you have network, or pass the path of a .safetensors file or diffusers folder."
        )
    raise CheckpointError(f"{name!r}: no such file or folder; pass a .safetensors file, a diffusers folder, "
                          f"a Hugging Face repo id present in the local cache, or a preset ({', '.join(sorted(PRESETS))})")


def _weights_file(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of one diffusers component, honouring `variant` ("fp16") and shards."""
    names = [f"{stem}.{variant}.safetensors", f"{stem}.safetensors"] if variant else [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for n in names:
        if (folder / n).is_file():
            return [folder / n]
        idx = folder / (n + ".index.json")
        if idx.is_file():
            shards = sorted(set(dfmt.read_json(idx).get("weight_map", {}).values()))
            return [folder / s for s in shards]
    pickles = [p.name for p in folder.glob(f"{stem}*.bin")]
    hint = (f" It has {pickles}: pickled weights are refused; convert them to safetensors first." if pickles else "")
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or fp16 variant / sharded index) found.{hint}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
    allow_pickle: bool = False, variant: str | None = None, prediction: str | None = None,
    config: ModelConfig | None = None, after_check=None,
) -> ModelParts:
    """Load every network of a model, strictly, from our file, an official single file or a diffusers folder.

    `after_check(module)` runs after each component's NaN check (the low-memory policy releases its pages there).
    `dtype` None keeps the stored dtype. `config` overrides detection for single files whose family
    cannot be told from the weights. `prediction` ("eps" / "v") overrides the detected parameterisation.
    """
    dt = parse_dtype(dtype)
    path = resolve(name_or_path)
    if path.is_dir():  # each component is NaN-checked (and handed to after_check) as it is loaded
        parts = _load_diffusers(path, dt, device, variant, after_check)
    else:
        source = open_tensor_file(path, allow_pickle=allow_pickle)
        parts = _load_file(source, dt, device, config)
        for name, module in parts.modules().items():
            check_finite(module, f"{path} ({name})")
            if after_check is not None:  # e.g. memory.release: the check touched every page of this module
                after_check(module)
    if prediction is not None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        parts.config = dataclasses.replace(parts.config, prediction=prediction)  # type: ignore[arg-type]
    parts.source = path
    parts.eval()
    return parts


def _load_file(source: TensorSource, dtype, device, config: ModelConfig | None) -> ModelParts:
    meta = source.metadata
    if meta.get(FORMAT_KEY) and config is None:
        try:
            config = ModelConfig.from_json(meta[CONFIG_KEY])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source.path}: stablexl metadata is unreadable ({e}); the file is corrupt") from None
    layout = "single-file"
    if FORMAT_KEY in meta and meta.get("stablexl.layout", "stablexl") == "stablexl":
        layout = "stablexl"
    if config is None:
        config = detect_single_file(source)
    has_image_encoder = layout == "stablexl" and any(k.startswith("image_encoder.") for k in source.keys())
    parts = build_parts(config, device="meta", with_image_encoder=has_image_encoder)
    if layout == "stablexl" and QUANTIZE_KEY in meta:  # int8 layers: built empty, filled from the file as stored
        from ..quant import quantize_module

        try:
            quantized = json.loads(meta[QUANTIZE_KEY])
            mods = parts.modules()
            for component, mode in quantized.items():
                if mode != "int8" or component not in mods:
                    raise ValueError(f"{component}: {mode}")
                quantize_module(mods[component], meta=True)
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{source.path}: unreadable {QUANTIZE_KEY} metadata ({e}); the file is corrupt") from None
        parts.quantized = {c: "int8" for c in quantized}
    plans = plans_for(parts, layout, source)
    skipped = check_plans(source, plans)
    load_plans(source, plans, dtype, device)
    if skipped:
        parts.notes.append(f"skipped {len(skipped)} non-weight tensors (e.g. {skipped[0]})")
    if config.family == "sd2-unclip" and layout == "single-file":
        # The official unCLIP files hold no image-embedding statistics; identity is right for unCLIP-H only.
        parts.image_normalizer = _identity_normalizer(config, device, dtype)
        if config.unclip and config.unclip.embed_dim == 768:
            parts.notes.append("unCLIP-L single file: no image-embedding statistics inside; using identity normalisation")
    parts.notes.append(f"loaded {source.path} as {config.name} ({layout})")
    return parts


def _identity_normalizer(config: ModelConfig, device, dtype):
    from ..models.parts import EmbeddingNormalizer

    n = EmbeddingNormalizer(config.unclip.embed_dim).to(device)
    return n.to(dtype) if dtype else n


def plans_for(parts: ModelParts, layout: str, source: TensorSource | None = None) -> list[Plan]:
    """The key rules that map every component of `parts` onto a file of the given layout."""
    mods = parts.modules()
    if layout == "stablexl":
        return [Plan(m, [Rule((k,), k) for k in m.state_dict()], f"{name}.") for name, m in mods.items()]
    plans = []
    for comp in single_file_layout(parts.config):
        m = mods[comp.component]
        plans.append(Plan(m, comp.rules(parts.config, list(m.state_dict())), comp.prefix))
    return plans


def detect_single_file(source: TensorSource) -> ModelConfig:
    keys = source.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    if conv_in not in source:
        sample = sorted({k.split(".")[0] for k in keys})[:8]
        raise CheckpointError(
            f"{source.path}: unknown checkpoint layout (no UNet at model.diffusion_model.*; top-level prefixes: {sample}). "
            "Supported: official SD 1.5 / 2.x / 2.1-unCLIP / SDXL base, Turbo and refiner single files, stablexl files "
            "and diffusers folders. A VAE- or text-encoder-only file cannot be loaded as a whole model."
        )
    in_ch = source.shape(conv_in)[1]
    if has("conditioner.embedders.1.model.transformer.resblocks."):
        config = preset("sdxl-base")
    elif has("conditioner.embedders.0.model.transformer.resblocks."):
        config = preset("sdxl-refiner")
    elif has("cond_stage_model.model.transformer.resblocks."):
        label = "model.diffusion_model.label_emb.0.0.weight"
        if label in source:
            adm = source.shape(label)[1]
            config = {2048: preset("sd21-unclip-h"), 1536: preset("sd21-unclip-l")}.get(adm)
            if config is None:
                raise CheckpointError(f"{source.path}: SD 2.x UNet with a {adm}-wide image-embedding input is not a known unCLIP model")
        else:
            config = preset("sd21")
    elif has("cond_stage_model.transformer.text_model."):
        config = preset("sd15")
    else:
        raise CheckpointError(f"{source.path}: has a UNet but no text encoder this loader recognises "
                              "(cond_stage_model.* or conditioner.embedders.*); it is not a complete SD/SDXL checkpoint")
    if in_ch != config.unet.in_channels:
        if in_ch != 9:
            raise CheckpointError(f"{source.path}: UNet with {in_ch} input channels; expected 4, or 9 for inpainting models")
        config = dataclasses.replace(config, name=config.name + "-inpaint",
                                     unet=dataclasses.replace(config.unet, in_channels=9))
    # OpenCLIP towers: take depth and projection from the file (SD 2.x diffusers-converted files keep 23 blocks).
    specs = []
    for comp, spec in zip(single_file_layout(config)[2:], config.text_encoders):
        if comp.prefix.endswith(".model."):
            blocks = {int(m[1]) for k in keys if (m := re.match(re.escape(comp.prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
            proj = comp.prefix + "text_projection" in source
            text = dataclasses.replace(spec.config, layers=len(blocks), projection_dim=spec.config.projection_dim if proj else 0)
            if spec.layer > text.layers:
                raise CheckpointError(f"{source.path}: text encoder {comp.prefix} has {text.layers} blocks; this model reads block {spec.layer}")
            spec = dataclasses.replace(spec, config=text)
        specs.append(spec)
    unet = _unet_from_keys(config, source)
    if unet != config.unet and config.family == "sdxl-base":
        down = tuple(unet.down_depths(level) for level in range(len(unet.channel_mult)))
        config = dataclasses.replace(config, name=_DERIVATIVES.get(down, "sdxl-base-derivative"))
    config = dataclasses.replace(config, text_encoders=tuple(specs), unet=unet)
    if config.family in ("sdxl-base", "sd2") and looks_like_turbo(Path(str(source.path)).name, source.metadata):
        config = as_turbo(config)
    if "v_pred" in source:
        config = dataclasses.replace(config, prediction="v")
    if "ztsnr" in source:
        config = dataclasses.replace(config, zero_terminal_snr=True)
    return config


# SDXL derivatives known by their down-path depths (ComfyUI supported_models.py SSD1B, Segmind_Vega)
_DERIVATIVES = {((0, 0), (2, 2), (4, 4)): "ssd-1b", ((0, 0), (1, 1), (2, 2)): "segmind-vega"}


def _unet_from_keys(config: ModelConfig, source: TensorSource) -> UNetConfig:
    """The family's UNet config with the transformer depth after every ResBlock, the mid block's kind and the
    micro-condition width as the file's LDM keys show them."""
    cfg, pre = config.unet, "model.diffusion_model."
    n, k = len(cfg.channel_mult), cfg.num_res_blocks + 1
    depth: dict[tuple[str, int], int] = {}
    for key in source.keys():
        # input_blocks.I.1.transformer_blocks.B / output_blocks.I.1... / middle_block.1.transformer_blocks.B
        if m := re.match(re.escape(pre) + r"(input_blocks\.\d+|output_blocks\.\d+|middle_block)\.1\.transformer_blocks\.(\d+)\.", key):
            kind, _, i = m[1].partition(".")
            where = (kind, int(i or 1))
            depth[where] = max(depth.get(where, 0), int(m[2]) + 1)
    down = tuple(tuple(depth.get(("input_blocks", 1 + level * k + j), 0) for j in range(k - 1)) for level in range(n))
    up = tuple(tuple(depth.get(("output_blocks", (n - 1 - level) * k + j), 0) for j in range(k)) for level in range(n))
    if ("middle_block", 1) in depth:
        mid, mid_depth = "attention", depth[("middle_block", 1)]
    else:
        mid, mid_depth = ("resnet" if any(key.startswith(pre + "middle_block.0.") for key in source.keys()) else "none"), 0
    td = tuple(ds[0] for ds in down)
    fields = dict(transformer_depth=td, mid_transformer_depth=mid_depth, mid_block=mid, down_layer_depths=down,
                  up_layer_depths=up)
    label = pre + "label_emb.0.0.weight"
    if config.family.startswith("sdxl") and label in source:  # pooled ‖ 6 (base) or 5 (refiner) micro-conditions
        adm, pooled = source.shape(label)[1], config.text_encoders[-1].config.projection_dim
        micro, rest = divmod(adm - pooled, 6 if config.family == "sdxl-base" else 5)
        if rest == 0 and micro > 0:
            fields.update(vector_dim=adm, micro_dim=micro)
    try:
        return dataclasses.replace(cfg, **fields)
    except ValueError as e:
        raise CheckpointError(f"{source.path}: the UNet's transformer blocks do not form a UNet this loader builds ({e})") from None


def _load_diffusers(root: Path, dtype, device, variant: str | None, after_check=None) -> ModelParts:
    config, _index = dfmt.model_config_from_folder(root, name=root.name)
    load = lambda folder: load_component(root / folder, dtype=dtype, device=device, variant=variant,  # noqa: E731
                                         after_check=after_check)
    parts = ModelParts(
        config=config, unet=load("unet"), vae=load("vae"),
        text_encoders=[load(folder) for folder, _tok in dfmt.text_folders(config)],
    )
    if config.unclip is not None:
        parts.image_encoder = load("image_encoder")
        parts.image_normalizer = load("image_normalizer")
    parts.notes.append(f"loaded diffusers folder {root} as {config.family}")
    return parts


def load_vae(path: str | os.PathLike, *, vae_config, dtype: str | torch.dtype | None = None,
             device: str | torch.device = "cpu", allow_pickle: bool = False) -> torch.nn.Module:
    """A separate VAE, as A1111's `sd_vae` and diffusers' `vae=`: a diffusers folder (its own, or a model
    folder's `vae/`), a single file in the original LDM layout (`encoder.down.0...`, optionally under
    `first_stage_model.`) or in diffusers' layout. A bare file carries no config, so it is read with the
    model's own VAE config (`vae_config`, which sets the latent scaling factor); shapes are checked strictly."""
    from ..models.vae import AutoencoderKL

    p = resolve(path)
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{p}: a VAE folder needs config.json (diffusers AutoencoderKL)")
        module = load_component(folder, dtype=dtype, device=device)
        if not isinstance(module, AutoencoderKL):
            raise CheckpointError(f"{folder}: holds a {type(module).__name__}, not a VAE (AutoencoderKL)")
        return module
    source = open_tensor_file(p, allow_pickle=allow_pickle)
    with torch.device("meta"):
        module = AutoencoderKL(vae_config)
    ours = list(module.state_dict())
    keys = source.keys()
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in keys) else ""
    if any(k.startswith(prefix + "encoder.down.") or k.startswith(prefix + "decoder.up.") for k in keys):
        rules = ldm_vae_rules(vae_config, ours)  # the original (A1111 / sgm) layout
    else:
        rules = [Rule((k,), k) for k in ours]  # diffusers' key names are ours
    plan = Plan(module, rules, prefix)
    try:
        check_plans(source, [plan])
    except CheckpointError as e:
        raise CheckpointError(f"{p}: not a VAE for this model ({e})") from None
    load_plans(source, [plan], parse_dtype(dtype), device)
    check_finite(module, str(p))
    return module.eval().requires_grad_(False)


def load_component(
    folder: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
    variant: str | None = None, after_check=None,
) -> torch.nn.Module:
    """One diffusers / transformers component folder (config.json + safetensors) -> our module, strictly.
    `after_check(module)` runs after its NaN check, as in `load_model`.

    UNet2DConditionModel -> UNet, AutoencoderKL -> AutoencoderKL, CLIPTextModel(WithProjection) ->
    CLIPTextModel, CLIPVisionModelWithProjection -> CLIPVisionModel, StableUnCLIPImageNormalizer ->
    EmbeddingNormalizer.
    """
    from ..models.clip import CLIPTextModel, CLIPVisionModel
    from ..models.parts import EmbeddingNormalizer
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL

    folder = resolve(folder)
    where = str(folder / "config.json")
    d = dfmt.read_json(folder / "config.json")
    cls = d.get("_class_name") or (d.get("architectures") or [None])[0]
    renames: dict[str, str] = {}
    stem = "diffusion_pytorch_model"
    with torch.device("meta"):
        if cls == "UNet2DConditionModel":
            module: torch.nn.Module = UNet(dfmt.unet_from_diffusers(d, where))
            renames = dfmt.unet_key_renames(d)
        elif cls == "AutoencoderKL":
            module = AutoencoderKL(dfmt.vae_from_diffusers(d, where))
        elif cls in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            module, stem, renames = CLIPTextModel(dfmt.text_from_transformers(d, where)), "model", {"text_model.": ""}
        elif cls == "CLIPVisionModelWithProjection":
            module, stem, renames = CLIPVisionModel(dfmt.vision_from_transformers(d, where)), "model", {"vision_model.": ""}
        elif cls == "StableUnCLIPImageNormalizer":
            module = EmbeddingNormalizer(d.get("embedding_dim", 768))
        else:
            raise CheckpointError(f"{where}: component class {cls!r} is not supported")
    source = SafetensorsSource(_weights_file(folder, stem, dtype_variant(variant)))
    ours = set(module.state_dict())
    rules = []
    for key in source.keys():
        new = key
        for a, b in renames.items():
            if key.startswith(a):
                new = b + key[len(a):]
        if new in ours:
            rules.append(Rule((new,), key))
    plan = Plan(module, rules, "")
    check_plans(source, [plan])
    load_plans(source, [plan], parse_dtype(dtype), device)
    check_finite(module, str(folder))
    module.eval().requires_grad_(False)
    if after_check is not None:
        after_check(module)
    return module


def dtype_variant(variant: str | None) -> str | None:
    if variant not in (None, "fp16", "bf16", "fp32"):
        raise ValueError(f"unknown weights variant {variant!r}; diffusers folders use 'fp16' (or none)")
    return variant


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_model(parts: ModelParts, out: str | os.PathLike, fmt: Format = "stablexl", dtype: str | torch.dtype | None = None) -> Path:
    """Write `parts` as our file, an official single file, or a diffusers folder."""
    out = Path(out)
    dt = parse_dtype(dtype)
    cast = (lambda t: t.to(dt) if dt is not None and torch.is_floating_point(t) else t)  # noqa: E731
    if parts.quantized and fmt != "stablexl":
        raise ValueError(f"int8 layers ({', '.join(parts.quantized)}) can only be saved in the stablexl format; "
                         "load the original weights without quantize= to write other formats")
    if fmt in ("stablexl", "single-file"):
        meta = {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: parts.config.to_json(),
                "stablexl.layout": "stablexl" if fmt == "stablexl" else "single-file"}
        keep: set[str] = set()  # int8 weights and their fp32 scales keep their dtype
        if parts.quantized:
            from ..quant import stored_dtype_keys

            meta[QUANTIZE_KEY] = json.dumps(parts.quantized)
            for name, m in parts.modules().items():
                keep |= {f"{name}.{k}" for k in stored_dtype_keys(m)}
        tensors = {}
        for plan in plans_for(parts, fmt):
            for key, t in iter_rules_out(plan.module, plan.rules, plan.prefix):
                tensors[key] = t if key in keep else cast(t)
        atomic_save_safetensors(tensors, out, meta)
        return out
    if fmt == "diffusers":
        _save_diffusers(parts, out, cast)
        return out
    raise ValueError(f"unknown format {fmt!r}; use stablexl, single-file or diffusers")


def write_diffusers_configs(config: ModelConfig, root: Path) -> None:
    """model_index.json, every component's config.json, tokenizers and scheduler: a diffusers folder minus weights."""
    root.mkdir(parents=True, exist_ok=True)
    sample = config.resolution // config.vae.downsample_factor

    def write_json(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True))

    write_json(root / "model_index.json", dfmt.model_index_for(config))
    write_json(root / "scheduler" / "scheduler_config.json", dfmt.scheduler_config_for(config))
    write_json(root / "unet" / "config.json", dfmt.unet_to_diffusers(config.unet, config.family, sample))
    write_json(root / "vae" / "config.json", dfmt.vae_to_diffusers(config.vae, config.resolution))
    if config.unclip is not None:
        for rel, data in dfmt.unclip_extra_configs(config).items():
            write_json(root / rel, data)
    for spec, (folder, tok) in zip(config.text_encoders, dfmt.text_folders(config)):
        write_json(root / folder / "config.json", dfmt.text_to_transformers(dfmt.diffusers_text_config(spec)))
        (root / tok).mkdir(parents=True, exist_ok=True)
        for name, text in dfmt.tokenizer_files(spec.pad_id).items():
            (root / tok / name).write_text(text)


def _save_diffusers(parts: ModelParts, root: Path, cast) -> None:
    config = parts.config
    write_diffusers_configs(config, root)
    sample = config.resolution // config.vae.downsample_factor
    renames = {ours: theirs for theirs, ours in
               dfmt.unet_key_renames(dfmt.unet_to_diffusers(config.unet, config.family, sample)).items()}
    unet_sd = {}
    for k, v in parts.unet.state_dict().items():
        for ours, theirs in renames.items():
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        unet_sd[k] = cast(v)
    atomic_save_safetensors(unet_sd, root / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    atomic_save_safetensors({k: cast(v) for k, v in parts.vae.state_dict().items()},
                            root / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    if config.unclip is not None:
        if parts.image_encoder is None or parts.image_normalizer is None:
            raise ValueError("an unCLIP diffusers folder needs the image encoder and normalizer; load them first "
                             "(official unCLIP single files do not contain the image encoder)")
        sd = {("visual_projection.weight" if k == "visual_projection.weight" else f"vision_model.{k}"): cast(v)
              for k, v in parts.image_encoder.state_dict().items()}
        atomic_save_safetensors(sd, root / "image_encoder" / "model.safetensors", {"format": "pt"})
        atomic_save_safetensors({k: cast(v) for k, v in parts.image_normalizer.state_dict().items()},
                                root / "image_normalizer" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    for te, spec, (folder, _tok) in zip(parts.text_encoders, config.text_encoders, dfmt.text_folders(config)):
        text_cfg, sd = dfmt.diffusers_text_config(spec), te.state_dict()
        sd = {k: v for k, v in sd.items() if not (k.startswith("text_projection.") and not text_cfg.projection_dim)
              and not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= text_cfg.layers)}
        sd = {(k if k.startswith("text_projection.") else f"text_model.{k}"): cast(v) for k, v in sd.items()}
        atomic_save_safetensors(sd, root / folder / "model.safetensors", {"format": "pt"})
