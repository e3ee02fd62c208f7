"""Where a pipeline runs and in what precision: chosen once per pipeline, never by the stored dtype.

- Device `auto`: CUDA, then MPS, then the CPU (what diffusers' users set by hand and ComfyUI picks), unless
  $STABLEXL_DEVICE names one (as the test suite's `--device` does). $STABLEXL_DTYPE does the same for dtype.
- Compute dtype `auto`: fp16 on CUDA and MPS (what diffusers' SDXL examples and ComfyUI use), fp32 on the
  CPU whatever the file stores. bf16 on the CPU only when asked: on our AVX-512 machines oneDNN's bf16 was
  measured no faster than fp32, with or without AMX listed (../shared/reference/performance.md §2), so
  `auto` never picks it there.
- The SDXL VAE overflows in fp16 (diffusers `force_upcast`): under fp16 compute it decodes in fp32 unless
  the VAE says it is fp16-safe (e.g. madebyollin's sdxl-vae-fp16-fix, `force_upcast: false`).
- Offload (GPU memory modes, as diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload`):
  `model` keeps each component on the accelerator only for its phase; `sequential` streams each layer's
  weights to it for that layer's call.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .io.checkpoint import DTYPES

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
OFFLOAD_MODES = ("none", "model", "sequential")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' (or a torch.device) -> a device that exists here."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto" and os.environ.get("STABLEXL_DEVICE", "auto").strip().lower() not in ("", "auto"):
        return resolve_device(os.environ["STABLEXL_DEVICE"])  # the environment's choice (the test suite's --device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available in this PyTorch build or on this machine "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        n = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= n:
            raise ValueError(f"device {name!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}")
    return dev


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' (or None) | 'fp32' | 'fp16' | 'bf16' -> the compute dtype on `device` (see the module doc)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported compute dtype {name}; use fp32, fp16 or bf16")
        return name
    if name is None or name == "auto":
        env = os.environ.get("STABLEXL_DTYPE", "auto").strip().lower()
        if env not in ("", "auto"):
            return resolve_dtype(env, device)
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16") from None


def vae_dtype(compute: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The dtype the VAE runs in: fp32 under fp16 compute when the VAE overflows in fp16 (force_upcast)."""
    return torch.float32 if compute == torch.float16 and force_upcast else compute


def check_offload(mode: str | None) -> str:
    mode = "none" if mode is None else mode
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; choose one of: {', '.join(OFFLOAD_MODES)}")
    return mode


def stream_weights(module: nn.Module, device: torch.device, home: torch.device = torch.device("cpu")) -> int:
    """Sequential offload: every submodule that holds weights of its own moves them to `device` just before
    its forward and back to `home` right after, so at most one layer's weights are on the device.
    Returns the number of hooked submodules."""

    def tensors(m: nn.Module):
        yield from m._parameters.items()
        yield from m._buffers.items()

    def move(m: nn.Module, to: torch.device) -> None:
        for key, t in list(tensors(m)):
            if t is not None and t.device != to:
                if key in m._parameters:
                    t.data = t.data.to(to, non_blocking=True)
                else:
                    m._buffers[key] = t.to(to, non_blocking=True)

    hooked = 0
    for m in module.modules():
        if not any(t is not None for _, t in tensors(m)) or getattr(m, "_stablexl_streamed", False):
            continue
        m.register_forward_pre_hook(lambda mod, args: move(mod, device))
        m.register_forward_hook(lambda mod, args, out: move(mod, home))
        m._stablexl_streamed = True
        move(m, home)
        hooked += 1
    return hooked


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure on any device (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e))


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
