"""Live previews of a running job: the sampler's current x0 estimate as a small PNG.

"approx" maps latent channels to RGB with one linear map per model (a 4x3 matrix and a bias). Tools with
a fixed VAE ship such a matrix for it; we fit ours when a model loads, from that model's own VAE: encode
a few smooth random-colour images and least-squares the latent means onto the 8x8-pooled pixels. So it
matches whatever VAE is loaded (SD, SDXL, a tiny random one) and costs one matmul per step.
"tiny" decodes x0 with the model's tiny decoder (TAESD; `Pipeline.tiny_decoder`): close to the real image
at a small fraction of a VAE decode (reference/performance.md §1).
"full" decodes x0 with the VAE (exact, but a full decode per preview: fine for small models only).
"auto" (the default) is "tiny" for a model that has a tiny decoder, else "approx".
Decoding modes skip a step's preview until `min_interval` seconds, and at least 3x the last decode's own
time, have passed, so previews never cost more than about a quarter of the job.
"""

from __future__ import annotations

import io
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models.taesd import decode_tiny
from ..models.vae import decode_latents

PREVIEW_MODES = ("auto", "approx", "tiny", "full", "none")
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
    """Turns the callback's x0 into PNG bytes; decoding modes ("tiny", "full") rate-limit themselves."""

    def __init__(self, pipe, mode: str = "auto", min_interval: float = 0.5):
        if mode not in PREVIEW_MODES:
            raise ValueError(f"preview mode must be one of {', '.join(PREVIEW_MODES)}, got {mode!r}")
        tiny = getattr(pipe, "tiny_decoder", None)
        if mode == "auto":
            mode = "tiny" if tiny is not None else "approx"
        if mode == "tiny" and tiny is None:
            raise ValueError(f"preview 'tiny' needs a tiny decoder for {getattr(pipe, 'name', 'this model')}; load "
                             "one (--tiny-decoder PATH) or use --preview approx")
        self.pipe, self.mode, self.min_interval = pipe, mode, min_interval
        self.matrix = fit_latent_rgb(pipe) if mode == "approx" else None
        self._next = 0.0  # monotonic time before which decoding modes skip a preview

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
        start = time.monotonic()
        if not last and start < self._next:
            return None
        if self.mode == "tiny":
            tiny = self.pipe.tiny_decoder
            rgb = decode_tiny(tiny, lat.to(next(tiny.parameters()).device)).images[0]
        else:
            vae = self.pipe.parts.vae  # where it is now (with model offload: on the CPU during sampling)
            rgb = decode_latents(vae, lat.to(next(vae.parameters()).device)).images[0]
        took = time.monotonic() - start
        self._next = start + max(self.min_interval, 4 * took)  # decode time ≤ 1/4 of the wall time
        return _to_png(rgb, width, height)
