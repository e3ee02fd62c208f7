"""UNet training: the SDXL recipe (reference/training.md §1).

ε-prediction (v optional) on the 1000-step DDPM schedule with uniform integer timesteps (sgm
`DiscreteSampling`), loss ||F − target||² averaged per sample (sgm `StandardDiffusionLoss` with
`EpsWeighting`, which reduces to plain ε-MSE), optional Min-SNR-γ weighting (Hang et al. 2023:
min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v), optional offset noise randn(B, C, 1, 1)·level.
Conditioning dropout is per embedder and by zeroing (sgm `GeneralConditioner` ucg_rate): the text
(context and pooled vector together, which is what SDXL's zeroed negative prompt is at inference),
original size, crop and target size are each dropped independently. The families whose pipelines encode the
empty negative prompt instead (refiner, SD 1/2, unCLIP) drop the text by captioning the image "" (LDM's
`ucg`), so that the unconditional branch of CFG is one the UNet has seen.

Refiners (family sdxl-refiner): timesteps from the low-noise part only ([0, 200) by default: the SDXL refiner
"specialized on high-quality, high resolution data and denoising at small noise levels", SDXL paper §2.5),
and the refiner vector pooled ‖ original size ‖ crop ‖ aesthetic score, the score from a documented proxy
(`UNetTrainOptions.aesthetic_proxy`; dropped with the target-size rate).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import NoiseSchedule
from ..io.models import save_model
from ..models.conditioning import Conditioning, encode_text, micro_embedding, unclip_vector
from ..models.parts import ModelParts
from ..models.tokenizer import default_tokenizer
from .data import TrainData, sample_rng
from .loop import Context, OptimizerSpec


@dataclass(frozen=True)
class UNetTrainOptions:
    prediction: str | None = None  # None: the model config's
    dropout_text: float = 0.1
    dropout_original_size: float = 0.1
    dropout_crop: float = 0.1
    dropout_target_size: float = 0.0
    # False: every sample's original size is given as its target size, so the condition carries nothing
    # and matches what inference passes by default (the SDXL paper's Table 2 "CIN-nocond" model)
    size_conditioning: bool = True
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0  # 0: off
    cache_latents: bool = False  # encode each image once (its crop and flip then stay fixed, as in kohya)
    cache_text: bool = True  # the text towers are frozen: encode each caption once
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_cfg: float = 5.0
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass
    # timesteps drawn from [0, max_timestep); None: the family's (the SDXL refiner trained on the first 200,
    # SDXL paper §2.5; everything else on all 1000)
    max_timestep: int | None = None
    # the refiner's aesthetic-score condition needs a per-image label; the proxy: half of the images (fixed per
    # image) are blurred by a Gaussian of σ ~ U(0.5, 2) px before encoding and labelled 6 − 2σ, the others 6.0
    # (a score that says how sharp the image is, independent of its original size, which has its own condition)
    aesthetic_proxy: str = "blur"  # blur | none (every image 6.0)
    # unCLIP: P(zero the image-embedding vector), which is the pipeline's unconditional vector
    dropout_image: float = 0.1


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """(C, H, W) blurred by a separable Gaussian of std `sigma` pixels (radius 3σ, reflected edges)."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(image)
    c = image.shape[0]
    y = F.pad(image[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def dropout_keep(gen: torch.Generator, batch: int, rates: tuple[float, ...]) -> Tensor:
    """(B, E) in {0, 1}: 0 where embedder e of sample b is dropped, independently with probability rates[e]."""
    return (torch.rand((batch, len(rates)), generator=gen) >= torch.tensor(rates)).float()


class UNetTask:
    name = "unet"

    def __init__(self, parts: ModelParts, data: TrainData, options: UNetTrainOptions = UNetTrainOptions()):
        cfg = parts.config
        if cfg.family not in ("sdxl-base", "sdxl-refiner", "sd1", "sd2", "sd2-unclip"):
            raise ValueError("UNet training supports sdxl-base, sdxl-refiner, sd1, sd2 and sd2-unclip models, "
                             f"not {cfg.family!r}")
        if cfg.family == "sd2-unclip" and (parts.image_encoder is None or parts.image_normalizer is None):
            raise ValueError(f"training {cfg.name} needs its CLIP image tower (parts.image_encoder): load the model "
                             "from a file or diffusers folder that holds image_encoder, or use a mini-* preset")
        if options.aesthetic_proxy not in ("blur", "none"):
            raise ValueError(f"aesthetic proxy must be 'blur' or 'none', got {options.aesthetic_proxy!r}")
        self.max_timestep = options.max_timestep or (200 if cfg.family == "sdxl-refiner" else 1000)
        if not 1 <= self.max_timestep <= 1000:
            raise ValueError(f"--max-timestep must be in [1, 1000], got {self.max_timestep}")
        if cfg.unet.in_channels != cfg.vae.latent_channels:
            raise ValueError("training inpainting UNets (extra input channels) is not supported")
        self.parts, self.data, self.opt = parts, data, options
        prediction = options.prediction or cfg.prediction
        self.denoiser = Denoiser(parts.unet, NoiseSchedule.ddpm(zero_terminal_snr=cfg.zero_terminal_snr), prediction)
        self.tokenizer = default_tokenizer()
        for m in [parts.vae, *parts.text_encoders, parts.image_encoder, parts.image_normalizer]:
            if m is not None:
                m.eval().requires_grad_(False)
        parts.unet.requires_grad_(True)
        parts.unet.gradient_checkpointing = options.gradient_checkpointing
        self._text: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._latents: dict[int, tuple[Tensor, Tensor, tuple, tuple, tuple, str]] = {}
        if options.cache_text:
            # Encode every caption up front in a fixed order and chunking: a cached embedding must not depend
            # on which batch first needed it (batched kernels differ in the last bit), or a resumed run drifts.
            captions = sorted({r.caption for r in data.records} | ({""} if cfg.family != "sdxl-base" else set()))
            for i in range(0, len(captions), 64):
                self._encode_into(self._text, captions[i:i + 64])
        self._unclip = cfg.family == "sd2-unclip"
        self._embeds: dict[int, Tensor] = {}  # unCLIP with cached latents: each image's embedding
        norm = parts.image_normalizer
        if cfg.family == "sd2-unclip" and bool((norm.mean == 0).all() and (norm.std == 1).all()):
            self._fit_normalizer()

    # -- Task protocol ------------------------------------------------------------------------------

    def modules(self):
        return {"unet": self.parts.unet}

    def optimizers(self):
        return [OptimizerSpec("unet", ["unet"])]

    def images_per_step(self) -> int:
        return self.data.batcher.batch_size

    def config_json(self) -> dict:
        return {"model": self.parts.config.to_dict(), "options": dataclasses.asdict(self.opt),
                "images": len(self.data.records), "buckets": {f"{h}x{w}": len(g) for (h, w), g in self.data.batcher.groups.items()}}

    # -- conditioning -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """Captions -> (context (B, T, C), pooled (B, P) or None), cached per caption when enabled."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._text]
        if not self.opt.cache_text:
            return self._stack(captions, self._encode_into({}, todo))
        if todo:
            self._encode_into(self._text, todo)
        return self._stack(captions, self._text)

    @torch.no_grad()
    def _encode_into(self, table: dict, captions: list[str]) -> dict:
        cfg = self.parts.config
        ids = [self.tokenizer(captions, pad_id=spec.pad_id) for spec in cfg.text_encoders]
        context, pooled = encode_text(cfg, self.parts.text_encoders, ids)
        table.update({c: (context[i].float(), None if pooled is None else pooled[i].float()) for i, c in enumerate(captions)})
        return table

    @staticmethod
    def _stack(captions, table) -> tuple[Tensor, Tensor | None]:
        ctx = torch.stack([table[c][0] for c in captions])
        pooled = None if table[captions[0]][1] is None else torch.stack([table[c][1] for c in captions])
        return ctx, pooled

    def conditioning(self, captions, original_size: Tensor, crop: Tensor, target: Tensor, keep: Tensor,
                     scores: Tensor | None = None) -> Conditioning:
        """keep (B, 4) in {0, 1}: text, original size, crop, target size (the refiner: aesthetic score) (0 = dropped:
        zeroed, or for the text of families other than sdxl-base the caption ""). `scores` (B,): the refiner's aesthetic scores."""
        family = self.parts.config.family
        if family == "sdxl-base":  # dropped text is zeroed: what the SDXL base pipeline's empty negative is
            context, pooled = self.encode_captions(captions)  # cached on the text towers' device (the CPU)
            context = context.to(keep.device) * keep[:, 0].reshape(-1, 1, 1)
        else:  # the other pipelines encode the empty negative prompt, so dropped text is the caption "" (LDM)
            context, pooled = self.encode_captions([c if k else "" for c, k in zip(captions, keep[:, 0].tolist())])
            context = context.to(keep.device)
        pooled = None if pooled is None else pooled.to(keep.device)
        if family == "sdxl-refiner":  # pooled ‖ emb(original size) ‖ emb(crop) ‖ emb(aesthetic score)
            dim = self.parts.config.unet.micro_dim
            score = torch.full((len(captions), 1), 6.0) if scores is None else scores.reshape(-1, 1).float()
            parts = [pooled]  # a dropped caption's pooled vector is already the empty prompt's
            for j, v in enumerate((original_size, crop, score.to(keep.device)), start=1):
                parts.append(micro_embedding(v, dim) * keep[:, j:j + 1])
            return Conditioning(context, torch.cat(parts, dim=1))
        if family != "sdxl-base":
            return Conditioning(context)
        parts = [pooled * keep[:, :1]]
        if not self.opt.size_conditioning:
            original_size = target
        for j, v in enumerate((original_size, crop, target), start=1):
            parts.append(micro_embedding(v, self.parts.config.unet.micro_dim) * keep[:, j:j + 1])  # (B, 2·256) each
        return Conditioning(context, torch.cat(parts, dim=1))

    # -- unCLIP: the image embedding ---------------------------------------------------------------

    @torch.no_grad()
    def image_embeds(self, pixels: Tensor) -> Tensor:
        """[-1, 1] images (B, 3, H, W) -> the frozen image tower's embeddings (B, D), preprocessed as the pipeline
        preprocesses an image prompt: shortest side to the tower's size (bicubic), centre crop, CLIP-normalised."""
        enc = self.parts.image_encoder
        x, size = (pixels.float() + 1) / 2, enc.config.image_size
        h, w = x.shape[-2:]
        if min(h, w) != size:
            scale = size / min(h, w)
            x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                              align_corners=False, antialias=True).clamp(0, 1)
            h, w = x.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top:top + size, left:left + size]
        weight = enc.embeddings.patch_embedding.weight
        return enc(enc.normalize(x).to(weight.device, weight.dtype)).float()

    @torch.no_grad()
    def _fit_normalizer(self, limit: int = 2048) -> None:
        """An identity normalizer is replaced by the per-dimension mean and std of the training images'
        embeddings (up to `limit` images, spread over the buckets, epoch 0's augmentation), so that the noise
        augmentation √ᾱ·scale(e) + √(1−ᾱ)·ε mixes quantities of one scale, as Karlo's statistics do for unCLIP-L."""
        groups = sorted(self.data.batcher.groups.items())
        total = sum(len(g) for _, g in groups)
        chosen = []
        for bucket, idx in groups:
            k = max(1, round(limit * len(idx) / total))
            chosen += [(bucket, i) for i in idx[:: max(1, len(idx) // k)][:k]]
        embeds = []
        for j in range(0, len(chosen), 64):
            pix = [self.data.sample(i, 0, b) for b, i in chosen[j:j + 64]]
            for sample in pix:
                if sample is not None:
                    embeds.append(self.image_embeds(sample.pixels[None]))
        e = torch.cat(embeds)
        norm = self.parts.image_normalizer
        norm.mean.data.copy_(e.mean(0, keepdim=True))
        norm.std.data.copy_(e.std(0, keepdim=True).clamp(min=1e-6))

    def image_vector(self, ctx: Context, gen: torch.Generator, embeds: Tensor) -> Tensor:
        """unCLIP's vector for a batch: each embedding noise-augmented at a level drawn from U{0..999} (SD 2.1
        unCLIP's training range), zeroed with P(dropout_image) (the pipeline's unconditional vector is 0)."""
        B, n, dim = self.data.batcher.batch_size, embeds.shape[0], embeds.shape[1]
        levels = ctx.local(torch.randint(0, 1000, (B,), generator=gen))[:n]
        eps = ctx.local(torch.randn((B, dim), generator=gen))[:n]
        keep = ctx.local(dropout_keep(gen, B, (self.opt.dropout_image,)))[:n].to(embeds.device)
        norm = self.parts.image_normalizer.to(embeds.device)
        return unclip_vector(embeds, levels, norm, eps.to(embeds.device)) * keep

    # -- latents ------------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(self, ctx: Context, data_step: int, gen: torch.Generator):
        """This rank's (z0, captions, original, crop, target, aesthetic scores or None, unCLIP image embeddings
        or None) for one micro-step."""
        vae, sf = self.parts.vae, self.parts.config.vae.scaling_factor
        vae.to(ctx.device)  # frozen: the loop moves only the trained modules (a no-op after the first call)
        if not self.opt.cache_latents:
            b = self.data.batch(data_step, ctx.rank, ctx.world)
            pixels, scores = self._aesthetic(b.pixels, b.indices)
            post = vae.encode(pixels.to(ctx.device))
            shape = (self.data.batcher.batch_size, *post.mean.shape[1:])  # drawn over the global batch, always
            noise = ctx.local(torch.randn(shape, generator=gen))[: b.pixels.shape[0]]
            embeds = self.image_embeds(b.pixels.to(ctx.device)) if self._unclip else None
            return (post.mean + post.std * noise) * sf, b.captions, b.original_size, b.crop, b.target_size, scores, embeds
        epoch, bucket, idx = self.data.batcher.batch(data_step)
        mine = idx[ctx.rank * (len(idx) // ctx.world):(ctx.rank + 1) * (len(idx) // ctx.world)]
        todo = [i for i in mine if i not in self._latents]
        for i in todo:
            s = self.data.sample(i, 0, bucket)  # fixed augmentation: epoch 0's crop and flip
            if s is None:
                continue
            pixels, score = self._aesthetic(s.pixels[None], [i])
            post = vae.encode(pixels.to(ctx.device))
            self._latents[i] = (post.mean[0], post.logvar[0], s.original_size, s.crop, s.target_size, s.caption,
                                None if score is None else float(score[0]))
            if self._unclip:
                self._embeds[i] = self.image_embeds(s.pixels[None].to(ctx.device))[0]
        rows = [self._latents[i] for i in mine if i in self._latents]
        mean, logvar = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        noise = ctx.local(torch.randn((len(idx), *mean.shape[1:]), generator=gen))[:len(rows)]
        z = (mean + torch.exp(0.5 * logvar) * noise) * sf
        f = lambda j: torch.tensor([r[j] for r in rows], dtype=torch.float32)
        scores = None if rows[0][6] is None else f(6)
        embeds = torch.stack([self._embeds[i] for i in mine if i in self._latents]) if self._unclip else None
        return z, [r[5] for r in rows], f(2), f(3), f(4), scores, embeds

    def _aesthetic(self, pixels: Tensor, indices) -> tuple[Tensor, Tensor | None]:
        """The refiner's aesthetic-score proxy (UNetTrainOptions.aesthetic_proxy): (pixels, scores (B,)), or
        (pixels, None) for models without the condition. Each image's draw depends only on (seed, its index)."""
        if self.parts.config.family != "sdxl-refiner":
            return pixels, None
        scores = torch.full((pixels.shape[0],), 6.0)
        if self.opt.aesthetic_proxy == "none":
            return pixels, scores
        out = pixels.clone()
        for k, i in enumerate(indices):
            rng = sample_rng(self.data.seed, 0xAE5, int(i))
            if rng.uniform() < 0.5:
                sigma = float(rng.uniform(0.5, 2.0))
                out[k] = gaussian_blur(pixels[k], sigma)
                scores[k] = 6.0 - 2.0 * sigma
        return out, scores

    # -- the loss -----------------------------------------------------------------------------------

    def loss(self, ctx: Context, data_step: int):
        o = self.opt
        gen = ctx.generator(data_step)
        z0, captions, orig, crop, target, scores, embeds = self.latents(ctx, data_step, gen)
        B = self.data.batcher.batch_size  # global: every random draw is over the global batch, then sliced
        n = z0.shape[0]
        t = ctx.local(torch.randint(0, self.max_timestep, (B,), generator=gen))[:n]
        noise = ctx.local(torch.randn((B, *z0.shape[1:]), generator=gen))[:n]
        offset = ctx.local(torch.randn((B, z0.shape[1], 1, 1), generator=gen))[:n]
        if o.offset_noise:
            noise = noise + o.offset_noise * offset  # SDXL paper §2.5 (stage 3: 0.05)
        keep = ctx.local(dropout_keep(gen, B, (o.dropout_text, o.dropout_original_size, o.dropout_crop,
                                               o.dropout_target_size)))[:n]
        cond = self.conditioning(captions, orig.to(ctx.device), crop.to(ctx.device), target.to(ctx.device), keep, scores)
        if self._unclip:  # drawn after everything the other families draw, so their streams are unchanged
            cond = Conditioning(cond.context, self.image_vector(ctx, gen, embeds))

        unet = ctx.models["unet"]  # the DDP-wrapped module when distributed
        den = self.denoiser
        x_t = den.noised(z0, noise, t)
        out = unet(x_t, t, cond.context, cond.vector).float()
        target_v = den.target(z0, noise, t)
        per_sample = (out - target_v).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if o.min_snr_gamma > 0:
            snr = den.snr(t)
            w = snr.clamp(max=o.min_snr_gamma) / (snr if den.prediction == "eps" else snr + 1)
            per_sample = per_sample * w
        loss = per_sample.mean()
        return "unet", loss, {"loss": float(loss.detach())}

    # -- outputs ------------------------------------------------------------------------------------

    def sample_grid(self, ctx: Context, step: int):
        prompts = list(self.opt.sample_prompts) or list(dict.fromkeys(r.caption for r in self.data.records))[:8]
        if not prompts:
            return None
        from ..pipeline import Pipeline
        from .grid import image_grid

        pipe = Pipeline(self.parts, self.tokenizer, name=f"step {step}")
        h, w = self.parts.config.resolution, self.parts.config.resolution
        images = []
        if self._unclip:  # variations (no text) of the first images of the largest bucket
            from PIL import Image

            bucket, idx = max(self.data.batcher.groups.items(), key=lambda g: len(g[1]))
            for k, i in enumerate(idx[:8]):
                pix = ((self.data.sample(i, 0, bucket).pixels + 1) * 127.5).round().clamp(0, 255).byte()
                source = Image.fromarray(pix.permute(1, 2, 0).numpy())
                images += [source] + pipe("", image_prompt=source, noise_level=0, steps=self.opt.sample_steps,
                                          cfg=self.opt.sample_cfg, seed=k, width=w, height=h, sampler="dpmpp_2m",
                                          schedule="karras").images
            return image_grid(images, captions=[c for i in idx[:8] for c in (self.data.records[i].caption, "variation")])
        for k, p in enumerate(prompts):
            images += pipe(p, steps=self.opt.sample_steps, cfg=self.opt.sample_cfg, seed=k, width=w, height=h,
                           sampler="dpmpp_2m", schedule="karras").images
        return image_grid(images, captions=prompts)

    def save(self, out: Path, ctx: Context) -> Path:
        return save_model(self.parts, out / "model.safetensors")

