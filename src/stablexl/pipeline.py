"""The one denoise loop, and the Pipeline that wires text encoders, UNet and VAE around it.

Text-to-image is an initial latent of pure noise at σ_0 plus the full σ schedule; image-to-image,
inpainting and the refiner hand-off are other initial latents / σ slices / masks into the same
`denoise` call, not copies of it.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import PRESETS, ModelConfig
from .diffusion.denoiser import Denoiser
from .diffusion.guidance import guided
from .diffusion.samplers import SAMPLERS, resolve_sampler
from .diffusion.schedule import SPACINGS, NoiseSchedule, make_sigmas
from .memory import MemoryPolicy, release, reuse_freed_memory, trim
from .models.conditioning import Conditioning, encode_text, refiner_vector, sdxl_vector, unclip_vector
from .models.parts import ModelParts, build_parts
from .models.tokenizer import CLIPTokenizer, default_tokenizer
from .prompts import encode_prompts_weighted, needs_weighting
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

    def __call__(self, shape: tuple[int, ...] | None = None) -> Tensor:
        shape = self.shape if shape is None else shape
        draws = [torch.randn((1, *shape), generator=g, dtype=self.dtype) for g in self.generators]
        return torch.cat(draws).to(self.device)


def denoise(model, x: Tensor, sigmas: Tensor, sampler: str, noise: SeededNoise,
            callback: Callable[[int, int, Tensor, Tensor], Tensor | None] | None = None) -> Tensor:
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
    noise: "SeededNoise | None" = None  # the generators, to continue them in a refiner stage


def latents_to_images(t: Tensor) -> list[Image.Image]:
    arr = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _defaults(config: ModelConfig) -> dict:
    if config.name == "mini":  # what the shipped miniature is evaluated with (docs/mini.md)
        return {"steps": 30, "cfg": 5.0, "sampler": "dpmpp_2m", "schedule": "karras"}
    if config.name == "sdxl-turbo":
        return {"steps": 1, "cfg": 0.0, "sampler": "euler_ancestral", "schedule": "trailing"}
    return {"steps": 30, "cfg": 5.0 if config.family.startswith("sdxl") else 7.5, "sampler": "euler", "schedule": "leading"}


class Pipeline:
    def __init__(self, parts: ModelParts, tokenizer: CLIPTokenizer | None = None, name: str | None = None,
                 memory: MemoryPolicy | str | None = None):
        if parts.config.family not in ("sd1", "sd2", "sdxl-base", "sdxl-refiner", "sd2-unclip"):
            raise ValueError(f"no pipeline for model family {parts.config.family!r}")
        self.parts = parts
        # Random and zeroed conditioning drive activations into subnormal floats, which x86 CPUs process
        # up to ~50x slower (measured: 1.9 s -> 0.037 s per tiny UNet call). Flushing them to zero changes
        # results only below 1e-38. This is a per-process CPU flag; set here, where inference starts.
        torch.set_flush_denormal(True)
        reuse_freed_memory()  # large activations reuse freed heap blocks instead of fresh zeroed pages
        self.tokenizer = tokenizer or default_tokenizer()
        self.name = name or parts.config.name
        self.schedule = NoiseSchedule.ddpm(zero_terminal_snr=parts.config.zero_terminal_snr)
        self.defaults = _defaults(parts.config)
        self.memory = MemoryPolicy.named(memory)
        self._release(*parts.modules().values())  # the loader's NaN check touched every weight

    def _release(self, *modules) -> None:
        """Under a `release_after_use` policy, file-backed weights of these modules leave RAM until next used."""
        if self.memory.release_after_use:
            release(*modules)
            trim()  # and the activations' freed heap memory

    @property
    def config(self) -> ModelConfig:
        return self.parts.config

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" of the weights this pipeline was loaded from; None for in-memory models."""
        from .io.hashing import model_hash

        try:
            return None if self.parts.source is None else model_hash(self.parts.source)
        except OSError:  # the file went away after loading: the image is still worth saving
            return None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                        memory: MemoryPolicy | str | None = None, **load_kwargs) -> "Pipeline":
        """A checkpoint path / diffusers folder / HF cache id, "mini" (the shipped miniature, trained on emoji
        art), or a `tiny-*` preset (random weights, for tests)."""
        from .io.models import load_model

        name = str(name_or_path)
        if name == "mini" and not os.path.exists(name):  # the shipped miniature (stablexl/assets/mini)
            from .io.checkpoint import parse_dtype
            from .mini.weights import load_mini_parts

            return cls(load_mini_parts(dtype=parse_dtype(dtype) if dtype is not None else torch.float32), name="mini")
        if name in PRESETS and not os.path.exists(name):
            if not name.startswith("tiny-"):
                raise ValueError(f"preset {name!r} names an architecture, not weights; pass the path of its checkpoint "
                                 "(.safetensors file or diffusers folder)")
            with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
                torch.manual_seed(0)
                parts = build_parts(PRESETS[name], device="cpu").eval()
            parts.notes.append(f"{name}: randomly initialised weights (seed 0), not a trained model")
            if dtype is not None:
                from .io.checkpoint import parse_dtype

                parts.to(parse_dtype(dtype))
            return cls(parts, name=name, memory=memory)
        policy = MemoryPolicy.named(memory)
        parts = load_model(name_or_path, dtype=dtype, after_check=release if policy.release_after_use else None,
                           **load_kwargs)
        return cls(parts, name=os.path.basename(os.path.normpath(name)), memory=policy)

    # ----------------------------------------------------------------------------------------------

    def _tokens(self, prompts: list[str]) -> list[Tensor]:
        return [self.tokenizer(prompts, pad_id=spec.pad_id) for spec in self.config.text_encoders]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative: list[str] | None, *, size: tuple[int, int],
                      original_size=None, crop=(0, 0), target_size=None, aesthetic_score: float = 6.0,
                      negative_aesthetic_score: float = 2.5, negative_original_size=None, negative_crop=None,
                      negative_target_size=None) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for the batch. SDXL base with no negative prompt gets zeroed text embeddings
        (diffusers `force_zeros_for_empty_prompt`); the micro-conditions stay. Negative micro-conditions
        default to the positive ones (diffusers `negative_original_size` & co.)."""
        cfg = self.config
        enc = self.parts.text_encoders
        zero_uncond = negative is None and cfg.family == "sdxl-base"
        negs = negative or [""] * len(prompts)
        if any(needs_weighting(p, tokenizer=self.tokenizer) for p in prompts + (negs if not zero_uncond else [])):
            # A1111 syntax / long prompts: prompts and negatives in one call so their chunk counts agree
            texts = prompts + ([] if zero_uncond else negs)
            all_ctx, all_pooled = encode_prompts_weighted(cfg, enc, texts, tokenizer=self.tokenizer)
            b = len(prompts)
            ctx, pooled = all_ctx[:b], None if all_pooled is None else all_pooled[:b]
            if not zero_uncond:
                uctx, upooled = all_ctx[b:], None if all_pooled is None else all_pooled[b:]
        else:  # plain prompts: exactly diffusers' encoding
            ctx, pooled = encode_text(cfg, enc, self._tokens(prompts))
            if not zero_uncond:
                uctx, upooled = encode_text(cfg, enc, self._tokens(negs))
        if zero_uncond:
            uctx, upooled = torch.zeros_like(ctx), None if pooled is None else torch.zeros_like(pooled)
        original_size = original_size or size
        target_size = target_size or size
        n_orig, n_crop, n_target = negative_original_size or original_size, negative_crop or crop, negative_target_size or target_size
        if cfg.family == "sdxl-base":
            vec = sdxl_vector(pooled, original_size, crop, target_size)
            uvec = sdxl_vector(upooled, n_orig, n_crop, n_target)
        elif cfg.family == "sdxl-refiner":
            vec = refiner_vector(pooled, original_size, crop, aesthetic_score)
            uvec = refiner_vector(upooled, n_orig, n_crop, negative_aesthetic_score)
        else:
            vec = uvec = None
        return Conditioning(ctx, vec), Conditioning(uctx, uvec)

    def check_size(self, width: int, height: int) -> None:
        f = self.config.vae.downsample_factor
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f}, got {v!r}; "
                                 f"try {max(f, round(v / f) * f) if isinstance(v, (int, float)) else 64}")

    def step_range(self, steps: int, sigmas: Tensor, strength: float | None, denoising_start: float | None,
                   denoising_end: float | None) -> tuple[int, int]:
        """[first, last] step indices to run (diffusers semantics, reference §5.4-5.5).

        strength s: int(n·s) steps run, the last ones (img2img / inpainting). denoising_end / _start = f:
        the base runs the steps whose timestep t >= round(1000 − 1000·f), the refiner the rest.
        """
        first, last = 0, steps
        if strength is not None:
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            run = min(int(steps * strength), steps)
            if run < 1:
                need = f"to at least {math.ceil(1 / strength)} " if strength >= 1e-6 else ""
                raise ValueError(f"steps x strength = {steps} x {strength} < 1 leaves no step to run; raise --steps "
                                 f"{need}or raise --strength")
            first = steps - run
        t = self.schedule.sigma_to_t(sigmas[:-1]).round()
        n_train = self.schedule.num_train_timesteps
        for name, frac in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if frac is not None and not 0.0 < frac < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {frac}")
        if denoising_end is not None:
            cutoff = int(round(n_train - denoising_end * n_train))
            last = int((t >= cutoff).sum())
        if denoising_start is not None:
            cutoff = int(round(n_train - denoising_start * n_train))
            first = steps - int((t < cutoff).sum())
        if first >= last:
            raise ValueError(f"no steps left to run between step {first} and {last} of {steps}; check strength / "
                             "denoising_start / denoising_end")
        return first, last

    @torch.no_grad()
    def encode_image(self, image: Tensor, noise: SeededNoise) -> Tensor:
        """[-1, 1] image (1 or B, 3, H, W) -> scaled latents, a posterior sample per batch element drawn from
        that element's generator (diffusers `retrieve_latents(..., sample_mode="sample")`)."""
        vae = self.parts.vae
        post = vae.encode(image.to(vae.dtype))
        b = len(noise.generators)
        mean, std = post.mean.float(), post.std.float()
        if mean.shape[0] == 1 and b > 1:
            mean, std = mean.expand(b, -1, -1, -1), std.expand(b, -1, -1, -1)
        return (mean + std * noise()) * self.config.vae.scaling_factor

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *, steps: int | None = None,
        cfg: float | None = None, seed: int | None = None, width: int | None = None, height: int | None = None,
        sampler: str | None = None, schedule: str | None = None, batch: int = 1, guidance_rescale: float = 0.0,
        init_image=None, strength: float | None = None, mask=None, mask_blur: float = 0.0,
        latents: Tensor | None = None, denoising_start: float | None = None, denoising_end: float | None = None,
        original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
        negative_original_size: tuple[int, int] | None = None, negative_crop: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        callback: Callable[[int, int, Tensor, Tensor], None] | None = None, output_type: str = "pil",
        noise: SeededNoise | None = None, vae_tile: int | None = None, image_prompt=None, noise_level: int = 0,
    ) -> GenerationResult:
        """Generate. Text-to-image by default; with `init_image` (+ `strength`) image-to-image, where
        `init_image` may also be latents (B or 1, C, h, w), as diffusers accepts; with `mask` (white =
        repaint) inpainting; with `denoising_end` the base stops early and returns latents for a
        refiner called with `latents=` and `denoising_start=` (the "ensemble of expert denoisers").
        unCLIP models take `image_prompt` (image variations) and its `noise_level` in [0, 999]."""
        d = self.defaults
        cfg_model = self.config
        steps = d["steps"] if steps is None else steps
        cfg_scale = d["cfg"] if cfg is None else float(cfg)
        sampler_name, implied = resolve_sampler(sampler or d["sampler"])
        schedule = schedule or implied or d["schedule"]
        if schedule not in SPACINGS:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SPACINGS)}")
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        f = cfg_model.vae.downsample_factor
        image_t = mask_t = init_latents = None
        if isinstance(init_image, Tensor):  # latents, e.g. a base model's output for the refiner as SDEdit
            init_latents = _check_init_latents(init_image, cfg_model.unet.out_channels, batch if isinstance(prompt, str)
                                               else len(prompt), mask)
            lat_h, lat_w = init_latents.shape[-2] * f, init_latents.shape[-1] * f
            if (width or lat_w, height or lat_h) != (lat_w, lat_h):
                raise ValueError(f"width x height {width}x{height} differs from the init latents' {lat_w}x{lat_h}; "
                                 "leave width and height unset")
            width, height = lat_w, lat_h
        elif init_image is not None:
            img = load_image(init_image)
            width = width or img.width // f * f
            height = height or img.height // f * f
            image_t = image_to_tensor(img, width, height)
        elif mask is not None:
            raise ValueError("a mask needs an init image to inpaint")
        if latents is not None:
            if mask is not None or init_image is not None:
                raise ValueError("pass either latents (a hand-off from a base model) or init_image / mask, not both")
            height, width = latents.shape[-2] * f, latents.shape[-1] * f
        width = width or cfg_model.resolution
        height = height or cfg_model.resolution
        self.check_size(width, height)
        if mask is not None:
            mask_t = mask_to_tensor(load_image(mask, mode="L"), width, height, mask_blur)
        if cfg_model.unet.in_channels == 9 and mask_t is None:
            raise ValueError("this is an inpainting UNet (9 input channels): pass init_image and mask")
        if init_image is not None and strength is None and latents is None:
            strength = 1.0 if mask is not None and cfg_model.unet.in_channels == 9 else (0.3 if cfg_model.family.startswith("sdxl") else 0.8)

        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if seed is None:
            seed = secrets.randbelow(2**31 - 1)  # from the OS, independent of torch's global RNG
        seeds = [seed + k for k in range(len(prompts))]

        cond, uncond = self.encode_prompt(
            prompts, negatives, size=(height, width), original_size=original_size, crop=crop, target_size=target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            negative_original_size=negative_original_size, negative_crop=negative_crop,
            negative_target_size=negative_target_size,
        )
        noise = noise or SeededNoise(seeds, (cfg_model.unet.out_channels, height // f, width // f))
        if cfg_model.family == "sd2-unclip":  # drawn before the initial latent, as diffusers does
            cond, uncond = self._image_conditioning(cond, uncond, image_prompt, noise_level, noise)
        elif image_prompt is not None:
            raise ValueError(f"image_prompt needs an unCLIP model; {self.name} is {cfg_model.family}")
        self._release(*self.parts.text_encoders, self.parts.image_encoder)
        # DDIM's last step lands on ᾱ_0 (σ_min), not ᾱ = 1, in both CompVis DDIM and diffusers with the SD
        # scheduler configs (`set_alpha_to_one: false`); every other sampler ends at σ = 0.
        final = self.schedule.sigma_min if sampler_name == "ddim" else 0.0
        sigmas_full = make_sigmas(self.schedule, steps, schedule, final=final)
        first, last = self.step_range(steps, sigmas_full, strength, denoising_start, denoising_end)
        sigmas = sigmas_full[first:last + 1]

        # Initial latent: the order of generator draws follows diffusers (posterior sample, then noise).
        concat = image_latents = None
        if latents is not None:  # hand-off: continue from a VE-form latent at sigmas[0]
            x = latents.float()
        elif init_latents is not None:  # diffusers img2img with 4-channel `image`: no VAE encode
            image_latents = init_latents.float().expand(len(seeds), -1, -1, -1)
            x = image_latents + noise() * float(sigmas[0])
        elif image_t is not None and (cfg_model.unet.in_channels == 4 or strength < 1.0):
            image_latents = self.encode_image(image_t, noise)
            first_noise = noise()
            if mask_t is not None and strength == 1.0:  # inpainting at full strength starts from pure noise
                x = first_noise * initial_noise_scale(sampler_name, schedule, float(sigmas[0]))
            else:
                x = image_latents + first_noise * float(sigmas[0])
        else:
            first_noise = noise()
            x = first_noise * initial_noise_scale(sampler_name, schedule, float(sigmas[0]))
        if mask_t is not None and cfg_model.unet.in_channels == 9:
            masked = image_t * (mask_t < 0.5)
            masked_latents = self.encode_image(masked, noise)
            small = F.interpolate(mask_t, size=(height // f, width // f))  # nearest, as diffusers
            concat = torch.cat([small.expand(len(seeds), -1, -1, -1), masked_latents], dim=1)

        unet = self.parts.unet
        # Euler-family samplers feed the UNet fractional timesteps t(σ) (diffusers' Euler schedulers);
        # the others round t to the training grid (diffusers DPM-Solver, k-diffusion, ComfyUI).
        denoiser = Denoiser(unet, self.schedule, cfg_model.prediction, concat=concat,
                            quantize_t=sampler_name not in EULER_FAMILY)
        model = guided(denoiser, cond.to(unet.dtype), uncond.to(unet.dtype), cfg_scale, guidance_rescale)
        step_fn = callback
        if mask_t is not None and cfg_model.unet.in_channels == 4:
            step_fn = _blend_known_region(F.interpolate(mask_t, size=(height // f, width // f)), image_latents,
                                          first_noise, sigmas, callback)
        self._release(self.parts.vae)  # used above only if an init image was encoded
        with unet.reusing_context():
            x = denoise(model, x, sigmas, sampler_name, noise, step_fn)
        self._release(unet)
        if not torch.isfinite(x).all():
            raise FloatingPointError("sampling produced NaN/inf latents; try fp32 weights, fewer CFG or another sampler")
        settings = {
            "prompt": prompts, "negative_prompt": negatives, "steps": steps, "sampler": sampler_name,
            "schedule": schedule, "cfg": cfg_scale, "seed": seed, "width": width, "height": height,
            "model": self.name, "guidance_rescale": guidance_rescale, "strength": strength,
            "denoising_start": denoising_start, "denoising_end": denoising_end,
            "original_size": original_size, "target_size": target_size, "crop": tuple(crop),
            "mask_blur": mask_blur if mask is not None else None,
            "noise_level": noise_level if image_prompt is not None else None,
        }
        notes = list(self.parts.notes)
        if float(sigmas[-1]) > final:
            # stopped early (hand-off): return the VE-form latent at sigmas[-1] for the next stage
            return GenerationResult([], x, seeds, settings, notes, noise=noise)
        x = x / math.sqrt(1 + float(sigmas[-1]) ** 2)  # VE -> data scale (identity unless DDIM stops at σ_min)
        if output_type == "latent":
            return GenerationResult([], x, seeds, settings, notes, noise=noise)
        settings["model_hash"] = self.model_hash  # images get saved with it (cached: hashed once per file)
        dec = decode_latents(self.parts.vae, x, tile=vae_tile)  # vae_tile: latent tile side, e.g. 64 = 512 px
        self._release(self.parts.vae)
        if dec.upcast:
            notes.append("VAE decode overflowed in reduced precision and was redone in fp32")
        images = dec.images
        if mask_t is not None:  # keep unmasked pixels exactly (the VAE round trip would alter them)
            images = image_t * (1 - mask_t) + images * mask_t
        return GenerationResult(latents_to_images(images), x, seeds, settings, notes, noise=noise)

    @torch.no_grad()
    def _image_conditioning(self, cond: Conditioning, uncond: Conditioning, image_prompt, noise_level: int,
                            noise: SeededNoise) -> tuple[Conditioning, Conditioning]:
        """unCLIP: vector = [noise-augmented CLIP image embedding ‖ sinusoid(noise_level)]; uncond vector = 0."""
        if image_prompt is None:
            raise ValueError("unCLIP models generate variations of an image: pass image_prompt (CLI: --image-prompt)")
        enc, norm = self.parts.image_encoder, self.parts.image_normalizer
        if enc is None or norm is None:
            raise ValueError("this unCLIP model has no image encoder loaded (official unCLIP single files do not "
                             "contain it); load the model from a diffusers folder that has image_encoder/")
        pixels = enc.normalize(clip_image_tensor(load_image(image_prompt), enc.config.image_size))
        embeds = enc(pixels.to(enc.embeddings.patch_embedding.weight.dtype)).float()  # (1, D)
        embeds = embeds.expand(len(cond), -1)
        vec = unclip_vector(embeds, noise_level, norm, noise((embeds.shape[1],)))
        return Conditioning(cond.context, vec), Conditioning(uncond.context, torch.zeros_like(vec))

    def refine(self, refiner: "Pipeline", prompt, negative_prompt=None, *, switch_at: float = 0.8,
               mode: str = "handoff", refiner_strength: float = 0.3, **kwargs) -> GenerationResult:
        """Base -> refiner, in one of the two ways the SDXL report describes (§2.5, Fig. 1):

        - `mode="handoff"`, the "ensemble of expert denoisers": the base runs the first `switch_at` of the
          schedule and the refiner the rest, on the same σ grid and noise (diffusers `denoising_end` /
          `denoising_start`; A1111's "Refiner switch at").
        - `mode="sdedit"`: the base runs its whole schedule, then the refiner does image-to-image on the
          base's latents at `refiner_strength` (SDEdit; diffusers' base latents into
          `StableDiffusionXLImg2ImgPipeline`, whose default strength is 0.3). Each seed's noise stream
          continues from the base, as when one generator is passed to both diffusers pipelines.
        `aesthetic_score` / `negative_aesthetic_score` go to the refiner, everything else to the base."""
        if mode not in ("handoff", "sdedit"):
            raise ValueError(f"unknown refiner mode {mode!r}; choose handoff or sdedit")
        if kwargs.get("mask") is not None:
            raise ValueError("inpainting with a refiner is not supported: the refiner stage would repaint the "
                             "unmasked pixels too; inpaint with the base alone, then refine the result as img2img")
        refiner_keys = {"aesthetic_score", "negative_aesthetic_score"}
        base_kwargs = {k: v for k, v in kwargs.items() if k not in refiner_keys}
        shared = {k: v for k, v in kwargs.items() if k in ("steps", "cfg", "sampler", "schedule", "guidance_rescale", "callback",
                                                           "vae_tile")
                  or k in refiner_keys}
        if mode == "handoff":
            base = self(prompt, negative_prompt, denoising_end=switch_at, output_type="latent", **base_kwargs)
            out = refiner(prompt, negative_prompt, latents=base.latents, denoising_start=switch_at,
                          seed=base.settings["seed"], batch=len(base.seeds), noise=base.noise, **shared)
            extra = {"refiner_switch_at": switch_at}
        else:
            base = self(prompt, negative_prompt, output_type="latent", **base_kwargs)
            out = refiner(prompt, negative_prompt, init_image=base.latents, strength=refiner_strength,
                          seed=base.settings["seed"], batch=len(base.seeds), noise=base.noise, **shared)
            extra = {"refiner_mode": "sdedit", "refiner_strength": refiner_strength}
        # The images' settings are the base's (A1111: "Model" is the base, "Refiner" the refiner).
        out.settings = {**base.settings, "denoising_end": None, "refiner": refiner.name, **extra}
        if out.images:
            out.settings["model_hash"] = self.model_hash
        return out


def _check_init_latents(latents: Tensor, channels: int, batch: int, mask) -> Tensor:
    if mask is not None:
        raise ValueError("inpainting needs the init image as pixels (a PIL image or a path), not latents")
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"init latents must have shape (B, {channels}, h, w), got {tuple(latents.shape)}; "
                         "pass a PIL image or a path for pixels")
    if latents.shape[0] not in (1, batch):
        raise ValueError(f"{latents.shape[0]} init latents for a batch of {batch}; pass 1 or {batch}")
    if not torch.isfinite(latents).all():
        raise ValueError("init latents contain NaN/inf")
    return latents


def _blend_known_region(mask: Tensor, image_latents: Tensor, noise: Tensor, sigmas: Tensor, callback):
    """After each step keep the unmasked region at the original latents noised to the next level
    (4-channel inpainting, diffusers `StableDiffusionXLInpaintPipeline`; mask 1 = repaint)."""
    def step(i: int, n: int, x: Tensor, x0: Tensor) -> Tensor:
        if callback is not None:
            callback(i, n, x, x0)
        known = image_latents + noise * float(sigmas[i + 1]) if i < n - 1 else image_latents
        return (1 - mask) * known + mask * x
    return step


# --------------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------------


def load_image(src, mode: str = "RGB") -> Image.Image:
    """A PIL image, a path, or an array -> PIL image in `mode`, with a clear error for anything else."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise ValueError(f"image {src}: no such file")
        try:
            img = Image.open(src)
            img.load()
        except Exception as e:  # PIL raises several types for malformed files
            raise ValueError(f"image {src}: cannot be read as an image ({type(e).__name__}: {e})") from None
    elif isinstance(src, np.ndarray):
        img = Image.fromarray(src)
    else:
        raise ValueError(f"expected a PIL image, a path or an array, got {type(src).__name__}")
    if img.width < 1 or img.height < 1:
        raise ValueError("image is empty")
    return img.convert(mode)


def image_to_tensor(img: Image.Image, width: int, height: int) -> Tensor:
    """RGB PIL -> (1, 3, H, W) in [-1, 1], resized (Lanczos, as diffusers' image processor) when needed."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return arr * 2 - 1


def clip_image_tensor(img: Image.Image, size: int) -> Tensor:
    """CLIP preprocessing: shortest side to `size` (bicubic), centre crop, [0, 1] (B=1, 3, size, size)."""
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def mask_to_tensor(img: Image.Image, width: int, height: int, blur: float = 0.0) -> Tensor:
    """Greyscale mask -> (1, 1, H, W) in {0, 1} (white = repaint), optionally Gaussian-blurred (soft edges)."""
    if img.size != (width, height):
        raise ValueError(f"mask is {img.width}x{img.height} but the image is {width}x{height}; resize the mask to match")
    m = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    m = (m >= 0.5).float()  # binarised, as diffusers' mask processor does
    if blur > 0:
        r = max(1, int(3 * blur))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * blur**2))
        k = k / k.sum()
        m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return m
