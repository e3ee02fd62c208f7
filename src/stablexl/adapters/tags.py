"""A1111's LoRA prompt tags, `<lora:NAME:W>` / `<lora:NAME:TE_W:UNET_W>`, and the LoRA folder they name.

Tags (reference/adapters.md §2, A1111 modules/extra_networks.py and extra_networks_lora.py): the regex
`<(\\w+):([^>]+)>`, arguments split on `:`, `k=v` items are named. For `lora` (and the older `lyco`):
one number sets the text-encoder and the UNet strength, a second number is the UNet's (`te` first),
`te=` / `unet=` name them; no number is 1.0. A1111 reads the tags of the first prompt of a batch, the
positive prompt only, and removes them from the text before encoding.

Names resolve only inside the folder: a name is a file's base name without `.safetensors` (A1111 walks
the folder recursively the same way); no path separators, `..` or absolute paths, and a file or symlink
whose real path is outside the folder is refused. Torch-free.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..names import nearest_names

TAG = re.compile(r"<(lora|lyco):([^>]+)>")
EXTENSIONS = (".safetensors",)
PICKLES = (".pt", ".ckpt", ".pth", ".bin", ".pkl")
MAX_STRENGTH = 100.0  # ComfyUI's LoraLoader range is ±100


@dataclass(frozen=True)
class LoraTag:
    name: str
    text_strength: float
    unet_strength: float


class TagError(ValueError):
    pass


def _weight(text: str, tag: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise TagError(f"LoRA tag {tag!r}: {text!r} is not a number (write <lora:NAME:0.8> or "
                       "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>)") from None
    if not math.isfinite(v):
        raise TagError(f"LoRA tag {tag!r}: the weight must be finite")
    return v


def parse_tag(body: str, tag: str) -> LoraTag:
    """The `NAME:args` of one tag (A1111 extra_networks_lora.py activate)."""
    parts = body.split(":")
    positional, named = [], {}
    for p in parts:
        k, eq, v = p.partition("=")
        if eq and k.strip() in ("te", "unet", "dyn"):
            named[k.strip()] = v.strip()
        else:
            positional.append(p.strip())
    if not positional or not positional[0]:
        raise TagError(f"LoRA tag {tag!r} names no LoRA; write <lora:NAME:WEIGHT>")
    if len(positional) > 3 or "dyn" in named:
        raise TagError(f"LoRA tag {tag!r}: a fourth value (DyLoRA's dyn_dim) is not supported; write "
                       "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    te = _weight(positional[1], tag) if len(positional) > 1 else 1.0
    te = _weight(named["te"], tag) if "te" in named else te
    unet = _weight(positional[2], tag) if len(positional) > 2 else te
    unet = _weight(named["unet"], tag) if "unet" in named else unet
    return LoraTag(positional[0], te, unet)


def extract_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(prompt without its LoRA tags, the tags in order). Raises TagError for a malformed tag."""
    tags = [parse_tag(m.group(2), m.group(0)) for m in TAG.finditer(prompt)]
    return TAG.sub("", prompt), tags


def check_name(name: str, kind: str = "LoRA") -> str:
    """A LoRA (or embedding: `kind`) name as a tag or an API gives it: a base name, never a path."""
    if not isinstance(name, str) or not name.strip():
        raise TagError(f"a {kind} name must be a non-empty string")
    name = name.strip()
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or os.path.isabs(name) or \
            re.match(r"^[A-Za-z]:", name):
        raise TagError(f"{kind} name {name!r} is not a plain name: {kind}s are named by their file name inside the "
                       f"{kind} folder, without directories or '..'")
    return name


class LoraFolder:
    """The LoRA files under one folder, by name (recursive; real paths confined to the folder). `kind` names
    what the files are in messages (adapters/embeddings.py reuses the class for textual inversions)."""

    kind = "LoRA"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.kind} folder {self.root}: not a directory")
        self.real_root = self.root.resolve()
        self.files: dict[str, Path] = {}
        self.refused: dict[str, str] = {}  # name -> why it cannot be used
        self.scan()

    def scan(self) -> int:
        files, refused = {}, {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                stem, ext = os.path.splitext(fn)
                ext = ext.lower()
                if ext not in EXTENSIONS + PICKLES:
                    continue
                if ext in PICKLES:
                    refused.setdefault(stem, f"{p} is a pickled file ({ext}), which is refused: pickles can run code; "
                                             "use a .safetensors version")
                    continue
                real = p.resolve()
                if not real.is_relative_to(self.real_root):
                    refused.setdefault(stem, f"{p} resolves outside the {self.kind} folder ({real}); it is refused")
                    continue
                if real.is_file():
                    files.setdefault(stem, p)  # the first of equal names in sorted walk order
        self.files, self.refused = files, {k: v for k, v in refused.items() if k not in files}
        return len(files)

    def find(self, name: str) -> Path:
        """The file of `name`; LookupError naming the folder and the nearest names otherwise."""
        name = check_name(name, self.kind)
        if name not in self.files:
            self.scan()  # files added since the last scan
        if name in self.files:
            p = self.files[name]
            real = p.resolve()  # checked again: the link may have changed since the scan
            if not real.is_relative_to(self.real_root) or not real.is_file():
                raise LookupError(f"{self.kind} {name!r}: {p} no longer resolves to a file inside the {self.kind} "
                                  f"folder {self.root}")
            return p
        if name in self.refused:
            raise LookupError(f"{self.kind} {name!r}: {self.refused[name]}")
        near = nearest_names(name, {k.lower(): k for k in self.files})
        raise LookupError(f"no {self.kind} named {name!r} in {self.root}" + (f"; nearest: {', '.join(near)}" if near
                          else "") + f" ({len(self.files)} {self.kind} file(s) there)")

    def describe(self) -> list[dict]:
        """A1111's `GET /sdapi/v1/loras` records: {name, alias, path, metadata} (extensions-builtin/Lora/
        lora_script.py create_lora_json); metadata is the safetensors header's, JSON values decoded as A1111's
        read_metadata_from_safetensors does. Names are what tags use; aliases are not resolved, so alias = name."""
        return [{"name": n, "alias": n, "path": str(p), "metadata": read_metadata(p)} for n, p in self.files.items()]


def read_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors header ({} when unreadable), without reading any tensor."""
    import json

    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 * 2**20:
                return {}
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for k, v in meta.items():
        if isinstance(v, str) and v[:1] == "{":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


def read_adapter_file(path: str | os.PathLike, error: type[Exception], advice: str):
    """All tensors and the header metadata of a safetensors adapter file (a LoRA, an embedding). A pickle is
    refused, never unpickled: by its extension, or by its zip / pickle magic bytes when the safetensors check
    fails (a renamed .pt). `error` is raised with the reason; `advice` says how to get a safetensors file."""
    from ..io.checkpoint import CheckpointError, SafetensorsSource

    path = Path(path)
    refused = f"{path}: this is a pickled PyTorch file, which can run arbitrary code when loaded, so it is refused. {advice}"
    if path.suffix.lower() in PICKLES:
        raise error(refused)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        src = SafetensorsSource(path)
        return {k: src.get(k) for k in src.keys()}, dict(src.metadata)
    except CheckpointError as e:
        with open(path, "rb") as f:
            head = f.read(2)
        # a zip (torch.save since PyTorch 1.6) or a raw pickle stream (protocol 2-5 starts 0x80, protocol)
        if head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            raise error(refused) from None
        raise error(str(e)) from None
