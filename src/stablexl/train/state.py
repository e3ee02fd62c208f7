"""Crash-safe training checkpoints: everything a run needs to continue bit-for-bit, in one safetensors file.

Tensors: module weights (`model.<part>.*`), EMA shadows (`ema.<part>.*`), optimizer moments
(`optim.<name>.<param index>.<key>`) and RNG states (`rng.*`). JSON metadata: step, data position,
optimizer hyper-parameters, the run's config, and a SHA-256 over every tensor's bytes in key order, so a
damaged file is reported instead of loaded. Written atomically (temporary file, fsync, rename); no pickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io.checkpoint import CheckpointError, SafetensorsSource, atomic_save_safetensors

KIND = "stablexl.train-state"


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(opt: torch.optim.Optimizer, name: str) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            tensors[f"optim.{name}.{idx}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, name: str, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    prefix = f"optim.{name}."
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, key = k[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = v.clone()
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> tuple[dict[str, Tensor], dict]:
    np_state = np.random.get_state()
    return ({"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))},
            {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": json.dumps(random.getstate()[1]), "python_version": random.getstate()[0]})


def restore_rng(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["rng.numpy"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    random.setstate((meta["python_version"], tuple(json.loads(meta["python"])), None))


class StateWriteError(OSError):
    """A training state could not be written (disk full, quota, I/O error); the previous state is untouched."""


def save_state(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write atomically (temporary file, fsync, rename): a failure part-way leaves no partial file, and the
    run's earlier states intact."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    body = {"kind": KIND, "sha256": _digest(tensors), "meta": meta}
    try:
        atomic_save_safetensors(tensors, path, {"stablexl.state": json.dumps(body)})
    except OSError as e:
        path = Path(path)
        earlier = latest_state(path.parent)
        keep = f"the previous state {earlier.name} is intact" if earlier is not None else "no earlier state exists"
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{type(e).__name__}: {e}"
        raise StateWriteError(e.errno, f"cannot write the training state {path.name}: {why}; {keep}. Free space "
                                       f"(each state is about {sum(t.nbytes for t in tensors.values()) / 1e6:.0f} MB) "
                                       "and continue with --resume") from None


def load_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read and verify a training state; any damage raises CheckpointError naming the file."""
    path = Path(path)
    src = SafetensorsSource(path)  # header / truncation checks
    raw = src.metadata.get("stablexl.state")
    if raw is None:
        raise CheckpointError(f"{path}: not a stablexl training state (no 'stablexl.state' metadata); "
                              "pass the run's output folder or a state-*.safetensors file to --resume")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the training-state metadata is not valid JSON; the file is corrupt") from None
    tensors = {k: src.get(k) for k in src.keys()}
    if body.get("kind") != KIND or _digest(tensors) != body.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the training state is corrupt; resume from an earlier "
                              "state-*.safetensors in the same folder")
    return tensors, body["meta"]


def latest_state(folder: str | Path) -> Path | None:
    states = sorted(Path(folder).glob("state-*.safetensors"))
    return states[-1] if states else None
