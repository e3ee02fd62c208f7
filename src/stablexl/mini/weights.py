"""The shipped miniature: weights that live in the package, so `Pipeline.from_pretrained("mini")` and
`stablexl generate` work with no download.

Files under `stablexl/assets/mini/`, all half precision (150 MB for the whole family):

  model.safetensors        the whole pipeline (UNet, VAE, both text towers) in our checkpoint format
  clip-vision.safetensors  the mini CLIP's image tower and temperatures; its text towers are the pipeline's
                           own (the UNet run kept them frozen), so `mini_clip()` reassembles the trained
                           CLIP for `stablexl eval` without storing the towers twice
  turbo-unet.safetensors   `mini-turbo`: the UNet of mini's ADD student (`stablexl train add`) and its config;
                           everything else is mini's (`load_shipped`, `ship_variant`)
  refiner-unet.safetensors `mini-refiner`: a refiner-shaped UNet on mini's bigG-shaped tower and VAE
  unclip-unet.safetensors  `mini-unclip`: an unCLIP UNet (and its embedding normalizer) on mini's towers, VAE
                           and the mini CLIP's image tower

`ship()` writes both from a UNet run's `model.safetensors` and the CLIP run's `clip.safetensors`, checking
that the text towers are the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ..config import MINI_SAMPLING
from ..io.checkpoint import CheckpointError, SafetensorsSource, atomic_save_safetensors
from ..io.components import KEY, load_component_file
from ..models.clip import CLIPModel

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini"
MODEL_FILE = "model.safetensors"
VISION_FILE = "clip-vision.safetensors"


def shipped_model_file(root: Path = ASSET_DIR) -> Path:
    """The packaged pipeline file, checked to be real weights (not missing, not a Git LFS pointer)."""
    path = root / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the miniature's weights are missing from this install; reinstall stablexl "
                                "from a full clone (`pip install -e .`), or pass a checkpoint path with --model")
    if path.stat().st_size < 1024 and path.read_bytes().startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the weights; run `git lfs pull` in the clone")
    return path


def load_mini_parts(dtype: torch.dtype = torch.float32, root: Path = ASSET_DIR):
    """The shipped pipeline's networks, upcast to `dtype` (stored in fp16; fp32 is the fast CPU path)."""
    from ..io.models import load_model

    parts = load_model(shipped_model_file(root), dtype=dtype)
    if parts.config.name != "mini":
        raise CheckpointError(f"{root / MODEL_FILE}: holds preset {parts.config.name!r}, expected 'mini'")
    if parts.config.sampling is None:  # the shipped file predates the config's `sampling` field
        parts.config = dataclasses.replace(parts.config, sampling=MINI_SAMPLING)
    return parts


# Models shipped beside `mini` that share its VAE and text towers: name -> their own UNet's file (fp16, with the
# variant's whole config in the metadata, so the UNet's shape and sampling defaults come from the file).
# A variant may use a subset of mini's text towers (the refiner: the bigG-shaped one, matched by spec), and an unCLIP
# variant also the mini CLIP's image tower (clip-vision.safetensors), its normalizer stored beside its UNet.
VARIANT_FILES = {"mini-turbo": "turbo-unet.safetensors", "mini-refiner": "refiner-unet.safetensors",
                 "mini-unclip": "unclip-unet.safetensors"}
NORMALIZER = "image_normalizer."  # key prefix of an unCLIP variant's normalizer in its file
SHIPPED = ("mini", *VARIANT_FILES)


def load_shipped(name: str, dtype: torch.dtype = torch.float32, root: Path = ASSET_DIR):
    """`mini` or a variant of it (`mini-turbo`): the variant's UNet and config with mini's other networks."""
    parts = load_mini_parts(dtype=dtype, root=root)
    if name == "mini":
        return parts
    if name not in VARIANT_FILES:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    path = root / VARIANT_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {name} weights are missing from this install; reinstall stablexl")
    src = SafetensorsSource(path)
    info = json.loads(src.metadata.get(KEY, "{}"))
    if info.get("kind") != "unet-variant":
        raise CheckpointError(f"{path}: not a shipped UNet variant file (no unet-variant metadata); reinstall stablexl")
    from ..config import ModelConfig
    from ..models.unet import UNet

    config = ModelConfig.from_dict(info["config"])
    towers = dict(zip(parts.config.text_encoders, parts.text_encoders))
    if config.vae != parts.config.vae or any(spec not in towers for spec in config.text_encoders):
        raise CheckpointError(f"{path}: {name} was made for another VAE or text towers than this install's mini")
    with torch.device("meta"):
        unet = UNet(config.unet)
    keys = list(src.keys())
    unet.load_state_dict({k: src.get(k).to(dtype) for k in keys if not k.startswith(NORMALIZER)}, strict=True, assign=True)
    parts.unet, parts.config = unet.eval(), config
    parts.text_encoders = [towers[spec] for spec in config.text_encoders]
    if config.unclip is not None:
        from ..models.parts import EmbeddingNormalizer

        vision = mini_clip(parts, root=root).vision
        if vision.config != config.unclip.vision:
            raise CheckpointError(f"{path}: {name} was made for another image tower than this install's mini CLIP")
        norm = EmbeddingNormalizer(config.unclip.embed_dim)
        norm.load_state_dict({k[len(NORMALIZER):]: src.get(k).float() for k in keys if k.startswith(NORMALIZER)})
        parts.image_encoder, parts.image_normalizer = vision.to(dtype), norm.eval().requires_grad_(False)
    parts.source = path
    return parts


def ship_variant(name: str, model_path: str | Path, out: Path = ASSET_DIR, dtype=torch.float16) -> tuple[int, str]:
    """Write a variant's UNet file from a model.safetensors (e.g. `stablexl train add`'s) whose VAE and text towers
    are the shipped mini's own (checked)."""
    from ..io.models import load_model

    student = load_model(model_path, dtype=torch.float32)
    mini = load_mini_parts()
    towers = dict(zip(mini.config.text_encoders, mini.text_encoders))
    if any(spec not in towers for spec in student.config.text_encoders):
        raise ValueError(f"{model_path}: its text towers are not mini's; a variant shares them")
    pairs = [("VAE", student.vae, mini.vae)] + [
        (f"text tower {i}", x, towers[spec]) for i, (x, spec) in enumerate(zip(student.text_encoders, student.config.text_encoders))]
    if student.config.unclip is not None:
        if student.image_encoder is None or student.image_normalizer is None:
            raise ValueError(f"{model_path}: an unCLIP variant needs its image tower and normalizer in the file")
        pairs.append(("image tower", student.image_encoder, mini_clip(mini).vision))
    for what, a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa):
            raise ValueError(f"{model_path}: its {what} differs from the shipped mini's; a variant shares them")
    config = dataclasses.replace(student.config, name=name)
    path = Path(out) / VARIANT_FILES[name]
    tensors = {k: v.to(dtype) for k, v in student.unet.state_dict().items()}
    if student.image_normalizer is not None:  # kept in fp32: 2·D numbers
        tensors.update({NORMALIZER + k: v.float() for k, v in student.image_normalizer.state_dict().items()})
    atomic_save_safetensors(tensors, path, {KEY: json.dumps({"kind": "unet-variant", "config": config.to_dict()})})
    return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def mini_clip(parts=None, root: Path = ASSET_DIR) -> CLIPModel:
    """The mini CLIP (image tower + the pipeline's two text towers), fp32, for `stablexl eval --clip mini`."""
    parts = parts or load_mini_parts(root=root)
    path = root / VISION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the mini CLIP image tower is missing from this install; pass a "
                                "clip.safetensors from `stablexl train clip` instead")
    src = SafetensorsSource(path)
    info = json.loads(src.metadata.get(KEY, "{}"))
    if info.get("kind") != "clip-vision":
        raise CheckpointError(f"{path}: not a mini CLIP image-tower file (no clip-vision metadata); reinstall stablexl")
    model = CLIPModel.from_configs({"vision": info["config"]["vision"],
                                    "texts": [dataclasses.asdict(te.config) for te in parts.text_encoders]})
    sd = {k: src.get(k).float() for k in src.keys()}
    for i, te in enumerate(parts.text_encoders):
        sd.update({f"texts.{i}.{k}": v.float() for k, v in te.state_dict().items()})
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


def ship(model_path: str | Path, clip_path: str | Path, out: Path = ASSET_DIR, dtype=torch.float16) -> dict:
    """Write the two asset files from training outputs; returns {file: (bytes, sha256)}."""
    from ..io.models import load_model, save_model

    parts = load_model(model_path, dtype=torch.float32)
    clip = load_component_file(clip_path, "clip")
    if len(clip.texts) != len(parts.text_encoders):
        raise ValueError(f"{clip_path} has {len(clip.texts)} text towers, the model {len(parts.text_encoders)}")
    for i, (a, b) in enumerate(zip(clip.texts, parts.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
            raise ValueError(f"text tower {i} of {model_path} differs from {clip_path}'s: ship the CLIP the "
                             "UNet was trained with (--text-encoders)")
    out.mkdir(parents=True, exist_ok=True)
    save_model(parts, out / MODEL_FILE, dtype=dtype)
    tensors = {f"vision.{k}": v.to(dtype) for k, v in clip.vision.state_dict().items()}
    tensors["logit_scale"] = clip.logit_scale.detach().float()
    atomic_save_safetensors(tensors, out / VISION_FILE,
                            {KEY: json.dumps({"kind": "clip-vision", "config": {"vision": dataclasses.asdict(clip.vision.config)}})})
    return {f: ((out / f).stat().st_size, hashlib.sha256((out / f).read_bytes()).hexdigest())
            for f in (MODEL_FILE, VISION_FILE)}


def model_from_state(state: str | Path, vae: str | Path, clip: str | Path, out: str | Path, ema: bool = True) -> Path:
    """A mini UNet run's training state (its EMA weights by default) + the VAE and CLIP it was trained with ->
    a whole-model file, like the run's final model.safetensors. For scoring a run at intermediate steps."""
    from ..config import PRESETS
    from ..io.models import save_model
    from ..models.parts import build_parts
    from ..train.state import load_state

    tensors, meta = load_state(state)
    parts = build_parts(PRESETS["mini"], device="cpu")
    parts.vae = load_component_file(vae, "vae")
    parts.text_encoders = list(load_component_file(clip, "clip").texts)
    prefix = "ema.unet." if ema and meta.get("ema_updates") else "model.unet."
    sd = {k: tensors.get(prefix + k, tensors.get("model.unet." + k)) for k in parts.unet.state_dict()}
    missing = [k for k, v in sd.items() if v is None]
    if missing:
        raise CheckpointError(f"{state}: no UNet tensor {missing[0]} (and {len(missing) - 1} more); not a mini UNet run")
    parts.unet.load_state_dict(sd, strict=True)
    return save_model(parts, out)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="write the shipped miniature's asset files from training outputs")
    p.add_argument("--model", required=True, help="model.safetensors of the UNet run")
    p.add_argument("--clip", default=None, help="clip.safetensors of the CLIP run the UNet was trained with")
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--from-state", default=None, help="first write --model from this UNet training state (EMA)")
    p.add_argument("--vae", default=None, help="with --from-state: the vae.safetensors the run used")
    p.add_argument("--only-model", action="store_true", help="with --from-state: write --model and stop")
    p.add_argument("--variant", choices=sorted(VARIANT_FILES), default=None,
                   help="write this variant's UNet file from --model (a model sharing mini's VAE and text towers)")
    a = p.parse_args(argv)
    if a.variant:
        size, sha = ship_variant(a.variant, a.model, Path(a.out))
        print(f"{VARIANT_FILES[a.variant]}: {size / 1e6:.1f} MB sha256 {sha}")
        return 0
    if not a.clip:
        p.error("--clip is required (except with --variant)")
    if a.from_state:
        if not a.vae:
            p.error("--from-state needs --vae")
        print(f"wrote {model_from_state(a.from_state, a.vae, a.clip, a.model)}")
        if a.only_model:
            return 0
    for name, (size, sha) in ship(a.model, a.clip, Path(a.out)).items():
        print(f"{name}: {size / 1e6:.1f} MB sha256 {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
