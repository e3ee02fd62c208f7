"""Emoji text-to-image dataset for the miniature SDXL (~64 px): `stablexl data emoji DIR`.

Sources are the npm packages of iamcal's emoji-data with the 64-px art of two sets:
`emoji-datasource-twitter` (Twemoji, CC BY 4.0) and `emoji-datasource-google` (Noto Emoji,
Apache-2.0). Each tarball is fetched once with `npm pack` into a cache directory, checked against the
sha512/sha256 recorded below, and read in memory (nothing is unpacked to disk). The layout inside is
`package/emoji.json` + `package/img/<set>/64/<image>.png` (RGBA or palette PNGs, 64x64).

Output (the training loader reads exactly this):
  DIR/images/000000.png ...   RGB PNGs, art alpha-composited on white
  DIR/metadata.jsonl          one item per line: file, caption, name, style, unified, category, kind,
                              original_size [h, w], bbox [[top, left, bottom, right], ...]
  DIR/names.json              {style: [distinct emoji names]}, for prompt-retrieval evaluation
  DIR/README.md, DIR/ATTRIBUTION.md, DIR/LICENSE-*.txt, DIR/contact_sheet.png

Kinds of item, all drawn from random.Random streams keyed by (seed, style, purpose), so a build is a
pure function of its options:
  single       the 64-px art on a 64x64 white canvas; plus, for `margin_share` of the emoji, a copy at a
               random offset on a 72/80-px canvas, so random 64-px crops sometimes cut the object
  upscaled     for `upscaled_share` of the emoji: downscaled to s x s (s in [16, 48]) and upscaled back
               to 64x64 with bicubic, blurry on purpose; original_size = [s, s] (SDXL size conditioning)
  composition  one or two emoji, scaled to fit and not overlapping, on a multi-aspect canvas (sides
               multiples of 8, area ~64^2); the caption names them left to right or top to bottom

Boxes are measured, not predicted: `bbox` is the tight box, end-exclusive like a slice
(`img[top:bottom, left:right]`), of the pixels with any channel < 255 that belong to each object, so
the union of the boxes covers exactly the non-white pixels of the stored image.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ==================================================================================================
# Sources
# ==================================================================================================


@dataclass(frozen=True)
class EmojiPackage:
    """One npm package of emoji-data art, pinned by version and checksums."""

    style: str  # our name for the art style, used in captions: "twemoji", "noto"
    npm_name: str
    version: str
    img_set: str  # folder under package/img/: "twitter", "google"
    sha512: str  # npm's `dist.integrity`: "sha512-" + base64 digest
    sha256: str  # hex digest of the same tarball

    @property
    def spec(self) -> str:
        return f"{self.npm_name}@{self.version}"

    @property
    def filename(self) -> str:  # what `npm pack` writes
        return f"{self.npm_name}-{self.version}.tgz"

    @property
    def url(self) -> str:
        return f"https://registry.npmjs.org/{self.npm_name}/-/{self.filename}"


# Recorded from `npm view <spec> dist.integrity` and `sha256sum` of the packed tarballs.
PACKAGES: dict[str, EmojiPackage] = {
    "twemoji": EmojiPackage(
        style="twemoji", npm_name="emoji-datasource-twitter", version="16.0.0", img_set="twitter",
        sha512="sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        sha256="f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    ),
    "noto": EmojiPackage(
        style="noto", npm_name="emoji-datasource-google", version="16.0.0", img_set="google",
        sha512="sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        sha256="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    ),
}

ART_SIZE = 64  # the art we read, and the side of single/upscaled items
MARGIN_SIDES = (72, 80)  # canvas sides of the margin variant of single items
UPSCALED_SIZES = (16, 48)  # inclusive range of the small side s of upscaled items
# (h, w) of composition canvases: sides multiples of 8, areas within 7% of 64^2
COMPOSITION_SIZES = ((64, 64), (48, 80), (80, 48), (56, 72), (72, 56), (40, 96), (96, 40))
TWO_OBJECT_SHARE = 0.7  # share of compositions with two emoji (the rest hold one)
COMPOSITION_GAP = 2  # at least this many white pixels between the two objects of a composition
COMPOSITION_SCALE = (0.75, 1.0)  # an object's size, as a share of the largest that fits its cell (no enlarging)
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
              "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}
WHITE = (255, 255, 255)


class PackageError(ValueError):
    """A source package could not be fetched, failed its checksum, or is not in the expected layout."""


def default_cache_dir() -> Path:
    """`$STABLEXL_CACHE/npm` if the variable is set, else `~/.cache/stablexl/npm`."""
    root = os.environ.get("STABLEXL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "stablexl") / "npm"


def file_checksums(path: str | Path) -> tuple[str, str]:
    """(npm-style "sha512-<base64>" integrity, sha256 hex) of a file."""
    h512, h256 = hashlib.sha512(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h512.update(chunk)
            h256.update(chunk)
    return "sha512-" + base64.b64encode(h512.digest()).decode(), h256.hexdigest()


def verify_package(path: Path, pkg: EmojiPackage, what: str) -> None:
    sha512, sha256 = file_checksums(path)
    if sha512 != pkg.sha512 or sha256 != pkg.sha256:
        raise PackageError(
            f"checksum mismatch for {what} {path} ({pkg.spec}): expected {pkg.sha512} / sha256 {pkg.sha256}, "
            f"got {sha512} / sha256 {sha256}. Delete the file to fetch it again; if a fresh download still "
            f"differs, the registry content changed and the recorded checksums must be reviewed.")


def _npm_pack(spec: str, dest: Path) -> Path:
    """Run `npm pack SPEC` into `dest` and return the tarball's path (tests replace this function)."""
    cmd = ["npm", "pack", spec, "--pack-destination", str(dest), "--json", "--silent"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PackageError("npm was not found on PATH: install Node.js/npm, or put the tarball into the cache "
                           "directory yourself (see --cache)") from None
    if proc.returncode != 0:
        raise PackageError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return dest / json.loads(proc.stdout)[0]["filename"]


def fetch_package(pkg: EmojiPackage, cache_dir: str | Path, log: Callable[[str], None] = lambda s: None) -> Path:
    """Path of the verified tarball of `pkg` in `cache_dir`; fetched with npm only when not cached yet."""
    cache_dir = Path(cache_dir)
    path = cache_dir / pkg.filename
    if path.exists():
        verify_package(path, pkg, "cached")
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {pkg.spec} with npm into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        got = _npm_pack(pkg.spec, Path(tmp))
        verify_package(got, pkg, "downloaded")
        os.replace(got, path)  # only a verified file ever takes the cached name
    return path


@dataclass
class PackageContents:
    entries: list[dict]  # emoji.json
    images: dict[str, bytes]  # file name under img/<set>/64/ -> PNG bytes
    licence: str  # the package's own LICENSE (emoji-data's MIT licence)


def read_package(path: str | Path, img_set: str) -> PackageContents:
    """Read emoji.json, LICENSE and the 64-px PNGs of `img_set` from an npm tarball, in memory."""
    prefix = f"package/img/{img_set}/{ART_SIZE}/"
    entries, images, licence = None, {}, ""
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if m.name == "package/emoji.json":
                entries = json.loads(tar.extractfile(m).read())
            elif m.name == "package/LICENSE":
                licence = tar.extractfile(m).read().decode("utf-8", "replace")
            elif m.name.startswith(prefix) and m.name.endswith(".png") and "/" not in m.name[len(prefix):]:
                images[m.name[len(prefix):]] = tar.extractfile(m).read()
    if entries is None:
        raise PackageError(f"{path} has no package/emoji.json: not an emoji-datasource package")
    if not images:
        raise PackageError(f"{path} has no PNGs under {prefix}")
    return PackageContents(entries, images, licence)


# ==================================================================================================
# The emoji list
# ==================================================================================================


@dataclass(frozen=True)
class Emoji:
    name: str  # lower-case, as it appears in captions
    unified: str  # code points, e.g. "1F600" or "1F385-1F3FD"
    category: str
    image: str  # file name under img/<set>/64/
    has_img: dict = field(default_factory=dict, compare=False)  # img_set -> bool, from emoji.json


def _base_name(entry: dict) -> str:
    name = (entry.get("name") or "").strip()
    return (name or entry["short_name"].replace("_", " ")).lower()


def _skin_tone_name(key: str) -> str:
    tones = list(dict.fromkeys(SKIN_TONES.get(k, k.lower()) for k in key.split("-")))  # "1F3FB-1F3FB" -> one
    return ", ".join(tones)


def list_emoji(entries: list[dict], *, skin_tones: bool = False, categories: list[str] | None = None,
               limit: int | None = None) -> list[Emoji]:
    """The emoji of emoji.json in `sort_order`; skin-tone variants follow their base emoji when asked for."""
    known = sorted({e["category"] for e in entries})
    wanted = None
    if categories:
        by_lower = {c.lower(): c for c in known}
        unknown = [c for c in categories if c.lower() not in by_lower]
        if unknown:
            raise ValueError(f"unknown emoji categories {unknown}; known: {known}")
        wanted = {by_lower[c.lower()] for c in categories}
    out = []
    for e in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        if wanted is not None and e["category"] not in wanted:
            continue
        name = _base_name(e)
        flags = {k[len("has_img_"):]: v for k, v in e.items() if k.startswith("has_img_")}
        out.append(Emoji(name, e["unified"], e["category"], e["image"], flags))
        if skin_tones:
            for key, v in (e.get("skin_variations") or {}).items():
                vflags = {k[len("has_img_"):]: x for k, x in v.items() if k.startswith("has_img_")}
                out.append(Emoji(f"{name}: {_skin_tone_name(key)}", v["unified"], e["category"], v["image"], vflags))
    return out[:limit] if limit is not None else out


# ==================================================================================================
# Drawing
# ==================================================================================================


@dataclass
class _Art:
    emoji: Emoji
    white: Image.Image  # RGB, the art composited on white
    box: tuple[int, int, int, int]  # PIL box (left, upper, right, lower) of the art's alpha > 0


def _decode(emoji: Emoji, png: bytes) -> _Art | None:
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    if rgba.size != (ART_SIZE, ART_SIZE):
        raise PackageError(f"{emoji.image} is {rgba.size[0]}x{rgba.size[1]}, expected {ART_SIZE}x{ART_SIZE}")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        return None
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    if not (np.asarray(white) < 255).any():  # only white pixels: nothing to see or to box
        return None
    return _Art(emoji, white, box)


def _nonwhite_box(arr: np.ndarray, rect: tuple[int, int, int, int]) -> list[int] | None:
    """Tight [top, left, bottom, right] (end-exclusive) of the non-white pixels of arr inside rect."""
    top, left, bottom, right = rect
    mask = (arr[top:bottom, left:right] < 255).any(-1)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return [top + int(rows[0]), left + int(cols[0]), top + int(rows[-1]) + 1, left + int(cols[-1]) + 1]


def _place(art: _Art, h: int, w: int, top: int, left: int) -> tuple[Image.Image, list[int]]:
    canvas = Image.new("RGB", (w, h), WHITE)
    canvas.paste(art.white, (left, top))
    return canvas, _nonwhite_box(np.asarray(canvas), (0, 0, h, w))


def _upscaled(art: _Art, s: int) -> tuple[Image.Image, list[int]]:
    small = art.white.resize((s, s), Image.Resampling.LANCZOS)  # antialiased downscale
    img = small.resize((ART_SIZE, ART_SIZE), Image.Resampling.BICUBIC)
    return img, _nonwhite_box(np.asarray(img), (0, 0, ART_SIZE, ART_SIZE))


def _composition(arts: list[_Art], h: int, w: int, rng: random.Random) -> tuple[Image.Image, list[list[int]]] | None:
    """One or two emoji in disjoint cells of an h x w canvas; cells run left to right or top to bottom."""
    g = COMPOSITION_GAP // 2
    if len(arts) == 1:
        cells = [(0, 0, h, w)]
    elif w > h or (w == h and rng.random() < 0.5):
        cells = [(0, 0, h, w // 2 - g), (0, w // 2 + g, h, w)]
    else:
        cells = [(0, 0, h // 2 - g, w), (h // 2 + g, 0, h, w)]
    canvas = Image.new("RGB", (w, h), WHITE)
    rects = []
    for art, (ct, cl, cb, cr) in zip(arts, cells):
        obj = art.white.crop(art.box)
        ow, oh = obj.size
        fit = min((cb - ct) / oh, (cr - cl) / ow, 1.0)  # never enlarge: upscaled items are a kind of their own
        scale = fit * rng.uniform(*COMPOSITION_SCALE)
        size = (max(1, round(ow * scale)), max(1, round(oh * scale)))
        if size != obj.size:
            obj = obj.resize(size, Image.Resampling.LANCZOS)
        top, left = ct + rng.randint(0, cb - ct - size[1]), cl + rng.randint(0, cr - cl - size[0])
        canvas.paste(obj, (left, top))
        rects.append((top, left, top + size[1], left + size[0]))
    arr = np.asarray(canvas)
    boxes = [_nonwhite_box(arr, r) for r in rects]
    return None if any(b is None for b in boxes) else (canvas, boxes)


# ==================================================================================================
# Captions
# ==================================================================================================

# (weight, template): {name} is the emoji name (or "x and y"), {style} the art style
CAPTION_TEMPLATES = ((0.55, "{name}, {style} style"), (0.15, "{name}"), (0.15, "an emoji of {name}, {style} style"),
                     (0.15, "{name} emoji in {style} style"))


def caption(names: list[str], style: str, rng: random.Random) -> str:
    weights, templates = zip(*CAPTION_TEMPLATES)
    return rng.choices(templates, weights)[0].format(name=" and ".join(names), style=style)


# ==================================================================================================
# The dataset
# ==================================================================================================


@dataclass
class DatasetSummary:
    out_dir: Path
    counts: Counter  # (style, kind) -> images
    margin: dict[str, int]  # style -> single items on a margin canvas (counted in "single" too)
    emoji: dict[str, int]  # style -> emoji drawn
    missing: dict[str, int]  # style -> emoji skipped: no PNG in that set
    blank: dict[str, int]  # style -> emoji skipped: no visible pixel on white
    seconds: float
    options: dict

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for style in self.emoji:
            kinds = ", ".join(f"{self.counts[style, k]} {k}" for k in ("single", "upscaled", "composition"))
            out.append(f"{style}: {self.emoji[style]} emoji -> {kinds} ({self.margin[style]} single with margin); "
                       f"skipped {self.missing[style]} without PNG, {self.blank[style]} blank")
        out.append(f"{self.total} images in {self.seconds:.1f}s -> {self.out_dir}")
        return out


def _stream(seed: int, *key) -> random.Random:
    """An independent, reproducible random stream per purpose (string seeds hash with sha512)."""
    return random.Random("/".join(map(str, (seed,) + key)))


def _cycle(items: list, rng: random.Random) -> Iterator:
    while True:  # every item once per shuffled round: compositions cover all emoji evenly
        order = items[:]
        rng.shuffle(order)
        yield from order


def _style_items(arts: list[_Art], style: str, *, seed: int, upscaled_share: float, margin_share: float,
                 compositions: int | None) -> Iterator[tuple[Image.Image, dict]]:
    """(image, metadata without `file`) for every item of one style."""
    rng = _stream(seed, style, "choose")
    n = len(arts)
    margin = set(rng.sample(range(n), round(margin_share * n)))
    upscaled = set(rng.sample(range(n), round(upscaled_share * n)))

    def item(img, emojis, kind, original_size, boxes, r):
        meta = {"caption": caption([e.name for e in emojis], style, r), "name": " and ".join(e.name for e in emojis),
                "style": style, "unified": " ".join(e.unified for e in emojis),
                "category": " / ".join(dict.fromkeys(e.category for e in emojis)), "kind": kind,
                "original_size": list(original_size), "bbox": boxes}
        return img, meta

    for i, art in enumerate(arts):
        r = _stream(seed, style, art.emoji.unified)
        img, box = _place(art, ART_SIZE, ART_SIZE, 0, 0)
        yield item(img, [art.emoji], "single", (ART_SIZE, ART_SIZE), [box], r)
        if i in margin:
            h, w = r.choice(MARGIN_SIDES), r.choice(MARGIN_SIDES)
            img, box = _place(art, h, w, r.randint(0, h - ART_SIZE), r.randint(0, w - ART_SIZE))
            yield item(img, [art.emoji], "single", (h, w), [box], r)
        if i in upscaled:
            s = r.randint(*UPSCALED_SIZES)
            img, box = _upscaled(art, s)
            yield item(img, [art.emoji], "upscaled", (s, s), [box], r)

    pool = _cycle(arts, _stream(seed, style, "composition-order"))
    for k in range(n if compositions is None else compositions):
        r = _stream(seed, style, "composition", k)
        h, w = r.choice(COMPOSITION_SIZES)
        chosen = [next(pool)]
        if n > 1 and r.random() < TWO_OBJECT_SHARE:
            other = next(pool)
            for _ in range(8):  # two different names, or the caption says "x and x"
                if other.emoji.name != chosen[0].emoji.name:
                    break
                other = next(pool)
            chosen.append(other)
        for _ in range(10):
            drawn = _composition(chosen, h, w, r)
            if drawn is not None:
                break
        else:
            continue  # a downscaled object vanished into white ten times: leave this one out
        img, boxes = drawn
        yield item(img, [a.emoji for a in chosen], "composition", (h, w), boxes, r)


def build_dataset(out_dir: str | Path, styles: list[str] | tuple[str, ...] = ("twemoji", "noto"), *,
                  skin_tones: bool = False, upscaled_share: float = 0.25, margin_share: float = 0.25,
                  compositions: int | None = None, seed: int = 0, limit: int | None = None,
                  categories: list[str] | None = None, cache_dir: str | Path | None = None,
                  packages: dict[str, EmojiPackage] | None = None, overwrite: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> DatasetSummary:
    """Build the emoji dataset in `out_dir` (see the module docstring for the format).

    compositions: composition images per style (default: one per emoji drawn). limit: the first N emoji
    (in emoji-data's sort order) per style. packages: style -> EmojiPackage (default PACKAGES).
    """
    packages = PACKAGES if packages is None else packages
    styles = list(dict.fromkeys(styles))
    unknown = [s for s in styles if s not in packages]
    if not styles or unknown:
        raise ValueError(f"unknown emoji styles {unknown}; known: {list(packages)}")
    for label, share in (("upscaled_share", upscaled_share), ("margin_share", margin_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{label} must be within [0, 1], got {share}")
    if compositions is not None and compositions < 0:
        raise ValueError(f"compositions must be >= 0, got {compositions}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    exists = (out_dir / "metadata.jsonl").exists() or images_dir.exists()
    if exists and not overwrite:
        raise ValueError(f"{out_dir} already holds a dataset; pass overwrite=True (CLI: --overwrite) to replace it")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tarballs = {s: fetch_package(packages[s], cache_dir, log) for s in styles}  # fail before touching out_dir
    if exists:
        shutil.rmtree(images_dir, ignore_errors=True)
    options = {"styles": styles, "skin_tones": skin_tones, "upscaled_share": upscaled_share,
               "margin_share": margin_share, "compositions": compositions, "seed": seed, "limit": limit,
               "categories": categories}

    t0 = time.perf_counter()
    images_dir.mkdir(parents=True)
    counts, margin, n_emoji, missing, blank, names, licences = Counter(), Counter(), {}, {}, {}, {}, {}
    index = 0
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as meta_file:
        for style in styles:
            pkg = packages[style]
            contents = read_package(tarballs[style], pkg.img_set)
            licences[style] = contents.licence
            emojis = list_emoji(contents.entries, skin_tones=skin_tones, categories=categories, limit=limit)
            arts, missing[style], blank[style] = [], 0, 0
            for e in emojis:
                png = contents.images.get(e.image) if e.has_img.get(pkg.img_set, True) else None
                art = _decode(e, png) if png is not None else None
                if png is None:
                    missing[style] += 1
                elif art is None:
                    blank[style] += 1
                else:
                    arts.append(art)
            n_emoji[style] = len(arts)
            names[style] = sorted({a.emoji.name for a in arts})
            log(f"{style}: drawing {len(arts)} emoji")
            for img, meta in _style_items(arts, style, seed=seed, upscaled_share=upscaled_share,
                                          margin_share=margin_share, compositions=compositions):
                rel = f"images/{index:06d}.png"
                img.save(out_dir / rel)
                meta_file.write(json.dumps({"file": rel, **meta}, ensure_ascii=False) + "\n")
                counts[style, meta["kind"]] += 1
                margin[style] += meta["kind"] == "single" and meta["original_size"] != [ART_SIZE, ART_SIZE]
                index += 1

    (out_dir / "names.json").write_text(json.dumps(names, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    summary = DatasetSummary(out_dir, counts, margin, n_emoji, missing, blank, time.perf_counter() - t0, options)
    _write_licences(out_dir, [packages[s] for s in styles], licences)
    (out_dir / "README.md").write_text(_readme(summary, [packages[s] for s in styles]), encoding="utf-8")
    contact_sheet(out_dir).save(out_dir / "contact_sheet.png")
    return summary


# ==================================================================================================
# Contact sheet, README, licences
# ==================================================================================================


def contact_sheet(dataset_dir: str | Path, n: int = 64, columns: int = 8, zoom: int = 2, seed: int = 0) -> Image.Image:
    """A grid of `n` items spread over the kinds, each zoomed (nearest) in a grey cell with its boxes in red
    drawn one pixel outside the box, so white backgrounds, whole objects and blur can be checked by eye."""
    dataset_dir = Path(dataset_dir)
    with open(dataset_dir / "metadata.jsonl", encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    rng = random.Random(seed)
    by_kind = {k: [it for it in items if it["kind"] == k] for k in ("single", "upscaled", "composition")}
    quota = {"single": n * 3 // 8, "upscaled": n // 4}
    quota["composition"] = n - quota["single"] - quota["upscaled"]
    picked = []
    for kind, pool in by_kind.items():
        picked += rng.sample(pool, min(len(pool), quota[kind]))
    images = [Image.open(dataset_dir / it["file"]).convert("RGB") for it in picked]
    cell = (max((max(img.size) for img in images), default=ART_SIZE) + 4) * zoom
    rows = max(1, -(-len(picked) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for i, (it, img) in enumerate(zip(picked, images)):
        w, h = img.size
        x0 = (i % columns) * cell + (cell - w * zoom) // 2
        y0 = (i // columns) * cell + (cell - h * zoom) // 2
        sheet.paste(img.resize((w * zoom, h * zoom), Image.Resampling.NEAREST), (x0, y0))
        for top, left, bottom, right in it["bbox"]:
            draw.rectangle((x0 + left * zoom - 1, y0 + top * zoom - 1, x0 + right * zoom, y0 + bottom * zoom),
                           outline=(255, 0, 0))
    return sheet


def _readme(s: DatasetSummary, pkgs: list[EmojiPackage]) -> str:
    rows = "\n".join(f"| {st} | {s.emoji[st]} | {s.counts[st, 'single']} ({s.margin[st]} with margin) | "
                     f"{s.counts[st, 'upscaled']} | "
                     f"{s.counts[st, 'composition']} | {s.missing[st]} | {s.blank[st]} |" for st in s.emoji)
    sources = "\n".join(f"- `{p.spec}` ({p.style}): {p.sha512}, sha256 {p.sha256}" for p in pkgs)
    sizes = ", ".join(f"{h}x{w}" for h, w in COMPOSITION_SIZES)
    return f"""# Emoji text-to-image dataset

Built by `stablexl data emoji` for training the miniature SDXL at ~64 px. {s.total} images.

| style | emoji | single | upscaled | composition | skipped: no PNG | skipped: blank |
|---|---|---|---|---|---|---|
{rows}

## Kinds
- **single**: the 64-px art on a white 64x64 canvas; for a share of the emoji also a copy at a random offset
  on a {MARGIN_SIDES[0]}-{MARGIN_SIDES[-1]} px canvas (random 64-px crops of it sometimes cut the object).
- **upscaled**: downscaled to s x s, s in [{UPSCALED_SIZES[0]}, {UPSCALED_SIZES[1]}], then bicubic back to 64x64
  (blurry); `original_size` is [s, s].
- **composition**: one or two emoji, scaled down to fit without overlapping, on canvases of {sizes} (h x w);
  the caption names them left to right (wide canvases) or top to bottom (tall ones); `name`, `unified` and
  `category` join the objects' values with " and ", " " and " / ".

## Files
- `metadata.jsonl`: one JSON object per image: `file`, `caption`, `name`, `style`, `unified`, `category`, `kind`,
  `original_size` [h, w] (before any upscaling), `bbox` [[top, left, bottom, right], ...] per object.
  Boxes are end-exclusive (`img[top:bottom, left:right]`) and tight around the pixels with any channel < 255;
  together they cover every non-white pixel.
- `names.json`: the distinct emoji names per style. `contact_sheet.png`: a sample, boxes drawn in red.
- `ATTRIBUTION.md`, `LICENSE-*.txt`: the art's licences. Keep them with the data.

## Options
```json
{json.dumps(s.options, indent=1)}
```
Everything is determined by these options (seed {s.options['seed']}). Build time: {s.seconds:.1f}s.

## Sources
{sources}
"""


_TWEMOJI_NOTICE = """\
Twemoji graphics
Copyright 2019 Twitter, Inc (now X Corp.) and other contributors
https://github.com/twitter/twemoji, maintained since 2023 at https://github.com/jdecked/twemoji

The Twemoji graphics are licensed under the Creative Commons Attribution 4.0 International
licence (CC BY 4.0): https://creativecommons.org/licenses/by/4.0/
Full legal code: https://creativecommons.org/licenses/by/4.0/legalcode

You may share and adapt the graphics for any purpose, including commercially, provided you give
appropriate credit, provide a link to the licence, and indicate if changes were made.

Changes made in this dataset: the 64-px PNGs of the emoji-datasource-twitter npm package were
composited onto a white background, some were placed on larger canvases, downscaled and upscaled
again, or scaled down and arranged in pairs on canvases of other aspect ratios.
"""

_NOTO_NOTICE = """\
Noto Emoji images
Copyright Google and the Noto Emoji contributors
https://github.com/googlefonts/noto-emoji

The Noto Emoji image resources are licensed under the Apache License, Version 2.0 (full text below).
The flag images of Noto Emoji come from the region-flags project and are in the public domain.

Changes made in this dataset: the 64-px PNGs of the emoji-datasource-google npm package were
composited onto a white background, some were placed on larger canvases, downscaled and upscaled
again, or scaled down and arranged in pairs on canvases of other aspect ratios.

--------------------------------------------------------------------------------------------------

"""


def _write_licences(out_dir: Path, pkgs: list[EmojiPackage], package_licences: dict[str, str]) -> None:
    styles = {p.style for p in pkgs}
    parts = ["# Attribution\n", "The images of this dataset are derived from these emoji sets:\n"]
    if "twemoji" in styles:
        (out_dir / "LICENSE-twemoji.txt").write_text(_TWEMOJI_NOTICE, encoding="utf-8")
        parts.append("- **Twemoji** (style `twemoji`), Copyright 2019 Twitter, Inc (now X Corp.) and other "
                     "contributors, https://github.com/jdecked/twemoji. Licensed under CC BY 4.0 "
                     "(https://creativecommons.org/licenses/by/4.0/); see `LICENSE-twemoji.txt`. "
                     "Modified: composited on white, rescaled and rearranged.")
    if "noto" in styles:
        (out_dir / "LICENSE-noto.txt").write_text(_NOTO_NOTICE + APACHE_2_0, encoding="utf-8")
        parts.append("- **Noto Emoji** (style `noto`), by Google and contributors, "
                     "https://github.com/googlefonts/noto-emoji. Licensed under the Apache License 2.0; see "
                     "`LICENSE-noto.txt`. Flag images: region-flags, public domain. "
                     "Modified: composited on white, rescaled and rearranged.")
    licence = next((t for t in package_licences.values() if t), "")
    if licence:
        (out_dir / "LICENSE-emoji-data.txt").write_text(licence, encoding="utf-8")
    parts.append("\nNames, categories and code points come from emoji.json of iamcal's emoji-data "
                 "(https://github.com/iamcal/emoji-data), MIT licence"
                 + (", see `LICENSE-emoji-data.txt`." if licence else "."))
    parts.append("Fetched as the npm packages " + ", ".join(f"`{p.spec}`" for p in pkgs) + ".\n")
    (out_dir / "ATTRIBUTION.md").write_text("\n".join(parts), encoding="utf-8")


# The Apache License 2.0, verbatim: section 4(a) asks that recipients of the Noto images get a copy.
APACHE_2_0 = """\

                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION

   1. Definitions.

      "License" shall mean the terms and conditions for use, reproduction,
      and distribution as defined by Sections 1 through 9 of this document.

      "Licensor" shall mean the copyright owner or entity authorized by
      the copyright owner that is granting the License.

      "Legal Entity" shall mean the union of the acting entity and all
      other entities that control, are controlled by, or are under common
      control with that entity. For the purposes of this definition,
      "control" means (i) the power, direct or indirect, to cause the
      direction or management of such entity, whether by contract or
      otherwise, or (ii) ownership of fifty percent (50%) or more of the
      outstanding shares, or (iii) beneficial ownership of such entity.

      "You" (or "Your") shall mean an individual or Legal Entity
      exercising permissions granted by this License.

      "Source" form shall mean the preferred form for making modifications,
      including but not limited to software source code, documentation
      source, and configuration files.

      "Object" form shall mean any form resulting from mechanical
      transformation or translation of a Source form, including but
      not limited to compiled object code, generated documentation,
      and conversions to other media types.

      "Work" shall mean the work of authorship, whether in Source or
      Object form, made available under the License, as indicated by a
      copyright notice that is included in or attached to the work
      (an example is provided in the Appendix below).

      "Derivative Works" shall mean any work, whether in Source or Object
      form, that is based on (or derived from) the Work and for which the
      editorial revisions, annotations, elaborations, or other modifications
      represent, as a whole, an original work of authorship. For the purposes
      of this License, Derivative Works shall not include works that remain
      separable from, or merely link (or bind by name) to the interfaces of,
      the Work and Derivative Works thereof.

      "Contribution" shall mean any work of authorship, including
      the original version of the Work and any modifications or additions
      to that Work or Derivative Works thereof, that is intentionally
      submitted to Licensor for inclusion in the Work by the copyright owner
      or by an individual or Legal Entity authorized to submit on behalf of
      the copyright owner. For the purposes of this definition, "submitted"
      means any form of electronic, verbal, or written communication sent
      to the Licensor or its representatives, including but not limited to
      communication on electronic mailing lists, source code control systems,
      and issue tracking systems that are managed by, or on behalf of, the
      Licensor for the purpose of discussing and improving the Work, but
      excluding communication that is conspicuously marked or otherwise
      designated in writing by the copyright owner as "Not a Contribution."

      "Contributor" shall mean Licensor and any individual or Legal Entity
      on behalf of whom a Contribution has been received by Licensor and
      subsequently incorporated within the Work.

   2. Grant of Copyright License. Subject to the terms and conditions of
      this License, each Contributor hereby grants to You a perpetual,
      worldwide, non-exclusive, no-charge, royalty-free, irrevocable
      copyright license to reproduce, prepare Derivative Works of,
      publicly display, publicly perform, sublicense, and distribute the
      Work and such Derivative Works in Source or Object form.

   3. Grant of Patent License. Subject to the terms and conditions of
      this License, each Contributor hereby grants to You a perpetual,
      worldwide, non-exclusive, no-charge, royalty-free, irrevocable
      (except as stated in this section) patent license to make, have made,
      use, offer to sell, sell, import, and otherwise transfer the Work,
      where such license applies only to those patent claims licensable
      by such Contributor that are necessarily infringed by their
      Contribution(s) alone or by combination of their Contribution(s)
      with the Work to which such Contribution(s) was submitted. If You
      institute patent litigation against any entity (including a
      cross-claim or counterclaim in a lawsuit) alleging that the Work
      or a Contribution incorporated within the Work constitutes direct
      or contributory patent infringement, then any patent licenses
      granted to You under this License for that Work shall terminate
      as of the date such litigation is filed.

   4. Redistribution. You may reproduce and distribute copies of the
      Work or Derivative Works thereof in any medium, with or without
      modifications, and in Source or Object form, provided that You
      meet the following conditions:

      (a) You must give any other recipients of the Work or
          Derivative Works a copy of this License; and

      (b) You must cause any modified files to carry prominent notices
          stating that You changed the files; and

      (c) You must retain, in the Source form of any Derivative Works
          that You distribute, all copyright, patent, trademark, and
          attribution notices from the Source form of the Work,
          excluding those notices that do not pertain to any part of
          the Derivative Works; and

      (d) If the Work includes a "NOTICE" text file as part of its
          distribution, then any Derivative Works that You distribute must
          include a readable copy of the attribution notices contained
          within such NOTICE file, excluding those notices that do not
          pertain to any part of the Derivative Works, in at least one
          of the following places: within a NOTICE text file distributed
          as part of the Derivative Works; within the Source form or
          documentation, if provided along with the Derivative Works; or,
          within a display generated by the Derivative Works, if and
          wherever such third-party notices normally appear. The contents
          of the NOTICE file are for informational purposes only and
          do not modify the License. You may add Your own attribution
          notices within Derivative Works that You distribute, alongside
          or as an addendum to the NOTICE text from the Work, provided
          that such additional attribution notices cannot be construed
          as modifying the License.

      You may add Your own copyright statement to Your modifications and
      may provide additional or different license terms and conditions
      for use, reproduction, or distribution of Your modifications, or
      for any such Derivative Works as a whole, provided Your use,
      reproduction, and distribution of the Work otherwise complies with
      the conditions stated in this License.

   5. Submission of Contributions. Unless You explicitly state otherwise,
      any Contribution intentionally submitted for inclusion in the Work
      by You to the Licensor shall be under the terms and conditions of
      this License, without any additional terms or conditions.
      Notwithstanding the above, nothing herein shall supersede or modify
      the terms of any separate license agreement you may have executed
      with Licensor regarding such Contributions.

   6. Trademarks. This License does not grant permission to use the trade
      names, trademarks, service marks, or product names of the Licensor,
      except as required for reasonable and customary use in describing the
      origin of the Work and reproducing the content of the NOTICE file.

   7. Disclaimer of Warranty. Unless required by applicable law or
      agreed to in writing, Licensor provides the Work (and each
      Contributor provides its Contributions) on an "AS IS" BASIS,
      WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
      implied, including, without limitation, any warranties or conditions
      of TITLE, NON-INFRINGEMENT, MERCHANTABILITY, or FITNESS FOR A
      PARTICULAR PURPOSE. You are solely responsible for determining the
      appropriateness of using or redistributing the Work and assume any
      risks associated with Your exercise of permissions under this License.

   8. Limitation of Liability. In no event and under no legal theory,
      whether in tort (including negligence), contract, or otherwise,
      unless required by applicable law (such as deliberate and grossly
      negligent acts) or agreed to in writing, shall any Contributor be
      liable to You for damages, including any direct, indirect, special,
      incidental, or consequential damages of any character arising as a
      result of this License or out of the use or inability to use the
      Work (including but not limited to damages for loss of goodwill,
      work stoppage, computer failure or malfunction, or any and all
      other commercial damages or losses), even if such Contributor
      has been advised of the possibility of such damages.

   9. Accepting Warranty or Additional Liability. While redistributing
      the Work or Derivative Works thereof, You may choose to offer,
      and charge a fee for, acceptance of support, warranty, indemnity,
      or other liability obligations and/or rights consistent with this
      License. However, in accepting such obligations, You may act only
      on Your own behalf and on Your sole responsibility, not on behalf
      of any other Contributor, and only if You agree to indemnify,
      defend, and hold each Contributor harmless for any liability
      incurred by, or claims asserted against, such Contributor by reason
      of your accepting any such warranty or additional liability.

   END OF TERMS AND CONDITIONS

   APPENDIX: How to apply the Apache License to your work.

      To apply the Apache License to your work, attach the following
      boilerplate notice, with the fields enclosed by brackets "[]"
      replaced with your own identifying information. (Don't include
      the brackets!)  The text should be enclosed in the appropriate
      comment syntax for the file format. We also recommend that a
      file or class name and description of purpose be included on the
      same "printed page" as the copyright notice for easier
      identification within third-party archives.

   Copyright [yyyy] [name of copyright owner]

   Licensed under the Apache License, Version 2.0 (the "License");
   you may not use this file except in compliance with the License.
   You may obtain a copy of the License at

       http://www.apache.org/licenses/LICENSE-2.0

   Unless required by applicable law or agreed to in writing, software
   distributed under the License is distributed on an "AS IS" BASIS,
   WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
   See the License for the specific language governing permissions and
   limitations under the License.
"""
