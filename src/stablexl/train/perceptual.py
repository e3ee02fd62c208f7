"""Perceptual distances for VAE training.

LPIPS (Zhang et al. 2018) needs VGG16 ImageNet weights and the learned linear heads, which cannot be
downloaded here. So there are two implementations behind one interface, `distance(x, y) -> (B,)`:

- `LPIPS`: the real architecture (VGG16 `features` conv stack sliced at relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3; per-channel unit-normalised features; 1×1 non-negative linear heads; spatial mean;
  sum over layers; inputs shifted/scaled as in the `lpips` package). It loads torchvision-layout VGG16
  weights (`features.N.weight`) and lpips-layout heads (`linK.model.1.weight`) from local files.
- `RandomConvPerceptual`: the honest substitute, named for what it is ("rcf", random conv features,
  *not* LPIPS): the same multi-scale, unit-normalised feature difference, through a fixed, seeded,
  randomly initialised VGG-shaped conv net with uniform heads. Random conv features carry much of the
  texture/structure sensitivity of trained ones but are not calibrated to human judgements.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # indices in torchvision's vgg16().features after relu1_2 ... relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def _vgg_features(cfg: list, width: float = 1.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            c = max(8, int(v * width))
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(inplace=False)]
            cin = c
    return nn.Sequential(*layers)


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class _FeatureDistance(nn.Module):
    def __init__(self, features: nn.Sequential, heads: list[nn.Module]):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList(heads)
        # lpips ScalingLayer constants: inputs in [-1, 1] -> ImageNet-like normalisation
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def taps(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
            if len(out) == len(self.heads):
                break
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance per sample (B,) between images in [-1, 1]; gradients flow to x and y."""
        total = 0.0
        for fx, fy, head in zip(self.taps(x), self.taps(y), self.heads):
            d = (_unit(fx) - _unit(fy)).pow(2)  # (B, C, h, w)
            total = total + head(d).mean(dim=(1, 2, 3))
        return total  # type: ignore[return-value]

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)


class _Head(nn.Module):
    """lpips `NetLinLayer`: (dropout) + 1×1 conv without bias; key `model.1.weight`."""

    def __init__(self, c: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))

    def forward(self, d: Tensor) -> Tensor:
        return self.model(d)


class LPIPS(_FeatureDistance):
    name = "lpips-vgg"

    def __init__(self, vgg_weights: str | Path, lin_weights: str | Path):
        from safetensors.torch import load_file

        features = _vgg_features(VGG16_CFG)
        heads = [_Head(c) for c in CHANNELS]
        super().__init__(features, heads)

        def read(p) -> dict[str, Tensor]:
            p = Path(p)
            if not p.is_file():
                raise FileNotFoundError(f"LPIPS weights {p} not found; pass local VGG16 and lpips head files")
            if p.suffix == ".safetensors":
                return load_file(str(p))
            return torch.load(p, map_location="cpu", weights_only=True)  # tensors only, never code

        vgg = {k.removeprefix("features."): v for k, v in read(vgg_weights).items() if k.startswith("features.")}
        self.features.load_state_dict(vgg, strict=True)
        lin = read(lin_weights)
        for k, head in enumerate(self.heads):
            head.model[1].weight.data.copy_(lin[f"lin{k}.model.1.weight"])


class RandomConvPerceptual(_FeatureDistance):
    name = "rcf-perceptual (random conv features, not LPIPS)"

    def __init__(self, seed: int = 0, width: float = 0.25, levels: int = 4):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            features = _vgg_features(VGG16_CFG, width)
            for m in features:
                if isinstance(m, nn.Conv2d):  # He init keeps activations alive through depth
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        heads = []
        for _ in range(levels):
            h = _Head(1)
            h.model = nn.Sequential(nn.Identity(), _ChannelMean())
            heads.append(h)
        super().__init__(features, heads)


class _ChannelMean(nn.Module):
    def forward(self, d: Tensor) -> Tensor:
        return d.sum(dim=1, keepdim=True)


def make_perceptual(kind: str, vgg: str | None = None, lin: str | None = None) -> _FeatureDistance | None:
    if kind == "none":
        return None
    if kind == "lpips":
        if not (vgg and lin):
            raise ValueError("--perceptual lpips needs --lpips-vgg PATH and --lpips-lin PATH (local weight files)")
        return LPIPS(vgg, lin)
    if kind == "rcf":
        return RandomConvPerceptual()
    raise ValueError(f"unknown perceptual loss {kind!r}; choose rcf, lpips or none")


__all__ = ["LPIPS", "RandomConvPerceptual", "make_perceptual"]
