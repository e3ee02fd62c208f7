"""Separately trained parts in files of their own: a VAE, or a CLIP (image tower + text towers).

Safetensors with the component's config as JSON in the metadata (as for whole models), so a loader
rebuilds from the config, never from a guess. A UNet run takes them with `--vae` / `--text-encoders`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import CLIPTextConfig, CLIPVisionConfig, VAEConfig, component_from_dict
from ..io.checkpoint import CheckpointError, SafetensorsSource, atomic_save_safetensors
from ..models.clip import CLIPTextModel, CLIPVisionModel
from ..models.vae import AutoencoderKL

KEY = "stablexl.component"


class CLIPModel(nn.Module):
    """Contrastive CLIP: one ViT image tower and one or more text towers, each with its own learned
    temperature (Radford et al. 2021, Fig. 3: logit_scale initialised to log(1/0.07))."""

    def __init__(self, vision: CLIPVisionConfig, texts: list[CLIPTextConfig]):
        super().__init__()
        for t in texts:
            if t.projection_dim != vision.projection_dim:
                raise ValueError(f"text tower projection {t.projection_dim} must equal the image tower's "
                                 f"{vision.projection_dim} to share the embedding space")
        self.vision = CLIPVisionModel(vision)
        self.texts = nn.ModuleList(CLIPTextModel(t) for t in texts)
        self.logit_scale = nn.Parameter(torch.full((len(texts),), float(torch.log(torch.tensor(1 / 0.07)))))

    def forward(self, pixels: Tensor, ids: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Normalised pixels (B, 3, S, S) and token ids per tower (B, 77) -> image (B, P), texts [(B, P)]."""
        img = self.vision(pixels)
        return img, [tower(t, pooled=True).pooled for tower, t in zip(self.texts, ids)]

    def configs(self) -> dict:
        import dataclasses

        return {"vision": dataclasses.asdict(self.vision.config), "texts": [dataclasses.asdict(t.config) for t in self.texts]}

    @staticmethod
    def from_configs(d: dict) -> CLIPModel:
        return CLIPModel(component_from_dict(CLIPVisionConfig, d["vision"]),
                         [component_from_dict(CLIPTextConfig, t) for t in d["texts"]])


def save_component(module: nn.Module, path: str | Path) -> Path:
    import dataclasses

    if isinstance(module, AutoencoderKL):
        kind, cfg = "vae", dataclasses.asdict(module.config)
    elif isinstance(module, CLIPModel):
        kind, cfg = "clip", module.configs()
    else:
        raise TypeError(f"cannot save a {type(module).__name__} as a component")
    path = Path(path)
    atomic_save_safetensors({k: v.float() for k, v in module.state_dict().items()}, path,
                            {KEY: json.dumps({"kind": kind, "config": cfg})})
    return path


def load_component_file(path: str | Path, kind: str) -> nn.Module:
    """A component file written by `save_component` -> module (strict: every tensor present, no extras)."""
    src = SafetensorsSource(Path(path))
    raw = src.metadata.get(KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not a stablexl component file (no {KEY!r} metadata); "
                              f"pass the {kind}.safetensors written by `stablexl train {kind}`")
    info = json.loads(raw)
    if info["kind"] != kind:
        raise CheckpointError(f"{path}: holds a {info['kind']}, but a {kind} was expected")
    module: nn.Module = AutoencoderKL(component_from_dict(VAEConfig, info["config"])) if kind == "vae" \
        else CLIPModel.from_configs(info["config"])
    sd = {k: src.get(k) for k in src.keys()}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: {len(missing)} missing and {len(unexpected)} unexpected tensors for its own "
                              f"config (e.g. {(missing or unexpected)[0]}); the file is damaged")
    return module
