"""Adversarial Diffusion Distillation (Sauer et al. 2023, arXiv:2311.17042): a 1–4-step student from a diffusion
teacher. Design and sources: reference/distillation.md (§ numbers below refer to it).

One iteration is two loop steps, as the VAE's GAN phase alternates (train/vae.py): even steps update the
discriminator heads, odd steps the student.

Student (§1.2): s drawn from the student timesteps {999, 749, 499, 249}; z_s = α_s·z0 + σ_s·ε, except that at
s = 999 the signal term is dropped (pure noise, exactly the input a trailing 1-step sampler gives); the
ε-prediction is turned into x̂θ = (z_s − σ_s·ε̂θ)/α_s with the schedule's own α_s.

Teacher (§1.3): t ~ U{0..999}; z_t = α_t·sg(x̂θ) + σ_t·ε'; one evaluation with CFG (Imagen form, zeroed text as
the unconditional branch, as the teacher was trained with text dropout by zeroing); x̂ψ likewise.

Distillation (§1.4; diffusers PR #6303): L_distill = c(t)·mean (dec(x̂θ) − dec(x̂ψ))², images in [−1, 1],
c(t) = α_t ("exponential"), α_t/(2σ_t) ("sds") or 1 ("uniform"); optionally on latents instead of pixels.

Discriminator (§1.5; StyleGAN-T `networks/discriminator.py`): a frozen ViT's tokens after the embeddings and after
each block, the CLS token added to every patch token ("AddReadout"); one trainable head per level (spectral-norm
1-d convolutions, local batch norm over virtual batches of 8, LeakyReLU 0.2, a k = 9 circular residual block),
projection-conditioned on the pooled text; one logit per token, all heads' logits averaged. Hinge loss
L_D = mean relu(1 − D(real)) + mean relu(1 + D(fake)) + γ·R1, R1 = E‖∂ΣD/∂features‖² on reals (taken with respect
to the heads' inputs, §5), L_G = −mean D(fake) + λ·L_distill, λ = 2.5. Reals and fakes get the same random
translation and cutout (DiffAugment, Zhao et al. 2020); reals are VAE round trips by default (§2.1), so that
the decoder's softness is not a cue the student could only meet off the latent manifold.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..io.models import save_model
from ..models.clip import CLIPVisionModel
from ..models.parts import ModelParts
from .data import TrainData
from .loop import Context, OptimizerSpec
from .run import STUDENT_TIMESTEPS, WEIGHT_SCHEDULES
from .unet import UNetTask, UNetTrainOptions



@dataclass(frozen=True)
class ADDOptions:
    student_timesteps: tuple[int, ...] = STUDENT_TIMESTEPS
    teacher_cfg: float = 3.0  # Imagen form; the miniature's best-identity CFG (§1.3)
    distill_weight: float = 2.5  # λ
    adv_weight: float = 1.0  # 0: distillation only (an ablation; no discriminator steps)
    weight_schedule: str = "exponential"
    distill_space: str = "pixel"  # pixel | latent
    r1_gamma: float = 1e-5
    disc_lr: float = 1e-4
    disc_betas: tuple[float, float] = (0.0, 0.99)
    cmap_dim: int = 64
    reals: str = "roundtrip"  # roundtrip (VAE-decoded latents) | raw
    augment: bool = True
    sample_prompts: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"--weight-schedule must be one of {', '.join(WEIGHT_SCHEDULES)}, got {self.weight_schedule!r}")
        if self.distill_space not in ("pixel", "latent"):
            raise ValueError(f"--distill-space must be 'pixel' or 'latent', got {self.distill_space!r}")
        if self.reals not in ("roundtrip", "raw"):
            raise ValueError(f"--reals must be 'roundtrip' or 'raw', got {self.reals!r}")
        if not self.student_timesteps or any(not 0 <= t <= 999 for t in self.student_timesteps):
            raise ValueError(f"--student-timesteps must be integers in [0, 999], got {self.student_timesteps}")
        if self.distill_weight <= 0 and self.adv_weight <= 0:
            raise ValueError("--distill-weight and --adv-weight are both 0: nothing to train")


# --------------------------------------------------------------------------------------------------
# The discriminator: frozen ViT features + trainable heads
# --------------------------------------------------------------------------------------------------


class ViTFeatures(nn.Module):
    """Frozen ViT -> its token features at every level: [(B, W, N)] × (1 + layers), patch tokens only,
    each with the CLS token added (StyleGAN-T `AddReadout`). Level 0 is the input of the first block
    (embeddings + position, after CLIP's pre-LayerNorm)."""

    def __init__(self, vision: CLIPVisionModel):
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)

    @property
    def width(self) -> int:
        return self.vision.config.width

    @property
    def levels(self) -> int:
        return self.vision.config.layers + 1

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) in [−1, 1]."""
        v, s = self.vision, self.vision.config.image_size
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="area" if x.shape[-1] > s else "bilinear", align_corners=None)
        h = v.pre_layrnorm(v.embeddings(v.normalize(x)))  # (B, 1+N, W)
        readout = lambda h: (h[:, 1:] + h[:, :1]).transpose(1, 2)  # (B, W, N)
        feats = [readout(h)]
        for block in v.encoder.layers:
            h = block(h, causal=False)
            feats.append(readout(h))
        return feats


class BatchNormLocal(nn.Module):
    """Batch norm over virtual batches of `virtual` samples, no running statistics (StyleGAN-T `BatchNormLocal`)."""

    def __init__(self, channels: int, virtual: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual, self.eps = virtual, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N)
        B = x.shape[0]
        groups = max(1, math.ceil(B / self.virtual))
        while B % groups:  # a last short group cannot be a view: use fewer, larger groups
            groups -= 1
        g = x.reshape(groups, B // groups, *x.shape[1:])
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.reshape(x.shape) * self.weight[None, :, None] + self.bias[None, :, None]


def _block(channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.fn(x)) / math.sqrt(2)


class DiscHead(nn.Module):
    """One level's head: (B, W, N) tokens, condition (B, C) -> (B, N) logits (StyleGAN-T `DiscHead`)."""

    def __init__(self, channels: int, c_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1), _Residual(_block(channels, 9)))
        self.cls = spectral_norm(nn.Conv1d(channels, cmap_dim, 1))
        self.cmapper = nn.Linear(c_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        out = self.cls(self.main(x))  # (B, cmap, N)
        cmap = self.cmapper(c)[:, :, None]  # (B, cmap, 1)
        return (out * cmap).sum(1) / math.sqrt(self.cmap_dim)  # (B, N): projection conditioning


class DiscriminatorHeads(nn.Module):
    def __init__(self, width: int, levels: int, c_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(DiscHead(width, c_dim, cmap_dim) for _ in range(levels))

    def forward(self, feats: list[Tensor], c: Tensor) -> Tensor:
        return torch.cat([h(f, c) for h, f in zip(self.heads, feats)], dim=1)  # (B, levels·N)


def diff_augment(x: Tensor, gen: torch.Generator, batch: int, translate: float = 0.125, cutout: float = 0.5) -> Tensor:
    """DiffAugment's translation (zero fill, up to 1/8 of the side) and cutout (a zeroed square of half the
    side) (Zhao et al. 2020, `DiffAugment_pytorch.py`), with per-sample draws over the global batch `batch`
    (then this rank's slice: the first x.shape[0] rows)."""
    n, _, H, W = x.shape
    sh, sw = int(H * translate + 0.5), int(W * translate + 0.5)
    dy = torch.randint(-sh, sh + 1, (batch,), generator=gen)[:n]
    dx = torch.randint(-sw, sw + 1, (batch,), generator=gen)[:n]
    ch, cw = int(H * cutout + 0.5), int(W * cutout + 0.5)
    cy = torch.randint(0, H + (1 - ch % 2), (batch,), generator=gen)[:n]
    cx = torch.randint(0, W + (1 - cw % 2), (batch,), generator=gen)[:n]
    ys = torch.arange(H)[None, :] - dy[:, None]  # (n, H): source row of each output row
    xs = torch.arange(W)[None, :] - dx[:, None]
    valid = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]  # (n, H, W)
    iy, ix = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
    idx = (iy[:, :, None] * W + ix[:, None, :]).reshape(n, 1, H * W).expand(-1, x.shape[1], -1).to(x.device)
    out = x.reshape(n, x.shape[1], H * W).gather(2, idx).reshape(x.shape)
    gy = torch.arange(H)[None, :, None] - (cy - ch // 2)[:, None, None]
    gx = torch.arange(W)[None, None, :] - (cx - cw // 2)[:, None, None]
    keep = valid & ~((gy >= 0) & (gy < ch) & (gx >= 0) & (gx < cw))
    return out * keep[:, None].to(x)


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class DistillationTask(UNetTask):
    """What ADD and LCM share: a student trained in place from the teacher's weights, a frozen copy of the
    teacher evaluated with CFG, Turbo-style conditioning, and a saved model that carries few-step defaults."""

    ema_modules = ("student",)

    def __init__(self, parts: ModelParts, data: TrainData, unet_options: UNetTrainOptions | None = None):
        if parts.config.prediction != "eps":
            raise ValueError(f"{type(self).__name__[:-4]} here distils ε-prediction teachers; "
                             f"{parts.config.name} is {parts.config.prediction}-prediction")
        super().__init__(parts, data, unet_options or UNetTrainOptions(cache_latents=True))
        self.teacher = copy.deepcopy(parts.unet).eval().requires_grad_(False)
        self.student = parts.unet  # trained in place: starts from the teacher's weights
        cfg = parts.config
        # the pooled text leads SDXL's vector (its first P entries)
        self._pooled = next((s.config.projection_dim for s in cfg.text_encoders if s.pooled), 0) \
            if cfg.family == "sdxl-base" else 0
        ac = self.denoiser.schedule.alphas_cumprod
        self._alpha, self._sigma = ac.sqrt(), (1 - ac).sqrt()

    def _frozen(self) -> list[nn.Module]:
        return [self.teacher, self.parts.vae]

    def _frozen_to(self, device):
        for m in self._frozen():
            m.to(device)

    def _bc(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return table.to(like.device)[t].reshape(-1, 1, 1, 1).to(like.dtype)

    def _cond(self, captions, n: int, device):
        res = float(self.parts.config.resolution)
        size = torch.full((n, 2), res, device=device)  # original = target = the model's size, crop (0, 0) (§1.2)
        keep = torch.ones(n, 4, device=device)
        return self.conditioning(captions, size, torch.zeros(n, 2, device=device), size, keep)

    def _uncond_vector(self, vector: Tensor | None) -> Tensor | None:
        """The pooled text zeroed, the micro-conditions kept (the teacher's text dropout, train/unet.py)."""
        if vector is None:
            return None
        p = self._pooled
        return torch.cat([torch.zeros_like(vector[:, :p]), vector[:, p:]], dim=1)

    @torch.no_grad()
    def teacher_eps(self, z_t: Tensor, t: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(ε̂_u, ε̂_c) of the frozen teacher at VP-form z_t, in one batched pass; the unconditional branch has
        zeroed text, as the teacher was trained with text dropout by zeroing."""
        vec = cond.vector
        out = self.teacher(torch.cat([z_t, z_t]), torch.cat([t, t]),
                           torch.cat([torch.zeros_like(cond.context), cond.context]),
                           None if vec is None else torch.cat([self._uncond_vector(vec), vec])).float()
        return out.chunk(2)

    def _x0(self, z: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (z - self._bc(self._sigma, t, z) * eps) / self._bc(self._alpha, t, z)

    def sample_grid(self, ctx: Context, step: int):
        prompts = list(self.sample_prompts) or list(dict.fromkeys(r.caption for r in self.data.records))[:8]
        if not prompts:
            return None
        from ..pipeline import Pipeline
        from .grid import image_grid

        pipe = Pipeline(self.parts, self.tokenizer, name=f"step {step}")
        r = self.parts.config.resolution
        images = []
        for steps in (1, 4):
            for k, p in enumerate(prompts):
                images += pipe(p, steps=steps, cfg=0.0, seed=k, width=r, height=r, sampler="lcm",
                               schedule="trailing").images
        return image_grid(images, captions=prompts + prompts, cols=len(prompts))

    def save(self, out: Path, ctx: Context) -> Path:
        """The student with the teacher's VAE and text towers, its config carrying the few-step sampling
        defaults (that is how a distilled model is recognised: config.sampling, never its name)."""
        from ..config import FEW_STEP_SAMPLING

        student = dataclasses.replace(self.parts, config=dataclasses.replace(self.parts.config, sampling=FEW_STEP_SAMPLING))
        return save_model(student, out / "model.safetensors")


class ADDTask(DistillationTask):
    """Student UNet + discriminator heads; frozen teacher UNet, VAE, text towers and ViT."""

    name = "add"

    def __init__(self, parts: ModelParts, data: TrainData, vision: CLIPVisionModel,
                 options: ADDOptions = ADDOptions(), unet_options: UNetTrainOptions | None = None):
        super().__init__(parts, data, unet_options)
        self.add = options
        self.sample_prompts = options.sample_prompts
        self.features = ViTFeatures(vision)
        # models without a pooled text condition D on the mean context
        c_dim = self._pooled or parts.config.unet.context_dim
        self.heads = DiscriminatorHeads(self.features.width, self.features.levels, c_dim, options.cmap_dim)

    # -- Task protocol ------------------------------------------------------------------------------

    def modules(self):
        mods = {"student": self.student}
        if self.add.adv_weight > 0:
            mods["heads"] = self.heads
        return mods

    def optimizers(self):
        specs = [OptimizerSpec("student", ["student"], weight_decay=0.0)]
        if self.add.adv_weight > 0:
            specs.append(OptimizerSpec("heads", ["heads"], lr=self.add.disc_lr, betas=self.add.disc_betas,
                                       weight_decay=0.0))
        return specs

    def config_json(self) -> dict:
        return {**super().config_json(), "add": dataclasses.asdict(self.add),
                "features": dataclasses.asdict(self.features.vision.config)}

    # -- pieces ---------------------------------------------------------------------------------------

    def _frozen(self) -> list[nn.Module]:
        return [*super()._frozen(), self.features]

    def _head_condition(self, cond) -> Tensor:
        return cond.vector[:, : self._pooled] if self._pooled else cond.context.mean(dim=1)

    def _decode(self, z: Tensor) -> Tensor:
        return self.parts.vae.decode(z / self.parts.config.vae.scaling_factor)

    def _student(self, ctx: Context, gen: torch.Generator, z0: Tensor, cond, B: int, grad: bool) -> Tensor:
        """x̂θ (latents) at drawn student timesteps; draws: timestep index, noise."""
        n = z0.shape[0]
        ts = torch.tensor(self.add.student_timesteps)
        s = ctx.local(ts[torch.randint(0, len(ts), (B,), generator=gen)])[:n]
        eps = ctx.local(torch.randn((B, *z0.shape[1:]), generator=gen))[:n]
        signal = (s != 999).to(z0).reshape(-1, 1, 1, 1)  # pure noise at s = 999 (§1.2)
        z_s = signal * self._bc(self._alpha, s, z0) * z0 + self._bc(self._sigma, s, z0) * eps
        with torch.set_grad_enabled(grad):
            return self._x0(z_s, s, ctx.models["student"](z_s, s, cond.context, cond.vector).float())

    def _discriminate(self, ctx: Context, images: Tensor, c: Tensor, gen: torch.Generator, B: int,
                      grad_features: bool = False):
        """(B, levels·N) logits of the (possibly DDP-wrapped) heads, and the features they saw."""
        if self.add.augment:
            images = diff_augment(images, gen, B)
        feats = self.features(images)
        if grad_features:  # R1 is taken with respect to the heads' inputs (§5)
            feats = [f.detach().requires_grad_(True) for f in feats]
        return ctx.models["heads"](feats, c), feats

    # -- the loss -----------------------------------------------------------------------------------

    def loss(self, ctx: Context, data_step: int):
        o = self.add
        self._frozen_to(ctx.device)
        gen = ctx.generator(data_step)
        z0, captions, *_ = self.latents(ctx, data_step, gen)
        B, n = self.data.batcher.batch_size, z0.shape[0]
        cond = self._cond(captions, n, ctx.device)
        c = self._head_condition(cond)
        disc_step = o.adv_weight > 0 and data_step % 2 == 0
        if disc_step:
            with torch.no_grad():
                fake = self._decode(self._student(ctx, gen, z0, cond, B, grad=False))
                real = self._decode(z0) if o.reals == "roundtrip" else self._raw_pixels(ctx, data_step)
            aug = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            aug_state = aug.get_state()
            d_real, feats = self._discriminate(ctx, real, c, aug, B, grad_features=o.r1_gamma > 0)
            aug.set_state(aug_state)  # the same augmentation for reals and fakes
            d_fake, _ = self._discriminate(ctx, fake, c, aug, B)
            loss_real, loss_fake = F.relu(1 - d_real).mean(), F.relu(1 + d_fake).mean()
            loss = loss_real + loss_fake
            logs = {"loss_d": float(loss.detach()), "logits_real": float(d_real.detach().mean()),
                    "logits_fake": float(d_fake.detach().mean()),
                    "signs_real": float(d_real.detach().sign().mean()), "signs_fake": float(d_fake.detach().sign().mean())}
            if o.r1_gamma > 0:
                grads = torch.autograd.grad(d_real.sum(), feats, create_graph=True)
                r1 = sum(g.pow(2).sum(dim=(1, 2)) for g in grads).mean()
                loss = loss + o.r1_gamma * r1
                logs["r1"] = float(r1.detach())
            return "heads", loss, logs

        x0 = self._student(ctx, gen, z0, cond, B, grad=True)
        loss = x0.new_zeros(())
        logs: dict[str, float] = {}
        need_pixels = o.adv_weight > 0 or o.distill_space == "pixel"
        fake = self._decode(x0) if need_pixels else None
        if o.distill_weight > 0:
            t = ctx.local(torch.randint(0, self.denoiser.schedule.num_train_timesteps, (B,), generator=gen))[:n]
            eps = ctx.local(torch.randn((B, *z0.shape[1:]), generator=gen))[:n]
            with torch.no_grad():
                z_t = self._bc(self._alpha, t, x0) * x0.detach() + self._bc(self._sigma, t, x0) * eps
                e_u, e_c = self.teacher_eps(z_t, t, cond)
                target = self._x0(z_t, t, e_u + o.teacher_cfg * (e_c - e_u))  # CFG, Imagen form
                w = self._weight(t, x0)
                target_px = self._decode(target) if o.distill_space == "pixel" else None
            if o.distill_space == "pixel":
                per = (fake - target_px).pow(2).mean(dim=(1, 2, 3))
            else:
                per = (x0 - target).pow(2).mean(dim=(1, 2, 3))
            distill = (w.reshape(-1) * per).mean()
            loss = loss + o.distill_weight * distill
            logs["distill"] = float(distill.detach())
        if o.adv_weight > 0:
            aug = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            d_fake, _ = self._discriminate(ctx, fake, c, aug, B)
            g_adv = -d_fake.mean()
            loss = loss + o.adv_weight * g_adv
            logs["loss_g_adv"] = float(g_adv.detach())
            logs["signs_fake_g"] = float(d_fake.detach().sign().mean())
        logs["loss"] = float(loss.detach())
        return "student", loss, logs

    def _weight(self, t: Tensor, like: Tensor) -> Tensor:
        a, s = self._bc(self._alpha, t, like), self._bc(self._sigma, t, like)
        if self.add.weight_schedule == "exponential":
            return a
        if self.add.weight_schedule == "sds":
            return a / (2 * s)
        return torch.ones_like(a)

    def _raw_pixels(self, ctx: Context, data_step: int) -> Tensor:
        epoch, bucket, idx = self.data.batcher.batch(data_step)
        mine = idx[ctx.rank * (len(idx) // ctx.world):(ctx.rank + 1) * (len(idx) // ctx.world)]
        return torch.stack([self.data.sample(i, 0, bucket).pixels for i in mine if i in self._latents]).to(ctx.device)

def load_features(spec: str, parts: ModelParts | None = None) -> CLIPVisionModel:
    """The discriminator's frozen ViT: "mini" (the miniature's CLIP image tower), a clip.safetensors from
    `stablexl train clip`, or a local transformers CLIP folder (config.json + weights). Never downloads."""
    from ..eval.features import load_transformers_clip
    from ..io.components import load_component_file

    p = Path(spec)
    if spec == "mini" and not p.exists():
        from ..mini.weights import mini_clip

        return mini_clip(parts if parts is not None and parts.config.name == "mini" else None).vision
    if p.is_dir():
        return load_transformers_clip(p)[0].vision
    if not p.is_file():
        raise FileNotFoundError(f"--features {spec}: no such file or folder; pass 'mini', a clip.safetensors from "
                                "`stablexl train clip`, or a local transformers CLIP folder")
    return load_component_file(p, "clip").vision
