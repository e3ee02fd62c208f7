"""Request and response bodies of both HTTP surfaces (pydantic; they are also the OpenAPI schema).

Static bounds live here (a seed fits 32 bits, a noise level is 0-999); the server's configurable limits
(max width, steps, batch) and everything that depends on the loaded model are checked in generation.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 20_000  # characters of a prompt; long prompts are chunked by the encoder, this only bounds abuse


# (pydantic already refuses strings with lone surrogates, which JSON can carry: "unable to parse raw data")
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Seed = Annotated[int, Field(ge=-1, le=2**32 - 1, description="-1 or null: random")]
Pair = tuple[Annotated[int, Field(ge=0, le=16384)], Annotated[int, Field(ge=0, le=16384)]]
SizePair = tuple[Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]]
Image64 = Annotated[str, Field(description="base64 image (PNG/JPEG/WebP), optionally a data: URL")]
Name = Annotated[str, Field(max_length=256)]


# ==================================================================================================
# Native API (/v1)
# ==================================================================================================


class Latents(BaseModel):
    """Raw latents: float32 little-endian, C order, base64; scaled as the UNet sees them."""

    model_config = ConfigDict(extra="forbid")
    shape: tuple[int, int, int, int]
    data: Annotated[str, Field(description="base64 of the float32 values")]


class LoraIn(BaseModel):
    """A LoRA of the server's --lora-dir, by file name (no paths)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Name
    strength: float = Field(1.0, ge=-100.0, le=100.0, description="the UNet's strength")
    text_strength: float | None = Field(None, ge=-100.0, le=100.0, description="the text encoders'; null: strength")


class HiresIn(BaseModel):
    """A1111's hires fix (stablexl.request.Hires): a second, larger image-to-image pass after the first."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    scale: float = Field(2.0, ge=1.0, le=8.0, description="target = int(width·scale) x int(height·scale)")
    resize: Pair | None = Field(None, description="(width, height) instead of scale; a 0 side keeps the aspect")
    upscaler: Name = Field("Latent", description="a latent mode (GET /sdapi/v1/latent-upscale-modes), Lanczos or "
                                                 "Nearest")
    steps: int | None = Field(None, ge=0, le=10_000, description="second-pass steps; null or 0: the first pass's")
    strength: float = Field(0.7, gt=0.0, le=1.0, description="denoising strength of the second pass")
    sampler: Name | None = None
    schedule: Name | None = None
    prompt: Text | None = Field(None, description="null: the first pass's")
    negative_prompt: Text | None = Field(None, description="null: the first pass's")
    cfg: float | None = Field(None, ge=0.0, le=100.0)


class GenerateRequest(BaseModel):
    """Every option of `Pipeline.__call__` / `Pipeline.refine`; null means the model's default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: Text
    negative_prompt: Text | None = Field(None, description="null: SDXL base uses zeroed uncond embeddings")
    model: Name | None = Field(None, description="a loaded model (GET /v1/models); null: the default one")
    sampler: Name | None = Field(None, description="our name (GET /v1/samplers) or an A1111 name, e.g. 'DPM++ 2M Karras'")
    schedule: Name | None = Field(None, description="leading trailing linspace karras exponential")
    sigmas: list[Annotated[float, Field(ge=0.0, le=1e4)]] | None = Field(
        None, max_length=1001, description="a custom descending noise schedule (0 appended); sets the step count")
    eta: float | None = Field(None, ge=0.0, le=10.0, description="stochastic samplers' noise; null: the sampler's own")
    steps: int | None = Field(None, ge=1, le=10_000)
    cfg: float | None = Field(None, ge=0.0, le=100.0)
    seed: Seed | None = None
    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)
    batch: int = Field(1, ge=1, le=1024)
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    # image-to-image / inpainting
    init_image: Image64 | None = None
    strength: float | None = Field(None, gt=0.0, le=1.0)
    mask: Image64 | None = Field(None, description="white = repaint; same size as init_image")
    mask_blur: float = Field(0.0, ge=0.0, le=64.0)
    mask_invert: bool = False
    # base -> refiner hand-off, in one job or by hand (output_type latent + latents)
    refiner: Name | None = Field(None, description="a loaded refiner model to hand the last steps to")
    refiner_switch_at: float = Field(0.8, gt=0.0, lt=1.0, description="handoff: the fraction of the schedule the base runs")
    refiner_mode: Literal["handoff", "sdedit"] = Field(
        "handoff", description="handoff: the refiner runs the last steps of one schedule; sdedit: the base runs all "
                               "its steps, then the refiner does image-to-image on its latents at refiner_strength")
    refiner_strength: float = Field(0.3, gt=0.0, le=1.0, description="sdedit: the refiner's img2img strength")
    denoising_start: float | None = Field(None, gt=0.0, lt=1.0)
    denoising_end: float | None = Field(None, gt=0.0, lt=1.0)
    latents: Latents | None = None
    output_type: Literal["pil", "latent"] = "pil"
    # SDXL micro-conditioning (pairs are (height, width) and (top, left), as the CLI)
    original_size: SizePair | None = None
    crop: Pair = (0, 0)
    target_size: SizePair | None = None
    negative_original_size: SizePair | None = None
    negative_crop: Pair | None = None
    negative_target_size: SizePair | None = None
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0)
    negative_aesthetic_score: float = Field(2.5, ge=0.0, le=10.0)
    # unCLIP variations
    image_prompt: Image64 | None = None
    noise_level: int = Field(0, ge=0, le=999)
    vae_tile: int | None = Field(None, ge=16, le=1024, description="decode in tiles of this many latents")
    decoder: Literal["full", "tiny"] | None = Field(None, description="final decode: the VAE (full, the default) or "
                                                                 "the model's tiny decoder (faster, lossy)")
    loras: list[LoraIn] = Field([], max_length=64, description="LoRAs of --lora-dir to apply (prompt tags "
                                                                "<lora:NAME:W> are added to these)")
    hires: HiresIn | None = Field(None, description="hires fix: upscale the first pass and run a second one")


class Progress(BaseModel):
    step: int
    total: int
    fraction: float


class ImageOut(BaseModel):
    image: str = Field(description="base64 PNG with the infotext in its `parameters` chunk")
    seed: int
    width: int
    height: int
    infotext: str


class LatentsOut(BaseModel):
    shape: list[int]
    dtype: str = "float32"
    data: str


class JobView(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    created: float
    started: float | None = None
    finished: float | None = None
    queue_position: int | None = None
    progress: Progress
    eta_seconds: float | None = None
    cancel_requested: bool = False
    preview: str | None = Field(None, description="base64 PNG of the current latent while running")
    images: list[ImageOut] = []
    latents: LatentsOut | None = None
    error: str | None = None
    notes: list[str] = []
    settings: dict[str, Any] = {}


class ModelView(BaseModel):
    name: str
    family: str
    resolution: int
    size_multiple: int
    default: bool
    defaults: dict[str, Any]
    devices: list[str] = []
    inpainting: bool
    notes: list[str]


class NameView(BaseModel):
    name: str
    a1111_name: str | None
    aliases: list[str] = []  # the other spellings accepted for it (A1111's aliases, ComfyUI's, sd.cpp's)


class SamplersView(BaseModel):
    samplers: list[NameView]
    schedules: list[NameView]


# ==================================================================================================
# A1111 surface (/sdapi/v1), fields from reference/peers.md §2.1 and A1111 1.10's API models. A field A1111 does
# not have is refused (a1111.py names the nearest ones); fields we accept without using are listed in `info`
# ==================================================================================================


class _A1111Common(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    prompt: Text = ""
    negative_prompt: Text = ""
    styles: list[Name] | None = None
    seed: Seed = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_w: int | None = -1
    seed_resize_from_h: int | None = -1
    sampler_name: Name | None = None
    sampler_index: Name | None = None
    scheduler: Name | None = None
    batch_size: int = Field(1, ge=1, le=1024)
    n_iter: int = Field(1, ge=1, le=1024)
    steps: int | None = Field(None, ge=1, le=10_000)
    cfg_scale: float | None = Field(None, ge=0.0, le=100.0)
    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Name | None = None
    refiner_switch_at: float | None = Field(None, gt=0.0, lt=1.0)
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: Name | None = None
    script_args: list[Any] = []
    alwayson_scripts: dict[str, Any] = {}
    send_images: bool = True
    save_images: bool = False
    infotext: Text | None = None
    force_task_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:()\-]{1,128}$")] | None = None
    # SDXL conditioning extras (our additions; A1111 keeps these in settings)
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0)
    negative_aesthetic_score: float = Field(2.5, ge=0.0, le=10.0)


class Txt2ImgRequest(_A1111Common):
    enable_hr: bool = False
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    hr_scale: float | None = None
    hr_upscaler: Name | None = None
    hr_second_pass_steps: int | None = None
    hr_resize_x: int | None = None
    hr_resize_y: int | None = None
    hr_checkpoint_name: Name | None = None
    hr_sampler_name: Name | None = None
    hr_scheduler: Name | None = None
    hr_prompt: Text = ""
    hr_negative_prompt: Text = ""
    firstpass_image: Image64 | None = None
    firstphase_width: int | None = None
    firstphase_height: int | None = None


class Img2ImgRequest(_A1111Common):
    init_images: list[Image64] = Field(default_factory=list, max_length=16)
    resize_mode: int = Field(0, ge=0, le=3)
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    image_cfg_scale: float | None = None
    mask: Image64 | None = None
    mask_blur: float | None = Field(None, ge=0.0, le=64.0)
    mask_blur_x: float | None = Field(None, ge=0.0, le=64.0)
    mask_blur_y: float | None = Field(None, ge=0.0, le=64.0)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    mask_round: bool = True
    latent_mask: Image64 | None = None


class A1111Result(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: Image64


class PngInfoResult(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
