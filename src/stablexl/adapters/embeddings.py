"""Textual-inversion embeddings: read the files, find them by name in the embeddings folder, and build the table
of extra token ids that the tokenizer and the text encoders use.

Formats (reference/adapters.md §3), safetensors only:
- SDXL: `clip_l` (n, 768) and `clip_g` (n, 1280) (kohya `sdxl_train_textual_inversion.py`; diffusers' advanced
  trainer). CLIP-L reads `clip_l`, bigG reads `clip_g` (A1111 `sd_hijack.py` textual_inversion_key, ComfyUI
  `sdxl_clip.py` embedding_key); the refiner (bigG only) reads `clip_g`.
- SD 1.x / 2.x: one tensor (n, W): kohya's `emb_params`, A1111's `string_to_param.*` (exactly one term, as
  A1111's create_embedding_from_data requires), or any single-key file (diffusers' `{"<token>": tensor}`).
  A1111 writes `string_to_param` into a pickled .pt; pickles are refused (they can run code when loaded).
A file whose widths do not match this model's encoders is *skipped*, as A1111 lists it under "skipped"
(its `expected_shape` check); naming it in a prompt is an error rather than silent text.

Triggers: the file name without extension (A1111: `register_embedding_by_name`, matched on whole words,
case-insensitive) and `embedding:NAME` (ComfyUI `sd1_clip.py` embedding_identifier). Names resolve only inside
the folder (tags.LoraFolder's confinement: no paths, no '..', no symlinks out). An `embedding:NAME` that names no
file is an error that lists the nearest names; a plain word that names no file is just text.

Tokens: each loaded embedding of n vectors gets n ids past the vocabulary (sd.cpp's custom ids); a trigger
becomes those n ids, so it takes n token slots of a 75-token chunk (A1111 counts `vectors` the same way), and
`CLIPTextModel` looks the ids up in the per-encoder `vectors` of the table. The shipped vocabulary is untouched.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..models.tokenizer import AddedTokens
from ..names import nearest_names
from .tags import LoraFolder, TagError, check_name, read_adapter_file

MAX_VECTORS = 75  # one 75-token chunk (prompts.CHUNK_TOKENS); A1111 refuses more in a single chunk as well
# `embedding:NAME` (ComfyUI): NAME runs to the next space, comma, bracket or ':' (ComfyUI splits words on spaces;
# the weight syntax "(embedding:NAME:1.2)" ends it at ':')
EMBEDDING_WORD = re.compile(r"(?<![\w:])embedding:([^\s,()\[\]<>:|]+)")  # a bare "embedding:" is text
EXTENSIONS = (".safetensors", ".pt", ".bin")  # ComfyUI accepts the name with its extension


class EmbeddingError(ValueError):
    """An embedding file that cannot be used with this model; the message says why and the fix."""


class EmbeddingFolder(LoraFolder):
    """The embedding files under one folder, by name (recursive, confined to the folder)."""

    kind = "embedding"


@dataclass
class Embedding:
    """One file as this model reads it: the vectors of each text encoder (n, width), float32."""

    name: str
    path: Path
    vectors: tuple[Tensor, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]


@dataclass(frozen=True)
class EmbeddingTable:
    """What the prompt encoders need: the trigger words with their extra ids, and per text encoder the vectors
    those ids index (row k is id vocab_size + k)."""

    tokens: AddedTokens
    vectors: tuple[Tensor, ...]


# ==================================================================================================
# Files
# ==================================================================================================


def read_embedding_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header metadata of a safetensors embedding; pickles are refused, never unpickled."""
    return read_adapter_file(path, EmbeddingError, "Convert it to .safetensors in a trusted environment (torch.load, "
                             "then safetensors.torch.save_file with its string_to_param tensor as 'emb_params'), or "
                             "download a .safetensors version.")


def file_layout(tensors: dict[str, Tensor]) -> dict[str, Tensor] | Tensor:
    """{'clip_l', 'clip_g'} for an SDXL file, else its one tensor (emb_params / string_to_param.* / single key)."""
    if "clip_l" in tensors or "clip_g" in tensors:
        return {k: tensors[k] for k in ("clip_l", "clip_g") if k in tensors}
    terms = [k for k in tensors if k.startswith("string_to_param.")]
    if terms:
        if len(terms) != 1:
            raise EmbeddingError(f"string_to_param holds {len(terms)} terms ({', '.join(terms)}); an embedding has "
                                 "exactly one")
        return tensors[terms[0]]
    if "emb_params" in tensors:
        return tensors["emb_params"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise EmbeddingError(f"not a textual-inversion file: expected clip_l + clip_g (SDXL), emb_params or "
                         f"string_to_param.* (SD 1.x / 2.x); found {', '.join(sorted(tensors)[:6]) or 'no tensors'}")


def _as_rows(t: Tensor, what: str) -> Tensor:
    if t.ndim == 1:  # a single vector (diffusers' concept files)
        t = t[None]
    if t.ndim != 2 or t.shape[0] < 1:
        raise EmbeddingError(f"{what} has shape {tuple(t.shape)}; expected (vectors, width)")
    if not t.is_floating_point():
        raise EmbeddingError(f"{what} is {t.dtype}, not a float tensor")
    return t


def encoder_keys(config) -> tuple[str | None, ...]:
    """The file key each text encoder of the model reads (None: the file's one tensor)."""
    if config.family == "sdxl-base":
        return ("clip_l", "clip_g")
    if config.family == "sdxl-refiner":
        return ("clip_g",)
    return (None,) * len(config.text_encoders)


def describe_layout(layout) -> tuple[int, int]:
    """(shape, vectors) as A1111 reports them: the summed width of an SDXL file, and its vector count."""
    if isinstance(layout, dict):
        rows = [_as_rows(t, k) for k, t in layout.items()]
        return sum(r.shape[1] for r in rows), rows[-1].shape[0]  # A1111: vectors = clip_g.shape[0]
    r = _as_rows(layout, "the embedding")
    return r.shape[1], r.shape[0]


def _expected(config) -> str:
    widths = [spec.config.width for spec in config.text_encoders]
    keys = encoder_keys(config)
    if keys[0] is None:
        return f"one tensor of width {widths[0]}"
    return " + ".join(f"{k} of width {w}" for k, w in zip(keys, widths))


def embedding_vectors(layout, config) -> tuple[Tensor, ...]:
    """The vectors of each of the model's text encoders; EmbeddingError saying what does not fit."""
    keys = encoder_keys(config)
    widths = [spec.config.width for spec in config.text_encoders]
    if isinstance(layout, dict) and keys[0] is None:
        raise EmbeddingError(f"an SDXL embedding ({' + '.join(layout)}), but {config.name} ({config.family}) needs "
                             f"{_expected(config)}")
    if not isinstance(layout, dict) and keys[0] is not None:
        w = _as_rows(layout, "the embedding").shape[1]
        made = {768: " (an SD 1.x embedding)", 1024: " (an SD 2.x embedding)"}.get(w, "")
        raise EmbeddingError(f"one tensor of width {w}{made}, but {config.name} ({config.family}) needs "
                             f"{_expected(config)}")
    out = []
    for key, width in zip(keys, widths):
        if key is not None and key not in layout:
            raise EmbeddingError(f"has no {key!r} tensor; {config.name} needs {_expected(config)}")
        t = _as_rows(layout[key] if key is not None else layout, key or "the embedding")
        if t.shape[1] != width:
            raise EmbeddingError(f"{key or 'its tensor'} is {t.shape[1]} wide; {config.name} needs {_expected(config)}")
        out.append(t.float())
    counts = {t.shape[0] for t in out}
    if len(counts) != 1:
        raise EmbeddingError(f"its tensors have different vector counts ({', '.join(map(str, sorted(counts)))}); "
                             "clip_l and clip_g must have one row per token each")
    n = counts.pop()
    if n > MAX_VECTORS:
        raise EmbeddingError(f"{n} vectors do not fit in one {MAX_VECTORS}-token chunk")
    if not all(bool(torch.isfinite(t).all()) for t in out):
        raise EmbeddingError("its vectors contain NaN or infinity")
    return tuple(out)


def load_embedding(path: str | os.PathLike, config, name: str | None = None) -> Embedding:
    """One file for one model (its ModelConfig); EmbeddingError naming the file otherwise."""
    path = Path(path)
    tensors, meta = read_embedding_file(path)
    try:
        vectors = embedding_vectors(file_layout(tensors), config)
    except EmbeddingError as e:
        raise EmbeddingError(f"{path}: {e}") from None
    return Embedding(name or path.stem, path, vectors, meta)


# ==================================================================================================
# The folder as one model sees it
# ==================================================================================================


def _record(meta: dict, shape: int | None, vectors: int | None) -> dict:
    """A1111's `GET /sdapi/v1/embeddings` record (modules/api/models.py EmbeddingItem). A1111 reads step and
    checkpoint from its .pt files; ours are safetensors, so they come from the header when a trainer wrote them."""
    def num(v):
        try:
            return int(v)
        except (TypeError, ValueError):
            return None

    return {"step": num(meta.get("step")), "sd_checkpoint": meta.get("sd_checkpoint"),
            "sd_checkpoint_name": meta.get("sd_checkpoint_name"), "shape": shape, "vectors": vectors}


class Embeddings:
    """The embeddings of one folder for one model: the ones that fit (`loaded`), the others with why
    (`skipped`). Files are read again only when their size or time changes (A1111 rescans per generation too)."""

    def __init__(self, folder: EmbeddingFolder | str | os.PathLike, config):
        self.folder = folder if isinstance(folder, EmbeddingFolder) else EmbeddingFolder(folder)
        self.config = config
        vocab = {spec.config.vocab_size for spec in config.text_encoders}
        if len(vocab) != 1:
            raise ValueError(f"{config.name}: text encoders with different vocabularies ({sorted(vocab)})")
        self.vocab_size = vocab.pop()
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, tuple[str, dict]] = {}  # name -> (why, A1111 record)
        self._seen: dict[Path, tuple[tuple, Embedding | tuple[str, dict]]] = {}
        self._table: EmbeddingTable | None = None
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            self.folder.scan()
            loaded, skipped, seen = {}, {}, {}
            for name, path in self.folder.files.items():
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = (st.st_size, st.st_mtime_ns)
                old = self._seen.get(path)
                item = old[1] if old is not None and old[0] == key else self._read(name, path)
                seen[path] = (key, item)
                if isinstance(item, Embedding):
                    loaded[name] = item
                else:
                    skipped[name] = item
            for name, why in self.folder.refused.items():
                skipped.setdefault(name, (why, _record({}, None, None)))
            changed = [e.path for e in loaded.values()] != [e.path for e in self.loaded.values()] or \
                any(self.loaded.get(n) is not e for n, e in loaded.items())
            self.loaded, self.skipped, self._seen = loaded, skipped, seen
            if changed or self._table is None:
                self._table = self._build_table()

    def _read(self, name: str, path: Path) -> Embedding | tuple[str, dict]:
        try:
            tensors, meta = read_embedding_file(path)
            layout = file_layout(tensors)
            shape, count = describe_layout(layout)
        except EmbeddingError as e:
            return (str(e), _record({}, None, None))
        try:
            return Embedding(name, path, embedding_vectors(layout, self.config), meta)
        except EmbeddingError as e:
            return (f"{path}: {e}", _record(meta, shape, count))

    def _build_table(self) -> EmbeddingTable:
        words: dict[str, tuple[int, ...]] = {}
        rows: list[list[Tensor]] = [[] for _ in self.config.text_encoders]
        next_id = self.vocab_size
        for name, emb in sorted(self.loaded.items()):
            ids = tuple(range(next_id, next_id + emb.count))
            next_id += emb.count
            for trigger in (name, f"embedding:{name}", *(f"embedding:{name}{ext}" for ext in EXTENSIONS)):
                words[trigger] = ids
            for i, v in enumerate(emb.vectors):
                rows[i].append(v)
        vectors = tuple(torch.cat(r) if r else torch.zeros(0, spec.config.width)
                        for r, spec in zip(rows, self.config.text_encoders))
        return EmbeddingTable(AddedTokens(words), vectors)

    def table(self) -> EmbeddingTable | None:
        """The current table (None when no embedding fits), after a rescan."""
        self.refresh()
        return self._table if self.loaded else None

    def check(self, texts: Iterable[str]) -> None:
        """Every `embedding:NAME` names a loaded embedding. Raises LookupError (an unknown name, with the nearest
        ones) or EmbeddingError (`embedding:NAME` of a file that does not fit this model). A plain word that is
        the name of a skipped file stays text, as in A1111: an SD 1.5 negative prompt with "easynegative"
        copied to an SDXL model still runs (the file is listed under "skipped" in /sdapi/v1/embeddings)."""
        self.refresh()
        lower = {k.lower(): k for k in self.loaded}
        skipped = {k.lower(): k for k in self.skipped}
        for text in texts:
            for m in EMBEDDING_WORD.finditer(text):
                raw = m.group(1)
                for ext in EXTENSIONS:
                    if raw.lower().endswith(ext) and raw[:-len(ext)].lower() in lower.keys() | skipped.keys():
                        raw = raw[:-len(ext)]
                if raw.lower() in lower:
                    continue
                if raw.lower() in skipped:
                    name = skipped[raw.lower()]
                    raise EmbeddingError(f"embedding {name!r} cannot be used with {self.config.name}: "
                                         f"{self.skipped[name][0]}")
                try:
                    check_name(raw, "embedding")
                except TagError as e:
                    raise LookupError(str(e)) from None
                near = nearest_names(raw, lower)
                raise LookupError(f"no embedding named {raw!r} in {self.folder.root}"
                                  + (f"; nearest: {', '.join(near)}" if near else "")
                                  + f" ({len(self.loaded)} usable embedding file(s) there)")

    def describe(self) -> dict:
        """A1111's `GET /sdapi/v1/embeddings`: {"loaded": {name: record}, "skipped": {name: record}}."""
        self.refresh()
        loaded = {}
        for name, e in self.loaded.items():
            loaded[name] = _record(e.metadata, sum(v.shape[1] for v in e.vectors), e.count)
        return {"loaded": loaded, "skipped": {n: rec for n, (_, rec) in self.skipped.items()}}
