"""Every generation option, declared once: `GenerationRequest` and its `resolve` step.

A request is what a user asks for, in the names users already know (`prompt`, `steps`, `cfg`, ...), with
the rarer options grouped in small records. `resolve(request, config)` applies the model's defaults and
every check, and returns a concrete request: each field set, images loaded, names in our spelling.
`Pipeline.generate` runs only resolved requests. The keyword call, the CLI, the native API, the A1111 API
and the PNG infotext are translations to and from this one type; none of them repeats a check.

A check that fails raises `RequestError(field, message)`; `field` is the dotted path in the request
(e.g. "image.strength"), which each surface maps to its own spelling (`--strength`, `denoising_strength`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from .names import (DIFFUSERS_SPACINGS, DISCARD_PENULTIMATE, ETA_SAMPLERS, SCHEDULE_NAMES, parse_schedule,
                     resolve_sampler, unknown_schedule_message)

Pair = tuple[int, int]
RefinerMode = Literal["handoff", "sdedit"]
MAX_SEED = 2**32 - 1


class RequestError(ValueError):
    """A request field that cannot be honoured; `field` is its dotted path in `GenerationRequest`."""

    def __init__(self, field: str, message: str, *, not_found: bool = False):
        super().__init__(message)
        self.field, self.message = field, message
        self.not_found = not_found  # an unknown name (a sampler), which HTTP surfaces answer with 404


# ==================================================================================================
# The request
# ==================================================================================================


@dataclass(frozen=True)
class MicroConditions:
    """SDXL micro-conditioning (SDXL report §2.2-2.3). Pairs are (height, width) and (top, left).
    None means the output size (sizes) or the positive value (negatives). The aesthetic scores
    condition the refiner only (report §2.5; diffusers defaults 6.0 / 2.5)."""

    original_size: Pair | None = None
    crop: Pair = (0, 0)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crop: Pair | None = None
    negative_target_size: Pair | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class ImageInput:
    """Image-to-image and inpainting. `image` is a PIL image, a path, an array, or latents (B or 1, C, h, w)
    as diffusers' img2img accepts; `strength` None is the model's default; `mask` is white = repaint.
    `fit` "crop" centre-crops the image to the output's aspect first (A1111 resize_mode 1), "resize"
    stretches it. A mask must have the image's size unless `resize_mask` (A1111 resizes it along)."""

    image: Any
    strength: float | None = None
    mask: Any = None
    mask_blur: float = 0.0
    mask_invert: bool = False
    fit: Literal["resize", "crop"] = "resize"
    resize_mask: bool = False


@dataclass(frozen=True)
class Handoff:
    """Base -> refiner, either in one request (`refiner` names the refiner model) or by hand: a base
    request with `denoising_end` and output_type "latent", then a refiner request with its `latents`
    and `denoising_start` (diffusers' semantics, SDXL report §2.5 "ensemble of expert denoisers").
    `mode` "sdedit" lets the base finish and the refiner re-run `refiner_strength` of its schedule."""

    refiner: str | None = None
    switch_at: float = 0.8
    mode: RefinerMode = "handoff"
    refiner_strength: float = 0.3
    denoising_start: float | None = None
    denoising_end: float | None = None
    latents: Any = None  # torch.Tensor (B, C, h, w) in VE form at the schedule's start


@dataclass(frozen=True)
class ImagePrompt:
    """unCLIP image variations: the image to vary and the noise level added to its embedding (0-999)."""

    image: Any
    noise_level: int = 0


# A1111 modules/shared.py latent_upscale_modes: name -> (F.interpolate mode, antialias); "Latent" is the default
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True), "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True), "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel upscalers that are plain resamplers (A1111 modules/upscaler.py UpscalerLanczos / UpscalerNearest): the first
# pass is decoded, resized with PIL and encoded again. Model upscalers (ESRGAN, SwinIR, ...) are not available.
PIXEL_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix (reference/adapters.md §6): a first pass at width x height, its latents upscaled (the
    "Latent" modes) or its image resized (Lanczos, Nearest), then an image-to-image pass at the larger size
    through the same denoise loop, with fresh noise from the same seeds.

    Target size: (int(width·scale), int(height·scale)), or `resize` (width, height) where a 0 side keeps the
    aspect ratio; with both sides given the upscaled latent covers the target and is cropped to it centrally
    (A1111 calculate_target_resolution), both rounded down to the VAE's multiple of 8. Second pass: `steps`
    (None or 0: the first pass's) run at `strength` the A1111 way, i.e. the last `steps` levels of a schedule of
    int(steps / min(strength, 0.999)) (sd_samplers_common.py setup_img2img_steps). `sampler`, `schedule`,
    `prompt`, `negative_prompt`, `cfg`: None is the first pass's."""

    scale: float = 2.0
    resize: Pair | None = None  # (width, height); None or (0, 0): use scale
    upscaler: str = "Latent"
    steps: int | None = None
    strength: float = 0.7  # A1111's UI default (its API's is 0.75; the A1111 surface passes the client's value)
    sampler: str | None = None
    schedule: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    cfg: float | None = None


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to apply for this request: a name in the LoRA folder (`lora_dir`) or of a LoRA the pipeline has
    loaded; `strength` is the UNet's, `text_strength` the text encoders' (None: `strength`), as A1111's
    `<lora:NAME:TE_W:UNET_W>`. Negative strengths subtract the LoRA."""

    name: str
    strength: float = 1.0
    text_strength: float | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Unset (None) fields take the model's defaults in `resolve`."""

    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] | None = None  # None: SDXL base zeroes the uncond text (diffusers)
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None  # None or -1: random; image k of iteration i uses seed + i*batch + k
    width: int | None = None
    height: int | None = None
    sampler: str | None = None  # ours or a peer's name, e.g. "DPM++ 2M Karras"
    schedule: str | None = None
    sigmas: tuple[float, ...] | None = None  # a custom σ schedule (descending; 0 appended), instead of `schedule`
    eta: float | None = None  # the stochastic samplers' noise amount (DDIM η, ancestral / SDE η); None: each one's own
    # drop the schedule's next-to-last σ (steps + 1 levels made), as A1111 and ComfyUI do for DPM2 (a),
    # DPM++ 3M SDE and UniPC (names.DISCARD_PENULTIMATE); None: do so for those samplers on the peers' schedules
    # (karras, exponential, normal, ...), never on diffusers' spacings (leading / trailing / linspace)
    discard_penultimate: bool | None = None
    batch: int = 1
    iterations: int = 1  # batches run one after another (A1111 n_iter)
    guidance_rescale: float = 0.0
    model: str | None = None  # the model's name (servers choose by it; infotext "Model")
    conditions: MicroConditions = field(default_factory=MicroConditions)
    image: ImageInput | None = None
    handoff: Handoff = field(default_factory=Handoff)
    image_prompt: ImagePrompt | None = None
    hires: Hires | None = None  # A1111's hires fix: a second, larger image-to-image pass
    # LoRAs to apply; `<lora:NAME:W>` tags in the prompt are added here by resolve (and removed from the text)
    loras: tuple[LoraSpec, ...] = ()
    vae_tile: int | None = None  # decode in overlapping tiles of this many latents (the full decoder only)
    # the final decode: the model's VAE, or its tiny decoder (TAESD; faster, lossy); None: "full"
    decoder: Literal["full", "tiny"] | None = None
    output_type: Literal["pil", "latent"] = "pil"

    @property
    def prompts(self) -> tuple[str, ...]:
        """One prompt per image of a batch (after resolve)."""
        return (self.prompt,) * self.batch if isinstance(self.prompt, str) else tuple(self.prompt)

    @property
    def negative_prompts(self) -> tuple[str, ...] | None:
        if self.negative_prompt is None:
            return None
        return (self.negative_prompt,) * self.batch if isinstance(self.negative_prompt, str) else tuple(self.negative_prompt)

    def seeds(self, iteration: int = 0) -> list[int]:
        return [self.seed + iteration * self.batch + k for k in range(self.batch)]

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


def _refuse_unknown_fields(cls) -> None:
    """`cls(bogus=1)` names the accepted fields instead of Python's bare "unexpected keyword argument"."""
    init = cls.__init__
    accepted = tuple(f.name for f in dataclasses.fields(cls))

    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__


for _cls in (MicroConditions, ImageInput, Handoff, ImagePrompt, Hires, LoraSpec, GenerationRequest):
    _refuse_unknown_fields(_cls)


# The keyword call's flat names -> (record, field): `pipe(prompt, strength=0.5)` is ImageInput.strength.
FLAT = {
    **{f.name: ("conditions", f.name) for f in dataclasses.fields(MicroConditions)},
    "init_image": ("image", "image"), "strength": ("image", "strength"), "mask": ("image", "mask"),
    "mask_blur": ("image", "mask_blur"), "mask_invert": ("image", "mask_invert"), "fit": ("image", "fit"),
    "resize_mask": ("image", "resize_mask"),
    "refiner": ("handoff", "refiner"), "refiner_switch_at": ("handoff", "switch_at"), "switch_at": ("handoff", "switch_at"),
    "refiner_mode": ("handoff", "mode"), "refiner_strength": ("handoff", "refiner_strength"),
    "denoising_start": ("handoff", "denoising_start"), "denoising_end": ("handoff", "denoising_end"),
    "latents": ("handoff", "latents"),
    "image_prompt": ("image_prompt", "image"), "noise_level": ("image_prompt", "noise_level"),
    **{f"hires_{f.name}": ("hires", f.name) for f in dataclasses.fields(Hires)},
}
_RECORDS = {"conditions": MicroConditions, "image": ImageInput, "handoff": Handoff, "image_prompt": ImagePrompt}
TOP_LEVEL = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name not in _RECORDS)


def request_from_flat(prompt, negative_prompt=None, **options) -> GenerationRequest:
    """The flat keyword spelling (`pipe(prompt, steps=20, init_image=img, strength=0.5)`) -> a request.
    Unknown names are refused with the list of accepted ones."""
    unknown = sorted(set(options) - set(TOP_LEVEL) - set(FLAT))
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(sorted(set(TOP_LEVEL) - {'prompt', 'negative_prompt'} | set(FLAT)))}")
    top = {k: v for k, v in options.items() if k in TOP_LEVEL}
    groups: dict[str, dict] = {}
    for k, v in options.items():
        if k in FLAT:
            record, name = FLAT[k]
            groups.setdefault(record, {})[name] = v
    for record, values in groups.items():
        if record == "image":
            if values.get("image") is None:
                if values.get("mask") is not None:
                    raise RequestError("image.mask", "a mask needs an init image (the picture to inpaint)")
                continue  # strength & co. without an image: nothing to apply them to (diffusers ignores them too)
        if record == "image_prompt" and values.get("image") is None:
            continue
        if record == "conditions" and values.get("crop", 0) is None:
            values["crop"] = (0, 0)
        if record == "hires":  # any hires_* option turns the hires fix on (hires=Hires(...) is the whole record)
            values = {k: v for k, v in values.items() if v is not None}
            if values and top.get("hires") is not None:
                raise TypeError("pass either hires=Hires(...) or hires_* options, not both")
            if values:
                top["hires"] = Hires(**values)
            continue
        top[record] = _RECORDS[record](**values)
    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **top)


# ==================================================================================================
# Resolving: defaults and every check
# ==================================================================================================


@dataclass(frozen=True)
class Limits:
    """What a server accepts on top of what the model can do (None: no limit)."""

    max_width: int | None = None
    max_height: int | None = None
    max_steps: int | None = None
    max_batch: int | None = None  # images per request: batch x iterations


def _number(field_name: str, v, kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(field_name, f"{field_name} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise RequestError(field_name, f"{field_name} must be finite, got {v!r}")
    v = kind(v)
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
        lo_s = "" if lo is None else f"{'(' if lo_open else '['}{lo}"
        hi_s = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
        if lo is not None and hi is not None:
            span = f"between {lo} and {hi}" if not (lo_open or hi_open) else f"in {lo_s}, {hi_s}"
        else:
            span = (f"> {lo}" if lo_open else f">= {lo}") if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
        raise RequestError(field_name, f"{field_name} must be {span}, got {v}")
    return v


def _pair(field_name: str, v, lo: int) -> Pair | None:
    if v is None:
        return None
    try:
        a, b = v
    except (TypeError, ValueError):
        raise RequestError(field_name, f"{field_name} must be a pair of integers, got {v!r}") from None
    return (_number(field_name, a, int, lo=lo), _number(field_name, b, int, lo=lo))


def _texts(field_name: str, v, batch: int) -> str | tuple[str, ...]:
    if isinstance(v, str):
        return v
    try:
        items = tuple(v)
    except TypeError:
        raise RequestError(field_name, f"{field_name} must be a string or a list of strings") from None
    if not items or not all(isinstance(p, str) for p in items):
        raise RequestError(field_name, f"{field_name} must be a string or a non-empty list of strings")
    return items


def load_image(src, mode: str = "RGB", what: str = "image") -> Image.Image:
    """A PIL image, a path, or an array -> PIL image in `mode`, with a clear error for anything else."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise ValueError(f"{what} {src}: no such file")
        try:
            img = Image.open(src)
            img.load()
        except Exception as e:  # PIL raises several types for malformed files
            raise ValueError(f"{what} {src}: cannot be read as an image ({type(e).__name__}: {e})") from None
    elif isinstance(src, np.ndarray):
        try:
            img = Image.fromarray(src)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: this array is not an image ({e})") from None
    else:
        raise ValueError(f"{what}: expected a PIL image, a path or an array, got {type(src).__name__}")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{what} is empty")
    return img.convert(mode)


def fit_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the aspect ratio of width x height (A1111 "Crop and resize"; the resize follows)."""
    scale = max(width / img.width, height / img.height)
    cw, ch = min(img.width, round(width / scale)), min(img.height, round(height / scale))
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _image(field_name: str, src, mode: str = "RGB") -> Image.Image:
    try:
        return load_image(src, mode, what=field_name)
    except ValueError as e:
        raise RequestError(field_name, str(e)) from None


def _is_tensor(v) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "shape")


def default_strength(config, masked: bool) -> float:
    """diffusers' pipeline defaults: 1.0 for inpainting UNets with a mask, 0.3 SDXL img2img, 0.8 SD."""
    if masked and config.unet.in_channels == 9:
        return 1.0
    return 0.3 if config.family.startswith("sdxl") else 0.8


def _steps_times(field_name: str, steps: int, strength: float, flag: str) -> None:
    if int(steps * strength) < 1:
        need = f"raise steps to at least {math.ceil(1 / strength)} or raise {flag}" if strength >= 1e-6 else f"raise {flag}"
        raise RequestError(field_name, f"steps x {flag} = {steps} x {strength} < 1 leaves no step to run; {need}")


def resolve(req: GenerationRequest, config, *, name: str | None = None, refiner_config=None,
            limits: Limits | None = None, lora_folder=None, loaded_loras=(), has_tiny_decoder: bool = False,
            embeddings=None) -> GenerationRequest:
    """Check `req` against the model (its `ModelConfig`) and fill every default. `refiner_config` is the
    config of the refiner when `req.handoff.refiner` is set; LoRA names must be in `lora_folder` (an
    adapters.tags.LoraFolder) or `loaded_loras` (names the pipeline has loaded); `decoder="tiny"` needs
    `has_tiny_decoder` (the pipeline holds one); `embedding:NAME` in a prompt must name a file of `embeddings`
    (an adapters.embeddings.Embeddings) that fits the model. Returns a new, concrete request; raises
    RequestError(field, message) naming the field and the fix."""
    if not isinstance(req, GenerationRequest):
        raise TypeError(f"expected a GenerationRequest, got {type(req).__name__}")
    lim = limits or Limits()
    d = config.sampling_defaults
    f = config.vae.downsample_factor

    # ---- text and batch ---------------------------------------------------------------------------
    prompt = _texts("prompt", req.prompt, req.batch)
    batch = _number("batch", req.batch, int, lo=1)
    if not isinstance(prompt, str):
        if batch not in (1, len(prompt)):
            raise RequestError("batch", f"{len(prompt)} prompts with batch {batch}; pass one prompt or leave batch 1")
        batch = len(prompt)
    negative = req.negative_prompt
    if negative is not None:
        negative = _texts("negative_prompt", negative, batch)
        if not isinstance(negative, str) and len(negative) != batch:
            raise RequestError("negative_prompt", f"{len(negative)} negative prompts for {batch} prompts")
    iterations = _number("iterations", req.iterations, int, lo=1)
    if lim.max_batch is not None and batch * iterations > lim.max_batch:
        raise RequestError("batch", f"at most {lim.max_batch} images per request on this server "
                                    f"(batch {batch} x iterations {iterations})")
    prompt, negative, loras = _loras(req.loras, prompt, negative, lora_folder, loaded_loras)
    _check_embeddings(embeddings, prompt, "prompt")
    _check_embeddings(embeddings, negative, "negative_prompt")

    # ---- names --------------------------------------------------------------------------------------
    try:
        sampler, implied = resolve_sampler(req.sampler if req.sampler is not None else d.sampler)
    except ValueError as e:
        raise RequestError("sampler", str(e), not_found=True) from None
    schedule = parse_schedule(req.schedule) if req.schedule is not None else implied or d.schedule
    sigmas = None
    if req.sigmas is not None:  # a custom schedule: its length sets the step count
        sigmas = _sigmas(req.sigmas)
        if req.steps is not None and req.steps != len(sigmas) - 1:
            raise RequestError("steps", f"steps {req.steps} disagrees with the {len(sigmas) - 1} steps of the custom "
                                        "sigmas; leave steps unset")
        schedule = "custom"
    elif schedule not in SCHEDULE_NAMES:
        raise RequestError("schedule", unknown_schedule_message(schedule))
    eta = None if req.eta is None else _number("eta", req.eta, lo=0.0, hi=10.0)
    if eta is not None and sampler not in ETA_SAMPLERS:
        raise RequestError("eta", f"sampler {sampler!r} takes no eta; leave eta unset or choose one of: "
                                  f"{', '.join(sorted(ETA_SAMPLERS))}")
    if eta is not None and sampler == "tcd" and eta > 1:  # TCD's γ mixes two timesteps (Zheng et al. 2024)
        raise RequestError("eta", f"TCD's eta (gamma) must be in [0, 1], got {eta}")

    if req.discard_penultimate is None:
        discard = sampler in DISCARD_PENULTIMATE and sigmas is None and schedule not in DIFFUSERS_SPACINGS
    elif not isinstance(req.discard_penultimate, bool):
        raise RequestError("discard_penultimate", f"discard_penultimate must be true, false or unset, got "
                                                  f"{req.discard_penultimate!r}")
    elif req.discard_penultimate and sigmas is not None:
        raise RequestError("discard_penultimate", "custom sigmas run as given; drop the level from the list or "
                                                  "leave discard_penultimate unset")
    else:
        discard = req.discard_penultimate

    # ---- numbers ------------------------------------------------------------------------------------
    if sigmas is not None:
        steps = _number("steps", len(sigmas) - 1, int, lo=1, hi=lim.max_steps)
    elif req.steps is None:  # the model's default, capped by a server's limit so that it always runs
        steps = d.steps if lim.max_steps is None else min(d.steps, lim.max_steps)
    else:
        steps = _number("steps", req.steps, int, lo=1, hi=lim.max_steps)
    cfg = float(d.cfg) if req.cfg is None else _number("cfg", req.cfg, lo=0.0)
    guidance_rescale = _number("guidance_rescale", req.guidance_rescale, lo=0.0, hi=1.0)
    seed = req.seed
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**31 - 1)  # from the OS, independent of torch's global RNG (A1111: -1 = random)
    seed = _number("seed", seed, int, lo=0, hi=MAX_SEED)
    if req.output_type not in ("pil", "latent"):
        raise RequestError("output_type", f"output_type must be 'pil' or 'latent', got {req.output_type!r}")
    vae_tile = None if req.vae_tile is None else _number("vae_tile", req.vae_tile, int, lo=4)
    decoder = "full" if req.decoder is None else req.decoder
    if decoder not in ("full", "tiny"):
        raise RequestError("decoder", f"decoder must be 'full' or 'tiny', got {decoder!r}")
    if decoder == "tiny" and not has_tiny_decoder:
        raise RequestError("decoder", "decoder 'tiny' needs a tiny decoder for this model: load one with "
                                      "Pipeline.from_pretrained(..., tiny_decoder=PATH) (CLI/server: --tiny-decoder)")

    # ---- hand-off -----------------------------------------------------------------------------------
    h = req.handoff if req.handoff is not None else Handoff()
    width, height = req.width, req.height
    latents = h.latents
    for fname in ("denoising_start", "denoising_end"):
        if getattr(h, fname) is not None:
            _number(f"handoff.{fname}", getattr(h, fname), lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if latents is not None:
        if not _is_tensor(latents):
            raise RequestError("handoff.latents", f"latents must be a tensor, got {type(latents).__name__}")
        if req.image is not None:
            raise RequestError("handoff.latents", "pass either latents (a hand-off from a base model) or an init "
                                                  "image / mask, not both")
        c = config.unet.out_channels
        if latents.ndim != 4 or latents.shape[1] != c or latents.shape[0] != batch:
            raise RequestError("handoff.latents", f"latents must have shape (batch={batch}, {c}, h, w), got "
                                                  f"{tuple(latents.shape)}")
        if not bool(latents.isfinite().all()):
            raise RequestError("handoff.latents", "latents contain NaN or infinity")
        width, height = _size_from("handoff.latents", latents, f, width, height)
    if h.denoising_end is not None and req.output_type != "latent":
        raise RequestError("handoff.denoising_end", "denoising_end stops before the end of the schedule, so there is "
                                                    "no image to decode: set output_type 'latent' and continue with "
                                                    "latents + denoising_start, or name a refiner")
    if h.refiner is not None:
        if refiner_config is None:
            raise RequestError("handoff.refiner", f"the request names refiner {h.refiner!r}, but no refiner model was "
                                                  "given: pass refiner=Pipeline (Python) or load it (--refiner)")
        if req.image is not None and req.image.mask is not None:
            raise RequestError("handoff.refiner", "inpainting with a refiner is not supported: the refiner stage would "
                                                  "repaint the unmasked pixels too; inpaint with the base alone, then "
                                                  "refine the result as image-to-image")
        if h.denoising_start is not None or h.denoising_end is not None or latents is not None:
            raise RequestError("handoff.refiner", "a named refiner does the hand-off itself: leave denoising_start, "
                                                  "denoising_end and latents unset")
        if req.output_type != "pil":
            raise RequestError("output_type", "a refiner request returns images; output_type must be 'pil'")
        if h.mode not in ("handoff", "sdedit"):
            raise RequestError("handoff.mode", f"unknown refiner mode {h.mode!r}; choose handoff or sdedit")
        _number("handoff.switch_at", h.switch_at, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _number("handoff.refiner_strength", h.refiner_strength, lo=0.0, hi=1.0, lo_open=True)
        if h.mode == "sdedit":
            _steps_times("handoff.refiner_strength", steps, h.refiner_strength, "refiner strength")
    elif refiner_config is not None:
        raise RequestError("handoff.refiner", "a refiner model was given but the request names none: set "
                                              "handoff.refiner (its name)")

    # ---- images -------------------------------------------------------------------------------------
    image_in = req.image
    if image_in is not None:
        if not isinstance(image_in, ImageInput):
            raise RequestError("image", f"image must be an ImageInput, got {type(image_in).__name__}")
        if image_in.image is None:
            raise RequestError("image.image", "an image input needs its image (init image)")
        masked = image_in.mask is not None
        strength = default_strength(config, masked) if image_in.strength is None else image_in.strength
        strength = _number("image.strength", strength, lo=0.0, hi=1.0, lo_open=True)
        mask_blur = _number("image.mask_blur", image_in.mask_blur, lo=0.0, hi=256.0)
        if image_in.fit not in ("resize", "crop"):
            raise RequestError("image.fit", f"fit must be 'resize' or 'crop', got {image_in.fit!r}")
        if _is_tensor(image_in.image):  # latents, e.g. a base model's output for the refiner as SDEdit
            lat = image_in.image
            if masked:
                raise RequestError("image.mask", "inpainting needs the init image as pixels (a PIL image or a "
                                                 "path), not latents")
            c = config.unet.out_channels
            if lat.ndim != 4 or lat.shape[1] != c:
                raise RequestError("image.image", f"init latents must have shape (B, {c}, h, w), got "
                                                  f"{tuple(lat.shape)}; pass a PIL image or a path for pixels")
            if lat.shape[0] not in (1, batch):
                raise RequestError("image.image", f"{lat.shape[0]} init latents for a batch of {batch}; pass 1 or {batch}")
            if not bool(lat.isfinite().all()):
                raise RequestError("image.image", "init latents contain NaN or infinity")
            width, height = _size_from("image.image", lat, f, width, height)
            image_in = dataclasses.replace(image_in, strength=strength, mask_blur=mask_blur)
        else:
            img = _image("image.image", image_in.image)
            mask = None
            if masked:
                mask = _image("image.mask", image_in.mask, "L")
                if mask.size != img.size:
                    if not image_in.resize_mask:
                        raise RequestError("image.mask", f"mask is {mask.width}x{mask.height} but the init image is "
                                                         f"{img.width}x{img.height}; they must match")
                    mask = mask.resize(img.size, Image.NEAREST)
                if image_in.mask_invert:
                    mask = ImageOps.invert(mask)
            if width is None or height is None:
                width = width or img.width // f * f
                height = height or img.height // f * f
                if not width or not height:
                    raise RequestError("image.image", f"the init image is {img.width}x{img.height}; the output size "
                                                      f"would be below {f} px: pass width and height")
            if image_in.fit == "crop":
                img = fit_crop(img, width, height)
                if mask is not None:
                    mask = fit_crop(mask, width, height)
            if mask is not None and mask.size != (width, height):  # the image is resized to the output size too
                mask = mask.resize((width, height), Image.NEAREST)
            image_in = ImageInput(image=img, strength=strength, mask=mask, mask_blur=mask_blur if masked else 0.0)
        _steps_times("image.strength", steps, strength, "strength")
    if config.unet.in_channels == 9 and (image_in is None or image_in.mask is None):
        raise RequestError("image.mask", f"{name or config.name} is an inpainting model (9-channel UNet): pass an "
                                         "init image and a mask")

    image_prompt = req.image_prompt
    if config.family == "sd2-unclip":
        if image_prompt is None or image_prompt.image is None:
            raise RequestError("image_prompt", f"{name or config.name} is an unCLIP model: it makes variations "
                                               "of an image; pass image_prompt (CLI: --image-prompt)")
        top = config.unclip.max_noise_level - 1 if config.unclip is not None else 999
        image_prompt = ImagePrompt(_image("image_prompt", image_prompt.image),
                                   _number("image_prompt.noise_level", image_prompt.noise_level, int, lo=0, hi=top))
    elif image_prompt is not None:
        raise RequestError("image_prompt", f"an image prompt needs an unCLIP model; {name or config.name} is "
                                           f"{config.family}")

    # ---- size ---------------------------------------------------------------------------------------
    width = config.resolution if width is None else width
    height = config.resolution if height is None else height
    for fname, v, top in (("width", width, lim.max_width), ("height", height, lim.max_height)):
        v = _number(fname, v, int)
        if v < f or v % f:
            raise RequestError(fname, f"{fname} must be a positive multiple of {f} for {name or config.name}, got "
                                      f"{v}; try {max(f, round(v / f) * f)}")
        if top is not None and v > top:
            raise RequestError(fname, f"{fname} must be at most {top} on this server, got {v}")

    hires = None if req.hires is None else _hires(req, config, name, lim, width, height, steps, cfg, sampler,
                                                  schedule, sigmas is not None, prompt, negative, loras,
                                                  embeddings, image_in, h, f)

    mc = req.conditions if req.conditions is not None else MicroConditions()
    out_size = (height, width)
    original = _pair("conditions.original_size", mc.original_size, 1) or out_size
    target = _pair("conditions.target_size", mc.target_size, 1) or out_size
    crop = _pair("conditions.crop", mc.crop, 0) or (0, 0)
    conditions = MicroConditions(
        original_size=original, crop=crop, target_size=target,
        negative_original_size=_pair("conditions.negative_original_size", mc.negative_original_size, 1) or original,
        negative_crop=_pair("conditions.negative_crop", mc.negative_crop, 0) or crop,
        negative_target_size=_pair("conditions.negative_target_size", mc.negative_target_size, 1) or target,
        aesthetic_score=_number("conditions.aesthetic_score", mc.aesthetic_score, lo=0.0, hi=10.0),
        negative_aesthetic_score=_number("conditions.negative_aesthetic_score", mc.negative_aesthetic_score, lo=0.0,
                                         hi=10.0),
    )
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative, steps=steps, cfg=cfg, seed=seed, width=width, height=height,
        sampler=sampler, schedule=schedule, sigmas=sigmas, eta=eta, discard_penultimate=discard, batch=batch,
        iterations=iterations, guidance_rescale=guidance_rescale,
        model=req.model or name or config.name, conditions=conditions, image=image_in, handoff=h,
        image_prompt=image_prompt, hires=hires, loras=loras, vae_tile=vae_tile, decoder=decoder,
        output_type=req.output_type,
    )


def _loras(specs, prompt, negative, folder, loaded) -> tuple:
    """The request's LoRAs plus the prompt's `<lora:...>` tags -> (prompt, negative prompt, LoraSpecs), tags
    removed from the text. As A1111: tags are read from the first prompt of a batch and the positive prompt
    only (a tag in the negative prompt is removed and has no effect); a name given twice keeps its last
    strengths (applying a LoRA twice never doubles it)."""
    from .adapters.tags import MAX_STRENGTH, TagError, check_name, extract_tags

    try:
        if isinstance(prompt, str):
            prompt, tags = extract_tags(prompt)
        else:
            pairs = [extract_tags(t) for t in prompt]
            prompt, tags = tuple(p for p, _ in pairs), pairs[0][1]
        if isinstance(negative, str):
            negative = extract_tags(negative)[0]
        elif negative is not None:
            negative = tuple(extract_tags(t)[0] for t in negative)
    except TagError as e:
        raise RequestError("prompt", str(e)) from None
    if not isinstance(specs, (tuple, list)):
        raise RequestError("loras", f"loras must be a list of LoraSpec, got {type(specs).__name__}")
    wanted = list(specs) + [LoraSpec(t.name, t.unet_strength, t.text_strength) for t in tags]
    out: dict[str, LoraSpec] = {}
    for i, s in enumerate(wanted):
        fname = f"loras.{i}" if i < len(specs) else "prompt"
        if not isinstance(s, LoraSpec):
            raise RequestError("loras", f"loras[{i}] must be a LoraSpec(name, strength, text_strength), got "
                                        f"{type(s).__name__}")
        try:
            n = check_name(s.name)
        except TagError as e:
            raise RequestError(fname, str(e)) from None
        unet = _number(f"{fname}.strength" if i < len(specs) else fname, s.strength, lo=-MAX_STRENGTH,
                       hi=MAX_STRENGTH)
        te = unet if s.text_strength is None else _number(f"{fname}.text_strength" if i < len(specs) else fname,
                                                           s.text_strength, lo=-MAX_STRENGTH, hi=MAX_STRENGTH)
        if n not in loaded:
            if folder is None:
                raise RequestError(fname, f"LoRA {n!r} is requested but no LoRA folder is configured: pass "
                                          "lora_dir= to Pipeline.from_pretrained (CLI/server: --lora-dir), or load "
                                          "the file with Pipeline.load_lora", not_found=True)
            try:
                folder.find(n)
            except LookupError as e:
                raise RequestError(fname, str(e), not_found=True) from None
        out.pop(n, None)
        out[n] = LoraSpec(n, unet, te)
    return prompt, negative, tuple(out.values())


def upscaler_name(name) -> str:
    """A hires upscaler as A1111 spells it (any case); RequestError naming the ones we have otherwise."""
    if name is None:
        return "Latent"
    known = {k.lower(): k for k in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)}
    if isinstance(name, str) and name.strip().lower() in known:
        return known[name.strip().lower()]
    raise RequestError("hires.upscaler", f"hires upscaler {name!r} is not available: model upscalers (ESRGAN, "
                                         "R-ESRGAN, SwinIR, LDSR, ...) are not supported. Choose a latent mode: "
                                         f"{', '.join(LATENT_UPSCALERS)}; or a plain resampler: "
                                         f"{', '.join(PIXEL_UPSCALERS)}")


def hires_target(width: int, height: int, hires: Hires, f: int = 8) -> tuple[int, int, int, int]:
    """(upscaled width, height, latent columns, latent rows to crop) for a first pass of width x height: A1111's
    calculate_target_resolution, sides rounded down to multiples of f. The crop takes t // 2 latents from the
    start and (t + 1) // 2 from the end of each axis; the final image is (width - f·tx) x (height - f·ty)."""
    rx, ry = hires.resize or (0, 0)
    tx = ty = 0
    if rx == 0 and ry == 0:
        w, h = int(width * hires.scale), int(height * hires.scale)
    elif ry == 0:
        w, h = rx, rx * height // width
    elif rx == 0:
        w, h = ry * width // height, ry
    else:
        if width / height < rx / ry:
            w, h = rx, rx * height // width
        else:
            w, h = ry * width // height, ry
        tx, ty = (w - rx) // f, (h - ry) // f
    return w // f * f, h // f * f, tx, ty


def _hires(req, config, name, lim, width, height, steps, cfg, sampler, schedule, custom_sigmas, prompt,
           negative, loras, embeddings, image_in, h, f) -> Hires:
    """The hires fix record, checked and with every default filled (see `Hires`)."""
    hr = req.hires
    if not isinstance(hr, Hires):
        raise RequestError("hires", f"hires must be a Hires record, got {type(hr).__name__}")
    if image_in is not None:
        raise RequestError("hires", "the hires fix is a text-to-image option (A1111 txt2img); for image-to-image "
                                    "at a larger size pass the larger width and height")
    if h.refiner is not None or h.latents is not None or h.denoising_start is not None or h.denoising_end is not None:
        raise RequestError("hires", "the hires fix cannot be combined with a refiner hand-off or latents; run the "
                                    "hires result through the refiner as image-to-image instead")
    if config.unet.in_channels == 9:
        raise RequestError("hires", "the hires fix needs a text-to-image model, not an inpainting one")
    upscaler = upscaler_name(hr.upscaler)
    scale = _number("hires.scale", hr.scale, lo=1.0, hi=8.0)
    resize = _pair("hires.resize", hr.resize, 0)
    resize = None if resize is None or resize == (0, 0) else resize
    hsteps = steps if hr.steps in (None, 0) else _number("hires.steps", hr.steps, int, lo=1, hi=lim.max_steps)
    strength = _number("hires.strength", hr.strength, lo=0.0, hi=1.0, lo_open=True)
    hcfg = cfg if hr.cfg is None else _number("hires.cfg", hr.cfg, lo=0.0)
    if hr.sampler is None:
        hsampler, implied = sampler, None
    else:
        try:
            hsampler, implied = resolve_sampler(hr.sampler)
        except ValueError as e:
            raise RequestError("hires.sampler", str(e), not_found=True) from None
    if hr.schedule is not None:
        hschedule = parse_schedule(hr.schedule)
    elif implied is not None:
        hschedule = implied
    else:  # the first pass's, unless that was a custom σ list (whose length is the first pass's step count)
        hschedule = config.sampling_defaults.schedule if custom_sigmas else schedule
    if hschedule not in SCHEDULE_NAMES:
        raise RequestError("hires.schedule", unknown_schedule_message(hschedule))
    texts = {}
    for fname, v, first in (("prompt", hr.prompt, prompt), ("negative_prompt", hr.negative_prompt, negative)):
        if v is None or v == "":
            texts[fname] = None
            continue
        if not isinstance(v, str):
            raise RequestError(f"hires.{fname}", f"hires.{fname} must be a string")
        from .adapters.tags import TagError, extract_tags

        try:
            v, tags = extract_tags(v)
        except TagError as e:
            raise RequestError(f"hires.{fname}", str(e)) from None
        if tags and fname == "prompt" and {t.name for t in tags} != {s.name for s in loras}:
            raise RequestError("hires.prompt", "the hires prompt's <lora:...> tags must be the first pass's: the "
                                               "LoRAs stay merged for both passes")
        _check_embeddings(embeddings, v, f"hires.{fname}")
        texts[fname] = v
    out = Hires(scale=scale, resize=resize, upscaler=upscaler, steps=hsteps, strength=strength, sampler=hsampler,
                schedule=hschedule, prompt=texts["prompt"], negative_prompt=texts["negative_prompt"], cfg=hcfg)
    w, hh, tx, ty = hires_target(width, height, out, f)
    fw, fh = w - f * tx, hh - f * ty
    field_name = "hires.resize" if resize else "hires.scale"
    if fw < f or fh < f:
        raise RequestError(field_name, f"the hires size {fw}x{fh} is below {f} px")
    for side, v, top in (("width", fw, lim.max_width), ("height", fh, lim.max_height)):
        if top is not None and v > top:
            raise RequestError(field_name, f"the hires {side} {v} is above this server's limit of {top}; lower the "
                                           "hires scale")
    return out


def hires_steps(hires: Hires) -> tuple[int, float]:
    """(schedule length, strength) of the second pass in our image-to-image terms: A1111 runs `hires.steps`
    steps starting at level total − steps of a schedule of total = int(steps / min(strength, 0.999)) levels
    (sd_samplers_common.py setup_img2img_steps with steps given); our strength s runs int(total·s) of them, so
    s = (steps + ½) / total selects exactly `steps` whatever the float rounding."""
    total = int(hires.steps / min(hires.strength, 0.999))
    return total, min(1.0, (hires.steps + 0.5) / total)


def _check_embeddings(embeddings, texts, field_name: str) -> None:
    """Textual-inversion names in the text: `embedding:NAME` must name a usable file, and no word may name a
    file made for another model (adapters/embeddings.py). Without an embeddings folder `embedding:NAME` is
    refused too, so that it is never drawn as text."""
    if texts is None:
        return
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    if embeddings is None:
        from .adapters.embeddings import EMBEDDING_WORD

        for t in texts:
            m = EMBEDDING_WORD.search(t)
            if m is not None:
                raise RequestError(field_name, f"{m.group(0)!r} names a textual-inversion embedding, but no embeddings "
                                               "folder is configured: pass embeddings_dir= to Pipeline.from_pretrained "
                                               "(CLI/server: --embeddings-dir)", not_found=True)
        return
    from .adapters.embeddings import EmbeddingError

    try:
        embeddings.check(texts)
    except EmbeddingError as e:
        raise RequestError(field_name, str(e)) from None
    except LookupError as e:
        raise RequestError(field_name, str(e), not_found=True) from None


def _sigmas(values) -> tuple[float, ...]:
    """A custom σ list: finite, positive, strictly descending, then 0 (appended when missing)."""
    try:
        sig = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise RequestError("sigmas", f"sigmas must be a list of numbers, got {values!r}") from None
    if sig and sig[-1] != 0.0:
        sig = sig + (0.0,)
    if len(sig) < 2 or not all(math.isfinite(v) for v in sig) or any(v <= 0 for v in sig[:-1]):
        raise RequestError("sigmas", "sigmas must hold at least one positive, finite noise level (descending; "
                                     "a final 0 is appended)")
    if any(a <= b for a, b in zip(sig, sig[1:])):
        raise RequestError("sigmas", f"sigmas must be strictly descending, got {list(sig)}")
    return sig


def _size_from(field_name: str, latents, f: int, width, height) -> tuple[int, int]:
    lh, lw = int(latents.shape[-2]) * f, int(latents.shape[-1]) * f
    what = "init latents" if field_name == "image.image" else "latents"
    if (width or lw, height or lh) != (lw, lh):
        raise RequestError(field_name, f"width x height {width}x{height} differs from the {what}' {lw}x{lh}; "
                                       "leave width and height unset")
    return lw, lh


def steps_run(req: GenerationRequest) -> int:
    """Sampler steps a resolved request runs per iteration (for progress totals; the refiner's included)."""
    n = req.steps
    if req.image is not None:
        n = max(1, int(req.steps * req.image.strength))
    if req.handoff.refiner is not None and req.handoff.mode == "sdedit":
        n += max(1, int(req.steps * req.handoff.refiner_strength))
    if req.hires is not None:
        n += req.hires.steps
    return n
