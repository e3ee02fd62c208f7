"""The diffusers folder layout: `model_index.json` + one folder per component (config.json + weights).

Config translation is explicit in both directions: each diffusers / transformers field we read is
named here, and options our models do not implement are refused with a message rather than
ignored. Facts: reference/architecture.md §4.2 and the hub config.json files it cites.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import (
    CLIPTextConfig, CLIPVisionConfig, ModelConfig, SamplingDefaults, TextEncoderSpec, UNetConfig, UnCLIPConfig,
    VAEConfig,
)
from .checkpoint import CheckpointError

DIFFUSERS_VERSION = "0.42.1"  # the version whose layout we write and test against


def _err(path: Path | str, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _err(path, "missing; a diffusers folder needs this file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _err(path, "must hold a JSON object")
    return data


# --------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------

# Options of diffusers' UNet2DConditionModel that must have these values for our UNet to be the same network.
_UNET_FIXED = {
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "only_cross_attention": False, "dual_cross_attention": False,
    "encoder_hid_dim": None, "time_cond_proj_dim": None, "num_class_embeds": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "center_input_sample": False, "class_embeddings_concat": False,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_act_fn": None,
    "timestep_post_act": None, "attention_type": "default", "cross_attention_norm": None,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
}


def unet_from_diffusers(d: dict[str, Any], where: str = "unet/config.json") -> UNetConfig:
    for k, v in _UNET_FIXED.items():
        if k in d and d[k] != v and not (isinstance(v, float) and d[k] == int(v)):
            raise _err(where, f"{k}={d[k]!r} is not supported (stablexl's UNet implements {k}={v!r})")
    bc = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(bc)
    mc = bc[0]
    if any(b % mc for b in bc):
        raise _err(where, f"block_out_channels {bc} are not multiples of the first width")
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if set(down) - known or len(down) != n:
        raise _err(where, f"down_block_types {down} not supported (only {sorted(known)}, one per level)")
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    up = list(d.get("up_block_types", []))
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up and up != want_up:
        raise _err(where, f"up_block_types {up} must mirror down_block_types ({want_up})")
    # diffusers' get_mid_block: CrossAttn = ResBlock + transformer + ResBlock, UNetMidBlock2D = one ResBlock
    # (num_layers=0, add_attention=False), null = none
    mids = {"UNetMidBlock2DCrossAttn": "attention", "UNetMidBlock2D": "resnet", None: "none"}
    mid_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in mids:
        raise _err(where, f"mid_block_type {mid_type!r} is not supported ({', '.join(map(str, mids))})")
    lpb = d.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise _err(where, "per-block layers_per_block is not supported")
    # transformer_layers_per_block: an int, one per down block, or one list per down block (a depth per ResBlock);
    # the up path reads reverse_transformer_layers_per_block, else the down values reversed; the mid block the
    # last down entry (UNet2DConditionModel.__init__ and its blocks, which read the first `num_layers` entries)
    tl = d.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rtl = d.get("reverse_transformer_layers_per_block")
    if rtl is None and any(isinstance(t, list) for t in tl):
        raise _err(where, "per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block "
                          "(diffusers refuses it too)")
    rtl = list(reversed(tl)) if rtl is None else list(rtl)
    if len(tl) != n or len(rtl) != n:
        raise _err(where, f"transformer_layers_per_block / reverse_transformer_layers_per_block need {n} entries")

    def layers(v, count: int, what: str) -> tuple[int, ...]:
        v = [v] * count if isinstance(v, int) else list(v)
        if len(v) < count or not all(isinstance(x, int) and x >= 1 for x in v[:count]):
            raise _err(where, f"{what} {v}: needs {count} transformer depths of at least 1")
        return tuple(v[:count])

    down_d = [layers(tl[i], lpb, f"transformer_layers_per_block[{i}]") if attn[i] else (0,) * lpb for i in range(n)]
    up_d = [layers(rtl[n - 1 - i], lpb + 1, f"reverse_transformer_layers_per_block[{n - 1 - i}]") if attn[i]
            else (0,) * (lpb + 1) for i in range(n)]
    mid_block = mids[mid_type]
    mid_depth = layers(tl[-1], 1, "transformer_layers_per_block[-1] (the mid block)")[0] if mid_block == "attention" else 0
    depth = tuple(ds[0] for ds in down_d)
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = [heads] * n if isinstance(heads, int) else list(heads)
    # attention levels and the mid block (uses the last entry)
    levels = [i for i in range(n) if attn[i]] + ([n - 1] if mid_block == "attention" else [])
    num_heads = head_dim = None
    if len(set(heads)) == 1:  # one head count everywhere (SD 1.x writes an int)
        num_heads = heads[0]
    elif len({bc[i] // heads[i] for i in levels}) == 1:  # per-level counts of one width (SD 2.x, SDXL: 64)
        head_dim = bc[levels[0]] // heads[levels[0]]
    else:
        raise _err(where, f"attention heads {heads} give neither a fixed head count nor a fixed head width")
    ctx = d.get("cross_attention_dim", 1280)
    if not isinstance(ctx, int):
        raise _err(where, "per-block cross_attention_dim is not supported")
    vector_dim = 0
    add_type, class_type = d.get("addition_embed_type"), d.get("class_embed_type")
    micro_dim = 256
    if add_type == "text_time":
        micro_dim = d.get("addition_time_embed_dim")
        if not isinstance(micro_dim, int) or micro_dim < 2 or micro_dim % 2:
            raise _err(where, f"addition_time_embed_dim {micro_dim!r}: SDXL micro-conditioning needs an even width")
        vector_dim = d["projection_class_embeddings_input_dim"]
    elif add_type is not None:
        raise _err(where, f"addition_embed_type {add_type!r} is not supported")
    if class_type == "projection":
        vector_dim = d["projection_class_embeddings_input_dim"]
    elif class_type is not None:
        raise _err(where, f"class_embed_type {class_type!r} is not supported")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(b // mc for b in bc), num_res_blocks=lpb,
        transformer_depth=depth, mid_transformer_depth=mid_depth,
        num_heads=num_heads, head_dim=head_dim, context_dim=ctx, linear_proj=bool(d.get("use_linear_projection", False)),
        vector_dim=vector_dim, upcast_attention=bool(d.get("upcast_attention", False)),
        norm_groups=d.get("norm_num_groups", 32),
        down_layer_depths=tuple(down_d), up_layer_depths=tuple(up_d),  # None when uniform (UNetConfig)
        mid_block=mid_block, micro_dim=micro_dim,
    )


def unet_to_diffusers(cfg: UNetConfig, family: str, sample_size: int) -> dict[str, Any]:
    n = len(cfg.channel_mult)
    bc = [cfg.model_channels * m for m in cfg.channel_mult]
    mid_attn = cfg.mid_block == "attention"
    if mid_attn and cfg.transformer_depth[-1] and cfg.transformer_depth[-1] != cfg.mid_transformer_depth:
        raise ValueError("diffusers ties the mid-block depth to the last level's depth; this UNet cannot be written as a diffusers folder")
    fill = cfg.mid_transformer_depth if mid_attn else 1  # the value of levels without attention (the mid block reads the last)
    if cfg.down_layer_depths is None and cfg.up_layer_depths is None:
        tl: list = [t or fill for t in cfg.transformer_depth]
        rtl = None
    else:  # per-layer lists: every level written out, as SSD-1B's config does
        tl = [list(cfg.down_depths(i)) if cfg.transformer_depth[i] else [fill] * cfg.num_res_blocks for i in range(n)]
        rtl = [list(cfg.up_depths(i)) if cfg.transformer_depth[i] else [1] * (cfg.num_res_blocks + 1)
               for i in reversed(range(n))]
    d: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": bc, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if t else "DownBlock2D" for t in cfg.transformer_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if t else "UpBlock2D" for t in reversed(cfg.transformer_depth)],
        "mid_block_type": {"attention": "UNetMidBlock2DCrossAttn", "resnet": "UNetMidBlock2D", "none": None}[cfg.mid_block],
        "transformer_layers_per_block": tl,
        "attention_head_dim": [cfg.heads_for(w)[0] for w in bc], "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.linear_proj, "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
        "norm_eps": 1e-5,
    }
    if rtl is not None:
        d["reverse_transformer_layers_per_block"] = rtl
    if n and cfg.num_heads is not None:
        d["attention_head_dim"] = cfg.num_heads
    if cfg.vector_dim:
        d["projection_class_embeddings_input_dim"] = cfg.vector_dim
        if family == "sd2-unclip":
            d["class_embed_type"] = "projection"
        else:
            d["addition_embed_type"] = "text_time"
            d["addition_time_embed_dim"] = cfg.micro_dim
    return d


# Our UNet calls the vector embedding `add_embedding` for every family; diffusers' unCLIP UNet calls it
# `class_embedding` (class_embed_type "projection").
def unet_key_renames(d: dict[str, Any]) -> dict[str, str]:
    """diffusers key prefix -> our key prefix for this UNet config."""
    return {"class_embedding.": "add_embedding."} if d.get("class_embed_type") == "projection" else {}


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------


def vae_from_diffusers(d: dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
    bc = list(d.get("block_out_channels", (64,)))
    if any(b % bc[0] for b in bc):
        raise _err(where, f"block_out_channels {bc} are not multiples of the first width")
    n = len(bc)
    if list(d.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n or \
       list(d.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n:
        raise _err(where, "only DownEncoderBlock2D / UpDecoderBlock2D VAEs (KL-f8 family) are supported")
    for k, v in {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
                 "shift_factor": None, "latents_mean": None, "latents_std": None}.items():
        if d.get(k, v) != v:
            raise _err(where, f"{k}={d[k]!r} is not supported")
    return VAEConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), base_channels=bc[0],
        channel_mult=tuple(b // bc[0] for b in bc), num_res_blocks=d.get("layers_per_block", 1),
        latent_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=float(d.get("scaling_factor", 0.18215)), force_upcast=bool(d.get("force_upcast", True)),
    )


def vae_to_diffusers(cfg: VAEConfig, sample_size: int) -> dict[str, Any]:
    n = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "latent_channels": cfg.latent_channels, "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups, "act_fn": "silu", "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor, "force_upcast": cfg.force_upcast,
    }


# --------------------------------------------------------------------------------------------------
# CLIP (transformers configs)
# --------------------------------------------------------------------------------------------------


def text_from_transformers(d: dict[str, Any], where: str) -> CLIPTextConfig:
    d = d.get("text_config", d) if d.get("model_type") == "clip" else d
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise _err(where, f"hidden_act {act!r} is not supported (quick_gelu or gelu)")
    with_proj = any("WithProjection" in a for a in d.get("architectures") or [])
    return CLIPTextConfig(
        vocab_size=d.get("vocab_size", 49408), max_length=d.get("max_position_embeddings", 77),
        width=d.get("hidden_size", 512), layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 8),
        mlp_dim=d.get("intermediate_size", 2048), activation=act,
        projection_dim=d.get("projection_dim", 512) if with_proj else 0, eps=d.get("layer_norm_eps", 1e-5),
    )


def text_to_transformers(cfg: CLIPTextConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": cfg.activation, "projection_dim": cfg.projection_dim or cfg.width,
        "layer_norm_eps": cfg.eps, "initializer_factor": 1.0, "attention_dropout": 0.0, "dropout": 0.0,
        # eos_token_id 2 is the legacy value of the SD hub configs; it makes transformers pool at argmax(ids),
        # which is what OpenCLIP and we do (reference/architecture.md §3.2).
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
    }


def vision_from_transformers(d: dict[str, Any], where: str) -> CLIPVisionConfig:
    d = d.get("vision_config", d) if d.get("model_type") == "clip" else d
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise _err(where, f"hidden_act {act!r} is not supported (quick_gelu or gelu)")
    return CLIPVisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32), width=d.get("hidden_size", 768),
        layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 12),
        mlp_dim=d.get("intermediate_size", 3072), activation=act, projection_dim=d.get("projection_dim", 512),
        eps=d.get("layer_norm_eps", 1e-5),
    )


def vision_to_transformers(cfg: CLIPVisionConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3, "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
        "hidden_act": cfg.activation, "projection_dim": cfg.projection_dim, "layer_norm_eps": cfg.eps,
        "initializer_factor": 1.0, "attention_dropout": 0.0, "dropout": 0.0, "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------
# Whole pipelines
# --------------------------------------------------------------------------------------------------

_SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
_XL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
_UNCLIP_PIPELINES = {"StableUnCLIPImg2ImgPipeline", "StableUnCLIPPipeline"}


def _present(index: dict[str, Any], name: str) -> bool:
    v = index.get(name)
    return isinstance(v, list) and len(v) == 2 and v[0] is not None


def pad_id_from_tokenizer(folder: Path, default: int) -> int:
    """The pad id of a tokenizer folder: "<|endoftext|>" -> 49407 (CLIP-L), "!" -> 0 (OpenCLIP)."""
    f = folder / "special_tokens_map.json"
    if not f.is_file():
        return default
    pad = read_json(f).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    table = {"<|endoftext|>": 49407, "!": 0}
    if pad not in table:
        raise _err(f, f"pad_token {pad!r} is not one the SD family uses ('<|endoftext|>' or '!')")
    return table[pad]


def model_config_from_folder(root: Path, name: str) -> tuple[ModelConfig, dict[str, Any]]:
    """ModelConfig of a diffusers folder, and the model_index it came from."""
    index = read_json(root / "model_index.json")
    cls = index.get("_class_name")
    unet_d = read_json(root / "unet" / "config.json")
    unet = unet_from_diffusers(unet_d, str(root / "unet" / "config.json"))
    vae = vae_from_diffusers(read_json(root / "vae" / "config.json"), str(root / "vae" / "config.json"))
    sched = root / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched) if sched.is_file() else {}
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise _err(sched, f"prediction_type {prediction!r} is not supported (epsilon or v_prediction)")

    def text(folder: str) -> CLIPTextConfig:
        return text_from_transformers(read_json(root / folder / "config.json"), str(root / folder / "config.json"))

    unclip = None
    if cls in _XL_PIPELINES:
        specs = []
        if _present(index, "text_encoder"):
            te = text("text_encoder")
            specs.append(TextEncoderSpec(te, layer=te.layers - 1, final_norm=False,
                                         pad_id=pad_id_from_tokenizer(root / "tokenizer", 49407)))
        te2 = text("text_encoder_2")
        specs.append(TextEncoderSpec(te2, layer=te2.layers - 1, final_norm=False,
                                     pad_id=pad_id_from_tokenizer(root / "tokenizer_2", 0), pooled=True))
        family = "sdxl-base" if len(specs) == 2 else "sdxl-refiner"
        k = 6 if family == "sdxl-base" else 5  # micro-conditions after the pooled text (conditioning.py)
        if unet.vector_dim != te2.projection_dim + k * unet.micro_dim:
            raise _err(root / "unet" / "config.json",
                       f"projection_class_embeddings_input_dim {unet.vector_dim} is not the pooled text width "
                       f"{te2.projection_dim} + {k} × addition_time_embed_dim {unet.micro_dim}")
    elif cls in _SD_PIPELINES or cls in _UNCLIP_PIPELINES:
        te = text("text_encoder")
        family = "sd1" if te.width == 768 else "sd2"
        # diffusers keeps all blocks of the stored encoder (SD 2.x folders store 23 of OpenCLIP-H's 24).
        specs = [TextEncoderSpec(te, layer=te.layers, final_norm=True,
                                 pad_id=pad_id_from_tokenizer(root / "tokenizer", 49407 if family == "sd1" else 0))]
        if cls in _UNCLIP_PIPELINES:
            family = "sd2-unclip"
            vision = vision_from_transformers(read_json(root / "image_encoder" / "config.json"),
                                              str(root / "image_encoder" / "config.json"))
            unclip = UnCLIPConfig(vision=vision, embed_dim=vision.projection_dim)
    else:
        raise _err(root / "model_index.json", f"pipeline class {cls!r} is not supported; expected one of "
                   f"{sorted(_SD_PIPELINES | _XL_PIPELINES | _UNCLIP_PIPELINES)}")
    config = ModelConfig(
        name=name, family=family, unet=unet, vae=vae, text_encoders=tuple(specs),
        prediction="v" if prediction == "v_prediction" else "eps",
        resolution=8 * int(unet_d.get("sample_size", 64)), unclip=unclip,
        zero_terminal_snr=bool(sched_cfg.get("rescale_betas_zero_snr", False)),
        sampling=sampling_from_scheduler(sched_cfg),
    )
    return config, index


# diffusers scheduler classes -> our sampler names, for the few-step rule below
_FEW_STEP_SAMPLERS = {"EulerAncestralDiscreteScheduler": "euler_ancestral", "EulerDiscreteScheduler": "euler",
                      "LCMScheduler": "lcm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}


def sampling_from_scheduler(sched: dict[str, Any]) -> SamplingDefaults | None:
    """A distilled (Turbo / ADD) model's defaults from its diffusers scheduler config: trailing spacing on an
    ε-prediction schedule without zero-SNR rescaling is what the SDXL-Turbo (EulerAncestral) and SD-Turbo (Euler)
    repositories ship, and what no base model ships (they use leading); v-prediction zero-SNR models also use
    trailing, but keep CFG and many steps, so they are excluded. None: the family's defaults apply."""
    sampler = _FEW_STEP_SAMPLERS.get(sched.get("_class_name", ""))
    if (sampler is None or sched.get("timestep_spacing") != "trailing"
            or sched.get("prediction_type", "epsilon") != "epsilon" or sched.get("rescale_betas_zero_snr")):
        return None
    return SamplingDefaults(steps=1, cfg=0.0, sampler=sampler, schedule="trailing")


def text_folders(config: ModelConfig) -> list[tuple[str, str]]:
    """(text encoder folder, tokenizer folder) per text encoder, in our order."""
    if config.family == "sdxl-base":
        return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    if config.family == "sdxl-refiner":
        return [("text_encoder_2", "tokenizer_2")]
    return [("text_encoder", "tokenizer")]


def diffusers_text_config(spec: TextEncoderSpec) -> CLIPTextConfig:
    """The text encoder as a diffusers folder stores it: diffusers reads the last block + final LN, so SD 2.x
    keeps only the blocks it reads and drops the unused projection (as diffusers' converter does)."""
    if spec.final_norm and spec.layer < spec.config.layers:
        return dataclasses.replace(spec.config, layers=spec.layer, projection_dim=0)
    return spec.config


def model_index_for(config: ModelConfig) -> dict[str, Any]:
    nul = [None, None]
    common = {"_diffusers_version": DIFFUSERS_VERSION, "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    te = lambda spec: ["transformers", "CLIPTextModelWithProjection" if diffusers_text_config(spec).projection_dim  # noqa: E731
                       else "CLIPTextModel"]
    tok = ["transformers", "CLIPTokenizer"]
    f = config.family
    if f == "sdxl-base":
        return {"_class_name": "StableDiffusionXLPipeline", **common, "text_encoder": te(config.text_encoders[0]),
                "text_encoder_2": te(config.text_encoders[1]), "tokenizer": tok, "tokenizer_2": tok,
                "image_encoder": nul, "feature_extractor": nul, "force_zeros_for_empty_prompt": True}
    if f == "sdxl-refiner":
        return {"_class_name": "StableDiffusionXLImg2ImgPipeline", **common, "text_encoder": nul, "tokenizer": nul,
                "text_encoder_2": te(config.text_encoders[0]), "tokenizer_2": tok, "image_encoder": nul,
                "feature_extractor": nul, "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}
    if f in ("sd1", "sd2"):
        return {"_class_name": "StableDiffusionPipeline", **common, "text_encoder": te(config.text_encoders[0]),
                "tokenizer": tok, "safety_checker": nul, "feature_extractor": nul, "image_encoder": nul,
                "requires_safety_checker": False}
    if f == "sd2-unclip":
        return {"_class_name": "StableUnCLIPImg2ImgPipeline", **common,
                "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": te(config.text_encoders[0]),
                "tokenizer": tok, "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                "feature_extractor": ["transformers", "CLIPImageProcessor"],
                "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
                "image_noising_scheduler": ["diffusers", "DDPMScheduler"]}
    raise ValueError(f"writing a diffusers folder for family {f!r} is not supported")


def unclip_extra_configs(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """The unCLIP-only config files (relative path -> JSON), as in the hub unCLIP repos (reference §6)."""
    assert config.unclip is not None
    v = config.unclip.vision
    return {
        "image_encoder/config.json": vision_to_transformers(v),
        "image_normalizer/config.json": {"_class_name": "StableUnCLIPImageNormalizer", "_diffusers_version": DIFFUSERS_VERSION,
                                         "embedding_dim": config.unclip.embed_dim},
        "image_noising_scheduler/scheduler_config.json": {
            "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True,
            "prediction_type": "epsilon", "variance_type": "fixed_small"},
        "feature_extractor/preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean),
            "image_std": list(v.std), "do_convert_rgb": True},
    }


def scheduler_config_for(config: ModelConfig) -> dict[str, Any]:
    """The DDPM training schedule every SD model shares (reference/architecture.md §5.1); few-step models get the
    trailing spacing and their sampler's class, as the Turbo repositories ship (`sampling_from_scheduler`)."""
    s = config.sampling
    few = s is not None and s.schedule == "trailing" and s.cfg <= 1.0 and config.prediction == "eps" \
        and not config.zero_terminal_snr
    cls = next((c for c, n in _FEW_STEP_SAMPLERS.items() if few and n == s.sampler), "EulerDiscreteScheduler")
    if few and cls == "EulerDiscreteScheduler" and s.sampler != "euler":
        cls = "EulerAncestralDiscreteScheduler"  # a sampler diffusers has no class for: the Turbo default
    return {
        "_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if config.prediction == "v" else "epsilon",
        "timestep_spacing": "trailing" if few else "leading", "steps_offset": 1, "interpolation_type": "linear",
        "use_karras_sigmas": False,
        # as in the hub SD/SDXL scheduler configs, so other schedulers built from this one behave as there
        "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0,
        "rescale_betas_zero_snr": config.zero_terminal_snr,
    }


def tokenizer_files(pad_id: int) -> dict[str, str]:
    """The files of a transformers CLIPTokenizer folder for our vocabulary, as text."""
    from ..models.tokenizer import default_tokenizer

    tok = default_tokenizer()
    vocab, merges = tok.vocab_and_merges()
    pad = "<|endoftext|>" if pad_id == 49407 else tok.decode([pad_id])
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                                             "clean_up_tokenization_spaces": False, "do_lower_case": True}),
    }


def replace_config(config: ModelConfig, **kw: Any) -> ModelConfig:
    return dataclasses.replace(config, **kw)
