"""Distil the shipped miniature's VAE decoder into its tiny decoder (TAESD_MINI, ≤ 2 MB in fp16).

Runs the common training loop (stablexl/train/loop.py): resumable states every --checkpoint-every steps,
log.jsonl, loss.png, sample grids (rows: real image, VAE decode, tiny decode). One thread by default, so
that it can share a small machine. Typical use, in the background:

  OMP_NUM_THREADS=1 nohup .venv/bin/python scripts/train_tiny_decoder.py --data /work/data/emoji \
      --output artifacts/tiny-decoder > artifacts/tiny-decoder.log 2>&1 &
  # after a kill / reboot: the same command with --resume
  .venv/bin/python scripts/train_tiny_decoder.py --ship artifacts/tiny-decoder/tiny-decoder.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="/work/data/emoji", help="dataset folder (stablexl data emoji DIR)")
    p.add_argument("--output", default="artifacts/tiny-decoder", help="run folder (states, log, cache, result)")
    p.add_argument("--resume", action="store_true", help="continue the latest state in --output")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--decay-steps", type=int, default=1000, help="cosine decay over the last N steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--perceptual", default="rcf", choices=("rcf", "lpips", "none"))
    p.add_argument("--perceptual-weight", type=float, default=0.25)
    p.add_argument("--image-weight", type=float, default=0.0, help="extra L1 to the real image")
    p.add_argument("--checkpoint-every", type=int, default=300, help="steps between resumable states")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ship", metavar="RESULT", default=None,
                   help="instead of training: write RESULT (a run's tiny-decoder.safetensors) in fp16 as the "
                        "miniature's shipped tiny decoder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)

    from stablexl.config import TAESD_MINI
    from stablexl.io.tiny import mini_tiny_decoder_file, load_tiny_autoencoder, save_tiny_autoencoder

    if a.ship:
        model = load_tiny_autoencoder(a.ship, latent_space="mini")
        out = save_tiny_autoencoder(model, mini_tiny_decoder_file(), dtype=torch.float16)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return 0

    from stablexl.mini.weights import load_mini_parts
    from stablexl.models.taesd import AutoencoderTiny
    from stablexl.train.data import Augment, TrainData, scan_dataset
    from stablexl.train.loop import TrainConfig, train
    from stablexl.train.tiny_decoder import TinyDecoderOptions, TinyDecoderTask

    side = TAESD_MINI.downsample_factor * 8  # the miniature's 64 px images, 8x8 latents
    records = scan_dataset(a.data).records
    data = TrainData(records, [(side, side)], a.batch_size, a.seed, Augment(flip_p=0.0, random_crop=False))
    torch.manual_seed(a.seed)
    student = AutoencoderTiny(TAESD_MINI, encoder=False)
    teacher = load_mini_parts().vae
    opts = TinyDecoderOptions(perceptual=a.perceptual, perceptual_weight=a.perceptual_weight, image_weight=a.image_weight)
    task = TinyDecoderTask(student, teacher, data, Path(a.output), opts)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                      decay_steps=a.decay_steps, weight_decay=0.0, ema_decay=a.ema_decay, seed=a.seed,
                      checkpoint_every=a.checkpoint_every, log_every=a.log_every, sample_every=a.sample_every)
    out = train(task, cfg, a.output, resume=a.resume or None, progress=False)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
