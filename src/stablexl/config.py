"""Frozen configuration dataclasses and the named presets of the real models.

Every number here comes from `../shared/reference/architecture.md` (itself read from the official
inference yaml files of Stability-AI/generative-models, Stability-AI/stablediffusion and
runwayml/stable-diffusion, and the hub config.json files). Configs travel with our checkpoints as
JSON (see `to_dict` / `from_dict`), so a loader rebuilds a model from its config, never from a guess.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Prediction = Literal["eps", "v"]
Activation = Literal["quick_gelu", "gelu"]


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """The LDM/SGM `UNetModel` family (SD 1.x, SD 2.x, unCLIP, SDXL base/refiner)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per level; 0 means that level has no attention (SDXL level 0).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    mid_transformer_depth: int = 1
    # Exactly one of the two: a fixed head count (SD 1.x: 8) or a fixed head width (SD 2.x/SDXL: 64).
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    linear_proj: bool = False  # `use_linear_in_transformer`: Linear (SD2/SDXL) vs 1x1 conv (SD1) proj_in/out
    vector_dim: int = 0  # `adm_in_channels`: 2816 SDXL base, 2560 refiner, 2048/1536 unCLIP; 0 = none
    upcast_attention: bool = False  # SD 2.1-768 computes attention in fp32
    norm_groups: int = 32
    # Depths that differ inside a level (Segmind SSD-1B, Vega: diffusers' nested transformer_layers_per_block /
    # reverse_transformer_layers_per_block): per level, indexed as transformer_depth, one depth per ResBlock
    # (down: num_res_blocks, up: num_res_blocks + 1). None: transformer_depth[level] for every ResBlock.
    down_layer_depths: tuple[tuple[int, ...], ...] | None = None
    up_layer_depths: tuple[tuple[int, ...], ...] | None = None
    # ResBlock, SpatialTransformer, ResBlock ("attention"); one ResBlock ("resnet": diffusers' UNetMidBlock2D,
    # SSD-1B and Vega); or no mid block ("none")
    mid_block: Literal["attention", "resnet", "none"] = "attention"
    micro_dim: int = 256  # sinusoidal features per SDXL micro-condition (diffusers `addition_time_embed_dim`)

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads (SD 1.x style) or head_dim (SD 2.x/SDXL style)")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"UNetConfig: transformer_depth has {len(self.transformer_depth)} entries but channel_mult has "
                f"{len(self.channel_mult)}; give one depth per level (0 = no attention)"
            )
        if self.mid_block not in ("attention", "resnet", "none"):
            raise ValueError(f"UNetConfig: mid_block {self.mid_block!r}; use attention, resnet or none")
        for name, per_level in (("down", self.num_res_blocks), ("up", self.num_res_blocks + 1)):
            depths = getattr(self, f"{name}_layer_depths")
            if depths is None:
                continue
            depths = tuple(tuple(int(d) for d in level) for level in depths)  # JSON gives lists
            object.__setattr__(self, f"{name}_layer_depths", depths)
            if len(depths) != len(self.channel_mult) or any(len(level) != per_level for level in depths):
                raise ValueError(f"UNetConfig: {name}_layer_depths needs {len(self.channel_mult)} levels of "
                                 f"{per_level} depths each, got {depths}")
            for level, ds in enumerate(depths):
                if bool(self.transformer_depth[level]) != any(ds) or (any(ds) and min(ds) < 1):
                    raise ValueError(f"UNetConfig: {name}_layer_depths[{level}] = {ds} must be all 0 (a level without "
                                     "attention) or all >= 1, as transformer_depth says")
            if all(ds == (self.transformer_depth[i],) * per_level for i, ds in enumerate(depths)):
                object.__setattr__(self, f"{name}_layer_depths", None)  # one form per network: equal configs compare equal

    def down_depths(self, level: int) -> tuple[int, ...]:
        """Transformer depth after each ResBlock of a down level (0: no attention)."""
        if self.down_layer_depths is not None:
            return self.down_layer_depths[level]
        return (self.transformer_depth[level],) * self.num_res_blocks

    def up_depths(self, level: int) -> tuple[int, ...]:
        """Transformer depth after each ResBlock of an up level (0: no attention)."""
        if self.up_layer_depths is not None:
            return self.up_layer_depths[level]
        return (self.transformer_depth[level],) * (self.num_res_blocks + 1)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads_for(self, width: int) -> tuple[int, int]:
        """(heads, head_dim) for a transformer of the given width."""
        if self.head_dim is not None:
            return width // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, width // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """KL-f8 autoencoder (identical architecture for SD 1.x, SD 2.x and SDXL)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1 per level
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # 0.13025 for SDXL
    # Overflows in fp16, so decodes in fp32 under fp16 compute (diffusers `force_upcast`; false for fp16-fix VAEs)
    force_upcast: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


LatentSpace = Literal["sd", "sdxl", "mini"]


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """AutoencoderTiny (TAESD, madebyollin/taesd; diffusers `AutoencoderTiny`): a VAE-free encoder/decoder of
    one VAE's *scaled* latent space (what the UNet sees), distilled from that VAE.

    Levels run from the latent side for the decoder and from the image side for the encoder. TAESD has 64
    channels everywhere; unequal widths (our miniature's) change only the convolution between two levels,
    c_i -> c_(i+1), like upstream's F32Decoder (diffusers' class supports equal widths only).
    """

    latent_channels: int = 4
    image_channels: int = 3
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)  # per level, image side first
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)  # per level, latent side first
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    # Which VAE it stands in for: sd (SD 1.x/2.x), sdxl, the miniature's; None: not known (a bare upstream file
    # says nothing, and taesd and taesdxl files have identical shapes)
    latent_space: LatentSpace | None = None
    # Only for packing latents into uint8 images (taesd.py `scale_latents`): raw -> raw/(2·3) + 0.5 in [0, 1]
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    def __post_init__(self) -> None:
        for side in ("encoder", "decoder"):
            if len(getattr(self, f"{side}_channels")) != len(getattr(self, f"{side}_blocks")):
                raise ValueError(f"TinyAutoencoderConfig: {side}_channels and {side}_blocks need one entry per level")
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError("TinyAutoencoderConfig: encoder and decoder need the same number of levels")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.decoder_channels) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer: OpenAI ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 text towers."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: Activation = "quick_gelu"
    projection_dim: int = 0  # 0 = no text_projection (SD 1.x / SD 2.x do not use it)
    eps: float = 1e-5


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP vision transformer (ViT) with the projection to the joint embedding space."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    activation: Activation = "quick_gelu"
    projection_dim: int = 768
    eps: float = 1e-5
    # Normalisation of [0, 1] RGB before the tower (OpenAI CLIP statistics; OpenCLIP uses the same).
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------
# How a text encoder is read out for conditioning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a model and the hidden state it contributes.

    `layer` counts transformer blocks run, as in transformers' `hidden_states[layer]`
    (0 = embeddings): SD 1.5 takes 12 of 12 with the final LayerNorm; SD 2.x 23 of 24 with the final
    LayerNorm ("penultimate"); SDXL takes CLIP-L 11 of 12 and bigG 31 of 32 without it
    (reference/architecture.md §3.2). Counting blocks rather than "penultimate" keeps SD 2.x correct
    whether the file holds 24 blocks (official single file) or 23 (diffusers folder).
    """

    config: CLIPTextConfig
    layer: int
    final_norm: bool
    pad_id: int  # 49407 (EOS) for OpenAI CLIP-L, 0 for OpenCLIP (reference/architecture.md §3.3)
    pooled: bool = False  # contributes the projected EOS feature (SDXL bigG)


# --------------------------------------------------------------------------------------------------
# A whole model family member
# --------------------------------------------------------------------------------------------------

Family = Literal["sd1", "sd2", "sd2-unclip", "sdxl-base", "sdxl-refiner"]


@dataclass(frozen=True)
class UnCLIPConfig:
    """Image-embedding conditioning of SD 2.1-unCLIP (reference/architecture.md §6)."""

    vision: CLIPVisionConfig
    embed_dim: int  # 1024 (H) / 768 (L)
    max_noise_level: int = 1000


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is meant to be sampled when a request leaves these unset: part of what the model is
    (distilled students want 1-4 trailing steps without CFG, the miniature was evaluated with DPM++ 2M
    Karras), stored with the model's config, never keyed on its name."""

    steps: int = 30
    cfg: float = 7.5
    sampler: str = "euler"
    schedule: str = "leading"

    @staticmethod
    def for_family(family: str) -> "SamplingDefaults":
        """The peers' usual defaults for a model that declares none: diffusers' Euler (leading spacing)
        with 30 steps; CFG 5 for SDXL (diffusers' SDXL docs), 7.5 for SD 1.x/2.x."""
        return SamplingDefaults(cfg=5.0 if family.startswith("sdxl") else 7.5)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a pipeline's networks: the components plus how they are wired."""

    name: str
    family: Family
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction: Prediction = "eps"
    resolution: int = 512
    unclip: UnCLIPConfig | None = None
    # Trained on a schedule rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1); v-prediction models only.
    zero_terminal_snr: bool = False
    # None: SamplingDefaults.for_family(family); see `sampling_defaults`
    sampling: SamplingDefaults | None = None

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return self.sampling or SamplingDefaults.for_family(self.family)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        return _build(ModelConfig, d)

    @staticmethod
    def from_json(s: str) -> "ModelConfig":
        return ModelConfig.from_dict(json.loads(s))


def component_from_dict(cls: type, d: dict[str, Any]):
    """Rebuild one component config (UNetConfig, VAEConfig, ...) from its `asdict` form."""
    return _build(cls, d)


def _build(cls: type, d: dict[str, Any]):
    """Inverse of `dataclasses.asdict` for our config types (tuples, nested dataclasses, Optionals)."""
    if not isinstance(d, dict):
        raise ValueError(f"config for {cls.__name__} must be a JSON object, got {type(d).__name__}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}; was this file written by a newer stablexl?")
    kwargs: dict[str, Any] = {}
    nested = {
        "unet": UNetConfig, "vae": VAEConfig, "config": CLIPTextConfig, "vision": CLIPVisionConfig,
        "unclip": UnCLIPConfig, "sampling": SamplingDefaults,
    }
    for name, value in d.items():
        if name == "text_encoders":
            value = tuple(_build(TextEncoderSpec, v) for v in value)
        elif name in nested and isinstance(value, dict):
            value = _build(nested[name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Presets: the real models
# --------------------------------------------------------------------------------------------------

SD15_UNET = UNetConfig()
SD15_INPAINT_UNET = dataclasses.replace(SD15_UNET, in_channels=9)
SD21_BASE_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, linear_proj=True)
SD21_UNET = dataclasses.replace(SD21_BASE_UNET, upcast_attention=True)
SD21_UNCLIP_H_UNET = dataclasses.replace(SD21_UNET, vector_dim=2048)
SD21_UNCLIP_L_UNET = dataclasses.replace(SD21_UNET, vector_dim=1536)
SDXL_BASE_UNET = UNetConfig(
    channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), mid_transformer_depth=10,
    num_heads=None, head_dim=64, context_dim=2048, linear_proj=True, vector_dim=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0), mid_transformer_depth=4,
    num_heads=None, head_dim=64, context_dim=1280, linear_proj=True, vector_dim=2560,
)

SD_VAE = VAEConfig(scaling_factor=0.18215)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
# TAESD / TAESDXL: same network, distilled from the SD and SDXL VAEs (madebyollin/taesd taesd.py @5cccb12)
TAESD = TinyAutoencoderConfig(latent_space="sd")
TAESDXL = TinyAutoencoderConfig(latent_space="sdxl")

CLIP_L_TEXT = CLIPTextConfig(width=768, layers=12, heads=12, mlp_dim=3072, activation="quick_gelu")
# The official SD 2.x files carry all 24 blocks and the projection; SD 2.x reads block 23 (+ final LN).
OPENCLIP_H_TEXT = CLIPTextConfig(width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu", projection_dim=1024)
OPENCLIP_BIGG_TEXT = CLIPTextConfig(
    width=1280, layers=32, heads=20, mlp_dim=5120, activation="gelu", projection_dim=1280
)

CLIP_L_VISION = CLIPVisionConfig(width=1024, layers=24, heads=16, mlp_dim=4096, activation="quick_gelu", projection_dim=768)
OPENCLIP_H_VISION = CLIPVisionConfig(width=1280, layers=32, heads=16, mlp_dim=5120, activation="gelu", projection_dim=1024)

PAD_EOS, PAD_ZERO = 49407, 0

SD15 = ModelConfig(
    name="sd15", family="sd1", unet=SD15_UNET, vae=SD_VAE,
    text_encoders=(TextEncoderSpec(CLIP_L_TEXT, layer=12, final_norm=True, pad_id=PAD_EOS),),
)
SD15_INPAINT = dataclasses.replace(SD15, name="sd15-inpaint", unet=SD15_INPAINT_UNET)
_SD2_TEXT = (TextEncoderSpec(OPENCLIP_H_TEXT, layer=23, final_norm=True, pad_id=PAD_ZERO),)
SD21 = ModelConfig(
    name="sd21", family="sd2", unet=SD21_UNET, vae=SD_VAE, text_encoders=_SD2_TEXT, prediction="v", resolution=768,
)
SD21_BASE = ModelConfig(name="sd21-base", family="sd2", unet=SD21_BASE_UNET, vae=SD_VAE, text_encoders=_SD2_TEXT)
SD21_UNCLIP_H = ModelConfig(
    name="sd21-unclip-h", family="sd2-unclip", unet=SD21_UNCLIP_H_UNET, vae=SD_VAE, text_encoders=_SD2_TEXT,
    prediction="v", resolution=768, unclip=UnCLIPConfig(vision=OPENCLIP_H_VISION, embed_dim=1024),
)
SD21_UNCLIP_L = ModelConfig(
    name="sd21-unclip-l", family="sd2-unclip", unet=SD21_UNCLIP_L_UNET, vae=SD_VAE, text_encoders=_SD2_TEXT,
    prediction="v", resolution=768, unclip=UnCLIPConfig(vision=CLIP_L_VISION, embed_dim=768),
)
SDXL_BASE = ModelConfig(
    name="sdxl-base", family="sdxl-base", unet=SDXL_BASE_UNET, vae=SDXL_VAE, resolution=1024,
    text_encoders=(
        TextEncoderSpec(CLIP_L_TEXT, layer=11, final_norm=False, pad_id=PAD_EOS),
        TextEncoderSpec(OPENCLIP_BIGG_TEXT, layer=31, final_norm=False, pad_id=PAD_ZERO, pooled=True),
    ),
)
SDXL_REFINER = ModelConfig(
    name="sdxl-refiner", family="sdxl-refiner", unet=SDXL_REFINER_UNET, vae=SDXL_VAE, resolution=1024,
    text_encoders=(TextEncoderSpec(OPENCLIP_BIGG_TEXT, layer=31, final_norm=False, pad_id=PAD_ZERO, pooled=True),),
)

# Tiny members of each family for tests: same wiring, minimal widths.
_TINY_TEXT_A = CLIPTextConfig(width=32, layers=3, heads=2, mlp_dim=64, activation="quick_gelu")
_TINY_TEXT_B = CLIPTextConfig(width=48, layers=3, heads=2, mlp_dim=96, activation="gelu", projection_dim=48)
_TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, scaling_factor=0.13025)
TINY_SDXL = ModelConfig(
    name="tiny-sdxl", family="sdxl-base", resolution=64, vae=_TINY_VAE,
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), mid_transformer_depth=2,
        num_heads=None, head_dim=16, context_dim=80, linear_proj=True, vector_dim=48 + 6 * 256, norm_groups=8,
    ),
    text_encoders=(
        TextEncoderSpec(_TINY_TEXT_A, layer=2, final_norm=False, pad_id=PAD_EOS),
        TextEncoderSpec(_TINY_TEXT_B, layer=2, final_norm=False, pad_id=PAD_ZERO, pooled=True),
    ),
)
TINY_SD15 = ModelConfig(
    name="tiny-sd15", family="sd1", resolution=64, vae=dataclasses.replace(_TINY_VAE, scaling_factor=0.18215),
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(1, 1, 1, 0), num_heads=2, context_dim=32,
        norm_groups=8,
    ),
    text_encoders=(TextEncoderSpec(_TINY_TEXT_A, layer=3, final_norm=True, pad_id=PAD_EOS),),
)

TINY_REFINER = ModelConfig(
    name="tiny-refiner", family="sdxl-refiner", resolution=64, vae=_TINY_VAE,
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0), mid_transformer_depth=1,
        num_heads=None, head_dim=16, context_dim=48, linear_proj=True, vector_dim=48 + 5 * 256, norm_groups=8,
    ),
    text_encoders=(TextEncoderSpec(_TINY_TEXT_B, layer=2, final_norm=False, pad_id=PAD_ZERO, pooled=True),),
)
TINY_SD21 = ModelConfig(
    name="tiny-sd21", family="sd2", resolution=64, prediction="v", vae=TINY_SD15.vae,
    unet=dataclasses.replace(TINY_SD15.unet, num_heads=None, head_dim=16, context_dim=48, linear_proj=True),
    text_encoders=(TextEncoderSpec(_TINY_TEXT_B, layer=2, final_norm=True, pad_id=PAD_ZERO),),
)

TINY_UNCLIP = ModelConfig(
    name="tiny-unclip", family="sd2-unclip", resolution=64, prediction="v", vae=TINY_SD15.vae,
    unet=dataclasses.replace(TINY_SD21.unet, vector_dim=2 * 24),
    text_encoders=TINY_SD21.text_encoders,
    unclip=UnCLIPConfig(
        vision=CLIPVisionConfig(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_dim=64,
                                activation="gelu", projection_dim=24),
        embed_dim=24,
    ),
)

# The miniature (the embedded default): SDXL's wiring at 64 px, with narrow towers trained on emoji art.
# Text towers shaped like CLIP-L (quick_gelu, EOS padding, penultimate layer) and bigG (gelu, zero
# padding, penultimate layer, pooled + projection), both projecting to the mini CLIP's 128-d space.
MINI_TEXT_L = CLIPTextConfig(width=64, layers=3, heads=2, mlp_dim=256, activation="quick_gelu", projection_dim=128)
MINI_TEXT_G = CLIPTextConfig(width=128, layers=3, heads=4, mlp_dim=512, activation="gelu", projection_dim=128)
MINI_VISION = CLIPVisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512,
                               activation="gelu", projection_dim=128)
# What the shipped miniature is evaluated with (docs/mini.md)
MINI_SAMPLING = SamplingDefaults(steps=30, cfg=5.0, sampler="dpmpp_2m", schedule="karras")
# SDXL-Turbo / SD-Turbo (ADD students): 1-4 steps, trailing spacing, no CFG (Sauer et al. 2023, model card)
TURBO_SAMPLING = SamplingDefaults(steps=1, cfg=0.0, sampler="euler_ancestral", schedule="trailing")
# What `stablexl train add` writes into its students: the same, with the sampler that re-noises fully between
# steps (predict x0, re-noise to the next trailing level), which is what the student saw in training at
# 2-4 steps (reference/distillation.md §1.6); at 1 step the two are the same.
FEW_STEP_SAMPLING = SamplingDefaults(steps=1, cfg=0.0, sampler="lcm", schedule="trailing")
MINI = ModelConfig(
    name="mini", family="sdxl-base", resolution=64, sampling=MINI_SAMPLING,
    vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8, scaling_factor=0.13025),
    unet=UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), mid_transformer_depth=2,
        num_heads=None, head_dim=32, context_dim=64 + 128, linear_proj=True, vector_dim=128 + 6 * 256, norm_groups=16,
    ),
    text_encoders=(
        TextEncoderSpec(MINI_TEXT_L, layer=2, final_norm=False, pad_id=PAD_EOS),
        TextEncoderSpec(MINI_TEXT_G, layer=2, final_norm=False, pad_id=PAD_ZERO, pooled=True),
    ),
)

# The miniature's refiner: SDXL refiner wiring (the bigG-shaped tower only, pooled + original size + crop +
# aesthetic score; attention in the inner levels only, as the refiner's (0, 4, 4, 0)) at 64 px, narrower than the
# base (the refiner only removes the last 20 % of the noise). Trained by `stablexl train unet --model mini-refiner`.
MINI_REFINER = ModelConfig(
    name="mini-refiner", family="sdxl-refiner", resolution=64, sampling=MINI_SAMPLING, vae=MINI.vae,
    unet=UNetConfig(
        model_channels=48, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1), mid_transformer_depth=1,
        num_heads=None, head_dim=32, context_dim=128, linear_proj=True, vector_dim=128 + 5 * 256, norm_groups=16,
    ),
    text_encoders=(MINI.text_encoders[1],),
)

# The miniature's image-variation model: SD 2.1-unCLIP's design (the noise-augmented CLIP image embedding ‖ the
# sinusoid of its noise level as the vector added to the time embedding; text optional) on mini's UNet, text
# towers and VAE, with the mini CLIP's image tower (128-d embeddings). Fine-tuned from mini's UNet by
# `stablexl train unet --model mini-unclip --init mini`; only the vector's input layer differs from mini's.
MINI_UNCLIP = ModelConfig(
    name="mini-unclip", family="sd2-unclip", resolution=64, sampling=MINI_SAMPLING, vae=MINI.vae,
    unet=dataclasses.replace(MINI.unet, vector_dim=2 * 128), text_encoders=MINI.text_encoders,
    unclip=UnCLIPConfig(vision=MINI_VISION, embed_dim=128),
)

# The miniature's tiny decoder (trained by scripts/train_tiny_decoder.py): TAESD's block counts, narrower
# at the two high-resolution levels so that it stays under 1 M parameters (2 MB in fp16).
TAESD_MINI = TinyAutoencoderConfig(latent_space="mini", encoder_channels=(32, 32, 64, 64),
                                   decoder_channels=(64, 64, 32, 32))
TINY_AUTOENCODERS: dict[str, TinyAutoencoderConfig] = {"taesd": TAESD, "taesdxl": TAESDXL, "taesd-mini": TAESD_MINI}

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (SD15, SD15_INPAINT, SD21, SD21_BASE, SD21_UNCLIP_H, SD21_UNCLIP_L, SDXL_BASE, SDXL_REFINER,
              TINY_SDXL, TINY_SD15, TINY_REFINER, TINY_SD21, TINY_UNCLIP, MINI, MINI_REFINER, MINI_UNCLIP)
}
PRESETS["sdxl-turbo"] = dataclasses.replace(SDXL_BASE, name="sdxl-turbo", resolution=512, sampling=TURBO_SAMPLING)


def as_turbo(config: ModelConfig) -> ModelConfig:
    """An ADD student of `config`'s architecture (SDXL-Turbo from SDXL base, SD-Turbo from SD 2.1): the same
    networks, ε-prediction, 512 px, and the Turbo sampling defaults (reference/architecture.md §7)."""
    name = {"sdxl-base": "sdxl-turbo", "sd21": "sd-turbo"}.get(config.name, config.name + "-turbo")
    return dataclasses.replace(config, name=name, prediction="eps",
                               resolution=512, sampling=TURBO_SAMPLING)


def looks_like_turbo(file_name: str, metadata: dict[str, str]) -> bool:
    """How an official single file is recognised as SDXL-Turbo / SD-Turbo, whose weights have the teacher's exact
    layout: "turbo" in its file name (sd_xl_turbo_1.0_fp16.safetensors, sd_turbo.safetensors) or in its ModelSpec
    title / architecture metadata. Our own files carry the defaults in their config; diffusers folders in their
    scheduler config (io/diffusers_format.py `sampling_from_scheduler`)."""
    fields = [file_name] + [metadata.get(k, "") for k in ("modelspec.title", "modelspec.architecture")]
    return any("turbo" in f.lower() for f in fields)


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
