"""Reading tensors from files safely and loading them strictly into meta-device modules.

- safetensors files are opened memory-mapped; tensors are read one at a time and assigned into
  modules built on the meta device, so no random initialisation is ever materialised.
- Pickled checkpoints (.ckpt/.pt/.pth/.bin) can run arbitrary code when unpickled. They are refused
  unless the caller opts in, and then read only with `torch.load(weights_only=True)`.
- Loading is strict: every parameter filled, every foreign tensor consumed (or named as a known
  non-weight buffer), every shape checked. Problems are collected and reported together.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .keymaps import Rule, foreign_shape, ignorable, to_ours

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what is wrong and how to fix it."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


# --------------------------------------------------------------------------------------------------
# Tensor sources
# --------------------------------------------------------------------------------------------------


class TensorSource:
    """A read-only mapping of names to tensors, read lazily."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self._keyset

    @property
    def _keyset(self) -> set[str]:
        if not hasattr(self, "_ks"):
            self._ks = set(self.keys())
        return self._ks


class SafetensorsSource(TensorSource):
    """One or more safetensors files (shards) read through safetensors' memory map."""

    def __init__(self, paths: Path | list[Path]):
        self.files = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
        self.path = self.files[0]
        self._handles = []
        self._where: dict[str, int] = {}
        self.metadata = {}
        for i, p in enumerate(self.files):
            if not p.is_file():
                raise CheckpointError(f"{p}: no such file")
            check_safetensors_header(p)
            try:
                h = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{p}: not a readable safetensors file ({e}); the file is corrupt or truncated, "
                                      "download or export it again") from None
            self._handles.append(h)
            self.metadata.update(h.metadata() or {})
            for k in h.keys():
                self._where[k] = i

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handles[self._where[key]].get_slice(key).get_dtype()

    def get(self, key: str) -> Tensor:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.files[self._where[key]]}: cannot read tensor {key!r} ({e}); "
                                  "the file is corrupt, download or export it again") from None


def check_safetensors_header(path: Path) -> None:
    """Validate the header and that the file holds every byte the header promises.

    safetensors' own checks catch most damage; this one makes a truncated download name itself
    ("expected N bytes, found M") instead of surfacing as an opaque error on first access.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file (truncated download?)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit in the file ({size} bytes); this is not a safetensors file "
                "or it is truncated. Download or export it again."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path}: the header describes {8 + n + end} bytes but the file has {size}; it is truncated or has "
            "trailing garbage. Download or export it again."
        )


class PickleSource(TensorSource):
    """A pickled state dict, read with `torch.load(weights_only=True)` (no arbitrary code)."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: could not be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). The file may "
                "be corrupt, or it pickles objects other than tensors, which we will not execute."
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
        self._sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._sd[key].dtype)

    def get(self, key: str) -> Tensor:
        return self._sd[key]


def open_tensor_file(path: str | os.PathLike, allow_pickle: bool = False) -> TensorSource:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: refusing to load a pickled checkpoint ({path.suffix}). Unpickling can execute arbitrary code "
                "hidden in the file. Prefer a .safetensors version of this model; if you trust the file, opt in with "
                "allow_pickle=True (CLI: --allow-pickle), which reads tensors only via torch.load(weights_only=True)."
            )
        return PickleSource(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors "
                              "(or a pickled .ckpt/.pt/.bin with allow_pickle=True)")
    return SafetensorsSource(path)


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadProblems:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def message(self, what: str) -> str:
        lines = [f"{what} does not match the model it was detected as:"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                lines.append(f"  {len(items)} {name}: {shown}")
        lines.append("Is this the right model type? A partial or differently shaped checkpoint cannot be loaded strictly.")
        return "\n".join(lines)


@dataclass
class Plan:
    """The rules that fill one component from one source, under a prefix."""

    module: nn.Module
    rules: list[Rule]
    prefix: str


def check_plans(source: TensorSource, plans: Iterable[Plan], *, allow_ignorable: bool = True) -> list[str]:
    """Shape-check every rule against the source and every source key against the rules.

    Returns the source keys skipped as known non-weight buffers; raises CheckpointError listing every
    missing / unexpected / mis-shaped key otherwise.
    """
    problems = LoadProblems()
    consumed: set[str] = set()
    for plan in plans:
        expected = {k: tuple(v.shape) for k, v in plan.module.state_dict().items()}
        covered = {k for r in plan.rules for k in r.ours}
        for k in sorted(set(expected) - covered):
            problems.missing.append(f"{plan.prefix}<{k}>")
        for rule in plan.rules:
            key = plan.prefix + rule.theirs
            if key not in source:
                problems.missing.append(key)
                continue
            consumed.add(key)
            want = foreign_shape(rule, [expected[k] for k in rule.ours])
            got = source.shape(key)
            if got != want:
                problems.mismatched.append(f"{key} (file {list(got)}, model {list(want)})")
    skipped = []
    for key in source.keys():
        if key in consumed:
            continue
        if allow_ignorable and ignorable(key):
            skipped.append(key)
        else:
            problems.unexpected.append(key)
    if problems:
        raise CheckpointError(problems.message(str(source.path)))
    return skipped


def load_plans(source: TensorSource, plans: Iterable[Plan], dtype: torch.dtype | None, device: str | torch.device = "cpu") -> None:
    """Fill meta-device modules from the source, one tensor at a time (call `check_plans` first)."""
    from ..quant import stored_dtype_keys

    for plan in plans:
        sd: dict[str, Tensor] = {}
        stored = stored_dtype_keys(plan.module)  # int8 weights and their fp32 scales, loaded as they are
        expected = {k: v.dtype for k, v in plan.module.state_dict().items()} if stored else {}
        for rule in plan.rules:
            t = source.get(plan.prefix + rule.theirs)
            for k, v in to_ours(rule, t).items():
                if k in stored:
                    if v.dtype != expected[k]:
                        raise CheckpointError(f"{plan.prefix}{rule.theirs}: expected {expected[k]}, got {v.dtype}")
                    sd[k] = v.to(device=device)  # file-backed where the source maps it (memory.release)
                    continue
                if not torch.is_floating_point(v):
                    raise CheckpointError(f"{plan.prefix}{rule.theirs}: expected floating-point weights, got {v.dtype}")
                v = v.to(device=device, dtype=dtype or v.dtype)
                if v.data_ptr() == t.data_ptr() and rule.op != "copy":
                    v = v.clone()  # a view of a fused tensor: give each parameter its own storage
                sd[k] = v
            del t
        plan.module.load_state_dict(sd, strict=True, assign=True)
        for name, p in plan.module.named_parameters():
            if p.is_meta:  # cannot happen after a strict load; guard against silent meta leftovers
                raise CheckpointError(f"parameter {name} was not filled")


def check_finite(module: nn.Module, what: str) -> None:
    for name, p in module.named_parameters():
        # one reduction: a NaN or inf element makes the sum non-finite, so a finite sum proves the tensor finite;
        # a non-finite sum may also be an overflow of large finite values, so that case gets the exact check
        if not torch.isfinite(p.detach().sum(dtype=torch.float64)) and not torch.isfinite(p).all():
            raise CheckpointError(f"{what}: parameter {name} contains NaN or inf; the checkpoint is corrupt")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def iter_rules_out(module: nn.Module, rules: list[Rule], prefix: str) -> Iterator[tuple[str, Tensor]]:
    from .keymaps import to_theirs

    sd = module.state_dict()
    for rule in rules:
        yield prefix + rule.theirs, to_theirs(rule, [sd[k] for k in rule.ours])
