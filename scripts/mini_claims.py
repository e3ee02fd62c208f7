"""The SDXL paper's conditioning claims, measured on a miniature (docs/mini.md §4). Inference only.

    python scripts/mini_claims.py --model mini --clip mini --data /work/data/emoji --out docs/mini/claims \
        [--parts size crop aspect cfg curve] [--states RUN_KEEP_DIR --vae VAE --clip-file CLIP] [--reuse OLD.json]

  size    original_size 16..64 at fixed seeds: sharpness (mean squared Laplacian) and pixel identity
          (Podell et al. 2023, §2.2 and Fig. 3)
  crop    crop (c, c) for c = 0..16: share of object pixels in the 2-px border (Fig. 5)
  aspect  the training canvases' aspect ratios: the same border share, generated vs the dataset's images
  cfg     a guidance sweep scored by `stablexl eval`: FD-miniCLIP against CLIP score (Fig. 12's trade-off)
  curve   `stablexl eval` identity / retrieval / FD at every kept training state of a UNet run
  table2  the same numbers for named training states (`--runs NAME=STATE ...`): the paper's Table 2 runs
          (only large images / no size conditioning / size conditioning) at one step budget

Writes OUT/claims.json, OUT/*.png grids and plots, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stablexl.eval import harness as H  # noqa: E402
from stablexl.eval import metrics as M  # noqa: E402
from stablexl.pipeline import Pipeline  # noqa: E402
from stablexl.train.grid import image_grid  # noqa: E402
from stablexl.train.plot import plot_series  # noqa: E402

SIZES = (16, 24, 32, 48, 64)
CROPS = (0, 4, 8, 12, 16)
CANVASES = ((64, 64), (48, 80), (80, 48), (56, 72), (72, 56), (40, 96), (96, 40))  # (H, W), as in the dataset
CFGS = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0)
SAMPLE = dict(steps=30, sampler="dpmpp_2m", schedule="karras")


def gen(pipe, prompts, seed, cfg=5.0, batch=50, **kw):
    out = []
    for i in range(0, len(prompts), batch):
        out += pipe(prompts[i:i + batch], cfg=cfg, seed=seed + i, **SAMPLE, **kw).images
    return out


def stats(x: torch.Tensor) -> tuple[float, float]:
    """mean and its standard error"""
    return float(x.mean()), float(x.std() / len(x) ** 0.5)


def size_claim(pipe, ref, names, prompts, out: Path) -> dict:
    rows, cells, base = [], [], None
    for s in SIZES:
        imgs = gen(pipe, prompts, 1000, original_size=(s, s))
        sharp = M.sharpness(M.images_to_tensor(imgs))
        base = sharp if base is None else base
        ident, _ = M.pixel_identity(imgs, names, *ref)
        # same seeds and prompts at every size: the paired difference to the smallest size has a small error
        rows.append({"original_size": s, "sharpness": stats(sharp), "vs_smallest": stats(sharp - base), "identity": ident})
        cells.append(imgs[:8])
    image_grid([im for col in zip(*cells) for im in col], [f"orig {s}" for _ in range(8) for s in SIZES],
               cols=len(SIZES)).save(out / "size.png")
    return {"rows": rows}


def crop_claim(pipe, ref, names, prompts, out: Path) -> dict:
    rows, cells, base = [], [], None
    for c in CROPS:
        imgs = gen(pipe, prompts, 2000, crop=(c, c))
        border = M.border_fraction(M.images_to_tensor(imgs), H.BORDER)
        base = border if base is None else base
        ident, _ = M.pixel_identity(imgs, names, *ref)
        rows.append({"crop": c, "border_fraction": stats(border), "vs_zero": stats(border - base), "identity": ident})
        cells.append(imgs[:8])
    image_grid([im for col in zip(*cells) for im in col], [f"crop {c},{c}" for _ in range(8) for c in CROPS],
               cols=len(CROPS)).save(out / "crop.png")
    return {"rows": rows}


def aspect_claim(pipe, data: Path, prompts, out: Path) -> dict:
    records = [json.loads(ln) for ln in (data / "metadata.jsonl").read_text().splitlines() if ln.strip()]
    rows, cells = [], []
    for h, w in CANVASES:
        imgs = gen(pipe, prompts, 3000, width=w, height=h)
        g = M.border_fraction(M.images_to_tensor(imgs), H.BORDER)
        real = [data / r["file"] for r in records if r["kind"] == "composition"]
        from PIL import Image

        real_imgs = [im for im in (Image.open(p).convert("RGB") for p in real[:4000]) if im.size == (w, h)][:200]
        r = M.border_fraction(M.images_to_tensor(real_imgs), H.BORDER) if real_imgs else None
        rows.append({"height": h, "width": w, "border_fraction": stats(g),
                     "real_compositions": stats(r) if r is not None else None, "real_n": len(real_imgs)})
        cells += imgs[:6]
    image_grid(cells, [f"{w}x{h}" for h, w in CANVASES for _ in range(6)], cols=6).save(out / "aspect.png")
    return {"rows": rows}


def cfg_claim(pipe, data: Path, clip, out: Path, n: int) -> dict:
    rows = []
    for c in CFGS:
        r = H.evaluate(pipe, data, clip, n_prompts=n, cfg=c, **SAMPLE)
        g = r["generated"]
        rows.append({"cfg": c, "fd": g["fd"]["FD-miniCLIP"], "clip_score": g["clip"]["miniCLIP"]["score"],
                     "top1": g["clip"]["miniCLIP"]["top1"], "identity": g["pixel_identity"]})
        print(f"cfg {c}: {rows[-1]}", file=sys.stderr)
    label = "cfg " + " -> ".join(f"{c:g}" for c in CFGS) + " (in order along the line)"
    plot_series({label: [(r["clip_score"], r["fd"]) for r in rows]},
                out / "cfg.png", title="guidance sweep: FD-miniCLIP (y) against miniCLIP score (x)", xlabel="miniCLIP score")
    return {"rows": rows}


def eval_state(state: Path, vae: str, clip_file: str, data: Path, clip, out: Path, n: int) -> dict:
    """`stablexl eval` (200 names, the shipped defaults) of a UNet run's state: its EMA weights."""
    from stablexl.mini.weights import model_from_state

    tmp = out / f"_model-{state.stem}.safetensors"
    model_from_state(state, vae, clip_file, tmp)
    try:
        g = H.evaluate(str(tmp), data, clip, n_prompts=n, cfg=5.0, **SAMPLE)["generated"]
    finally:
        tmp.unlink()
    return {"identity": g["pixel_identity"], "fd": g["fd"]["FD-miniCLIP"], "top1": g["clip"]["miniCLIP"]["top1"],
            "clip_score": g["clip"]["miniCLIP"]["score"], "sharpness": g.get("sharpness")}


def reusable_rows(paths: list[str], n: int) -> dict[str, dict]:
    """Scores of training states measured before (curve / table2 rows of earlier claims.json files, same number
    of prompts), keyed by the state file's resolved path: a state is a fixed file, so its scores do not change."""
    found = {}
    for p in paths:
        for part in json.loads(Path(p).read_text()).values():
            if isinstance(part, dict) and part.get("prompts") == n:
                for row in part.get("rows", []):
                    if "state" in row:
                        found[str(Path(row["state"]).resolve())] = row
    return found


def curve_claim(states: Path, vae: str, clip_file: str, data: Path, clip, out: Path, n: int,
                reuse: dict[str, dict]) -> dict:
    rows = []
    for st in sorted(states.glob("state-*.safetensors")):
        path = str(st.resolve())
        old = reuse.get(path)
        scores = {k: old[k] for k in ("identity", "fd", "top1", "clip_score", "sharpness") if k in old} if old \
            else eval_state(st, vae, clip_file, data, clip, out, n)
        rows.append({"step": int(st.stem.split("-")[1]), "state": path, **scores,
                     **({"reused": True} if old else {})})
        print(f"step {rows[-1]['step']}: {rows[-1]}", file=sys.stderr)
    if rows:
        plot_series({"pixel identity": [(r["step"], r["identity"]) for r in rows],
                     "retrieval top-1 (miniCLIP)": [(r["step"], r["top1"]) for r in rows]},
                    out / "curve.png", title="mini UNet: identity accuracy over training (EMA weights)")
    return {"rows": rows}


def table2_claim(runs: list[str], vae: str, clip_file: str, data: Path, clip, out: Path, n: int) -> dict:
    rows = []
    for spec in runs:
        name, _, state = spec.partition("=")
        if not state:
            raise SystemExit(f"--runs {spec!r}: expected NAME=STATE_FILE")
        rows.append({"run": name, "state": state, **eval_state(Path(state), vae, clip_file, data, clip, out, n)})
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    return {"rows": rows}


def markdown(results: dict) -> str:
    """The docs tables of a claims.json."""
    pm = lambda ms: f"{ms[0]:.3e} ± {ms[1]:.1e}"  # noqa: E731
    pct = lambda ms: f"{100 * ms[0]:.1f} % ± {100 * ms[1]:.1f}"  # noqa: E731
    out = []
    paired = (("size", "original size (px)", "sharpness (mean Laplacian², ± s.e.)", "paired change vs 16 px",
               lambda r: str(r["original_size"]), "sharpness", "vs_smallest", pm),
              ("crop", "crop (top, left)", "object pixels in the 2-px border (± s.e.)", "paired change vs (0, 0)",
               lambda r: f"({r['crop']}, {r['crop']})", "border_fraction", "vs_zero", pct))
    for part, h_key, h_val, h_diff, key, val, diff, fmt in paired:  # one setting per row, paired at fixed seeds
        if part in results:
            out += [f"| {h_key} | {h_val} | {h_diff} | pixel identity |", "|---|---|---|---|"]
            out += [f"| {key(r)} | {fmt(r[val])} | {fmt(r[diff])} | {100 * r['identity']:.1f} % |"
                    for r in results[part]["rows"]]
            out.append("")
    if "aspect" in results:
        out += ["| size (W×H) | generated: object pixels in border | dataset compositions of that canvas (n) |",
                "|---|---|---|"]
        out += [f"| {r['width']}×{r['height']} | {pct(r['border_fraction'])} | "
                f"{pct(r['real_compositions']) if r['real_compositions'] else '—'} ({r['real_n']}) |" for r in results["aspect"]["rows"]]
        out.append("")
    for part in ("cfg", "curve", "table2"):
        if part in results:
            key = {"cfg": "cfg", "curve": "step", "table2": "run"}[part]
            sharp = part == "table2"  # whether to show the sharpness column
            out += [f"| {key} | FD-miniCLIP | miniCLIP score | retrieval top-1 | pixel identity |"
                    + (" sharpness |" if sharp else ""), "|---|---|---|---|---|" + ("---|" if sharp else "")]
            out += [f"| {r[key]} | {r['fd']:.4f} | {r['clip_score']:.2f} | {100 * r['top1']:.1f} % | {100 * r['identity']:.1f} % |"
                    + (f" {r['sharpness']:.4f} |" if sharp else "") for r in results[part]["rows"]]
            out.append("")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini")
    p.add_argument("--clip", default="mini", help="CLIP for eval: clip.safetensors or 'mini'")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", nargs="+", default=["size", "crop", "aspect", "cfg"])
    p.add_argument("--prompts", type=int, default=100, help="emoji names per setting (size/crop/aspect)")
    p.add_argument("--eval-prompts", type=int, default=200, help="names per eval (cfg/curve)")
    p.add_argument("--states", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--clip-file", default=None)
    p.add_argument("--runs", nargs="+", default=[], help="table2: NAME=STATE_FILE of each run")
    p.add_argument("--reuse", nargs="+", default=[],
                   help="curve: earlier claims.json files whose rows (with a 'state') are not measured again")
    p.add_argument("--markdown", action="store_true", help="print OUT/claims.json as the docs tables and stop")
    a = p.parse_args()
    out, data = Path(a.out), Path(a.data)
    if a.markdown:
        print(markdown(json.loads((out / "claims.json").read_text())))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "claims.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    ref_ = H.read_emoji_reference(data, "twemoji")
    names = H.pick_names(ref_, a.prompts, seed=1)
    prompts = [H.emoji_prompt(n, "twemoji") for n in names]
    ref_names = sorted(ref_.images)
    ref = ([H._open(ref_.images[n]) for n in ref_names], ref_names, H.PIXEL_SIZE)
    pipe = Pipeline.from_pretrained(a.model) if set(a.parts) - {"curve", "table2"} else None
    for part in a.parts:
        t0 = time.perf_counter()
        if part == "size":
            results[part] = size_claim(pipe, ref, names, prompts, out)
        elif part == "crop":
            results[part] = crop_claim(pipe, ref, names, prompts, out)
        elif part == "aspect":
            results[part] = aspect_claim(pipe, data, prompts, out)
        elif part == "cfg":
            results[part] = cfg_claim(pipe, data, a.clip, out, a.eval_prompts)
        elif part == "curve":
            results[part] = curve_claim(Path(a.states), a.vae, a.clip_file, data, a.clip, out, a.eval_prompts,
                                        reusable_rows(a.reuse, a.eval_prompts))
        elif part == "table2":
            results[part] = table2_claim(a.runs, a.vae, a.clip_file, data, a.clip, out, a.eval_prompts)
        else:
            p.error(f"unknown part {part!r}")
        results[part]["seconds"] = round(time.perf_counter() - t0, 1)
        results[part]["prompts"] = a.eval_prompts if part in ("cfg", "curve", "table2") else a.prompts
        res_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"## {part}\n" + "\n".join(json.dumps(r) for r in results[part]["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
