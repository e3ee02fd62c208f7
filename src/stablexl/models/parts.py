"""The separately trained networks of one model, wired by nothing: the pipeline does the wiring."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from .clip import CLIPTextModel, CLIPVisionModel
from .unet import UNet
from .vae import AutoencoderKL


class EmbeddingNormalizer(nn.Module):
    """Per-dimension mean/std of image embeddings (unCLIP-L uses Karlo's ViT-L-14 statistics; H is identity).

    Names follow diffusers' `StableUnCLIPImageNormalizer` (`mean`, `std`, each (1, D)).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, dim))
        self.std = nn.Parameter(torch.ones(1, dim))

    def scale(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.mean) / self.std

    def unscale(self, e: torch.Tensor) -> torch.Tensor:
        return e * self.std + self.mean


@dataclass
class ModelParts:
    config: ModelConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    image_encoder: CLIPVisionModel | None = None
    image_normalizer: EmbeddingNormalizer | None = None
    notes: list[str] = field(default_factory=list)  # what the loader did that a user may want to know
    source: Path | None = None  # the file or folder the weights came from (None: built in memory)
    quantized: dict[str, str] = field(default_factory=dict)  # component -> "int8" (stablexl/quant.py)

    def modules(self) -> dict[str, nn.Module]:
        """Component name -> module, in a fixed order; also the key prefixes of our checkpoint format."""
        out: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        for i, te in enumerate(self.text_encoders):
            out[f"text_encoders.{i}"] = te
        if self.image_encoder is not None:
            out["image_encoder"] = self.image_encoder
        if self.image_normalizer is not None:
            out["image_normalizer"] = self.image_normalizer
        return out

    def quantize(self, mode: str = "int8", *, text_encoders: bool = False) -> None:
        """int8 weights for the UNet's Linear layers (and the text encoders' with `text_encoders`), in place;
        components already quantised are left as they are."""
        from ..quant import check_mode, quantize_module

        if check_mode(mode) is None:
            return
        names = ["unet"] + ([f"text_encoders.{i}" for i in range(len(self.text_encoders))] if text_encoders else [])
        mods = self.modules()
        for name in names:
            if name not in self.quantized:
                n = quantize_module(mods[name])
                self.quantized[name] = mode
                self.notes.append(f"{name}: {n} Linear layers quantised to {mode}")

    def to(self, *args, **kwargs) -> "ModelParts":
        for m in self.modules().values():
            m.to(*args, **kwargs)
        return self

    def eval(self) -> "ModelParts":
        for m in self.modules().values():
            m.eval().requires_grad_(False)
        return self


def build_parts(config: ModelConfig, device: torch.device | str = "meta", with_image_encoder: bool = False) -> ModelParts:
    """Instantiate every network of `config`. On the meta device nothing is allocated or initialised."""
    with torch.device(device):
        parts = ModelParts(
            config=config,
            unet=UNet(config.unet),
            vae=AutoencoderKL(config.vae),
            text_encoders=[CLIPTextModel(spec.config) for spec in config.text_encoders],
        )
        if config.unclip is not None:
            parts.image_normalizer = EmbeddingNormalizer(config.unclip.embed_dim)
            if with_image_encoder:
                parts.image_encoder = CLIPVisionModel(config.unclip.vision)
    return parts
