"""Latent Consistency Distillation (Luo et al. 2023, arXiv:2310.04378), the comparison method for ADD; numbers and
choices from reference/distillation.md §6 (diffusers `train_lcm_distill_sdxl_wds.py` @58eb52c080).

One step: a real latent noised to t_{n+k} on the 50-step DDIM grid (t ∈ {19, 39, …, 999}, skip k = 20); the
teacher takes one DDIM step with CFG to t_n; the consistency function f(z, t) = c_skip(t)·z + c_out(t)·x̂(z, t)
of the student at (z_{t_{n+k}}, t_{n+k}) is pulled towards that of the target network (an EMA of the student,
decay 0.95) at (z_{t_n}, t_n), with the pseudo-Huber loss √((f − f⁻)² + c²) − c, c = 0.001.

Boundary condition (Song et al. 2023, consistency models): c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²),
σ_d = 0.5. CFG: Imagen form with a fixed scale (the student has no w input, §6.3).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.parts import ModelParts
from .add import DistillationTask
from .data import TrainData
from .loop import Context, OptimizerSpec
from .unet import UNetTrainOptions


@dataclass(frozen=True)
class LCMOptions:
    ddim_steps: int = 50  # the teacher's solver grid
    teacher_cfg: float = 3.0  # Imagen form (the ADD target's scale, §6.2)
    target_ema: float = 0.95
    huber_c: float = 0.001
    sample_prompts: tuple[str, ...] = ()

    def __post_init__(self):
        if not 2 <= self.ddim_steps <= 1000 or 1000 % self.ddim_steps:
            raise ValueError(f"--ddim-steps must divide 1000 (e.g. 50), got {self.ddim_steps}")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"--target-ema must be in [0, 1), got {self.target_ema}")


def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCM's consistency parameterisation at integer timesteps t."""
    s = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


class LCMTask(DistillationTask):
    """Student UNet; a target network (EMA of the student, saved with the state, never optimised)."""

    name = "lcm"

    def __init__(self, parts: ModelParts, data: TrainData, options: LCMOptions = LCMOptions(),
                 unet_options: UNetTrainOptions | None = None, grad_accum: int = 1):
        super().__init__(parts, data, unet_options)
        self.lcm, self.grad_accum = options, grad_accum
        self.sample_prompts = options.sample_prompts
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        skip = 1000 // options.ddim_steps
        self.grid = torch.arange(1, options.ddim_steps + 1) * skip - 1  # 19, 39, ..., 999
        self.skip = skip

    def modules(self):
        return {"student": self.student, "target": self.target}  # the target is saved and resumed, not trained

    def optimizers(self):
        return [OptimizerSpec("student", ["student"], weight_decay=0.0)]

    def config_json(self) -> dict:
        return {**super().config_json(), "lcm": dataclasses.asdict(self.lcm)}

    @torch.no_grad()
    def _update_target(self) -> None:
        d = self.lcm.target_ema
        for p_t, p_s in zip(self.target.parameters(), self.student.parameters()):
            p_t.lerp_(p_s.detach(), 1.0 - d)  # p_t ← d·p_t + (1 − d)·p_s

    def loss(self, ctx: Context, data_step: int):
        o = self.lcm
        self._frozen_to(ctx.device)
        if data_step > 0 and data_step % self.grad_accum == 0:
            self._update_target()  # after the previous optimizer step, before this one's loss
        gen = ctx.generator(data_step)
        z0, captions, *_ = self.latents(ctx, data_step, gen)
        B, n = self.data.batcher.batch_size, z0.shape[0]
        cond = self._cond(captions, n, ctx.device)
        idx = ctx.local(torch.randint(0, len(self.grid), (B,), generator=gen))[:n]
        eps = ctx.local(torch.randn((B, *z0.shape[1:]), generator=gen))[:n]
        t_start = self.grid.to(idx.device)[idx]
        t_end = (t_start - self.skip).clamp(min=0)
        z_start = self._bc(self._alpha, t_start, z0) * z0 + self._bc(self._sigma, t_start, z0) * eps

        skip_s, out_s = (v.to(z0).reshape(-1, 1, 1, 1) for v in boundary_scalings(t_start))
        student = ctx.models["student"](z_start, t_start, cond.context, cond.vector).float()
        f_student = skip_s * z_start + out_s * self._x0(z_start, t_start, student)

        with torch.no_grad():
            e_u, e_c = self.teacher_eps(z_start, t_start, cond)
            e = e_u + o.teacher_cfg * (e_c - e_u)
            x0 = self._x0(z_start, t_start, e)
            # one DDIM step to t_end: z = √ᾱ_end·x̂ + √(1 − ᾱ_end)·ε̂ (DDIMSolver.ddim_step)
            z_end = self._bc(self._alpha, t_end, z0) * x0 + self._bc(self._sigma, t_end, z0) * e
            target_eps = self.target(z_end, t_end, cond.context, cond.vector).float()
            skip_e, out_e = (v.to(z0).reshape(-1, 1, 1, 1) for v in boundary_scalings(t_end))
            f_target = skip_e * z_end + out_e * self._x0(z_end, t_end, target_eps)

        c = o.huber_c
        loss = (((f_student - f_target) ** 2 + c * c).sqrt() - c).mean()
        return "student", loss, {"loss": float(loss.detach())}
