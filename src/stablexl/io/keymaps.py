"""One declarative key table per foreign checkpoint layout.

Our modules use diffusers / transformers names, so diffusers folders need (almost) no mapping. The
official single-file ("LDM") layout is described here as `Rule`s generated from the model config:
each rule names our key(s), the foreign key, and the tensor operation between them. Loading and
writing both walk the same table, so a layout can never be read one way and written another.
Facts: reference/architecture.md §4 (diffusers loaders/single_file_utils.py mapping rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ..config import ModelConfig, UNetConfig, VAEConfig

Op = Literal["copy", "transpose", "conv1x1", "fuse_qkv"]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # one key, or the (q, k, v) keys fused into one foreign tensor
    theirs: str
    op: Op = "copy"


def to_ours(rule: Rule, t: Tensor) -> dict[str, Tensor]:
    """Foreign tensor -> our tensor(s)."""
    if rule.op == "copy":
        return {rule.ours[0]: t}
    if rule.op == "transpose":  # OpenCLIP text_projection is used as x @ P; we store P.T as a Linear weight
        return {rule.ours[0]: t.t()}
    if rule.op == "conv1x1":  # LDM VAE attention q/k/v/proj_out are 1x1 convs; ours are Linear
        return {rule.ours[0]: t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t}
    if rule.op == "fuse_qkv":  # OpenCLIP attn.in_proj_*: rows q | k | v
        if t.shape[0] % 3:
            raise ValueError(f"{rule.theirs}: first dimension {t.shape[0]} is not divisible by 3")
        return dict(zip(rule.ours, t.chunk(3, dim=0)))
    raise AssertionError(rule.op)


def to_theirs(rule: Rule, tensors: list[Tensor]) -> Tensor:
    """Our tensor(s) -> the foreign tensor."""
    if rule.op == "copy":
        return tensors[0]
    if rule.op == "transpose":
        return tensors[0].t().contiguous()
    if rule.op == "conv1x1":
        t = tensors[0]
        return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
    if rule.op == "fuse_qkv":
        return torch.cat(tensors, dim=0)
    raise AssertionError(rule.op)


def foreign_shape(rule: Rule, ours: list[tuple[int, ...]]) -> tuple[int, ...]:
    if rule.op == "copy":
        return ours[0]
    if rule.op == "transpose":
        return tuple(reversed(ours[0]))
    if rule.op == "conv1x1":
        return (*ours[0], 1, 1) if len(ours[0]) == 2 else ours[0]
    return (sum(s[0] for s in ours), *ours[0][1:])


# --------------------------------------------------------------------------------------------------
# Per-component tables (keys relative to the component; prefixes are added by the layout below)
# --------------------------------------------------------------------------------------------------

_RES_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _rename_res(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table[head]}.{tail}"


def ldm_unet_rules(cfg: UNetConfig, our_keys: list[str]) -> list[Rule]:
    """diffusers-named UNet keys -> LDM `UNetModel` keys (input_blocks / middle_block / output_blocks)."""
    k = cfg.num_res_blocks + 1
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    rules = []
    for key in our_keys:
        m = re.match(r"(\w+(?:\.linear_\d)?)\.(weight|bias)$", key)
        if m and m.group(1) in top:
            theirs = f"{top[m.group(1)]}.{m.group(2)}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * k + j
            theirs = f"input_blocks.{i}.0.{_rename_res(rest, _RES_LDM)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            theirs = f"input_blocks.{1 + int(m[1]) * k + cfg.num_res_blocks}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
            theirs = f"middle_block.{2 * int(m[1])}.{_rename_res(m[2], _RES_LDM)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            theirs = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * k + j
            theirs = f"output_blocks.{i}.0.{_rename_res(rest, _RES_LDM)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            level = len(cfg.channel_mult) - 1 - b
            slot = 2 if cfg.transformer_depth[level] else 1  # after the attention, if the level has one
            theirs = f"output_blocks.{b * k + cfg.num_res_blocks}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        rules.append(Rule((key,), theirs))
    return rules


_RES_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_rules(cfg: VAEConfig, our_keys: list[str]) -> list[Rule]:
    """diffusers-named VAE keys -> LDM `AutoencoderKL` keys (encoder.down.i.block.j, decoder.up reversed)."""
    n = len(cfg.channel_mult)
    rules = []
    for key in our_keys:
        op: Op = "copy"
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            theirs = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_res(m[3], _RES_VAE)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|\w+)\.(weight|bias)", key):
            theirs = f"{m[1]}.mid.attn_1.{_ATTN_VAE[m[2]]}.{m[3]}"
            op = "conv1x1" if m[2] != "group_norm" else "copy"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            theirs = f"encoder.down.{m[1]}.block.{m[2]}.{_rename_res(m[3], _RES_VAE)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            theirs = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            theirs = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_rename_res(m[3], _RES_VAE)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            theirs = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            theirs = f"{m[1]}.norm_out.{m[2]}"
        elif re.match(r"(encoder\.conv_(in|out)|decoder\.conv_(in|out)|quant_conv|post_quant_conv)\.", key):
            theirs = key
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        rules.append(Rule((key,), theirs, op))
    return rules


_OC_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_text_rules(our_keys: list[str]) -> list[Rule]:
    """transformers-named CLIP text keys -> OpenCLIP keys (fused in_proj, transposed text_projection)."""
    rules = []
    done: set[str] = set()
    for key in our_keys:
        if key in done:
            continue
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", key):
            n, wb = m[1], m[2]
            qkv = tuple(f"encoder.layers.{n}.self_attn.{p}_proj.{wb}" for p in "qkv")
            rules.append(Rule(qkv, f"transformer.resblocks.{n}.attn.in_proj_{wb}", "fuse_qkv"))
            done.update(qkv)
            continue
        if m := re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key):
            rules.append(Rule((key,), f"transformer.resblocks.{m[1]}.{_OC_LAYER[m[2]]}.{m[3]}"))
        elif key == "embeddings.token_embedding.weight":
            rules.append(Rule((key,), "token_embedding.weight"))
        elif key == "embeddings.position_embedding.weight":
            rules.append(Rule((key,), "positional_embedding"))
        elif m := re.match(r"final_layer_norm\.(weight|bias)", key):
            rules.append(Rule((key,), f"ln_final.{m[1]}"))
        elif key == "text_projection.weight":
            rules.append(Rule((key,), "text_projection", "transpose"))
        else:
            raise KeyError(f"no OpenCLIP name for text-encoder key {key!r}")
    return rules


def hf_clip_text_rules(our_keys: list[str]) -> list[Rule]:
    """Our CLIP text keys inside transformers' `text_model.` (the projection sits outside it)."""
    return [Rule((k,), k if k.startswith("text_projection.") else f"text_model.{k}") for k in our_keys]


# --------------------------------------------------------------------------------------------------
# Whole single-file layouts
# --------------------------------------------------------------------------------------------------

# Foreign tensors that carry no weights of ours (reference/architecture.md §4.1): the DDPM schedule
# buffers of LDM files, OpenCLIP's logit_scale / attn_mask, position_ids, sgm's sigma table.
_DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "denoiser.sigmas", "model_ema.decay", "model_ema.num_updates",
}
_IGNORABLE_SUFFIXES = (".position_ids", ".logit_scale", ".attn_mask")
# Empty marker tensors of v-prediction / zero-terminal-SNR fine-tunes (ComfyUI model_detection reads them;
# io/models.py detect_single_file turns them into the config)
MARKERS = ("v_pred", "ztsnr")


def ignorable(key: str) -> str | None:
    """Why a foreign key may be skipped, or None if it must be consumed."""
    if key in _DDPM_BUFFERS:
        return "diffusion schedule buffer (recomputed from the config)"
    if key in MARKERS:
        return "model-kind marker (read into the config)"
    if key.startswith("noise_augmentor.") and key.split(".", 1)[1] in _DDPM_BUFFERS:
        return "unCLIP noise-augmentation schedule buffer (recomputed)"
    if key.startswith("model_ema."):
        return "EMA copy of the UNet (the regular weights are loaded)"
    if key.endswith(_IGNORABLE_SUFFIXES):
        return "buffer with no learned weights"
    return None


@dataclass(frozen=True)
class ComponentLayout:
    component: str  # key in ModelParts.modules(): "unet", "vae", "text_encoders.0", ...
    prefix: str  # foreign prefix
    rules: Callable[[ModelConfig, list[str]], list[Rule]]


def single_file_layout(config: ModelConfig) -> list[ComponentLayout]:
    """Where each component lives in the official single file of this model family."""
    unet = ComponentLayout("unet", "model.diffusion_model.", lambda c, k: ldm_unet_rules(c.unet, k))
    vae = ComponentLayout("vae", "first_stage_model.", lambda c, k: ldm_vae_rules(c.vae, k))
    hf = lambda c, k: hf_clip_text_rules(k)  # noqa: E731
    oc = lambda c, k: openclip_text_rules(k)  # noqa: E731
    family = config.family
    if family == "sd1":
        texts = [ComponentLayout("text_encoders.0", "cond_stage_model.transformer.", hf)]
    elif family in ("sd2", "sd2-unclip"):
        texts = [ComponentLayout("text_encoders.0", "cond_stage_model.model.", oc)]
    elif family == "sdxl-base":
        texts = [ComponentLayout("text_encoders.0", "conditioner.embedders.0.transformer.", hf),
                 ComponentLayout("text_encoders.1", "conditioner.embedders.1.model.", oc)]
    elif family == "sdxl-refiner":
        texts = [ComponentLayout("text_encoders.0", "conditioner.embedders.0.model.", oc)]
    else:
        raise ValueError(f"no single-file layout for family {family!r}")
    return [unet, vae, *texts]
