"""Model hashes for the infotext's "Model hash", as A1111 writes it, cached across runs.

A1111 (`modules/sd_models.py`, `CheckpointInfo.calculate_shorthash`) writes the first 10 hex digits of
the checkpoint file's SHA-256. A diffusers folder has no single file: we hash the UNet's weight files
(sorted by name, as one stream), the part that tells fine-tunes of one architecture apart.

Hashing a 7 GB checkpoint takes seconds, so results are kept in `hashes.json` under the cache directory
($STABLEXL_CACHE_DIR, else $XDG_CACHE_HOME/stablexl, else ~/.cache/stablexl), keyed by the real path
and checked against the file's size and modification time, as A1111's `cache.json` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".sft", ".gguf")
_memo: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    if os.environ.get("STABLEXL_CACHE_DIR"):
        return Path(os.environ["STABLEXL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stablexl"


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files a model's hash covers: the file itself, or a diffusers folder's UNet weight files."""
    path = Path(path)
    if path.is_file():
        return [path]
    unet = path / "unet"
    files = sorted(p for p in unet.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) if unet.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path}: no UNet weight files to hash (expected {unet}/*.safetensors)")
    return files


def sha256_files(files: list[Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """First 10 hex digits of the SHA-256 of the model's weights (A1111 "Model hash")."""
    files = weight_files(path)
    stats = [f.stat() for f in files]
    key = (str(Path(path).resolve()), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats))
    if key in _memo:
        return _memo[key]
    store = cache_dir() / "hashes.json"
    cached = _read(store)
    entry = cached.get(key[0])
    if isinstance(entry, dict) and entry.get("size") == key[1] and entry.get("mtime_ns") == key[2] \
            and isinstance(entry.get("sha256"), str):
        digest = entry["sha256"]
    else:
        digest = sha256_files(files)
        cached[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
        _write(store, {p: e for p, e in cached.items() if os.path.exists(p)})  # forget deleted models
    _memo[key] = digest[:10]
    return digest[:10]


def _read(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged cache: hash again
        return {}


def _write(store: Path, data: dict) -> None:
    """Atomic replace; a cache that cannot be written (read-only home) only costs a re-hash next time."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=".hashes-", suffix=".json")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, store)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def addnet_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a safetensors file's tensor bytes, after the 8-byte length and the JSON header: the hash
    A1111 shows for LoRAs ("Lora hashes", modules/hashes.py addnet_hash_safetensors; kohya train_util.py
    computes the same), so it does not change when only the metadata does. Cached like model_hash."""
    path = Path(path)
    st = path.stat()
    key = ("addnet:" + str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n)
        while block := fh.read(chunk):
            h.update(block)
    _memo[key] = h.hexdigest()
    return _memo[key]
