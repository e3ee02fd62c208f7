"""The one denoise loop, and the Pipeline that wires text encoders, UNet and VAE around it.

Text-to-image is an initial latent of pure noise at σ_0 plus the full σ schedule; image-to-image,
inpainting and the refiner hand-off are other initial latents / σ slices / masks into the same
`denoise` call, not copies of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import PRESETS, ModelConfig
from .device import check_offload, empty_cache, is_out_of_memory, resolve_device, resolve_dtype, stream_weights, vae_dtype
from .diffusion.denoiser import Denoiser
from .diffusion.guidance import guided
from .diffusion.samplers import SAMPLERS
from .diffusion.schedule import NoiseSchedule, make_sigmas
from .memory import MemoryPolicy, release, reuse_freed_memory, trim
from .models.conditioning import Conditioning, encode_text, refiner_vector, sdxl_vector, unclip_vector
from .models.parts import ModelParts, build_parts
from .models.tokenizer import CLIPTokenizer, default_tokenizer
from .prompts import encode_prompts_weighted, needs_weighting
from .quant import check_mode as check_quantize
from .models.taesd import AutoencoderTiny, decode_tiny
from .models.vae import decode_latents
from .request import (  # noqa: F401  (load_image: re-exported)
    LATENT_UPSCALERS, PIXEL_UPSCALERS, GenerationRequest, Handoff, ImageInput, Limits, LoraSpec, MicroConditions,
    RequestError, hires_steps, hires_target, load_image,
    request_from_flat, resolve,
)
from .adapters.lora import Active, LoraError, LoraStack
from .adapters.tags import LoraFolder
from .adapters.embeddings import Embeddings

# fractional t(σ), as in diffusers' Euler, Heun, LMS and KDPM2 schedulers; CFG++ and Restart go as Euler and Heun
EULER_FAMILY = {"euler", "euler_ancestral", "heun", "lcm", "lms", "dpm_2", "dpm_2_ancestral", "euler_cfg_pp",
                "euler_ancestral_cfg_pp", "restart"}
log = logging.getLogger("stablexl")


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
            callback: Callable[[int, int, Tensor, Tensor], Tensor | None] | None = None, *,
            eta: float | None = None) -> Tensor:
    """Run `sampler` from x at sigmas[0] down the schedule: the loop every pipeline uses. `eta` (None: the
    sampler's own default) reaches the samplers that take one."""
    try:
        fn = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}") from None
    options = {} if eta is None else {"eta": eta}  # resolve() allows eta only for samplers that take it
    return fn(model, x, sigmas, noise=noise, callback=callback, **options)


def initial_noise_scale(sampler: str, schedule: str, sigma0: float) -> float:
    """Scale of the first latent draw, as diffusers' schedulers set it.

    Euler-family schedulers with trailing/linspace spacing start at σ_0; with leading (and Karras /
    exponential, whose scheduler configs keep "leading") at √(σ_0² + 1), which is also what the
    VP-space schedulers (DDIM, DDPM, DPM-Solver) amount to (`init_noise_sigma`, reference §5.2).
    ComfyUI's rule (`noise_scaling`): √(σ_0² + 1) where σ_0 is the model's σ_max, σ_0 below it; of its
    schedules only ddim_uniform starts below σ_max (t = 951 for 20 steps).
    """
    if schedule in ("custom", "ddim_uniform") or sampler in EULER_FAMILY and schedule in ("trailing", "linspace"):
        return sigma0  # custom σ lists follow k-diffusion / ComfyUI: x = noise · σ_0
    return math.sqrt(sigma0**2 + 1)


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: Tensor  # (B, 4, h, w) final latents, scaled as the UNet sees them (on the pipeline's device)
    seeds: list[int]
    request: GenerationRequest | None = None  # the resolved request: every setting as it was run
    notes: list[str] = field(default_factory=list)
    noise: "SeededNoise | None" = None  # the generators, to continue them in a refiner stage
    model_hash: str | None = None  # A1111's "Model hash" of the (base) model, for the infotext
    lora_hashes: dict[str, str] = field(default_factory=dict)  # the LoRAs applied: name -> A1111 12-hex hash

    def infotext(self, index: int) -> str:
        """The A1111 `parameters` text of image `index` (what every PNG we write carries)."""
        from .io.metadata import generation_infotext

        return generation_infotext(self.request, index, model_hash=self.model_hash, lora_hashes=self.lora_hashes)


def latents_to_images(t: Tensor) -> list[Image.Image]:
    arr = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _load_tiny_decoder(spec, parts: ModelParts, dtype: torch.dtype, device, allow_pickle: bool) -> AutoencoderTiny | None:
    """`from_pretrained`'s tiny_decoder: None -> the model's shipped one (if any), "none" -> none, else a file/name."""
    from .io.tiny import load_tiny_autoencoder, model_latent_space, shipped_tiny_decoder

    space = model_latent_space(parts.config)
    if spec is None:
        spec = shipped_tiny_decoder(parts.config)
        if spec is None:
            return None
    elif str(spec) == "none":
        return None
    tiny = load_tiny_autoencoder(spec, latent_space=space, dtype=dtype, device=device, allow_pickle=allow_pickle)
    if tiny.decoder is None:
        raise ValueError(f"tiny_decoder {spec}: holds only an encoder; pass the *_decoder file")
    if tiny.config.latent_channels != parts.config.vae.latent_channels:
        raise ValueError(f"tiny_decoder {spec}: reads {tiny.config.latent_channels}-channel latents, this model makes "
                         f"{parts.config.vae.latent_channels}-channel ones")
    parts.notes.append(f"tiny decoder from {spec}")
    return tiny


class Pipeline:
    def __init__(self, parts: ModelParts, tokenizer: CLIPTokenizer | None = None, name: str | None = None,
                 memory: MemoryPolicy | str | None = None, *, device: str | torch.device | None = None,
                 offload: str = "none", compile: bool | str = False, lora_dir: str | os.PathLike | None = None,
                 tiny_decoder: AutoencoderTiny | None = None, embeddings_dir: str | os.PathLike | None = None):
        """Wire loaded parts. `device` is where they compute (they are moved there unless offloaded; None: where
        the UNet already is); the compute dtype is the UNet's. `from_pretrained` chooses device and dtype by name.
        `compile`: True (inductor) or a torch.compile backend name. `tiny_decoder`: a TAESD-style decoder of this
        model's latents, for `decoder="tiny"` requests and live previews."""
        if parts.config.family not in ("sd1", "sd2", "sdxl-base", "sdxl-refiner", "sd2-unclip"):
            raise ValueError(f"no pipeline for model family {parts.config.family!r}")
        self.parts = parts
        self.device = resolve_device(device) if device is not None else next(parts.unet.parameters()).device
        self.offload = check_offload(offload)
        # Random and zeroed conditioning drive activations into subnormal floats, which x86 CPUs process
        # up to ~50x slower (measured: 1.9 s -> 0.037 s per tiny UNet call). Flushing them to zero changes
        # results only below 1e-38. This is a per-process CPU flag; set here, where inference starts.
        torch.set_flush_denormal(True)
        reuse_freed_memory()  # large activations reuse freed heap blocks instead of fresh zeroed pages
        self.tokenizer = tokenizer or default_tokenizer()
        self.name = name or parts.config.name
        self.schedule = NoiseSchedule.ddpm(zero_terminal_snr=parts.config.zero_terminal_snr)
        self.memory = MemoryPolicy.named(memory)
        home = torch.device("cpu") if self.offload != "none" else self.device
        if device is not None or self.offload != "none":
            for m in parts.modules().values():
                m.to(home)
        if self.offload == "sequential":
            for m in parts.modules().values():
                stream_weights(m, self.device)
        self.compiled = bool(compile)
        if self.compiled:  # in place, so the module keeps its identity (hooks, state_dict)
            parts.unet.compile(**({} if compile is True else {"backend": compile}))
        self._release(*parts.modules().values())  # the loader's NaN check touched every weight
        # LoRAs: the ones merged into the weights (adapters/lora.py), and the folder prompt tags name them in
        self.loras = LoraStack(parts)
        self.lora_folder = None if lora_dir is None else LoraFolder(lora_dir)
        # textual inversions: the folder's files as this model reads them (adapters/embeddings.py)
        self.embeddings = None if embeddings_dir is None else Embeddings(embeddings_dir, parts.config)
        # a few MB: always where decoding happens, whatever the offload mode
        self.tiny_decoder = None if tiny_decoder is None else tiny_decoder.to(self.device)

    @property
    def config(self) -> ModelConfig:
        return self.parts.config

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the UNet's)."""
        return self.parts.unet.dtype

    @property
    def defaults(self) -> dict:
        """The model's sampling defaults (its config's `sampling`, else its family's)."""
        return dataclasses.asdict(self.config.sampling_defaults)

    def _release(self, *modules) -> None:
        """Under a `release_after_use` policy, file-backed weights of these modules leave RAM until next used."""
        if self.memory.release_after_use:
            release(*[m for m in modules if m is not None])
            trim()  # and the activations' freed heap memory

    @contextmanager
    def _phase(self, *modules):
        """One phase of a generation (text, denoise, decode): with model offload its modules are on the device
        only inside; afterwards the memory policy may release them."""
        modules = [m for m in modules if m is not None]
        if self.offload == "model":
            for m in modules:
                m.to(self.device)
        try:
            yield
        finally:
            if self.offload == "model":
                for m in modules:
                    m.to("cpu")
                empty_cache(self.device)
            self._release(*modules)

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" of the weights this pipeline was loaded from; None for in-memory models."""
        from .io.hashing import model_hash

        try:
            return None if self.parts.source is None else model_hash(self.parts.source)
        except OSError:  # the file went away after loading: the image is still worth saving
            return None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", memory: MemoryPolicy | str | None = None,
                        offload: str = "none", compile: bool | str = False, vae: str | os.PathLike | None = None,
                        allow_pickle: bool = False, variant: str | None = None, prediction: str | None = None,
                        config: ModelConfig | None = None, lora_dir: str | os.PathLike | None = None,
                        tiny_decoder: str | os.PathLike | None = None, quantize: str | None = None,
                        quantize_text: bool = False, embeddings_dir: str | os.PathLike | None = None,
                        **unknown) -> "Pipeline":
        """A checkpoint path / diffusers folder / HF cache id, "mini" (the shipped miniature, trained on emoji
        art) or "mini-turbo" (its 1-step ADD student), or a `tiny-*` preset (random weights, for tests).

        `device`: auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps. `dtype`: auto (fp16 on CUDA/MPS,
        fp32 on the CPU, whatever the file stores) | fp32 | fp16 | bf16. `offload`: none | model | sequential
        (GPU memory modes). `compile`: run the UNet through torch.compile. `vae`: a separate VAE (file or
        diffusers folder) instead of the checkpoint's, as A1111's sd_vae. `tiny_decoder`: a TAESD-style decoder
        (stablexl/io/tiny.py: a file, a diffusers folder, "taesd" / "taesdxl" from the HF cache), for
        `decoder="tiny"` and previews; None: the model's own if it ships one (the miniature does), "none": none.
        `quantize`: "int8" stores the UNet's Linear weights as int8 (stablexl/quant.py; a file saved so loads
        as int8 whatever is asked), `quantize_text` the text encoders' too. `embeddings_dir`: a folder of
        textual-inversion .safetensors files, triggered in prompts by file name or `embedding:NAME`."""
        from .io.models import load_model

        if unknown:  # the same answer for presets, the miniature and files
            accepted = [p for p in inspect.signature(cls.from_pretrained).parameters if p not in ("name_or_path", "unknown")]
            raise TypeError(f"Pipeline.from_pretrained: unknown option(s) {', '.join(sorted(unknown))}; accepted: "
                            f"{', '.join(accepted)}")
        dev = resolve_device(device)
        compute = resolve_dtype(dtype, dev)
        offload = check_offload(offload)
        quantize = check_quantize(quantize)
        if quantize_text and quantize is None:
            raise ValueError("quantize_text=True needs quantize='int8'")
        load_device = dev if offload == "none" else torch.device("cpu")
        name = str(name_or_path)
        from .mini.weights import SHIPPED

        if name in SHIPPED and not os.path.exists(name):  # the shipped miniature and its variants (assets/mini)
            from .mini.weights import load_shipped

            parts = load_shipped(name, dtype=compute)
        elif name in PRESETS and not os.path.exists(name):
            if not name.startswith("tiny-"):
                raise ValueError(f"preset {name!r} names an architecture, not weights; pass the path of its checkpoint "
                                 "(.safetensors file or diffusers folder)")
            with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
                torch.manual_seed(0)
                parts = build_parts(PRESETS[name], device="cpu").eval()
            parts.notes.append(f"{name}: randomly initialised weights (seed 0), not a trained model")
            parts.to(compute)
        else:
            policy = MemoryPolicy.named(memory)
            parts = load_model(name_or_path, dtype=compute, device=load_device, allow_pickle=allow_pickle,
                               variant=variant, prediction=prediction, config=config,
                               after_check=release if policy.release_after_use else None)
            name = os.path.basename(os.path.normpath(name))
        if quantize is not None:
            parts.quantize(quantize, text_encoders=quantize_text)
        if vae is not None:
            from .io.models import load_vae

            parts.vae = load_vae(vae, vae_config=parts.config.vae, dtype=compute, device=load_device)
            parts.notes.append(f"VAE from {vae}")
        parts.vae.to(vae_dtype(compute, parts.vae.config.force_upcast))
        tiny = _load_tiny_decoder(tiny_decoder, parts, compute, load_device, allow_pickle)
        return cls(parts, name=name, memory=memory, device=dev, offload=offload, compile=compile, lora_dir=lora_dir,
                   tiny_decoder=tiny, embeddings_dir=embeddings_dir)

    # ----------------------------------------------------------------------------------------------
    # LoRAs (the logic is in adapters/lora.py)
    # ----------------------------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, strength: float = 1.0, *, text_strength: float | None = None,
                  name: str | None = None):
        """Merge a LoRA / LyCORIS file into the weights until `unload_loras` (UNet at `strength`, text encoders
        at `text_strength`, default `strength`). Loading a name again replaces its strengths (never doubles).
        int8 layers (`quantize="int8"`) are not merged: the LoRA is applied at run time. A file that does not fit the model raises LoraError and changes nothing. Returns the matched Lora."""
        lora = self.loras.load(path, name=name)
        self.loras.add(lora, strength, text_strength)
        return lora

    def unload_loras(self) -> None:
        """Remove every LoRA: the original weights are put back bit for bit."""
        self.loras.clear()

    def _apply_loras(self, req: GenerationRequest) -> tuple[GenerationRequest, dict[str, str]]:
        """Merge the pinned LoRAs plus the resolved request's (only the layers whose sum changes are rewritten).
        Returns the request listing every LoRA in effect, and their A1111 short hashes for the infotext."""
        extra = []
        for spec in req.loras:  # every file read and matched before any weight changes
            pinned = self.loras.pinned.get(spec.name)
            try:
                lora = pinned.lora if pinned else self.loras.load(self.lora_folder.find(spec.name), name=spec.name)
            except (LoraError, LookupError) as e:
                raise RequestError("loras", str(e)) from None
            extra.append(Active(lora, spec.text_strength, spec.strength))
        self.loras.apply(extra)
        active = self.loras.active.values()
        specs = tuple(LoraSpec(a.lora.name, a.unet_strength, a.text_strength) for a in active)
        hashes = {a.lora.name: a.lora.short_hash for a in active if a.lora.short_hash}
        return req.replace(loras=specs), hashes

    # ----------------------------------------------------------------------------------------------
    # Generating: a request in, images out
    # ----------------------------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest, refiner: "Pipeline | None" = None,
                limits: Limits | None = None) -> GenerationRequest:
        """`request` with this model's defaults filled in and every check applied (RequestError otherwise)."""
        return resolve(request, self.config, name=self.name, refiner_config=None if refiner is None else refiner.config,
                       limits=limits, lora_folder=self.lora_folder, loaded_loras=tuple(self.loras.pinned),
                       has_tiny_decoder=self.tiny_decoder is not None, embeddings=self.embeddings)

    @torch.no_grad()
    def generate(self, request: GenerationRequest, *, refiner: "Pipeline | None" = None,
                 callback: Callable[[int, int, Tensor, Tensor], None] | None = None) -> GenerationResult:
        """Run one request: text-to-image, image-to-image (`request.image`), inpainting (with a mask), the
        base -> refiner hand-off (`request.handoff`, with `refiner` the refiner's pipeline) and unCLIP
        variations (`request.image_prompt`). `callback(i, n, x, x0)` is called after every sampler step."""
        req = self.resolve(request, refiner)
        req, lora_hashes = self._apply_loras(req)
        runs = []
        for it in range(req.iterations):
            seeds = req.seeds(it)
            if req.handoff.refiner is not None:
                runs.append(self._refine(refiner, req, seeds, callback))
            elif req.hires is not None:
                runs.append(self._hires(req, seeds, callback))
            else:
                runs.append(self._run(req, seeds, callback=callback))
        notes = list(self.parts.notes)
        for r in runs:
            notes += [n for n in r.notes if n not in notes]
        images = [img for r in runs for img in r.images]
        return GenerationResult(images, torch.cat([r.latents for r in runs]), [s for r in runs for s in r.seeds],
                                req, notes, noise=runs[-1].noise, model_hash=self.model_hash if images else None,
                                lora_hashes=lora_hashes)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
                 refiner: "Pipeline | None" = None, **options) -> GenerationResult:
        """The keyword spelling of `generate`: `pipe("a red apple", steps=20, init_image=img, strength=0.5)`.
        Every option of `GenerationRequest` is accepted by its name; the grouped ones by their flat names
        (`init_image strength mask mask_blur`, `original_size crop target_size aesthetic_score ...`,
        `latents denoising_start denoising_end`, `image_prompt noise_level`)."""
        if refiner is not None:
            if not isinstance(refiner, Pipeline):
                raise TypeError(f"refiner must be the refiner's Pipeline, got {type(refiner).__name__}")
            options.setdefault("refiner", refiner.name)
        request = request_from_flat(prompt, negative_prompt, **options)
        return self.generate(request, refiner=refiner, callback=callback)

    def refine(self, refiner: "Pipeline", prompt, negative_prompt=None, *, switch_at: float = 0.8,
               mode: str = "handoff", refiner_strength: float = 0.3, **options) -> GenerationResult:
        """Base -> refiner, in one of the two ways the SDXL report describes (§2.5, Fig. 1):

        - `mode="handoff"`, the "ensemble of expert denoisers": the base runs the first `switch_at` of the
          schedule and the refiner the rest, on the same σ grid and noise (diffusers `denoising_end` /
          `denoising_start`; A1111's "Refiner switch at").
        - `mode="sdedit"`: the base runs its whole schedule, then the refiner does image-to-image on the
          base's latents at `refiner_strength` (SDEdit; diffusers' base latents into
          `StableDiffusionXLImg2ImgPipeline`, whose default strength is 0.3). Each seed's noise stream
          continues from the base, as when one generator is passed to both diffusers pipelines.
        `aesthetic_score` / `negative_aesthetic_score` go to the refiner, everything else to the base."""
        return self(prompt, negative_prompt, refiner=refiner, switch_at=switch_at, refiner_mode=mode,
                    refiner_strength=refiner_strength, **options)

    def _refine(self, refiner: "Pipeline", req: GenerationRequest, seeds: list[int], callback) -> GenerationResult:
        """One iteration of a resolved request with a named refiner: the base stage, then the refiner's."""
        h = req.handoff
        mc = req.conditions
        if h.mode == "handoff":
            base = self._run(req.replace(handoff=Handoff(denoising_end=h.switch_at), output_type="latent"), seeds,
                             callback=callback)
            stage = Handoff(latents=base.latents, denoising_start=h.switch_at)
            image = None
        else:
            base = self._run(req.replace(handoff=Handoff(), output_type="latent"), seeds, callback=callback)
            stage, image = Handoff(), ImageInput(base.latents, strength=h.refiner_strength)
        # The refiner stage sees the base's settings but its own default size conditions (diffusers' second
        # pipeline call), plus the aesthetic scores that only it is conditioned on.
        stage_req = GenerationRequest(
            prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, cfg=req.cfg, seed=seeds[0],
            sampler=req.sampler, schedule=req.schedule if req.sigmas is None else None, sigmas=req.sigmas, eta=req.eta,
            batch=req.batch, guidance_rescale=req.guidance_rescale,
            conditions=MicroConditions(aesthetic_score=mc.aesthetic_score,
                                       negative_aesthetic_score=mc.negative_aesthetic_score),
            image=image, handoff=stage, vae_tile=req.vae_tile, decoder=req.decoder)
        out = refiner._run(refiner.resolve(stage_req), seeds, noise=base.noise, callback=callback)
        return GenerationResult(out.images, out.latents, seeds, req, base.notes + out.notes, noise=out.noise)

    def _hires(self, req: GenerationRequest, seeds: list[int], callback) -> GenerationResult:
        """One iteration with the hires fix (request.Hires; A1111 processing.py sample_hr_pass): the first pass,
        the upscale, then image-to-image at the larger size with fresh noise from the same seeds. With a latent
        mode this is, exactly, `pipe(..., output_type="latent")`, F.interpolate, and `pipe(..., init_image=latents,
        steps=total, strength=s)` with (total, s) = request.hires_steps(hires)."""
        from .names import ETA_SAMPLERS

        hr, f = req.hires, self.config.vae.downsample_factor
        w, h, tx, ty = hires_target(req.width, req.height, hr, f)
        pixel = hr.upscaler in PIXEL_UPSCALERS
        first = self._run(req.replace(hires=None, output_type="pil" if pixel else "latent"), seeds, callback=callback)
        noise = None
        if pixel:  # decoded, resized with PIL, cropped to the target, encoded again (A1111 crops the latent instead)
            resample = getattr(Image, PIXEL_UPSCALERS[hr.upscaler])
            left, top = f * (tx // 2), f * (ty // 2)
            fw, fh = w - f * tx, h - f * ty
            images = [im.resize((w, h), resample).crop((left, top, left + fw, top + fh)) for im in first.images]
            noise = SeededNoise(seeds, (self.config.unet.out_channels, fh // f, fw // f), device=self.device)
            with self._phase(self.parts.vae):
                pixels = torch.cat([image_to_tensor(im, fw, fh) for im in images]).to(self.device)
                latents = self.encode_image(pixels, noise)  # a posterior sample per seed, then the noise draw
        else:  # A1111: F.interpolate(samples, size=(H // 8, W // 8), mode, antialias), no VAE round trip
            mode, antialias = LATENT_UPSCALERS[hr.upscaler]
            latents = F.interpolate(first.latents.float(), size=(h // f, w // f), mode=mode, antialias=antialias)
            latents = latents[:, :, ty // 2:latents.shape[2] - (ty + 1) // 2, tx // 2:latents.shape[3] - (tx + 1) // 2]
        total, strength = hires_steps(hr)
        mc = req.conditions
        stage = GenerationRequest(
            prompt=hr.prompt if hr.prompt is not None else req.prompt,
            negative_prompt=hr.negative_prompt if hr.negative_prompt is not None else req.negative_prompt,
            steps=total, cfg=hr.cfg, seed=seeds[0], sampler=hr.sampler, schedule=hr.schedule,
            eta=req.eta if hr.sampler in ETA_SAMPLERS else None, batch=req.batch, guidance_rescale=req.guidance_rescale,
            # the size conditions are the larger image's (diffusers' second pipeline call); the crop carries over
            conditions=MicroConditions(crop=mc.crop, aesthetic_score=mc.aesthetic_score,
                                       negative_aesthetic_score=mc.negative_aesthetic_score),
            image=ImageInput(latents, strength=strength), image_prompt=req.image_prompt, vae_tile=req.vae_tile,
            decoder=req.decoder, output_type=req.output_type)
        out = self._run(self.resolve(stage), seeds, noise=noise, callback=callback)
        return GenerationResult(out.images, out.latents, seeds, req, first.notes + [n for n in out.notes
                                                                                     if n not in first.notes],
                                noise=out.noise)

    def _run(self, req: GenerationRequest, seeds: list[int], *, noise: SeededNoise | None = None,
             callback=None) -> GenerationResult:
        """One batch of a resolved request through the one denoise loop."""
        cfg_model = self.config
        f = cfg_model.vae.downsample_factor
        width, height = req.width, req.height
        dev = self.device
        image_t = mask_t = init_latents = None
        image_in, h, mc = req.image, req.handoff, req.conditions
        strength = None
        if image_in is not None:
            strength = image_in.strength
            if isinstance(image_in.image, Tensor):  # latents, e.g. a base model's output for the refiner as SDEdit
                init_latents = image_in.image.to(dev, torch.float32)
            else:
                image_t = image_to_tensor(image_in.image, width, height).to(dev)
                if image_in.mask is not None:
                    mask_t = mask_to_tensor(image_in.mask, width, height, image_in.mask_blur).to(dev)

        noise = noise or SeededNoise(seeds, (cfg_model.unet.out_channels, height // f, width // f), device=dev)
        with self._phase(*self.parts.text_encoders, self.parts.image_encoder):
            cond, uncond = self.encode_prompt(
                list(req.prompts), None if req.negative_prompts is None else list(req.negative_prompts),
                size=(height, width), original_size=mc.original_size, crop=mc.crop, target_size=mc.target_size,
                aesthetic_score=mc.aesthetic_score, negative_aesthetic_score=mc.negative_aesthetic_score,
                negative_original_size=mc.negative_original_size, negative_crop=mc.negative_crop,
                negative_target_size=mc.negative_target_size,
            )
            if cfg_model.family == "sd2-unclip":  # drawn before the initial latent, as diffusers does
                cond, uncond = self._image_conditioning(cond, uncond, req.image_prompt, noise)
        # DDIM's last step lands on ᾱ_0 (σ_min), not ᾱ = 1, in both CompVis DDIM and diffusers with the SD
        # scheduler configs (`set_alpha_to_one: false`); every other sampler ends at σ = 0.
        final = self.schedule.sigma_min if req.sampler == "ddim" else 0.0
        if req.sigmas is not None:
            sigmas_full = torch.tensor(req.sigmas, dtype=torch.float32)
        else:
            sigmas_full = make_sigmas(self.schedule, req.steps + int(req.discard_penultimate), req.schedule, final=final,
                                      family=cfg_model.family)
            if req.discard_penultimate:  # A1111 / ComfyUI: n + 1 levels, the next-to-last dropped (names.py)
                sigmas_full = torch.cat([sigmas_full[:-2], sigmas_full[-1:]])
        # some schedules (ComfyUI's ddim_uniform, beta) give a few more or fewer levels than the steps asked
        first, last = self.step_range(len(sigmas_full) - 1, sigmas_full, strength, h.denoising_start, h.denoising_end)
        sigmas = sigmas_full[first:last + 1]

        # Initial latent: the order of generator draws follows diffusers (posterior sample, then noise).
        concat = image_latents = first_noise = None
        with self._phase(self.parts.vae if image_t is not None else None):
            if h.latents is not None:  # hand-off: continue from a VE-form latent at sigmas[0]
                x = h.latents.to(dev, torch.float32)
            elif init_latents is not None:  # diffusers img2img with 4-channel `image`: no VAE encode
                image_latents = init_latents.expand(len(seeds), -1, -1, -1)
                x = image_latents + noise() * float(sigmas[0])
            elif image_t is not None and (cfg_model.unet.in_channels == 4 or strength < 1.0):
                image_latents = self.encode_image(image_t, noise)
                first_noise = noise()
                if mask_t is not None and strength == 1.0:  # inpainting at full strength starts from pure noise
                    x = first_noise * initial_noise_scale(req.sampler, req.schedule, float(sigmas[0]))
                else:
                    x = image_latents + first_noise * float(sigmas[0])
            else:
                first_noise = noise()
                x = first_noise * initial_noise_scale(req.sampler, req.schedule, float(sigmas[0]))
            if mask_t is not None and cfg_model.unet.in_channels == 9:
                masked = image_t * (mask_t < 0.5)
                masked_latents = self.encode_image(masked, noise)
                small = F.interpolate(mask_t, size=(height // f, width // f))  # nearest, as diffusers
                concat = torch.cat([small.expand(len(seeds), -1, -1, -1), masked_latents], dim=1)

        unet = self.parts.unet
        # Euler-family samplers feed the UNet fractional timesteps t(σ) (diffusers' Euler schedulers);
        # the others round t to the training grid (diffusers DPM-Solver, k-diffusion, ComfyUI).
        denoiser = Denoiser(unet, self.schedule, cfg_model.prediction, concat=concat,
                            quantize_t=req.sampler not in EULER_FAMILY)
        model = guided(denoiser, cond.to(dev, unet.dtype), uncond.to(dev, unet.dtype), req.cfg, req.guidance_rescale)
        step_fn = callback
        if mask_t is not None and cfg_model.unet.in_channels == 4:
            step_fn = _blend_known_region(F.interpolate(mask_t, size=(height // f, width // f)), image_latents,
                                          first_noise, sigmas, callback)
        with self._phase(unet), (contextlib.nullcontext() if self.compiled else unet.reusing_context()):
            x = denoise(model, x, sigmas, req.sampler, noise, step_fn, eta=req.eta)
        if not torch.isfinite(x).all():
            raise FloatingPointError("sampling produced NaN/inf latents; try fp32 (--dtype fp32), a lower CFG or "
                                     "another sampler")
        notes = list(self.parts.notes)
        if float(sigmas[-1]) > final:
            # stopped early (hand-off): return the VE-form latent at sigmas[-1] for the next stage
            return GenerationResult([], x, seeds, req, notes, noise=noise)
        x = x / math.sqrt(1 + float(sigmas[-1]) ** 2)  # VE -> data scale (identity unless DDIM stops at σ_min)
        if req.output_type == "latent":
            return GenerationResult([], x, seeds, req, notes, noise=noise)
        if req.decoder == "tiny":  # resolve() checked that there is one
            dec = decode_tiny(self.tiny_decoder, x)
            notes.append("decoded with the tiny decoder (TAESD)")
        else:
            with self._phase(self.parts.vae):
                dec = self._decode(x, req.vae_tile)
        if dec.upcast:
            notes.append("decode overflowed in reduced precision and was redone in fp32")
        images = dec.images
        if mask_t is not None:  # keep unmasked pixels exactly (the VAE round trip would alter them)
            images = image_t * (1 - mask_t) + images * mask_t
        return GenerationResult(latents_to_images(images), x, seeds, req, notes, noise=noise)

    def _decode(self, x: Tensor, tile: int | None):
        """VAE decode; on an out-of-memory error, retried in tiles of half, then a quarter, of the latent side
        (at least 8 latents = 64 px; seams blended, reference: decode_latents' tiling)."""
        side = max(x.shape[-2:])
        tiles = [tile] + [side // d for d in (2, 4) if side // d >= 8 and (tile is None or side // d < tile)]
        for k, t in enumerate(tiles):
            try:
                return decode_latents(self.parts.vae, x, tile=t)  # tile: latent tile side, e.g. 64 = 512 px
            except Exception as e:  # noqa: BLE001 - only allocation failures are retried
                if not is_out_of_memory(e):
                    raise
                empty_cache(self.device)
                if k == len(tiles) - 1:
                    raise MemoryError(f"the VAE decode of a {x.shape[-1] * 8}x{x.shape[-2] * 8} image (batch "
                                      f"{x.shape[0]}) ran out of memory on {self.device}, also in tiles of "
                                      f"{t or side} latents; use a smaller size or batch, --offload model, or the "
                                      "CPU") from None
                log.warning("VAE decode ran out of memory on %s; retrying in tiles of %d latents", self.device,
                            tiles[k + 1])
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------------------------------------

    def _tokens(self, prompts: list[str], added=None) -> list[Tensor]:
        return [self.tokenizer(prompts, pad_id=spec.pad_id, added=added) for spec in self.config.text_encoders]

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
        table = None if self.embeddings is None else self.embeddings.table()  # textual inversions
        added, extra = (None, None) if table is None else (table.tokens, table.vectors)
        if any(needs_weighting(p, tokenizer=self.tokenizer, added=added)
               for p in prompts + (negs if not zero_uncond else [])):
            # A1111 syntax / long prompts: prompts and negatives in one call so their chunk counts agree
            texts = prompts + ([] if zero_uncond else negs)
            all_ctx, all_pooled = encode_prompts_weighted(cfg, enc, texts, tokenizer=self.tokenizer, embeddings=table)
            b = len(prompts)
            ctx, pooled = all_ctx[:b], None if all_pooled is None else all_pooled[:b]
            if not zero_uncond:
                uctx, upooled = all_ctx[b:], None if all_pooled is None else all_pooled[b:]
        else:  # plain prompts: exactly diffusers' encoding
            ctx, pooled = encode_text(cfg, enc, self._tokens(prompts, added), extra)
            if not zero_uncond:
                uctx, upooled = encode_text(cfg, enc, self._tokens(negs, added), extra)
        if zero_uncond:
            uctx, upooled = torch.zeros_like(ctx), None if pooled is None else torch.zeros_like(pooled)
        original_size = original_size or size
        target_size = target_size or size
        n_orig, n_crop, n_target = negative_original_size or original_size, negative_crop or crop, negative_target_size or target_size
        if cfg.family == "sdxl-base":
            vec = sdxl_vector(pooled, original_size, crop, target_size, cfg.unet.micro_dim)
            uvec = sdxl_vector(upooled, n_orig, n_crop, n_target, cfg.unet.micro_dim)
        elif cfg.family == "sdxl-refiner":
            vec = refiner_vector(pooled, original_size, crop, aesthetic_score, cfg.unet.micro_dim)
            uvec = refiner_vector(upooled, n_orig, n_crop, negative_aesthetic_score, cfg.unet.micro_dim)
        else:
            vec = uvec = None
        return Conditioning(ctx, vec), Conditioning(uctx, uvec)

    def step_range(self, steps: int, sigmas: Tensor, strength: float | None, denoising_start: float | None,
                   denoising_end: float | None) -> tuple[int, int]:
        """[first, last] step indices to run (diffusers semantics, reference §5.4-5.5).

        strength s: int(n·s) steps run, the last ones (img2img / inpainting). denoising_end / _start = f:
        the base runs the steps whose timestep t >= round(1000 − 1000·f), the refiner the rest.
        """
        first, last = 0, steps
        if strength is not None:  # resolve() checked 0 < strength <= 1 and steps x strength >= 1
            first = steps - min(int(steps * strength), steps)
        t = self.schedule.sigma_to_t(sigmas[:-1]).round()
        n_train = self.schedule.num_train_timesteps
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
    def _image_conditioning(self, cond: Conditioning, uncond: Conditioning, image_prompt,
                            noise: SeededNoise) -> tuple[Conditioning, Conditioning]:
        """unCLIP: vector = [noise-augmented CLIP image embedding ‖ sinusoid(noise_level)]; uncond vector = 0."""
        enc, norm = self.parts.image_encoder, self.parts.image_normalizer
        if enc is None or norm is None:
            raise ValueError("this unCLIP model has no image encoder loaded (official unCLIP single files do not "
                             "contain it); load the model from a diffusers folder that has image_encoder/")
        pixels = enc.normalize(clip_image_tensor(image_prompt.image, enc.config.image_size))
        weight = enc.embeddings.patch_embedding.weight
        embeds = enc(pixels.to(weight.device, weight.dtype)).float()  # (1, D)
        embeds = embeds.expand(len(cond), -1)
        vec = unclip_vector(embeds, image_prompt.noise_level, norm.to(embeds.device), noise((embeds.shape[1],)))
        return Conditioning(cond.context, vec), Conditioning(uncond.context, torch.zeros_like(vec))


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
