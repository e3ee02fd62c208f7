"""Contrastive image–text training (CLIP, Radford et al. 2021, Fig. 3) for the miniature.

One ViT image tower and several text towers (CLIP-L-shaped and bigG-shaped), the same classes the
full-size models use. Each text tower has its own learned temperature; the loss is the mean over towers
of the symmetric cross-entropy over the global batch (embeddings gathered from every process with
gradients, as open_clip's `gather_with_grad`). Text towers embed the EOS token's final-normed feature
through `text_projection`, exactly what SDXL uses as the pooled vector.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io.components import save_component
from ..models.clip import CLIPModel, CLIPVisionModel
from ..models.tokenizer import default_tokenizer
from .data import TrainData
from .loop import Context, OptimizerSpec


def _gather(x: Tensor, ctx: Context) -> Tensor:
    if ctx.world == 1:
        return x
    import torch.distributed.nn.functional as dfn

    return torch.cat(dfn.all_gather(x), dim=0)


def _trim(ids: Tensor) -> Tensor:
    """Drop the padding after the batch's last EOS. Exact for the pooled output: attention is causal, so the
    EOS feature never sees later tokens, and positions are absolute. Short emoji captions: ~4x faster."""
    return ids[:, : int(ids.argmax(dim=1).max()) + 1]


def clip_pixels(vision: CLIPVisionModel, images: Tensor) -> Tensor:
    """[0, 1] RGB (B, 3, H, W) -> the image tower's input: bicubic (antialiased) to its size, then normalised."""
    s = vision.config.image_size
    if images.shape[-1] != s or images.shape[-2] != s:
        images = F.interpolate(images, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
    return vision.normalize(images)


def caption_ids(tokenizer, captions: list[str], pad_ids: tuple[int, ...], device) -> list[Tensor]:
    """Token ids per text tower (each padded with its own pad id), trimmed after the batch's last EOS."""
    return [_trim(tokenizer(captions, pad_id=pad).to(device)) for pad in pad_ids]


class CLIPTask:
    name = "clip"

    def __init__(self, model: CLIPModel, data: TrainData, pad_ids: tuple[int, ...]):
        if len(pad_ids) != len(model.texts):
            raise ValueError(f"{len(model.texts)} text towers need {len(model.texts)} pad ids")
        self.model, self.data, self.pad_ids = model, data, pad_ids
        self.tokenizer = default_tokenizer()
        model.requires_grad_(True)

    def modules(self):
        return {"clip": self.model}

    def optimizers(self):
        return [OptimizerSpec("clip", ["clip"])]

    def images_per_step(self) -> int:
        return self.data.batcher.batch_size

    def config_json(self) -> dict:
        return {"clip": self.model.configs(), "pad_ids": list(self.pad_ids), "images": len(self.data.records)}

    def embed(self, model, pixels: Tensor, captions: list[str]) -> tuple[Tensor, list[Tensor]]:
        """Pixels in [-1, 1] and captions through `model` (the DDP-wrapped CLIPModel when distributed)."""
        x = (pixels + 1) / 2  # [-1, 1] -> [0, 1]
        return model(clip_pixels(self.model.vision, x), caption_ids(self.tokenizer, captions, self.pad_ids, x.device))

    def loss(self, ctx: Context, data_step: int):
        b = self.data.batch(data_step, ctx.rank, ctx.world)
        img, txts = self.embed(ctx.models["clip"], b.pixels.to(ctx.device), b.captions)
        img = _gather(F.normalize(img.float(), dim=-1), ctx)
        labels = torch.arange(img.shape[0], device=img.device)
        total, logs = 0.0, {}
        for j, t in enumerate(txts):
            t = _gather(F.normalize(t.float(), dim=-1), ctx)
            scale = self.model.logit_scale[j].clamp(max=math.log(100.0)).exp()
            logits = scale * img @ t.T  # (B, B)
            lj = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            total = total + lj
            logs[f"loss_text{j}"] = float(lj.detach())
            logs[f"acc_text{j}"] = float((logits.argmax(dim=1) == labels).float().mean())
            logs[f"temperature{j}"] = float(1 / scale.detach())
        loss = total / len(txts)
        logs["loss"] = float(loss.detach())
        return "clip", loss, logs

    def sample_grid(self, ctx: Context, step: int):
        return None

    def save(self, out: Path, ctx: Context) -> Path:
        return save_component(self.model, out / "clip.safetensors")

