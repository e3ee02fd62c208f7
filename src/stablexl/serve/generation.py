"""From a request to pipeline calls: the loaded models, one checked `Spec` per job, and the job's work.

Both HTTP surfaces build a `Spec` (our field names), `resolve()` checks it against the loaded models and
the server's limits and fills every default (so the job's settings are concrete and limits apply to
them), and `run()` executes it in the model's worker thread. A check that fails raises `InputError`
naming the field; each surface translates the field to its own spelling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ..io.metadata import generation_infotext
from ..names import SCHEDULE_NAMES, resolve_sampler
from .images import png_bytes
from .preview import Previewer
from .queue import Cancelled, Job

log = logging.getLogger("stablexl.serve")


class InputError(ValueError):
    """A request field the server refuses; `field` uses our (native API) names."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class Limits:
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch: int = 8  # images per request: batch x iterations


# ==================================================================================================
# Loaded models
# ==================================================================================================


def size_multiple(config) -> int:
    """Pixel sizes must be multiples of the VAE's downsampling factor (8); the UNet takes any latent size."""
    return config.vae.downsample_factor


@dataclass
class LoadedModel:
    name: str
    pipe: object  # stablexl.pipeline.Pipeline
    previewer: Previewer | None

    @property
    def config(self):
        return self.pipe.config

    def describe(self, default: bool) -> dict:
        cfg = self.config
        return {"name": self.name, "family": cfg.family, "resolution": cfg.resolution,
                "size_multiple": size_multiple(cfg), "default": default, "defaults": dict(self.pipe.defaults),
                "inpainting": cfg.unet.in_channels == 9, "notes": list(self.pipe.parts.notes)}


class Models:
    """The models this server serves, loaded once at startup and shared by all jobs."""

    def __init__(self, names: list[str], loader: Callable[[str], object], preview: str = "approx"):
        if not names:
            raise ValueError("serve at least one model (--model)")
        if len(set(names)) != len(names):
            raise ValueError(f"a model is listed twice: {names}")
        self.names, self.loader, self.preview = list(names), loader, preview
        self.loaded: dict[str, LoadedModel] = {}
        self.default = names[0]
        self._lock = threading.Lock()

    def load_all(self) -> None:
        """Load every model (call from a worker thread: this is torch work)."""
        for name in self.names:
            pipe = self.loader(name)
            previewer = None if self.preview == "none" else Previewer(pipe, self.preview)
            with self._lock:
                self.loaded[name] = LoadedModel(name, pipe, previewer)
            log.info("loaded model %s (%s)", name, pipe.config.family)

    def get(self, name: str | None, field: str = "model") -> LoadedModel:
        name = self.default if name is None else name
        try:
            return self.loaded[name]
        except KeyError:
            raise InputError(field, f"unknown model {name!r}; this server serves: {', '.join(self.names)}") from None


# ==================================================================================================
# The checked request
# ==================================================================================================


@dataclass
class Spec:
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    sampler: str | None = None
    schedule: str | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    batch: int = 1
    n_iter: int = 1
    guidance_rescale: float = 0.0
    init_image: Image.Image | None = None
    strength: float | None = None
    mask: Image.Image | None = None
    mask_blur: float = 0.0
    mask_invert: bool = False
    resize_mask: bool = False  # A1111: the mask is resized with the image; native: sizes must match
    crop_to_fit: bool = False  # A1111 resize_mode 1: crop the init image to the output's aspect first
    refiner: str | None = None
    refiner_switch_at: float = 0.8
    refiner_mode: str = "handoff"  # or "sdedit": the base runs all its steps, the refiner does img2img on them
    refiner_strength: float = 0.3
    denoising_start: float | None = None
    denoising_end: float | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pil"
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    image_prompt: Image.Image | None = None
    noise_level: int = 0
    vae_tile: int | None = None

    def settings(self) -> dict:
        """The resolved settings as JSON (images are described, not echoed)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("init_image", "mask", "image_prompt"):
                v = None if v is None else f"{v.width}x{v.height} image"
            elif f.name == "latents":
                v = None if v is None else list(v.shape)
            elif f.name in ("resize_mask", "crop_to_fit"):
                continue
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _fit_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the aspect ratio of width x height (A1111 "Crop and resize"; the resize follows)."""
    scale = max(width / img.width, height / img.height)
    cw, ch = min(img.width, round(width / scale)), min(img.height, round(height / scale))
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def resolve(spec: Spec, models: Models, limits: Limits) -> Spec:
    """Check `spec` and fill its defaults; raises InputError(field, message). Returns the same object."""
    m = models.get(spec.model)
    spec.model = m.name
    cfg, defaults = m.config, m.pipe.defaults
    mult = size_multiple(cfg)
    f = cfg.vae.downsample_factor

    # ---- names ------------------------------------------------------------------------------------
    try:
        sampler, implied = resolve_sampler(spec.sampler or defaults["sampler"])
    except ValueError as e:
        raise InputError("sampler", str(e), status=404 if spec.sampler else 422) from None
    spec.sampler = sampler
    spec.schedule = spec.schedule or implied or defaults["schedule"]
    if spec.schedule not in SCHEDULE_NAMES:
        raise InputError("schedule", f"unknown schedule {spec.schedule!r}; choose one of: {', '.join(SCHEDULE_NAMES)}")
    if spec.refiner is not None:
        models.get(spec.refiner, field="refiner")
        if spec.mask is not None:
            raise InputError("refiner", "inpainting (mask) with a refiner hand-off is not supported: the pipeline's "
                                        "hand-off does not carry the mask into the refiner stage")
        if spec.denoising_start is not None or spec.denoising_end is not None or spec.latents is not None:
            raise InputError("refiner", "refiner does the hand-off itself: leave denoising_start, denoising_end "
                                        "and latents unset")
        if spec.output_type != "pil":
            raise InputError("output_type", "a refiner job returns images; output_type must be 'pil'")
        if spec.refiner_mode not in ("handoff", "sdedit"):
            raise InputError("refiner_mode", f"unknown refiner mode {spec.refiner_mode!r}; choose handoff or sdedit")

    # ---- numbers and limits ---------------------------------------------------------------------
    # an unspecified step count is the model's default, capped by the server's limit (so it always runs)
    spec.steps = min(defaults["steps"], limits.max_steps) if spec.steps is None else spec.steps
    if not 1 <= spec.steps <= limits.max_steps:
        raise InputError("steps", f"steps must be between 1 and {limits.max_steps} on this server, got {spec.steps}")
    spec.cfg = float(defaults["cfg"] if spec.cfg is None else spec.cfg)
    if spec.batch < 1 or spec.n_iter < 1 or spec.batch * spec.n_iter > limits.max_batch:
        raise InputError("batch", f"at most {limits.max_batch} images per request on this server "
                                  f"(batch {spec.batch} x iterations {spec.n_iter})")
    if spec.seed is None or spec.seed == -1:
        spec.seed = secrets.randbelow(2**31 - 1)  # A1111: -1 = random
    if spec.strength is not None and not 0.0 < spec.strength <= 1.0:
        raise InputError("strength", f"strength must be in (0, 1], got {spec.strength}")
    if spec.strength is not None and int(spec.steps * spec.strength) < 1:
        raise InputError("strength", f"steps x strength = {spec.steps} x {spec.strength} < 1 leaves no step to run; "
                                     + (f"raise steps to at least {math.ceil(1 / spec.strength)}" if spec.strength >= 1e-6
                                        else "raise strength"))

    # ---- images -----------------------------------------------------------------------------------
    if spec.mask is not None and spec.init_image is None:
        raise InputError("mask", "a mask needs init_image (the picture to inpaint)")
    if cfg.unet.in_channels == 9 and spec.mask is None:
        raise InputError("mask", f"{m.name} is an inpainting model (9-channel UNet): pass init_image and mask")
    if spec.init_image is not None and spec.latents is not None:
        raise InputError("latents", "pass either latents (a hand-off) or init_image / mask, not both")
    if cfg.family == "sd2-unclip" and spec.image_prompt is None:
        raise InputError("image_prompt", f"{m.name} is an unCLIP model: it makes variations of image_prompt")
    if cfg.family != "sd2-unclip" and spec.image_prompt is not None:
        raise InputError("image_prompt", f"image_prompt needs an unCLIP model; {m.name} is {cfg.family}")

    # ---- size ---------------------------------------------------------------------------------------
    if spec.latents is not None:
        lat = spec.latents
        if lat.ndim != 4 or lat.shape[1] != cfg.unet.out_channels or lat.shape[0] != spec.batch:
            raise InputError("latents", f"latents must have shape (batch={spec.batch}, {cfg.unet.out_channels}, h, w), "
                                        f"got {tuple(lat.shape)}")
        if not torch.isfinite(lat).all():
            raise InputError("latents", "latents contain NaN or infinity")
        lh, lw = lat.shape[2] * f, lat.shape[3] * f
        for name, v in (("width", spec.width), ("height", spec.height)):
            if v is not None and v != (lw if name == "width" else lh):
                raise InputError(name, f"{name} {v} does not match the latents ({lw}x{lh}); leave it unset")
        spec.width, spec.height = lw, lh
    elif spec.init_image is not None and (spec.width is None or spec.height is None):
        w0, h0 = spec.init_image.size
        spec.width = spec.width or w0 // mult * mult
        spec.height = spec.height or h0 // mult * mult
        if not spec.width or not spec.height:
            raise InputError("init_image", f"init_image is {w0}x{h0}; the output size would be below {mult} px: "
                                           "pass width and height")
    spec.width = spec.width or cfg.resolution
    spec.height = spec.height or cfg.resolution
    for name, v, top in (("width", spec.width, limits.max_width), ("height", spec.height, limits.max_height)):
        if v % mult or v < mult:
            near = max(mult, round(v / mult) * mult)
            raise InputError(name, f"{name} must be a positive multiple of {mult} for {m.name}, got {v}; try {near}")
        if v > top:
            raise InputError(name, f"{name} must be at most {top} on this server, got {v}")

    if spec.init_image is not None and spec.crop_to_fit:
        spec.init_image = _fit_crop(spec.init_image, spec.width, spec.height)
    if spec.mask is not None:
        if spec.mask.size != spec.init_image.size:
            if not spec.resize_mask:
                raise InputError("mask", f"mask is {spec.mask.width}x{spec.mask.height} but init_image is "
                                         f"{spec.init_image.width}x{spec.init_image.height}; they must match")
            spec.mask = spec.mask.resize(spec.init_image.size, Image.NEAREST)
        if spec.mask_invert:
            spec.mask = ImageOps.invert(spec.mask)
        if spec.mask.size != (spec.width, spec.height):  # the pipeline wants the mask at the output size
            spec.mask = spec.mask.resize((spec.width, spec.height), Image.NEAREST)
    if spec.denoising_end is not None and spec.output_type != "latent":
        raise InputError("denoising_end", "denoising_end stops before the end of the schedule, so there is no image "
                                          "to decode: set output_type 'latent' and continue with latents + "
                                          "denoising_start, or use refiner")
    return spec


# ==================================================================================================
# Running a job (worker thread)
# ==================================================================================================


@dataclass
class Output:
    images: list[dict]  # {"png": bytes, "seed", "width", "height", "infotext", "model_hash"}
    latents: tuple[list[int], bytes] | None  # (shape, float32 little-endian data), for output_type "latent"
    notes: list[str]
    settings: dict


class _Progress:
    """Steps across sampler stages (base + refiner) and iterations -> job.report(step, total, preview)."""

    def __init__(self, job: Job, spec: Spec, previewer: Previewer | None):
        self.job, self.spec, self.previewer = job, spec, previewer
        per = spec.steps
        if spec.strength is not None and spec.init_image is not None:
            per = max(1, int(spec.steps * spec.strength))
        self.per_iter, self.done, self.iter_base, self.stage_base, self.iteration = per, 0, 0, 0, 0
        job.report(0, per * spec.n_iter)

    def __call__(self, i: int, n: int, x, x0) -> None:
        if i == 0:
            self.stage_base = self.done
        self.done = self.stage_base + i + 1
        in_iter = self.done - self.iter_base
        this_iter = max(self.per_iter, in_iter + (n - i - 1))
        total = self.iter_base + this_iter + self.per_iter * (self.spec.n_iter - self.iteration - 1)
        preview = None
        if self.previewer is not None and x0 is not None:
            preview = self.previewer(x0, self.spec.width, self.spec.height, last=i == n - 1)
        self.job.report(self.done, total, preview)

    def end_iteration(self) -> None:
        self.per_iter = max(1, self.done - self.iter_base)
        self.iter_base, self.iteration = self.done, self.iteration + 1


def pipeline_kwargs(spec: Spec, seed: int, callback) -> dict:
    kw = dict(steps=spec.steps, cfg=spec.cfg, seed=seed, width=spec.width, height=spec.height, sampler=spec.sampler,
              schedule=spec.schedule, batch=spec.batch, guidance_rescale=spec.guidance_rescale,
              original_size=spec.original_size, crop=tuple(spec.crop), target_size=spec.target_size,
              negative_original_size=spec.negative_original_size, negative_crop=spec.negative_crop,
              negative_target_size=spec.negative_target_size, callback=callback, vae_tile=spec.vae_tile)
    if spec.refiner is not None:
        kw.update(aesthetic_score=spec.aesthetic_score, negative_aesthetic_score=spec.negative_aesthetic_score)
        if spec.init_image is not None:
            kw.update(init_image=spec.init_image, strength=spec.strength)
        return kw
    kw.update(aesthetic_score=spec.aesthetic_score, negative_aesthetic_score=spec.negative_aesthetic_score,
              denoising_start=spec.denoising_start, denoising_end=spec.denoising_end, output_type=spec.output_type)
    if spec.init_image is not None:
        kw.update(init_image=spec.init_image, strength=spec.strength, mask=spec.mask, mask_blur=spec.mask_blur)
    if spec.latents is not None:
        kw.update(latents=spec.latents)
    if spec.image_prompt is not None:
        kw.update(image_prompt=spec.image_prompt, noise_level=spec.noise_level)
    return kw


def run(job: Job, spec: Spec, models: Models) -> Output:
    """The work of one job, in its model's worker thread."""
    m = models.get(spec.model)
    refiner = models.get(spec.refiner, "refiner") if spec.refiner else None
    progress = _Progress(job, spec, m.previewer)
    images, latents, notes = [], [], []
    for it in range(spec.n_iter):
        if job.cancel_requested:
            raise Cancelled()
        seed = spec.seed + it * spec.batch  # A1111: batch k of n_iter starts at seed + k * batch_size
        kw = pipeline_kwargs(spec, seed, progress)
        if refiner is not None:
            result = m.pipe.refine(refiner.pipe, spec.prompt, spec.negative_prompt, switch_at=spec.refiner_switch_at,
                                   mode=spec.refiner_mode, refiner_strength=spec.refiner_strength, **kw)
        else:
            result = m.pipe(spec.prompt, spec.negative_prompt, **kw)
        if spec.strength is None and result.settings.get("strength") is not None:
            spec.strength = result.settings["strength"]  # the pipeline's default, for the infotext
        progress.end_iteration()
        settings = {**result.settings, "model": spec.model}  # the name the server knows the model by
        for k, img in enumerate(result.images):
            text = generation_infotext(settings, k)
            images.append({"png": png_bytes(img, text), "seed": result.seeds[k], "width": img.width,
                           "height": img.height, "infotext": text, "model_hash": settings.get("model_hash")})
        if spec.output_type == "latent":
            latents.append(result.latents.float().cpu())
        notes += [n for n in result.notes if n not in notes]
    lat = torch.cat(latents) if latents else None
    return Output(images, None if lat is None else (list(lat.shape), latents_to_bytes(lat)), notes, spec.settings())


def latents_to_bytes(t: torch.Tensor) -> bytes:
    return t.float().contiguous().numpy().astype("<f4").tobytes()


def latents_from_bytes(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 0
    if any(s < 1 for s in shape) or n > 4 * 1024 * 1024:
        raise InputError("latents", f"latents shape {list(shape)} is empty or too large")
    if len(raw) != 4 * n:
        raise InputError("latents", f"latents data has {len(raw)} bytes; shape {list(shape)} needs {4 * n} "
                                    "(float32 little-endian)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape).copy())
