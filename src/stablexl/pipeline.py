"""The one denoise loop, and the Pipeline that wires text encoders, UNet and VAE around it.

Text-to-image is an initial latent of pure noise at σ_0 plus the full σ schedule; image-to-image,
inpainting and the refiner hand-off are other initial latents / σ slices / masks into the same
`denoise` call, not copies of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import PRESETS, ModelConfig
from .diffusion.denoiser import Denoiser
from .diffusion.guidance import guided
from .diffusion.samplers import SAMPLERS, resolve_sampler
from .diffusion.schedule import SPACINGS, NoiseSchedule, make_sigmas
from .models.conditioning import Conditioning, encode_text, refiner_vector, sdxl_vector
from .models.parts import ModelParts, build_parts
from .models.tokenizer import CLIPTokenizer, default_tokenizer
from .models.vae import decode_latents

EULER_FAMILY = {"euler", "euler_ancestral", "heun", "lcm"}


# --------------------------------------------------------------------------------------------------
# Noise from per-sample generators
# --------------------------------------------------------------------------------------------------


class SeededNoise:
    """N(0, I) draws for a batch where sample k has its own CPU generator seeded with seeds[k].

    The first draw is the initial latent, exactly `torch.randn((1, C, h, w), generator=Generator().manual_seed(s))`
    per sample, as diffusers does with a list of CPU generators; later draws feed stochastic samplers.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape, self.device, self.dtype = shape, device, dtype

    def __call__(self) -> Tensor:
        draws = [torch.randn((1, *self.shape), generator=g, dtype=self.dtype) for g in self.generators]
        return torch.cat(draws).to(self.device)


def denoise(model, x: Tensor, sigmas: Tensor, sampler: str, noise: SeededNoise,
            callback: Callable[[int, int, Tensor, Tensor], None] | None = None) -> Tensor:
    """Run `sampler` from x at sigmas[0] down the schedule: the loop every pipeline uses."""
    try:
        fn = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}") from None
    return fn(model, x, sigmas, noise=noise, callback=callback)


def initial_noise_scale(sampler: str, schedule: str, sigma0: float) -> float:
    """Scale of the first latent draw, as diffusers' schedulers set it.

    Euler-family schedulers with trailing/linspace spacing start at σ_0; with leading (and Karras /
    exponential, whose scheduler configs keep "leading") at √(σ_0² + 1), which is also what the
    VP-space schedulers (DDIM, DDPM, DPM-Solver) amount to (`init_noise_sigma`, reference §5.2).
    """
    if sampler in EULER_FAMILY and schedule in ("trailing", "linspace"):
        return sigma0
    return math.sqrt(sigma0**2 + 1)


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: Tensor  # (B, 4, h, w) final latents, scaled as the UNet sees them
    seeds: list[int]
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def latents_to_images(t: Tensor) -> list[Image.Image]:
    arr = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _defaults(config: ModelConfig) -> dict:
    if config.name == "sdxl-turbo":
        return {"steps": 1, "cfg": 0.0, "sampler": "euler_ancestral", "schedule": "trailing"}
    return {"steps": 30, "cfg": 5.0 if config.family.startswith("sdxl") else 7.5, "sampler": "euler", "schedule": "leading"}


class Pipeline:
    def __init__(self, parts: ModelParts, tokenizer: CLIPTokenizer | None = None, name: str | None = None):
        if parts.config.family not in ("sd1", "sd2", "sdxl-base", "sdxl-refiner"):
            raise ValueError(f"text-to-image is not available for family {parts.config.family!r} yet")
        self.parts = parts
        # Random and zeroed conditioning drive activations into subnormal floats, which x86 CPUs process
        # up to ~50x slower (measured: 1.9 s -> 0.037 s per tiny UNet call). Flushing them to zero changes
        # results only below 1e-38. This is a per-process CPU flag; set here, where inference starts.
        torch.set_flush_denormal(True)
        self.tokenizer = tokenizer or default_tokenizer()
        self.name = name or parts.config.name
        self.schedule = NoiseSchedule.ddpm()
        self.defaults = _defaults(parts.config)

    @property
    def config(self) -> ModelConfig:
        return self.parts.config

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, **load_kwargs) -> "Pipeline":
        """A checkpoint path / diffusers folder / HF cache id, or a `tiny-*` preset (random weights, for tests)."""
        from .io.models import load_model

        name = str(name_or_path)
        if name in PRESETS and not os.path.exists(name):
            if not name.startswith("tiny-"):
                raise ValueError(f"preset {name!r} names an architecture, not weights; pass the path of its checkpoint "
                                 "(.safetensors file or diffusers folder)")
            torch.manual_seed(0)
            parts = build_parts(PRESETS[name], device="cpu").eval()
            parts.notes.append(f"{name}: randomly initialised weights (seed 0), not a trained model")
            if dtype is not None:
                from .io.checkpoint import parse_dtype

                parts.to(parse_dtype(dtype))
            return cls(parts, name=name)
        parts = load_model(name_or_path, dtype=dtype, **load_kwargs)
        return cls(parts, name=os.path.basename(os.path.normpath(name)))

    # ----------------------------------------------------------------------------------------------

    def _tokens(self, prompts: list[str]) -> list[Tensor]:
        return [self.tokenizer(prompts, pad_id=spec.pad_id) for spec in self.config.text_encoders]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative: list[str] | None, *, size: tuple[int, int],
                      original_size=None, crop=(0, 0), target_size=None, aesthetic_score: float = 6.0,
                      negative_aesthetic_score: float = 2.5) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for the batch. SDXL base with no negative prompt gets zeroed text embeddings
        (diffusers `force_zeros_for_empty_prompt`); the micro-conditions stay."""
        cfg = self.config
        enc = self.parts.text_encoders
        ctx, pooled = encode_text(cfg, enc, self._tokens(prompts))
        zero_uncond = negative is None and cfg.family == "sdxl-base"
        if zero_uncond:
            uctx, upooled = torch.zeros_like(ctx), None if pooled is None else torch.zeros_like(pooled)
        else:
            uctx, upooled = encode_text(cfg, enc, self._tokens(negative or [""] * len(prompts)))
        original_size = original_size or size
        target_size = target_size or size
        if cfg.family == "sdxl-base":
            vec = sdxl_vector(pooled, original_size, crop, target_size)
            uvec = sdxl_vector(upooled, original_size, crop, target_size)
        elif cfg.family == "sdxl-refiner":
            vec = refiner_vector(pooled, original_size, crop, aesthetic_score)
            uvec = refiner_vector(upooled, original_size, crop, negative_aesthetic_score)
        else:
            vec = uvec = None
        return Conditioning(ctx, vec), Conditioning(uctx, uvec)

    def check_size(self, width: int, height: int) -> None:
        f = self.config.vae.downsample_factor
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f}, got {v!r}; "
                                 f"try {max(f, round(v / f) * f) if isinstance(v, (int, float)) else 64}")

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *, steps: int | None = None,
        cfg: float | None = None, seed: int | None = None, width: int | None = None, height: int | None = None,
        sampler: str | None = None, schedule: str | None = None, batch: int = 1, guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
        callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    ) -> GenerationResult:
        d = self.defaults
        steps = d["steps"] if steps is None else steps
        cfg_scale = d["cfg"] if cfg is None else float(cfg)
        sampler_name, implied = resolve_sampler(sampler or d["sampler"])
        schedule = schedule or implied or d["schedule"]
        if schedule not in SPACINGS:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SPACINGS)}")
        width = width or self.config.resolution
        height = height or self.config.resolution
        self.check_size(width, height)
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if seed is None:
            seed = int(torch.randint(0, 2**32 - 1, (1,)).item())
        seeds = [seed + k for k in range(len(prompts))]

        cond, uncond = self.encode_prompt(
            prompts, negatives, size=(height, width), original_size=original_size, crop=crop, target_size=target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
        )
        unet = self.parts.unet
        denoiser = Denoiser(unet, self.schedule, self.config.prediction)
        model = guided(denoiser, cond.to(unet.dtype), uncond.to(unet.dtype), cfg_scale, guidance_rescale)
        # DDIM's last step lands on ᾱ_0 (σ_min), not ᾱ = 1, in both CompVis DDIM and diffusers with the SD
        # scheduler configs (`set_alpha_to_one: false`); every other sampler ends at σ = 0.
        final = self.schedule.sigma_min if sampler_name == "ddim" else 0.0
        sigmas = make_sigmas(self.schedule, steps, schedule, final=final)
        f = self.config.vae.downsample_factor
        noise = SeededNoise(seeds, (self.config.unet.out_channels, height // f, width // f))
        x = noise() * initial_noise_scale(sampler_name, schedule, float(sigmas[0]))
        x = denoise(model, x, sigmas, sampler_name, noise, callback)
        x = x / math.sqrt(1 + float(sigmas[-1]) ** 2)  # VE -> data scale (identity unless DDIM stops at σ_min)
        if not torch.isfinite(x).all():
            raise FloatingPointError("sampling produced NaN/inf latents; try fp32 weights, fewer CFG or another sampler")
        dec = decode_latents(self.parts.vae, x)
        notes = list(self.parts.notes) + (["VAE decode overflowed in reduced precision and was redone in fp32"] if dec.upcast else [])
        settings = {
            "prompt": prompts, "negative_prompt": negatives, "steps": steps, "sampler": sampler_name,
            "schedule": schedule, "cfg": cfg_scale, "seed": seed, "width": width, "height": height,
            "model": self.name, "guidance_rescale": guidance_rescale,
        }
        return GenerationResult(latents_to_images(dec.images), x, seeds, settings, notes)
