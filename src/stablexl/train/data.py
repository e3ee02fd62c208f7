"""Training data: records, SDXL aspect buckets, micro-conditions, and a deterministic batch order.

- Buckets (SDXL paper §2.3, App. I): pixel count as close to target² as possible, sides multiples of
  `step` (64 at 1024 px; 8 for the 64-px miniature). Every batch comes from one bucket, and the bucket
  is the `target_size` condition.
- Micro-conditions (paper §2.2; reference/training.md §1.4): `original_size` is recorded before any
  resizing (or taken from the record when the stored image was itself upscaled from a smaller original),
  the crop (top, left) after resizing the image to cover its bucket. A horizontal flip mirrors the crop:
  left' = resized_w − bucket_w − left (kohya train_util.py:1689).
- Order: batch k of a run is a pure function of (seed, k), so a resumed or multi-process run sees the
  same global batches; under DDP each rank takes its slice of the global batch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# SDXL App. I bucket list as (H, W) (reference/training.md §1.5): the 40 training buckets at 1024².
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


def make_buckets(target: int, step: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(H, W) buckets with sides multiples of `step`, area ≤ target² and as close to it as the step allows,
    aspect ratio within [1/max_ratio, max_ratio]; symmetric, sorted by H/W."""
    if target % step:
        raise ValueError(f"bucket target {target} must be a multiple of the step {step}")
    area = target * target
    out = set()
    h = step
    while h <= target * math.sqrt(max_ratio) + step:
        w = (area // h) // step * step  # the widest side that keeps the area ≤ target²
        if w >= step and 1 / max_ratio <= h / w <= max_ratio:
            out.add((h, w))
            out.add((w, h))
        h += step
    return sorted(out, key=lambda b: b[0] / b[1])


def nearest_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to h/w in log space (ties: larger area)."""
    r = math.log(h / w)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


# --------------------------------------------------------------------------------------------------
# Records: an image, its caption, and what we know about its origin
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    path: str
    caption: str
    size: tuple[int, int]  # (H, W) of the stored image
    original_size: tuple[int, int] | None = None  # (H, W) before the stored image was upscaled, if it was
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class ScanReport:
    records: list[Record]
    skipped: list[tuple[str, str]]  # (path, reason)


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def scan_dataset(root: str | os.PathLike, *, manifest: str | None = None) -> ScanReport:
    """Read a dataset folder: `metadata.jsonl` (or the given manifest: one JSON object per line with
    `file`, `caption`, optional `original_size` [h, w]) or, without one, images with same-name `.txt`
    captions (the kohya convention). Unreadable images are skipped with a warning and counted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; build one with `stablexl data emoji DIR` "
                                "or point --data at a folder of images with .txt captions or a metadata.jsonl")
    mpath = Path(manifest) if manifest else root / "metadata.jsonl"
    entries: list[tuple[Path, str, tuple[int, int] | None, dict]] = []
    if mpath.is_file():
        for n, line in enumerate(mpath.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                file, caption = obj["file"], obj["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{mpath}:{n}: each line must be a JSON object with 'file' and 'caption' ({e})") from None
            orig = obj.get("original_size")
            extra = {k: v for k, v in obj.items() if k not in ("file", "caption", "original_size")}
            entries.append((root / file, str(caption), tuple(orig) if orig else None, extra))  # type: ignore[arg-type]
    else:
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS:
                txt = p.with_suffix(".txt")
                caption = txt.read_text().strip() if txt.is_file() else ""
                entries.append((p, caption, None, {}))
    if not entries:
        raise ValueError(f"no images found in {root} (expected metadata.jsonl or images with .txt captions)")
    records, skipped = [], []
    for path, caption, orig, extra in entries:
        try:
            size = _image_size(path)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            skipped.append((str(path), f"{type(e).__name__}: {e}"))
            continue
        records.append(Record(str(path), caption, size, orig, extra))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {root}, e.g. {skipped[0][0]}: {skipped[0][1]}",
                      stacklevel=2)
    if not records:
        raise ValueError(f"every image in {root} is unreadable")
    return ScanReport(records, skipped)


# --------------------------------------------------------------------------------------------------
# One sample: resize to cover the bucket, random crop, optional flip, conditions recorded
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    flip_p: float = 0.5
    max_zoom: float = 1.0  # resize to cover the bucket × U[1, max_zoom]: > 1 makes crops cut into objects
    random_crop: bool = True  # else centre crop


@dataclass
class Sample:
    pixels: Tensor  # (3, H, W) in [-1, 1]
    caption: str
    original_size: tuple[int, int]
    crop: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]
    index: int


def sample_rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on (seed, key...), never on process or history."""
    return np.random.default_rng([seed & 0xFFFFFFFF, *[k & 0xFFFFFFFF for k in key]])


def load_sample(record: Record, index: int, bucket: tuple[int, int], aug: Augment, rng: np.random.Generator) -> Sample:
    bh, bw = bucket
    with Image.open(record.path) as im:
        im = im.convert("RGBA")
        if im.getextrema()[3][0] < 255:  # transparency -> white background, as the emoji set uses
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    w, h = im.size
    zoom = 1.0 if aug.max_zoom <= 1 else float(rng.uniform(1.0, aug.max_zoom))
    scale = max(bh / h, bw / w) * zoom
    rh, rw = max(bh, math.ceil(h * scale - 1e-6)), max(bw, math.ceil(w * scale - 1e-6))
    if (rh, rw) != (h, w):
        im = im.resize((rw, rh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    if aug.random_crop:
        top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    im = im.crop((left, top, left + bw, top + bh))
    if aug.flip_p > 0 and rng.random() < aug.flip_p:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - bw - left  # the crop seen from the mirrored image's left edge
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W)
    original = record.original_size or record.size
    return Sample(arr / 127.5 - 1.0, record.caption, (int(original[0]), int(original[1])), (top, left), (bh, bw), index)


# --------------------------------------------------------------------------------------------------
# The batch order: one bucket per batch, a pure function of (seed, step)
# --------------------------------------------------------------------------------------------------


class BucketBatcher:
    """Global batches of record indices. Epoch e shuffles each bucket's records with (seed, e), cuts them
    into full batches (the remainder waits for a later epoch's shuffle), and shuffles the batch order."""

    def __init__(self, records: Sequence[Record], buckets: Sequence[tuple[int, int]], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.bucket_of = [nearest_bucket(r.size[0], r.size[1], buckets) for r in records]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            groups.setdefault(b, []).append(i)
        self.groups = dict(sorted(groups.items()))
        self.batches_per_epoch = sum(len(g) // batch_size for g in self.groups.values())
        if self.batches_per_epoch == 0:
            sizes = ", ".join(f"{h}x{w}: {len(g)}" for (h, w), g in self.groups.items())
            raise ValueError(f"no bucket holds a full batch of {batch_size} images ({sizes}); lower --batch-size")
        self._epoch_cache: tuple[int, list[tuple[tuple[int, int], list[int]]]] | None = None

    def _epoch(self, epoch: int) -> list[tuple[tuple[int, int], list[int]]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = sample_rng(self.seed, 0xB0C, epoch)
            batches = []
            for bucket, idx in self.groups.items():
                perm = [idx[j] for j in rng.permutation(len(idx))]
                for k in range(len(perm) // self.batch_size):
                    batches.append((bucket, perm[k * self.batch_size:(k + 1) * self.batch_size]))
            order = rng.permutation(len(batches))
            self._epoch_cache = (epoch, [batches[j] for j in order])
        return self._epoch_cache[1]

    def batch(self, step: int) -> tuple[int, tuple[int, int], list[int]]:
        """(epoch, bucket, global indices) of optimizer step `step` (0-based)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        bucket, idx = self._epoch(epoch)[pos]
        return epoch, bucket, idx


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank r's contiguous slice of a global batch (the global batch size must divide evenly)."""
    if len(items) % world:
        raise ValueError(f"global batch {len(items)} does not split evenly over {world} processes")
    n = len(items) // world
    return list(items[rank * n:(rank + 1) * n])


@dataclass
class Batch:
    pixels: Tensor  # (B, 3, H, W)
    captions: list[str]
    original_size: Tensor  # (B, 2)
    crop: Tensor  # (B, 2)
    target_size: Tensor  # (B, 2)
    indices: list[int]


class TrainData:
    """Records + batch order + augmentation: `batch(step, rank, world)` gives this rank's part of step's batch."""

    def __init__(self, records: Sequence[Record], buckets: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 augment: Augment = Augment()):
        self.records, self.augment, self.seed = list(records), augment, seed
        self.batcher = BucketBatcher(self.records, buckets, batch_size, seed)
        self.broken: set[int] = set()

    def sample(self, index: int, epoch: int, bucket: tuple[int, int]) -> Sample | None:
        if index in self.broken:
            return None
        try:
            return load_sample(self.records[index], index, bucket, self.augment, sample_rng(self.seed, 0xA06, epoch, index))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            self.broken.add(index)
            warnings.warn(f"skipping unreadable image {self.records[index].path}: {e} "
                          f"({len(self.broken)} skipped so far)", stacklevel=2)
            return None

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        epoch, bucket, idx = self.batcher.batch(step)
        samples = [s for i in shard(idx, rank, world) if (s := self.sample(i, epoch, bucket)) is not None]
        if not samples:
            raise RuntimeError(f"every image of batch {step} is unreadable")
        return collate(samples)


def collate(samples: Sequence[Sample]) -> Batch:
    return Batch(
        pixels=torch.stack([s.pixels for s in samples]),
        captions=[s.caption for s in samples],
        original_size=torch.tensor([s.original_size for s in samples], dtype=torch.float32),
        crop=torch.tensor([s.crop for s in samples], dtype=torch.float32),
        target_size=torch.tensor([s.target_size for s in samples], dtype=torch.float32),
        indices=[s.index for s in samples],
    )
