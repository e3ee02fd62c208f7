"""The component-file format: a separately trained part in a file of its own (a VAE, or a CLIP: image
tower + text towers).

Safetensors with the component's config as JSON in the metadata (as for whole models), so a loader
rebuilds from the config, never from a guess. Training writes them (`stablexl train vae|clip`); a UNet run
takes them with `--vae` / `--text-encoders`, and the shipped miniature and `stablexl eval` read them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..config import VAEConfig, component_from_dict
from ..models.clip import CLIPModel
from ..models.vae import AutoencoderKL
from .checkpoint import CheckpointError, SafetensorsSource, atomic_save_safetensors

KEY = "stablexl.component"


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
