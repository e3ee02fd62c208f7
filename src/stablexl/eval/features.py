"""Feature extractors for distribution distances, and CLIP embedders for text-image metrics. Local files only:
nothing here downloads.

Every extractor has `name` (the label its Fréchet distance is reported under) and
`extract(images: list[PIL.Image]) -> Tensor (N, D)` (float32, CPU):

  MiniCLIPFeatures   the project's own CLIP image tower (`stablexl train clip`), L2-normalised embeddings:
                     "FD-miniCLIP", a self-trained proxy, never to be called FID
  InceptionFeatures  the standard FID Inception-v3 from a local TorchScript file: "FID"

`CLIPEmbedder` embeds images and captions in one CLIP's joint space (for CLIP score and retrieval); it reads
a `clip.safetensors` component or a local transformers CLIP folder (config.json + model.safetensors).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..config import PAD_EOS, PAD_ZERO, PRESETS
from ..io.checkpoint import CheckpointError, SafetensorsSource
from ..io.components import load_component_file
from ..models.clip import CLIPModel
from ..models.tokenizer import default_tokenizer
from ..train.clip import caption_ids, clip_pixels
from .metrics import images_to_tensor


class FeatureExtractor(Protocol):
    name: str

    def extract(self, images: Sequence[Image.Image]) -> Tensor: ...


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------


class CLIPEmbedder:
    """A CLIP (one image tower, one or more text towers sharing its embedding space) and each tower's pad id.
    Images go through the same preprocessing as in training (`train.clip.clip_pixels`), captions through
    the CLIP BPE tokenizer (`train.clip.caption_ids`)."""

    def __init__(self, model: CLIPModel, pad_ids: Sequence[int], label: str, batch_size: int = 64):
        if len(pad_ids) != len(model.texts):
            raise ValueError(f"{len(model.texts)} text towers need {len(model.texts)} pad ids, got {len(pad_ids)}")
        self.model = model.eval().requires_grad_(False)
        self.pad_ids, self.label, self.batch_size = tuple(pad_ids), label, batch_size
        self.tokenizer = default_tokenizer()

    @classmethod
    def load(cls, path: str | Path, pad_ids: Sequence[int] | None = None) -> CLIPEmbedder:
        """`clip.safetensors` from `stablexl train clip` (label "miniCLIP"; pad ids those of the mini preset's
        text encoders), "mini" (the CLIP shipped with the miniature), or a transformers CLIP folder (label: the folder name; pad id from its tokenizer)."""
        p = Path(path)
        if str(path) == "mini" and not p.exists():  # the CLIP shipped with the miniature (stablexl/assets/mini)
            from ..mini.weights import mini_clip

            return cls(mini_clip(), pad_ids or tuple(spec.pad_id for spec in PRESETS["mini"].text_encoders), "miniCLIP")
        if p.is_dir():
            model, pad = load_transformers_clip(p)
            return cls(model, pad_ids or (pad,), p.name)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such CLIP file or folder; pass the clip.safetensors written by "
                                    "`stablexl train clip`, or a local transformers CLIP folder (config.json + "
                                    "model.safetensors)")
        model = load_component_file(p, "clip")
        if pad_ids is None:
            mini = tuple(spec.pad_id for spec in PRESETS["mini"].text_encoders)
            pad_ids = mini if len(mini) == len(model.texts) else (PAD_EOS, PAD_ZERO)[: len(model.texts)]
        return cls(model, pad_ids, "miniCLIP")

    @torch.inference_mode()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> image embeddings (N, P), not normalised."""
        vision = self.model.vision
        out = [vision(clip_pixels(vision, images_to_tensor(images[i:i + self.batch_size])))
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).float()

    @torch.inference_mode()
    def texts(self, captions: Sequence[str]) -> list[Tensor]:
        """Captions -> one (N, P) embedding per text tower (the pooled, projected EOS feature), not normalised."""
        per_tower: list[list[Tensor]] = [[] for _ in self.model.texts]
        for i in range(0, len(captions), self.batch_size):
            ids = caption_ids(self.tokenizer, list(captions[i:i + self.batch_size]), self.pad_ids, "cpu")
            for j, (tower, t) in enumerate(zip(self.model.texts, ids)):
                per_tower[j].append(tower(t, pooled=True).pooled)
        return [torch.cat(e).float() for e in per_tower]


def load_transformers_clip(folder: str | Path) -> tuple[CLIPModel, int]:
    """A transformers `CLIPModel` folder (e.g. openai/clip-vit-large-patch14 saved locally) -> our CLIPModel
    with one text tower, and that tower's pad id. Keys map by prefix (vision_model. -> vision., text_model. ->
    texts.0.); loading is strict. The tokenizer must be the standard CLIP BPE (vocabulary of 49408)."""
    from ..io.diffusers_format import (
        pad_id_from_tokenizer,
        read_json,
        text_from_transformers,
        vision_from_transformers,
    )

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_path, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a transformers CLIP folder needs config.json and model.safetensors "
                                    "(convert pytorch_model.bin to safetensors first)")
    d = read_json(cfg_path)
    if d.get("model_type") != "clip":
        raise CheckpointError(f"{cfg_path}: model_type is {d.get('model_type')!r}; a transformers CLIPModel folder "
                              "(model_type 'clip', both towers) is needed")
    proj = d.get("projection_dim", 512)
    vision = dataclasses.replace(vision_from_transformers(d, str(cfg_path)), projection_dim=proj)
    text = dataclasses.replace(text_from_transformers(d, str(cfg_path)), projection_dim=proj)
    if text.vocab_size != 49408:
        raise CheckpointError(f"{cfg_path}: vocab_size {text.vocab_size}; only CLIPs with the standard CLIP BPE "
                              "vocabulary (49408) can be read with our tokenizer")
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = read_json(pre)
        vision = dataclasses.replace(vision, mean=tuple(p.get("image_mean", vision.mean)),
                                     std=tuple(p.get("image_std", vision.std)))
    renames = (("vision_model.", "vision."), ("visual_projection.", "vision.visual_projection."),
               ("text_model.", "texts.0."), ("text_projection.", "texts.0.text_projection."))
    src = SafetensorsSource(weights)
    sd = {}
    for key in src.keys():
        if key.endswith("position_ids"):  # a buffer in older transformers checkpoints, not a weight
            continue
        new = next((b + key[len(a):] for a, b in renames if key.startswith(a)), key)
        sd[new] = src.get(key).float()
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(1)
    model = CLIPModel(vision, [text])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: {len(missing)} missing and {len(unexpected)} unexpected tensors for a "
                              f"CLIPModel (e.g. {(missing or unexpected)[0]})")
    return model, pad_id_from_tokenizer(folder, PAD_EOS)


class MiniCLIPFeatures:
    """Image-tower embeddings of the project's CLIP, L2-normalised (CLIP is trained on cosine similarity, so
    the norm carries no meaning). A self-trained proxy for relative comparisons, labelled FD-miniCLIP."""

    def __init__(self, clip: str | Path | CLIPEmbedder):
        self.embedder = clip if isinstance(clip, CLIPEmbedder) else CLIPEmbedder.load(clip)
        self.name = f"FD-{self.embedder.label}"

    def extract(self, images: Sequence[Image.Image]) -> Tensor:
        return F.normalize(self.embedder.images(images), dim=-1)


class PixelFeatures:
    """8x8 RGB thumbnails (box filter), flattened to 192 values in [0, 1]: a feature space no trained network
    defines, so an FD here ("FD-px8") is independent of anything a model was trained against (a distilled
    student whose discriminator used the mini CLIP's features is partly optimised for FD-miniCLIP). It sees
    colour and layout, not detail."""

    name = "FD-px8"
    size = 8

    def extract(self, images: Sequence[Image.Image]) -> Tensor:
        rows = [np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BOX), dtype=np.float32) / 255.0
                for im in images]
        return torch.from_numpy(np.stack(rows).reshape(len(rows), -1)).double()


# --------------------------------------------------------------------------------------------------
# Inception (true FID; weights supplied by the operator)
# --------------------------------------------------------------------------------------------------


def clean_resize(image: Image.Image, size: int) -> np.ndarray:
    """clean-fid's "clean" resize (Parmar et al. 2022): each channel as a float image, PIL bicubic to
    size x size, clipped to [0, 255], not re-quantised. -> (size, size, 3) float32."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c])).resize((size, size), Image.BICUBIC))
             for c in range(3)]
    return np.stack(chans, axis=-1).clip(0, 255)


class InceptionFeatures:
    """Pool3 features of the standard FID Inception-v3 (the TF "2015-12-05" weights) from NVIDIA's TorchScript
    `inception-2015-12-05.pt` (StyleGAN2-ADA metrics, clean-fid's default network), read from a local file.

    Contract, as clean-fid with resize_inside=False: every image is resized to 299x299 by `clean_resize`,
    kept in [0, 255], normalised as (x - 128) / 128 and fed to the module's `layers` submodule, whose output
    is flattened to (N, 2048). Values are comparable with clean-fid's "clean" mode, not with torchmetrics'
    or pytorch-fid's resizing, and only at equal sample counts."""

    name = "FID"
    size = 299

    def __init__(self, weights_path: str | Path, batch_size: int = 16):
        p = Path(weights_path)
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: no such file. FID needs the standard Inception-v3 TorchScript file inception-2015-12-05.pt "
                "(as used by clean-fid and StyleGAN2-ADA); stablexl never downloads it: fetch it where the network "
                "allows and pass its path (--inception), or leave --inception out to report FD-miniCLIP only")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this file comes in
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                module = torch.jit.load(str(p), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{p}: not a TorchScript module ({str(e).splitlines()[0]}); pass NVIDIA's "
                                  "inception-2015-12-05.pt (a pytorch-fid .pth state dict is not supported)") from None
        if not hasattr(module, "layers"):
            raise CheckpointError(f"{p}: this TorchScript module has no `layers` submodule, so it is not the FID "
                                  "Inception inception-2015-12-05.pt")
        self.layers = module.layers.eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def extract(self, images: Sequence[Image.Image]) -> Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack([clean_resize(im, self.size) for im in images[i:i + self.batch_size]]))
            x = (x.permute(0, 3, 1, 2) - 128) / 128  # (B, 3, 299, 299) in [-1, 1]
            out.append(self.layers(x).reshape(x.shape[0], -1).float())
        return torch.cat(out)
