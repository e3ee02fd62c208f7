"""Text-to-image evaluation of a model on the emoji dataset (`stablexl eval`).

One style of a dataset written by `stablexl data emoji`: `n_prompts` emoji names are drawn with `seed`, each
is prompted as "{name}, {style} style" (the dataset's main caption template) and generated once at 64x64
(image i with seed + i). The generated set is scored against the style's reference images, the canonical
single image of every emoji (the 64x64 art; the margin copies of the same art are left out):

  FD / KID      Fréchet distance and KID of miniCLIP image embeddings, generated vs all reference images
                (plus true FID / KID when a local Inception file is given)
  CLIP          CLIP score of image and own prompt, and prompt retrieval: is the own prompt the top-1 /
                top-5 most similar among the prompts of all the style's names (per text tower, then averaged)
  pixel         pixel identity: is the nearest reference image at 16x16 (L2) the prompted emoji
  image         sharpness (mean squared Laplacian) and the share of object pixels in a 2-pixel border

The same numbers for the reference images of the prompted names ("real") show what a model that reproduced
the dataset would score: the floor of FD at this sample count and the ceiling of the CLIP metrics.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..mini.emoji import ART_SIZE, CAPTION_TEMPLATES
from . import metrics as M
from .features import (
    CLIPEmbedder,
    FeatureExtractor,
    InceptionFeatures,
    MiniCLIPFeatures,
    PixelFeatures,
)

PIXEL_SIZE = 16  # side of the thumbnails compared by pixel identity
BORDER = 2  # pixels of the frame for the object-at-border share


@dataclass
class EmojiReference:
    """One style of an emoji dataset: retrieval candidates and the reference image of each emoji."""

    root: Path
    style: str
    names: list[str]  # names.json[style]: every distinct emoji name of the style
    images: dict[str, Path]  # name -> its canonical single image (ART_SIZE x ART_SIZE canvas)


def read_emoji_reference(data_dir: str | Path, style: str) -> EmojiReference:
    root = Path(data_dir)
    meta, names_file = root / "metadata.jsonl", root / "names.json"
    for f in (meta, names_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; pass a dataset folder written by `stablexl data emoji`")
    by_style = json.loads(names_file.read_text())
    if style not in by_style:
        raise ValueError(f"{names_file}: no style {style!r}; the dataset has {', '.join(by_style) or 'none'}")
    images: dict[str, Path] = {}
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if r["style"] == style and r["kind"] == "single" and r["original_size"] == [ART_SIZE, ART_SIZE]:
                images.setdefault(r["name"], root / r["file"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}:{n}: not an emoji dataset item ({type(e).__name__}: {e})") from None
    names = list(by_style[style])
    images = {k: v for k, v in images.items() if k in set(names)}
    if len(images) < 2:
        raise ValueError(f"{meta}: {len(images)} single {style} images of names in names.json; at least 2 are needed")
    return EmojiReference(root, style, names, images)


def emoji_prompt(name: str, style: str) -> str:
    return CAPTION_TEMPLATES[0][1].format(name=name, style=style)


def pick_names(ref: EmojiReference, n: int, seed: int) -> list[str]:
    """`n` distinct names that have a reference image, drawn with `seed` (independent of file order)."""
    pool = sorted(ref.images)
    if not 2 <= n <= len(pool):
        raise ValueError(f"cannot evaluate {n} prompts: {len(pool)} {ref.style} emoji of {ref.root} have a reference "
                         "image (use --prompts between 2 and that)")
    return random.Random(seed).sample(pool, n)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        img = im.convert("RGB")
    if img.size != (ART_SIZE, ART_SIZE):
        raise ValueError(f"{path}: {img.width}x{img.height}, but a single emoji image is {ART_SIZE}x{ART_SIZE}")
    return img


def generate(pipe, prompts: Sequence[str], *, seed: int, steps: int, cfg: float, sampler: str, schedule: str,
             batch: int, log: Callable[[str], None], decoder: str = "full") -> tuple[list[Image.Image], list[str]]:
    """One image per prompt in batches; image i uses seed + i, so the batch size does not change the noise.
    -> images and their infotexts."""
    images, infos, t0 = [], [], time.perf_counter()
    for start in range(0, len(prompts), batch):
        res = pipe(list(prompts[start:start + batch]), steps=steps, cfg=cfg, seed=seed + start, width=ART_SIZE,
                   height=ART_SIZE, sampler=sampler, schedule=schedule,
                   **({} if decoder == "full" else {"decoder": decoder}))  # a Pipeline-like object may lack it
        images += res.images
        infos += [res.infotext(k) for k in range(len(res.images))]
        log(f"generate: {len(images)}/{len(prompts)} images ({time.perf_counter() - t0:.0f}s)")
    return images, infos


def _kid_name(fd_name: str) -> str:
    return "KID" if fd_name == "FID" else fd_name.replace("FD-", "KID-", 1)


def _alignment(img_emb: Tensor, candidates: list[Tensor], targets: Tensor) -> tuple[dict, Tensor]:
    """CLIP score and retrieval per text tower and averaged -> (metrics, 1-based ranks (N, towers))."""
    per, ranks = [], []
    for cand in candidates:
        r = M.retrieval_ranks(img_emb, cand, targets)
        per.append({"score": M.clip_score(img_emb, cand[targets]), "top1": float((r < 1).double().mean()),
                    "top5": float((r < 5).double().mean())})
        ranks.append(r + 1)
    mean = {k: sum(p[k] for p in per) / len(per) for k in ("score", "top1", "top5")}
    return {**mean, "per_tower": per}, torch.stack(ranks, dim=1)


def evaluate(model, data_dir: str | Path, clip_path: str | Path, *, style: str = "twemoji", n_prompts: int = 200,
             seed: int = 0, steps: int = 30, cfg: float = 5.0, sampler: str = "dpmpp_2m", schedule: str = "karras",
             batch: int = 25, output: str | Path | None = None, inception_path: str | Path | None = None,
             score_clip_path: str | Path | None = None, log: Callable[[str], None] | None = None,
             device: str = "auto", dtype: str = "auto", decoder: str = "full", tiny_decoder: str | None = None,
             quantize: str | None = None, quantize_text: bool = False) -> dict:
    """Generate one image per drawn emoji name and score it (see the module docstring).

    `model`: anything `Pipeline.from_pretrained` reads (loaded on `device` in `dtype`), or a Pipeline (or an
    object called like one);
    `clip_path`: the clip.safetensors of `stablexl train clip`; `score_clip_path`: an optional second CLIP
    (component or local transformers folder) for CLIP score and retrieval; `inception_path`: the TorchScript
    FID Inception, for true FID. `decoder` "tiny" decodes with the pipeline's tiny decoder (`tiny_decoder`: which
    one to load, default the model's own): the same seeds and latents as "full", so the two runs pair up.
    With `output`, writes the images, contact_sheet.png and results.json there.
    Returns the content of results.json."""
    from ..pipeline import Pipeline

    log = log or (lambda s: None)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    t_start = time.perf_counter()
    ref = read_emoji_reference(data_dir, style)
    names = pick_names(ref, n_prompts, seed)
    prompts = [emoji_prompt(n, style) for n in names]
    # everything that reads a file loads before the (slow) generation, so a bad path fails at once
    clip = CLIPEmbedder.load(clip_path)
    embedders = [clip]
    if score_clip_path:
        embedders.append(CLIPEmbedder.load(score_clip_path))
        if embedders[1].label == clip.label:  # two components are both "miniCLIP"
            embedders[1].label = str(score_clip_path)
    extractors: list[FeatureExtractor] = [MiniCLIPFeatures(clip), PixelFeatures()]
    if inception_path:
        extractors.append(InceptionFeatures(inception_path))
    ref_names = sorted(ref.images)
    ref_imgs = [_open(ref.images[n]) for n in ref_names]
    by_name = isinstance(model, (str, os.PathLike))
    pipe = (Pipeline.from_pretrained(model, device=device, dtype=dtype, tiny_decoder=tiny_decoder, quantize=quantize,
                                     quantize_text=quantize_text) if by_name else model)

    generated, infos = generate(pipe, prompts, seed=seed, steps=steps, cfg=cfg, sampler=sampler, schedule=schedule,
                                batch=batch, log=log, decoder=decoder)
    t_gen = time.perf_counter() - t_start
    log("scoring")
    ref_pos = {n: i for i, n in enumerate(ref_names)}
    subset = torch.tensor([ref_pos[n] for n in names])  # the prompted names' reference images
    real = [ref_imgs[i] for i in subset.tolist()]
    gen_m: dict = {"fd": {}, "kid": {}, "clip": {}}
    real_m: dict = {"fd": {}, "kid": {}, "clip": {}}
    features = {}
    for ex in extractors:
        f_ref, f_gen = ex.extract(ref_imgs), ex.extract(generated)
        features[ex.name] = f_ref, f_gen
        gen_m["fd"][ex.name] = M.frechet_distance(f_gen, f_ref)
        real_m["fd"][ex.name] = M.frechet_distance(f_ref[subset], f_ref)
        gen_m["kid"][_kid_name(ex.name)] = M.kernel_inception_distance(f_gen, f_ref)
        real_m["kid"][_kid_name(ex.name)] = M.kernel_inception_distance(f_ref[subset], f_ref)

    candidates = [emoji_prompt(n, style) for n in ref.names]
    cand_pos = {n: i for i, n in enumerate(ref.names)}
    targets = torch.tensor([cand_pos[n] for n in names])
    ranks = {}
    for emb in embedders:
        cand = emb.texts(candidates)
        if emb is clip:  # its FD features are its image embeddings, normalised (cosine does not care)
            f_ref, e_gen = features[extractors[0].name]
            e_real = f_ref[subset]
        else:
            e_real, e_gen = emb.images(real), emb.images(generated)
        gen_m["clip"][emb.label], ranks[emb.label] = _alignment(e_gen, cand, targets)
        real_m["clip"][emb.label], _ = _alignment(e_real, cand, targets)

    gen_m["pixel_identity"], nearest = M.pixel_identity(generated, names, ref_imgs, ref_names, PIXEL_SIZE)
    real_m["pixel_identity"] = None  # the reference set holds these very images
    g, r = M.images_to_tensor(generated), M.images_to_tensor(real)
    sharp_g, sharp_r = M.sharpness(g), M.sharpness(r)
    border_g, border_r = M.border_fraction(g, BORDER), M.border_fraction(r, BORDER)
    gen_m.update(sharpness=float(sharp_g.mean()), border_fraction=float(border_g.mean()))
    real_m.update(sharpness=float(sharp_r.mean()), border_fraction=float(border_r.mean()))

    results = {
        "settings": {"model": str(model) if by_name else getattr(pipe, "name", type(pipe).__name__), "data": str(ref.root), "clip": str(clip_path),
                     "score_clip": str(score_clip_path) if score_clip_path else None,
                     "inception": str(inception_path) if inception_path else None, "style": style,
                     "prompts": n_prompts, "seed": seed, "steps": steps, "cfg": cfg, "sampler": sampler,
                     "schedule": schedule, "batch": batch, "size": ART_SIZE, "decoder": decoder,
                     "quantized": dict(getattr(getattr(pipe, "parts", None), "quantized", {}) or {})},
        "dataset": {"candidates": len(ref.names), "reference_images": len(ref_imgs),
                    "chance_top1": 1 / len(ref.names), "chance_top5": min(5, len(ref.names)) / len(ref.names)},
        "generated": gen_m,
        "real": real_m,
        "notes": list(getattr(getattr(pipe, "parts", None), "notes", [])),
        "seconds": {"generate": round(t_gen, 1), "total": round(time.perf_counter() - t_start, 1)},
        "images": [{"file": f"images/{i:04d}.png", "name": n, "prompt": p, "seed": seed + i,
                    "clip_rank": {label: rk[i].tolist() for label, rk in ranks.items()},
                    "pixel_nearest": nearest[i], "sharpness": float(sharp_g[i]), "border_fraction": float(border_g[i])}
                   for i, (n, p) in enumerate(zip(names, prompts))],
    }
    if output is not None:
        write_outputs(Path(output), results, generated, infos, real)
    return results


def write_outputs(out: Path, results: dict, generated: Sequence[Image.Image], infos: Sequence[str],
                  real: Sequence[Image.Image]) -> None:
    """OUT/images/NNNN.png (with generation infotext), OUT/contact_sheet.png (generated | real pairs) and
    OUT/results.json."""
    from ..io.metadata import save_png
    from ..train.grid import image_grid

    (out / "images").mkdir(parents=True, exist_ok=True)
    for item, img, info in zip(results["images"], generated, infos):
        save_png(img, out / item["file"], info)
    cells, captions = [], []
    for item, g, r in zip(results["images"], generated, real):
        cells += [g, r]
        captions += [item["name"], "real"]
    image_grid(cells, captions, cols=min(16, len(cells))).save(out / "contact_sheet.png")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")


def summary_lines(results: dict) -> list[str]:
    """A one-screen table of a results dict: metric, generated, real (the prompted names' dataset images)."""
    s, d, gen, real = results["settings"], results["dataset"], results["generated"], results["real"]
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    num = lambda v: "—" if v is None else f"{v:.4g}"
    rows = []
    for name in gen["fd"]:
        rows.append((f"{name} (lower is better)", num(gen["fd"][name]), num(real["fd"][name])))
        k = _kid_name(name)
        rows.append((f"{k} (lower is better)", num(gen["kid"][k]), num(real["kid"][k])))
    for label, c in gen["clip"].items():
        rc = real["clip"][label]
        rows.append((f"CLIP score, {label}", f"{c['score']:.2f}", f"{rc['score']:.2f}"))
        rows.append((f"retrieval top-1, {label}", pct(c["top1"]), pct(rc["top1"])))
        rows.append((f"retrieval top-5, {label}", pct(c["top5"]), pct(rc["top5"])))
    rows += [(f"pixel identity at {PIXEL_SIZE} px", pct(gen["pixel_identity"]), pct(real["pixel_identity"])),
             ("sharpness (mean Laplacian^2)", num(gen["sharpness"]), num(real["sharpness"])),
             (f"object pixels in {BORDER}-px border", pct(gen["border_fraction"]), pct(real["border_fraction"]))]
    w = max(len(r[0]) for r in rows)
    head = (f"{s['model']}: {s['prompts']} {s['style']} prompts, {s['sampler']}/{s['schedule']} {s['steps']} steps, "
            f"cfg {s['cfg']}, seed {s['seed']} ({results['seconds']['total']:.0f}s)")
    lines = [head, f"{'metric':<{w}}  {'generated':>10}  {'real':>10}"]
    lines += [f"{a:<{w}}  {b:>10}  {c:>10}" for a, b, c in rows]
    lines.append(f"retrieval among {d['candidates']} names (chance {100 * d['chance_top1']:.2g}% / "
                 f"{100 * d['chance_top5']:.2g}%); FD/KID against {d['reference_images']} reference images; "
                 "real = the prompted names' dataset images")
    lines += results["notes"]
    return lines
