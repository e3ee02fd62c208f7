"""One Denoiser: network output -> x0 estimate, for ε- and v-prediction, used by sampling and training.

With x = x0 + σ·ε (variance-exploding form), the network sees c_in·x = x/√(σ²+1) and its timestep
t(σ), and D(x, σ) = c_skip·x + c_out·F(c_in·x, t) with (sgm denoiser_scaling.py; Karras et al. 2022 Table 1):
  ε-prediction: c_skip = 1,          c_out = −σ
  v-prediction: c_skip = 1/(σ²+1),   c_out = −σ/√(σ²+1)
Classifier-free guidance (guidance.py) combines raw network outputs, so it wraps `predict`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..models.conditioning import Conditioning
from .schedule import NoiseSchedule


def _bcast(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Denoiser:
    def __init__(self, unet, schedule: NoiseSchedule, prediction: Literal["eps", "v"], *, quantize_t: bool = False,
                 concat: Tensor | None = None):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet, self.schedule, self.prediction = unet, schedule, prediction
        self.quantize_t = quantize_t  # snap t to the nearest integer (sgm `DiscreteDenoiser`)
        self.concat = concat  # extra input channels (9-channel inpainting: mask ‖ masked-image latents)

    def timestep(self, sigma: Tensor) -> Tensor:
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.quantize_t else t

    def predict(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Raw network output F (ε or v) at noise level σ (B,) for the VE-form sample x."""
        c_in = _bcast((sigma**2 + 1) ** -0.5, x)
        inp = x * c_in
        if self.concat is not None:
            extra = self.concat.to(inp)
            inp = torch.cat([inp, extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)], dim=1)  # CFG doubles the batch
        out = self.unet(inp, self.timestep(sigma), cond.context, cond.vector)
        return out.to(x.dtype)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        s = _bcast(sigma, x)
        if self.prediction == "eps":
            return x - s * out
        return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5

    def to_eps(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        return (x - x0) / _bcast(sigma, x)

    # Training (the same parameterisation seen from the data side) ----------------------------------

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at integer timesteps t (B,): the network input c_in·(x0 + σε), formed
        without σ so that zero-terminal-SNR schedules (σ = ∞ at the last step) train too."""
        ac = self.schedule.alphas_cumprod.to(x0.device)[t]
        return _bcast(ac.sqrt(), x0) * x0 + _bcast((1 - ac).sqrt(), x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022, §4)."""
        if self.prediction == "eps":
            return noise
        ac = self.schedule.alphas_cumprod.to(x0.device)[t]
        return _bcast(ac.sqrt(), x0) * noise - _bcast((1 - ac).sqrt(), x0) * x0

    def train_output(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Raw network output for the VP-form input x_t at integer timesteps t (B,)."""
        inp = x_t if self.concat is None else torch.cat([x_t, self.concat.to(x_t)], dim=1)
        return self.unet(inp, t, cond.context, cond.vector)

    def snr(self, t: Tensor) -> Tensor:
        ac = self.schedule.alphas_cumprod.to(t.device)[t]
        return ac / (1 - ac)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.to_x0(x, sigma, self.predict(x, sigma, cond))
