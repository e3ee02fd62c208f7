"""Paired comparison of two `stablexl eval` runs on the same protocol and seeds (e.g. --decoder full vs tiny).

Image i of both runs comes from the same prompt, seed and latents, so differences are paired. Reported with
a bootstrap over the 200 prompts (the same resampled indices for both runs, `--rounds` times):
- pixel identity of each run, their difference and its 95 % interval;
- FD-miniCLIP of each run (generated vs all reference images, as the harness computes it), the difference
  and its interval, plus each run's own bootstrap s.d. (the metric's sampling noise at this count);
- how many images' pixel-identity verdicts differ, and the mean absolute pixel difference between the pairs.

Run: `python scripts/compare_eval.py artifacts/eval-mini-full artifacts/eval-mini-tiny --data /work/data/emoji`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="first eval output folder (results.json, images/)")
    p.add_argument("b", help="second eval output folder, same protocol")
    p.add_argument("--data", default="/work/data/emoji")
    p.add_argument("--clip", default="mini")
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args(argv)

    from stablexl.eval import metrics as M
    from stablexl.eval.features import CLIPEmbedder, MiniCLIPFeatures
    from stablexl.eval.harness import read_emoji_reference

    runs = [json.loads((Path(d) / "results.json").read_text()) for d in (a.a, a.b)]
    keys = ("prompts", "seed", "steps", "cfg", "sampler", "schedule", "style")
    if any(runs[0]["settings"][k] != runs[1]["settings"][k] for k in keys):
        raise SystemExit("the two runs used different protocols; compare runs with the same settings")
    names = [it["name"] for it in runs[0]["images"]]
    if names != [it["name"] for it in runs[1]["images"]]:
        raise SystemExit("the two runs prompted different names")
    ident = [np.array([it["pixel_nearest"] == it["name"] for it in r["images"]], dtype=np.float64) for r in runs]
    imgs = [[Image.open(Path(d) / it["file"]).convert("RGB") for it in r["images"]] for d, r in zip((a.a, a.b), runs)]
    ref = read_emoji_reference(a.data, runs[0]["settings"]["style"])
    ref_imgs = [Image.open(ref.images[n]).convert("RGB") for n in sorted(ref.images)]
    ex = MiniCLIPFeatures(CLIPEmbedder.load(a.clip))
    f_ref = ex.extract(ref_imgs)
    f = [ex.extract(i) for i in imgs]
    fd = [M.frechet_distance(x, f_ref) for x in f]

    rng = np.random.default_rng(0)
    n = len(names)
    d_id, d_fd, fd_a, fd_b = [], [], [], []
    for _ in range(a.rounds):
        idx = torch.from_numpy(rng.integers(0, n, n))
        d_id.append(ident[1][idx.numpy()].mean() - ident[0][idx.numpy()].mean())
        x, y = M.frechet_distance(f[0][idx], f_ref), M.frechet_distance(f[1][idx], f_ref)
        fd_a.append(x), fd_b.append(y), d_fd.append(y - x)
    ci = lambda v: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))  # noqa: E731
    px = np.mean([np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).mean() for u, v in zip(*imgs)])
    out = {
        "runs": [a.a, a.b],
        "pixel_identity": [float(ident[0].mean()), float(ident[1].mean())],
        "pixel_identity_diff": float(ident[1].mean() - ident[0].mean()), "pixel_identity_diff_ci95": ci(d_id),
        "verdicts_changed": int((ident[0] != ident[1]).sum()),
        "fd_miniclip": fd, "fd_diff": fd[1] - fd[0], "fd_diff_ci95": ci(d_fd),
        "fd_bootstrap_sd": [float(np.std(fd_a)), float(np.std(fd_b))],
        "mean_abs_pixel_diff_0_255": float(px), "images": n, "rounds": a.rounds,
    }
    print(f"pixel identity: {out['pixel_identity'][0]:.1%} vs {out['pixel_identity'][1]:.1%}, difference "
          f"{out['pixel_identity_diff']:+.1%} (95 % {ci(d_id)[0]:+.1%} .. {ci(d_id)[1]:+.1%}); "
          f"{out['verdicts_changed']} of {n} verdicts differ")
    print(f"FD-miniCLIP: {fd[0]:.4f} vs {fd[1]:.4f}, difference {fd[1] - fd[0]:+.4f} (95 % {ci(d_fd)[0]:+.4f} .. "
          f"{ci(d_fd)[1]:+.4f}); bootstrap s.d. of each {np.std(fd_a):.4f} / {np.std(fd_b):.4f}")
    print(f"mean |pixel difference| between paired images: {px:.2f} / 255")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
