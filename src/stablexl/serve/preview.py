"""Live previews of a running job: the sampler's current x0 estimate as a small PNG.

"approx" maps latent channels to RGB with one linear map per model (a 4x3 matrix and a bias). Tools with
a fixed VAE ship such a matrix for it; we fit ours when a model loads, from that model's own VAE: encode
a few smooth random-colour images and least-squares the latent means onto the 8x8-pooled pixels. So it
matches whatever VAE is loaded (SD, SDXL, a tiny random one) and costs one matmul per step.
"full" decodes x0 with the VAE (exact, but a full decode per preview: fine for small models only).
"""

from __future__ import annotations

import io
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models.vae import decode_latents

PREVIEW_MODES = ("approx", "full", "none")
PREVIEW_MAX_SIDE = 256


@torch.no_grad()
def fit_latent_rgb(pipe, size: int = 256, n: int = 4) -> Tensor:
    """(C + 1, 3) least-squares map from *scaled* latents (as the UNet sees them) to RGB in [-1, 1]."""
    vae = pipe.parts.vae
    f = vae.config.downsample_factor
    size = max(f * 4, min(size, pipe.config.resolution) // f * f)
    g = torch.Generator("cpu").manual_seed(0)
    colours = torch.rand((n, 3, 4, 4), generator=g) * 2 - 1
    images = F.interpolate(colours, size=(size, size), mode="bilinear", align_corners=False)  # smooth fields
    w = next(vae.parameters(), None) if isinstance(vae, torch.nn.Module) else None
    if w is not None:
        images = images.to(w.device, w.dtype)
    lat = vae.encode(images).mean.float().cpu() * vae.config.scaling_factor  # (n, C, size/f, size/f)
    target = F.avg_pool2d(images, f)  # (n, 3, size/f, size/f)
    x = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution  # (C + 1, 3)


def _to_png(rgb: Tensor, width: int, height: int) -> bytes:
    """(3, h, w) in [-1, 1] -> PNG of at most PREVIEW_MAX_SIDE px on the long side, aspect of the output."""
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Previewer:
    """Turns the callback's x0 into PNG bytes; `min_interval` seconds between two previews ("full" only)."""

    def __init__(self, pipe, mode: str = "approx", min_interval: float = 0.5):
        if mode not in PREVIEW_MODES:
            raise ValueError(f"preview mode must be one of {', '.join(PREVIEW_MODES)}, got {mode!r}")
        self.pipe, self.mode, self.min_interval = pipe, mode, min_interval
        self.matrix = fit_latent_rgb(pipe) if mode == "approx" else None
        self._last = 0.0

    @torch.no_grad()
    def __call__(self, x0: Tensor, width: int, height: int, last: bool = False) -> bytes | None:
        if self.mode == "none":
            return None
        lat = x0[:1].float()  # first image of the batch, (1, C, h, w)
        if self.mode == "approx":
            lat = lat.cpu()
            w = self.matrix
            rgb = torch.einsum("chw,ck->khw", lat[0], w[:-1]) + w[-1].view(3, 1, 1)
            return _to_png(rgb, width, height)
        now = time.monotonic()
        if not last and now - self._last < self.min_interval:
            return None
        self._last = now
        vae = self.pipe.parts.vae  # where it is now (with model offload: on the CPU during sampling)
        return _to_png(decode_latents(vae, lat.to(next(vae.parameters()).device)).images[0], width, height)
