"""What the UNet is conditioned on, as a typed value rather than a string-keyed dict.

- SD 1.x / 2.x: `context` only (the text encoder's hidden state).
- SDXL base: context = [CLIP-L penultimate (768) ‖ bigG penultimate (1280)] -> 2048 wide, and
  vector = pooled bigG (1280) ‖ 256-d [cos|sin] embeddings of original (h, w), crop (top, left),
  target (h, w) -> 2816 (sgm `ConcatTimestepEmbedderND`; diffusers `add_time_ids`).
- SDXL refiner: context = bigG penultimate (1280); vector = pooled ‖ original (h, w) ‖ crop ‖
  aesthetic score -> 2560.
- SD 2.1-unCLIP: vector = noise-augmented image embedding ‖ sinusoid of the noise level.
Facts: reference/architecture.md §1.5, §3.2, §6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..config import ModelConfig
from .clip import CLIPTextModel
from .layers import timestep_embedding

MICRO_DIM = 256  # each micro-condition scalar is embedded with 256 sinusoidal features


@dataclass
class Conditioning:
    context: Tensor  # (B, T, C) cross-attention tokens
    vector: Tensor | None = None  # (B, D) added to the time embedding; None for SD 1.x / 2.x

    def __len__(self) -> int:
        return self.context.shape[0]

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.context.to(*args, **kwargs), None if self.vector is None else self.vector.to(*args, **kwargs))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        vectors = [c.vector for c in items]
        if any(v is None for v in vectors) and not all(v is None for v in vectors):
            raise ValueError("cannot batch conditionings with and without a vector")
        return Conditioning(
            torch.cat([c.context for c in items]),
            None if vectors[0] is None else torch.cat(vectors),  # type: ignore[arg-type]
        )


def _pairs(values, batch: int, name: str) -> Tensor:
    """(h, w)-style tuples -> float tensor (B, k); one tuple is broadcast to the batch."""
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.ndim == 1:
        t = t[None].expand(batch, -1)
    if t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"{name} must be one tuple or one per sample (batch {batch}); got shape {tuple(t.shape)}")
    return t


def micro_embedding(values: Tensor, dim: int = MICRO_DIM) -> Tensor:
    """(B, k) scalars -> (B, dim k): each scalar's [cos|sin] embedding, concatenated in order. `dim`: the UNet's
    `micro_dim` (256 for SDXL; diffusers' tiny test models use 8)."""
    b, k = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, k * dim)


def sdxl_vector(pooled: Tensor, original_size, crop_top_left, target_size, dim: int = MICRO_DIM) -> Tensor:
    """SDXL base vector: pooled (B, 1280) ‖ emb(orig h, w) ‖ emb(crop top, left) ‖ emb(target h, w) -> (B, 2816)."""
    b = pooled.shape[0]
    ids = torch.cat([_pairs(original_size, b, "original_size"), _pairs(crop_top_left, b, "crop_top_left"),
                     _pairs(target_size, b, "target_size")], dim=1)  # (B, 6)
    return torch.cat([pooled.float(), micro_embedding(ids.to(pooled.device), dim)], dim=1)


def refiner_vector(pooled: Tensor, original_size, crop_top_left, aesthetic_score, dim: int = MICRO_DIM) -> Tensor:
    """SDXL refiner vector: pooled ‖ emb(orig h, w) ‖ emb(crop) ‖ emb(aesthetic score) -> (B, 2560)."""
    b = pooled.shape[0]
    score = torch.as_tensor(aesthetic_score, dtype=torch.float32).reshape(-1, 1)
    score = score.expand(b, 1) if score.shape[0] == 1 else score
    ids = torch.cat([_pairs(original_size, b, "original_size"), _pairs(crop_top_left, b, "crop_top_left"), score], dim=1)
    return torch.cat([pooled.float(), micro_embedding(ids.to(pooled.device), dim)], dim=1)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def encode_text(config: ModelConfig, encoders: Sequence[CLIPTextModel], ids: Sequence[Tensor],
                extra: Sequence[Tensor | None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Token ids per encoder (each (B, 77), padded with that encoder's pad id) -> (context, pooled).
    `extra`: per encoder, the vectors of the ids past its vocabulary (textual inversion), or None.

    Context is the concatenation of every encoder's selected hidden state along the feature axis,
    in encoder order (sgm `GeneralConditioner` concatenates crossattn outputs on dim 2).
    """
    if len(encoders) != len(config.text_encoders) or len(ids) != len(encoders):
        raise ValueError(f"{config.name} has {len(config.text_encoders)} text encoders; got {len(encoders)} encoders and {len(ids)} id tensors")
    hiddens, pooled = [], None
    extra = [None] * len(encoders) if extra is None else extra
    for spec, enc, tok, vectors in zip(config.text_encoders, encoders, ids, extra):
        out = enc(tok.to(enc.embeddings.token_embedding.weight.device), layer=spec.layer, final_norm=spec.final_norm,
                  pooled=spec.pooled, extra=vectors)
        hiddens.append(out.hidden)
        if spec.pooled:
            pooled = out.pooled
    return torch.cat(hiddens, dim=-1), pooled


# --------------------------------------------------------------------------------------------------
# unCLIP image-embedding noise augmentation
# --------------------------------------------------------------------------------------------------


def squaredcos_alphas_cumprod(n: int = 1000, max_beta: float = 0.999) -> Tensor:
    """ᾱ of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def unclip_vector(image_embeds: Tensor, noise_level: int | Tensor, normalizer, noise: Tensor) -> Tensor:
    """[noise-augmented embedding ‖ sinusoid(noise_level)] -> (B, 2·D) (SD2 `CLIPEmbeddingNoiseAugmentation`).

    e' = unscale(√ᾱ_k · scale(e) + √(1−ᾱ_k) · ε); the noise level's embedding uses the same
    [cos|sin] sinusoid as the UNet timestep, with the embedding's width. `noise_level`: one level for the batch,
    or (B,) integer levels (training draws one per sample).
    """
    levels = torch.as_tensor(noise_level).long().reshape(-1)
    if levels.numel() and not bool(((levels >= 0) & (levels < 1000)).all()):
        bad = levels[(levels < 0) | (levels >= 1000)][0].item()
        raise ValueError(f"noise_level must be in [0, 999], got {bad}")
    e = image_embeds.float()
    ac = squaredcos_alphas_cumprod()[levels.cpu()].reshape(-1, 1)  # level 0 still adds a little noise, as upstream
    e = normalizer.unscale(ac.sqrt().to(e) * normalizer.scale(e) + (1 - ac).sqrt().to(e) * noise.float())
    level = levels.to(e.device, torch.float32).expand(e.shape[0]) if levels.numel() == 1 else levels.to(e.device).float()
    return torch.cat([e, timestep_embedding(level, e.shape[1])], dim=1)
