"""Distil a VAE decoder into a tiny (TAESD-shaped) decoder: the training task behind
scripts/train_tiny_decoder.py, run by the common loop (`train.loop.train`: resumable states, JSONL log, EMA).

Data: each image of the set is encoded once by the teacher VAE (posterior mean, times the scaling factor:
the latents the UNet produces) and decoded once by it; both are cached in the run folder (`cache.safetensors`,
uint8 images), so a step costs only the student. The student learns
  loss = |D_tiny(z) − D_vae(z)|₁ + w_p·P(D_tiny(z), D_vae(z)) + w_i·|D_tiny(z) − x|₁
with P the project's perceptual distance (train/perceptual.py; "rcf" by default), x the real image.
Augmentation: a horizontal flip of latent and targets together (the VAE is close to flip-equivariant).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..io.checkpoint import SafetensorsSource, atomic_save_safetensors
from ..io.tiny import save_tiny_autoencoder
from ..models.taesd import AutoencoderTiny
from ..models.vae import AutoencoderKL
from .data import Augment, TrainData, load_sample, sample_rng
from .loop import Context, OptimizerSpec
from .perceptual import make_perceptual

CACHE_FILE = "cache.safetensors"


@dataclass(frozen=True)
class TinyDecoderOptions:
    perceptual: str = "rcf"  # rcf | lpips | none
    perceptual_weight: float = 0.25
    image_weight: float = 0.0  # L1 to the real image, on top of the teacher's decode
    lpips_vgg: str | None = None
    lpips_lin: str | None = None


def _to_u8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _from_u8(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1


@torch.no_grad()
def build_cache(vae: AutoencoderKL, data: TrainData, path: Path, chunk: int = 64) -> dict[str, Tensor]:
    """Teacher latents and decodes of every record (centre crop to the one bucket), written to `path`."""
    bucket = next(iter(data.batcher.groups))
    n = len(data.records)
    lat, dec, img = [], [], []
    aug = Augment(flip_p=0.0, random_crop=False)
    for start in range(0, n, chunk):
        x = torch.stack([load_sample(data.records[i], i, bucket, aug, sample_rng(0, i)).pixels
                         for i in range(start, min(n, start + chunk))])
        z = vae.encode(x).mean * vae.config.scaling_factor  # (b, 4, h, w): what the UNet produces
        lat.append(z.half())
        dec.append(_to_u8(vae.decode(z / vae.config.scaling_factor)))
        img.append(_to_u8(x))
        print(f"\rcaching teacher decodes {min(n, start + chunk)}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tensors = {"latents": torch.cat(lat), "decoded": torch.cat(dec), "images": torch.cat(img)}
    atomic_save_safetensors(tensors, path, {"bucket": f"{bucket[0]}x{bucket[1]}", "records": str(n)})
    return tensors


class TinyDecoderTask:
    name = "tiny-decoder"
    ema_modules = ("decoder",)

    def __init__(self, student: AutoencoderTiny, teacher: AutoencoderKL, data: TrainData, out: Path,
                 options: TinyDecoderOptions = TinyDecoderOptions()):
        if student.decoder is None:
            raise ValueError("the student needs a decoder")
        if student.config.latent_channels != teacher.config.latent_channels or \
                student.config.downsample_factor != teacher.config.downsample_factor:
            raise ValueError("student and teacher disagree on latent channels or downsampling factor")
        self.student, self.data, self.opt = student, data, options
        teacher.eval().requires_grad_(False)
        out.mkdir(parents=True, exist_ok=True)
        cache = out / CACHE_FILE
        if cache.is_file():
            src = SafetensorsSource(cache)
            self.cache = {k: src.get(k) for k in src.keys()}
            if len(self.cache["latents"]) != len(data.records):
                raise ValueError(f"{cache} holds {len(self.cache['latents'])} images, the data set {len(data.records)}; "
                                 "delete the cache or use another --output")
        else:
            self.cache = build_cache(teacher, data, cache)
        self.perceptual = make_perceptual(options.perceptual, options.lpips_vgg, options.lpips_lin)
        student.requires_grad_(True)

    def modules(self):
        return {"decoder": self.student}

    def optimizers(self):
        return [OptimizerSpec("decoder", ["decoder"], weight_decay=0.0)]

    def images_per_step(self) -> int:
        return self.data.batcher.batch_size

    def config_json(self) -> dict:
        return {"tiny": dataclasses.asdict(self.student.config), "options": dataclasses.asdict(self.opt),
                "perceptual": getattr(self.perceptual, "name", "none"), "images": len(self.data.records)}

    def _batch(self, ctx: Context, data_step: int) -> tuple[Tensor, Tensor, Tensor]:
        _epoch, _bucket, idx = self.data.batcher.batch(data_step)
        idx = torch.tensor(idx)
        z = self.cache["latents"][idx].float()
        target, image = _from_u8(self.cache["decoded"][idx]), _from_u8(self.cache["images"][idx])
        flip = torch.rand(len(idx), generator=ctx.generator(data_step)) < 0.5
        for t in (z, target, image):
            t[flip] = t[flip].flip(-1)
        return ctx.local(z), ctx.local(target), ctx.local(image)

    def loss(self, ctx: Context, data_step: int):
        z, target, image = self._batch(ctx, data_step)
        y = ctx.models["decoder"].decode(z)  # (B, 3, H, W)
        l1 = (y - target).abs().mean()
        loss, logs = l1, {"l1": float(l1.detach())}
        if self.perceptual is not None and self.opt.perceptual_weight > 0:
            p = self.perceptual(y, target).mean()
            loss = loss + self.opt.perceptual_weight * p
            logs["perceptual"] = float(p.detach())
        if self.opt.image_weight > 0:
            li = (y - image).abs().mean()
            loss = loss + self.opt.image_weight * li
            logs["l1_image"] = float(li.detach())
        logs["loss"] = float(loss.detach())
        return "decoder", loss, logs

    def sample_grid(self, ctx: Context, step: int):
        from PIL import Image

        from .grid import image_grid

        n = min(8, len(self.data.records))
        z = self.cache["latents"][:n].float()
        rows = [_from_u8(self.cache["images"][:n]), _from_u8(self.cache["decoded"][:n]), self.student.decode(z)]
        to_pil = lambda t: Image.fromarray(_to_u8(t).permute(1, 2, 0).numpy())  # noqa: E731
        return image_grid([to_pil(t) for row in rows for t in row], cols=n)

    def save(self, out: Path, ctx: Context) -> Path:
        return save_tiny_autoencoder(self.student, out / "tiny-decoder.safetensors")
