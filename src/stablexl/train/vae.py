"""VAE training (reference/training.md §2): L1 reconstruction + perceptual term + KL + PatchGAN.

Loss as in LDM/sgm `LPIPSWithDiscriminator` / `GeneralLPIPSWithDiscriminator`:
  rec  = |x − x̂| + w_p·P(x, x̂)             per pixel
  nll  = Σ_pixels rec / e^s + s, / B          s: a learned scalar log-variance
  kl   = Σ_latent KL(q(z|x) ‖ N(0, I)) / B     weight 1e-6 (the SD / SDXL-VAE regime)
  gan  = −mean D(x̂) × λ, λ = w_d · ‖∇_L nll‖ / (‖∇_L gan‖ + 1e-4) clamped to [0, 1e4], L = decoder.conv_out.weight
The discriminator (`NLayerDiscriminator`, pix2pix PatchGAN, 3 layers) learns with the hinge loss
0.5·(mean relu(1 − D(x)) + mean relu(1 + D(x̂))). After `disc_start` steps, steps alternate between the
autoencoder (even) and the discriminator (odd), as sgm does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.components import save_component
from ..models.vae import AutoencoderKL
from .data import TrainData
from .loop import Context, OptimizerSpec
from .perceptual import make_perceptual


class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): 4×4 convs, stride 2 then 1, LeakyReLU 0.2, one logit per patch."""

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        Norm = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else (lambda c: nn.GroupNorm(min(32, c // 4 or 1), c))
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), Norm(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 1, h, w) patch logits


@dataclass(frozen=True)
class VAETrainOptions:
    kl_weight: float = 1e-6
    perceptual: str = "rcf"  # rcf | lpips | none
    perceptual_weight: float = 0.5
    lpips_vgg: str | None = None
    lpips_lin: str | None = None
    disc_start: int = 2000
    disc_weight: float = 0.5
    disc_ndf: int = 64
    disc_lr: float | None = None
    betas: tuple[float, float] = (0.5, 0.9)  # LDM autoencoder
    # Fine-tune the decoder only (SD's ft-MSE / ft-EMA decoders, reference/training.md §2): the encoder, and with
    # it the latent space every UNet was trained in, stays frozen; the KL term has no gradient and is dropped.
    decoder_only: bool = False


class VAETask:
    name = "vae"
    ema_modules = ("vae",)

    def __init__(self, vae: AutoencoderKL, data: TrainData, options: VAETrainOptions = VAETrainOptions(), grad_accum: int = 1):
        self.vae, self.data, self.opt, self.grad_accum = vae, data, options, grad_accum
        self.disc = NLayerDiscriminator(vae.config.in_channels, options.disc_ndf)
        self.perceptual = make_perceptual(options.perceptual, options.lpips_vgg, options.lpips_lin)
        self.logvar = nn.Parameter(torch.zeros(1))  # (1,), not a scalar: FSDP cannot shard 0-d parameters
        self.vae.logvar = self.logvar  # trained with the autoencoder; not part of the saved VAE
        vae.requires_grad_(True)
        if options.decoder_only:
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)

    def modules(self):
        return {"vae": self.vae, "disc": self.disc}

    def optimizers(self):
        return [OptimizerSpec("vae", ["vae"], betas=self.opt.betas, weight_decay=0.0),
                OptimizerSpec("disc", ["disc"], lr=self.opt.disc_lr, betas=self.opt.betas, weight_decay=0.0)]

    def images_per_step(self) -> int:
        return self.data.batcher.batch_size

    def config_json(self) -> dict:
        return {"vae": dataclasses.asdict(self.vae.config), "options": dataclasses.asdict(self.opt),
                "perceptual": getattr(self.perceptual, "name", "none"), "images": len(self.data.records)}

    def loss(self, ctx: Context, data_step: int):
        o = self.opt
        step = data_step // self.grad_accum
        gan_on = step >= o.disc_start
        b = self.data.batch(data_step, ctx.rank, ctx.world)
        x = b.pixels.to(ctx.device)
        gen = ctx.generator(data_step)
        vae, disc = ctx.models["vae"], ctx.models["disc"]
        if gan_on and step % 2 == 1:  # discriminator step
            with torch.no_grad():
                x_hat = self._reconstruct(vae, x, gen, ctx)[0]
            real, fake = disc(x), disc(x_hat)
            loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            return "disc", loss, {"loss_disc": float(loss.detach()), "logits_real": float(real.detach().mean()),
                                  "logits_fake": float(fake.detach().mean())}
        x_hat, post = self._reconstruct(vae, x, gen, ctx)
        rec = (x - x_hat).abs()  # (B, 3, H, W)
        logs = {"l1": float(rec.mean().detach())}
        if self.perceptual is not None:
            p = self.perceptual(x, x_hat)  # (B,)
            rec = rec + o.perceptual_weight * p.reshape(-1, 1, 1, 1)
            logs["perceptual"] = float(p.mean().detach())
        B = x.shape[0]
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / B
        kl = post.kl().sum() / B
        loss = nll if o.decoder_only else nll + o.kl_weight * kl
        logs.update({"loss_rec": float(nll.detach() / rec[0].numel()), "kl": float(kl.detach())})
        if gan_on:
            g = -disc(x_hat).mean()
            last = self.vae.decoder.conv_out.weight
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g, last, retain_graph=True)[0]
            lam = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * o.disc_weight
            loss = loss + lam * g
            logs.update({"loss_g": float(g.detach()), "d_weight": float(lam)})
        logs["loss"] = float(loss.detach())
        return "vae", loss, logs

    def _reconstruct(self, vae, x, gen, ctx: Context):
        """x̂ and q(z|x) through the (possibly DDP-wrapped) forward, with z's noise drawn over the global batch."""
        cfg, f = self.vae.config, self.vae.config.downsample_factor
        shape = (self.data.batcher.batch_size, cfg.latent_channels, x.shape[2] // f, x.shape[3] // f)
        noise = ctx.local(torch.randn(shape, generator=gen))[: x.shape[0]]
        return vae(x, noise=noise)

    def sample_grid(self, ctx: Context, step: int):
        from PIL import Image

        from .grid import image_grid

        n = min(8, len(self.data.records))
        b = self.data.batch(0)
        x = b.pixels[:n]
        x_hat = self.vae.decode(self.vae.encode(x).mean).clamp(-1, 1)
        to_pil = lambda t: Image.fromarray(((t.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
        return image_grid([to_pil(t) for t in x] + [to_pil(t) for t in x_hat], cols=n)

    def save(self, out: Path, ctx: Context) -> Path:
        del self.vae.logvar
        try:
            return save_component(self.vae, out / "vae.safetensors")
        finally:
            self.vae.logvar = self.logvar
