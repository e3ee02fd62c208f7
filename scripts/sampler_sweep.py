"""Sampler x schedule sweep on the shipped miniature, on the `stablexl eval` protocol (docs/samplers.md).

Every pair is scored on the same drawn names and seeds: FD-miniCLIP (lower is better), pixel identity and
miniCLIP score; the model is loaded once. Results are appended to a JSON-lines file as they come, so an
interrupted sweep resumes where it stopped (pairs already in the file are skipped).

    .venv/bin/python scripts/sampler_sweep.py --data /work/data/emoji --out docs/samplers/sweep.jsonl \
        --prompts 50 --steps 10 30
    .venv/bin/python scripts/sampler_sweep.py --out docs/samplers/sweep.jsonl --table   # the markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from stablexl.names import SAMPLER_NAMES  # noqa: E402

SCHEDULES = ("karras", "normal", "sgm_uniform", "exponential", "beta", "align_your_steps")
SKIP = {"ddpm", "lcm", "tcd"}  # DDPM needs ~1000 steps; LCM / TCD are for distilled models


def table(rows: list[dict], steps: int) -> str:
    rows = [r for r in rows if r["steps"] == steps]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    cell = {(r["sampler"], r["schedule"]): r for r in rows}
    out = [f"| {steps} steps: FD-miniCLIP / identity | " + " | ".join(schedules) + " |",
           "|---|" + "---|" * len(schedules)]
    for s in samplers:
        vals = []
        for sch in schedules:
            r = cell.get((s, sch))
            vals.append("—" if r is None else f"{r['fd']:.3f} / {100 * r['identity']:.0f}%")
        out.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def _cache_reference_work() -> None:
    """Every pair scores against the same reference set: load the scoring CLIP, open the reference images and
    embed them (and the candidate prompts) once, not once per pair. The numbers are the same; only the
    repeated work goes."""
    import functools

    from stablexl.eval import features, harness

    harness._open = functools.lru_cache(maxsize=None)(harness._open)  # the same Image objects every call
    load = features.CLIPEmbedder.load.__func__
    features.CLIPEmbedder.load = classmethod(functools.lru_cache(maxsize=None)(load))
    memo: dict = {}

    def cached(fn, key_of):
        def wrapper(self, items):
            if len(items) < 500:  # the generated images: always new
                return fn(self, items)
            key = (id(self), key_of(items))
            if key not in memo:
                memo[key] = fn(self, items)
            return memo[key]
        return wrapper

    features.MiniCLIPFeatures.extract = cached(features.MiniCLIPFeatures.extract, lambda xs: tuple(map(id, xs)))
    features.CLIPEmbedder.texts = cached(features.CLIPEmbedder.texts, tuple)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/data/emoji")
    ap.add_argument("--out", default="docs/samplers/sweep.jsonl")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--samplers", nargs="+", default=[s for s in SAMPLER_NAMES if s not in SKIP])
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out and stop")
    a = ap.parse_args()
    out = Path(a.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    if a.table:
        for steps in sorted({r["steps"] for r in done}):
            print(table(done, steps) + "\n")
        return 0
    from stablexl.eval import evaluate
    from stablexl.pipeline import Pipeline

    _cache_reference_work()

    pipe = Pipeline.from_pretrained("mini", device="cpu")
    seen = {(r["sampler"], r["schedule"], r["steps"]) for r in done}
    out.parent.mkdir(parents=True, exist_ok=True)
    for steps in a.steps:
        for sampler in a.samplers:
            for schedule in a.schedules:
                if (sampler, schedule, steps) in seen:
                    continue
                try:
                    res = evaluate(pipe, a.data, "mini", n_prompts=a.prompts, seed=0, steps=steps, cfg=5.0,
                                   sampler=sampler, schedule=schedule, batch=25)
                    g = res["generated"]
                    row = {"sampler": sampler, "schedule": schedule, "steps": steps, "prompts": a.prompts,
                           "fd": g["fd"]["FD-miniCLIP"], "identity": g["pixel_identity"],
                           "clip": g["clip"]["miniCLIP"]["score"], "sharpness": g["sharpness"]}
                except Exception as e:  # noqa: BLE001 - a pair that fails is a result too
                    row = {"sampler": sampler, "schedule": schedule, "steps": steps, "prompts": a.prompts,
                           "error": f"{type(e).__name__}: {e}", "fd": float("nan"), "identity": float("nan")}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
