"""The few-step claims in miniature (issue 18; reference/distillation.md §4): ADD and LCM students against the
teacher, on the `stablexl eval` protocol (200 Twemoji names drawn with seed 0, image i with seed i, 64²).

Rows: the teacher at 30 steps (CFG 5 and 3), at 1 and 4 steps; each student given at 1, 2 and 4 steps (lcm sampler,
trailing, no CFG), and ADD at 4 steps with Euler a; image-to-image with the ADD student (2 steps × strength 0.5
on the 200 prompted names' own dataset images: is the nearest reference still the input's emoji, and how far at
16 px did it move). Metrics: pixel identity, FD-miniCLIP (the discriminator's features: not independent for ADD),
FD-px8 (independent), sharpness, seconds per image. Paired statistics against the first row of each pair:
McNemar's exact test on identity hits.

A student can be given as a model file or as a training state (`--add-state`: its EMA weights, or the raw ones
with `--raw`), so a run in progress can be scored.

    python scripts/distill_claims.py --data /work/data/emoji --add runs/mini-add/model.safetensors \\
        --lcm runs/mini-lcm/model.safetensors --out artifacts/distill
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch


def student_from_state(state: Path, out: Path, ema: bool = True) -> Path:
    """A distillation run's state (its student's EMA weights by default) + the shipped mini's other networks
    -> a model file with the few-step defaults, like the run's final model.safetensors."""
    from stablexl.config import FEW_STEP_SAMPLING
    from stablexl.io.models import save_model
    from stablexl.mini.weights import load_mini_parts
    from stablexl.train.state import load_state

    tensors, meta = load_state(state)
    parts = load_mini_parts()
    prefix = "ema.student." if ema and meta.get("ema_updates") else "model.student."
    sd = {k: tensors[prefix + k] for k in parts.unet.state_dict()}
    parts.unet.load_state_dict(sd, strict=True)
    parts.config = dataclasses.replace(parts.config, sampling=FEW_STEP_SAMPLING)
    return save_model(parts, out)


def mcnemar(a: list[bool], b: list[bool]) -> float:
    """Two-sided exact McNemar p-value for paired hits."""
    n01 = sum(1 for x, y in zip(a, b) if x and not y)
    n10 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def row(name, model, data, out: Path, steps, cfg, sampler, schedule, prompts) -> dict:
    from stablexl.eval.harness import evaluate

    t0 = time.perf_counter()
    r = evaluate(model, data, "mini", n_prompts=prompts, steps=steps, cfg=cfg, sampler=sampler, schedule=schedule,
                 output=out / name)
    g = r["generated"]
    hits = [it["pixel_nearest"] == it["name"] for it in r["images"]]
    return {"row": name, "model": str(model), "steps": steps, "cfg": cfg, "sampler": sampler, "schedule": schedule,
            "identity": g["pixel_identity"], "fd_miniclip": g["fd"]["FD-miniCLIP"], "fd_px8": g["fd"]["FD-px8"],
            "sharpness": g["sharpness"], "s_per_image": r["seconds"]["generate"] / prompts,
            "wall": round(time.perf_counter() - t0, 1), "hits": hits}


def img2img_row(model, data, prompts: int, steps: int = 2, strength: float = 0.5) -> dict:
    """The student refining each prompted name's own dataset image."""
    import numpy as np
    from PIL import Image

    from stablexl.eval import metrics as M
    from stablexl.eval.harness import PIXEL_SIZE, emoji_prompt, pick_names, read_emoji_reference
    from stablexl.pipeline import Pipeline

    ref = read_emoji_reference(data, "twemoji")
    names = pick_names(ref, prompts, 0)
    pipe = Pipeline.from_pretrained(model)
    ref_names = sorted(ref.images)
    ref_imgs = [Image.open(ref.images[n]).convert("RGB") for n in ref_names]
    outs, moved, t0 = [], [], time.perf_counter()
    for i, n in enumerate(names):
        init = Image.open(ref.images[n]).convert("RGB")
        im = pipe(emoji_prompt(n, "twemoji"), init_image=init, strength=strength, steps=steps, seed=i).images[0]
        outs.append(im)
        a, b = (torch.from_numpy(np.asarray(x.resize((PIXEL_SIZE, PIXEL_SIZE), Image.BOX), dtype=np.float32)) / 255
                for x in (im, init))
        moved.append(float((a - b).pow(2).mean().sqrt()))
    dt = time.perf_counter() - t0
    identity, nearest = M.pixel_identity(outs, names, ref_imgs, ref_names, PIXEL_SIZE)
    sharp = float(M.sharpness(M.images_to_tensor(outs)).mean())
    return {"row": f"ADD img2img {steps}x{strength}", "identity": identity, "rms_16px_from_input": sum(moved) / len(moved),
            "sharpness": sharp, "s_per_image": dt / prompts, "hits": [a == b for a, b in zip(nearest, names)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/data/emoji")
    p.add_argument("--teacher", default="mini")
    p.add_argument("--add", default=None, help="the ADD student: model file")
    p.add_argument("--add-state", default=None, help="or a state of its run")
    p.add_argument("--lcm", default=None, help="the LCM student: model file")
    p.add_argument("--lcm-state", default=None, help="or a state of its run")
    p.add_argument("--raw", action="store_true", help="with --*-state: the raw weights, not the EMA")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--skip", nargs="*", default=[], help="row names to skip (e.g. T30 T30-w3 when known)")
    p.add_argument("--out", default="artifacts/distill")
    a = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    students = {}
    for key, file, state in (("ADD", a.add, a.add_state), ("LCM", a.lcm, a.lcm_state)):
        if state:
            file = str(student_from_state(Path(state), out / f"{key.lower()}-student.safetensors", ema=not a.raw))
        if file:
            students[key] = file
    T = a.teacher
    plan = [("T30", T, 30, 5.0, "dpmpp_2m", "karras"), ("T30-w3", T, 30, 3.0, "dpmpp_2m", "karras"),
            ("T1", T, 1, 5.0, "euler", "trailing"), ("T4", T, 4, 5.0, "euler", "trailing"),
            ("T4-dpm", T, 4, 5.0, "dpmpp_2m", "karras")]
    for key, file in students.items():
        plan += [(f"{key}-{n}", file, n, 0.0, "lcm", "trailing") for n in (1, 2, 4)]
    if "ADD" in students:
        plan.append(("ADD-4-ea", students["ADD"], 4, 0.0, "euler_ancestral", "trailing"))
    rows = []
    for name, model, steps, cfg, sampler, schedule in plan:
        if name in a.skip:
            continue
        r = row(name, model, a.data, out, steps, cfg, sampler, schedule, a.prompts)
        rows.append(r)
        print(f"{name}: identity {r['identity']:.3f} FD-miniCLIP {r['fd_miniclip']:.4f} FD-px8 {r['fd_px8']:.4f} "
              f"sharpness {r['sharpness']:.4f} {r['s_per_image'] * 1000:.0f} ms/image", flush=True)
    if "ADD" in students and "img2img" not in a.skip:
        r = img2img_row(students["ADD"], a.data, a.prompts)
        rows.append(r)
        print(f"{r['row']}: identity {r['identity']:.3f} rms from input {r['rms_16px_from_input']:.4f}", flush=True)
    by = {r["row"]: r for r in rows}
    pairs = [("ADD-1", "T1"), ("ADD-1", "T4"), ("ADD-1", "LCM-1"), ("ADD-1", "T30"), ("ADD-4", "ADD-1"),
             ("ADD-4", "T30"), ("LCM-4", "LCM-1")]
    tests = {f"{x} vs {y}": {"delta_identity": by[x]["identity"] - by[y]["identity"],
                             "mcnemar_p": mcnemar(by[x]["hits"], by[y]["hits"])}
             for x, y in pairs if x in by and y in by}
    for k, v in tests.items():
        print(f"{k}: identity {v['delta_identity']:+.3f} (McNemar p = {v['mcnemar_p']:.3g})")
    (out / "claims.json").write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k != "hits"} for r in rows],
                                                 "paired": tests}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
