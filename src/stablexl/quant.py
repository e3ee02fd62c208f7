"""int8 weights for the matrix products (`quantize="int8"`).

What is quantised: every `nn.Linear` of the UNet (and, on request, of the text encoders) whose widths are
multiples of 8. Weights are stored as int8 with one fp32 scale per output channel (symmetric, ±127);
activations are quantised on the fly at each call. Convolutions stay in floating point: 24 % of a UNet call
at 512² (reference/performance.md §1), and the CPU has no int8 convolution kernel we could reach without a
layout change per call.

Which kernel multiplies, chosen once per device (`int8_kernel`):
- "int_mm": `torch._int_mm` (int8 × int8 → int32) with one scale per token. The fast path on CPUs with
  VNNI or AMX (2.4-3.5× fp32 on the AVX-512 machines of reference/performance.md §2) and on CUDA.
- "fbgemm": PyTorch's fbgemm dynamic linear (`quantized::linear_dynamic`: 7-bit activations with one scale
  per call, int8 weights per channel; less exact than per-token "int_mm"). On AVX2-only x86 CPUs `_int_mm` falls back to a scalar loop (30-50×
  slower than fp32, measured on an AMD EPYC without VNNI), while fbgemm's AVX2 kernels run 1.2-2× fp32.
- "dequant": the weights widened back to the activation dtype and one ordinary matmul; for other CPUs, and
  for `int_mm` calls with 16 rows or fewer (`_int_mm` needs more).
`$STABLEXL_INT8_KERNEL` overrides the choice (tests run every path on any CPU).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNELS = ("int_mm", "fbgemm", "dequant")
QUANTIZE_MODES = ("int8",)
INT8_MAX = 127


def int8_kernel(device: torch.device) -> str:
    """The int8 matmul kernel for `device` (see the module docstring). Called by every int8 layer's forward:
    the CPU probe is cached, only the environment override is read each time."""
    return _kernel(device.type, os.environ.get("STABLEXL_INT8_KERNEL") or None)


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str, forced: str | None) -> str:
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"STABLEXL_INT8_KERNEL={forced!r}; use one of {', '.join(KERNELS)}")
        return forced
    if device_type == "cuda":
        return "int_mm"
    if device_type != "cpu":
        return "dequant"
    if torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported():
        return "int_mm"
    if "fbgemm" in torch.backends.quantized.supported_engines and torch.cpu._is_avx2_supported():
        return "fbgemm"
    return "dequant"


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: x ≈ q · s with q in [-127, 127] and s = max|row| / 127 (fp32, shape (rows, 1))."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / INT8_MAX
    q = torch.round(x.float() / s).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s


class QuantizedLinear(nn.Module):
    """A Linear layer with int8 weights: y = (x ⊗ q) · s_w (+ bias). State: `qweight` (out, in) int8,
    `scale` (out,) fp32, `bias` (out,) in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._packed: tuple | None = None  # fbgemm's packed weight, with the (qweight, scale, bias) it was made from
        # LoRAs applied at run time (adapters/lora.py sets them; the int8 weight is never changed), fp32:
        # (down (r, in), up (out, r), factor) adds factor·(x downᵀ) upᵀ; (ΔW (out, in), None, 1) adds x ΔWᵀ
        self.lora_terms: list[tuple[Tensor, Tensor | None, float]] = []

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "QuantizedLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        with torch.no_grad():
            qw, s = quantize_rows(lin.weight.detach())
            q.qweight.copy_(qw)
            q.scale.copy_(s.squeeze(1))
            if lin.bias is not None:
                q.bias.copy_(lin.bias.detach())
        return q

    def _apply(self, fn, recurse=True):
        scale = self.scale
        out = super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:  # a dtype cast (model.half()): the scales stay fp32
            self.scale = scale.to(device=self.scale.device, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as floats (out, in): what the int8 values stand for."""
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        kernel = int8_kernel(x.device)
        if kernel == "fbgemm" and x.device.type == "cpu":
            # reduce_range: 7-bit activations. fbgemm's AVX2 kernel sums pairs of uint8 × int8 products in int16,
            # which saturates with 8-bit activations (measured: 1.1e-1 relative error on a 640 -> 5120 layer,
            # 2.3e-2 with 7 bits; PyTorch's x86 dynamic quantisation sets it for the same reason)
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._fbgemm_weight(), True)
        elif kernel == "int_mm" and x2.shape[0] > 16:
            xq, xs = quantize_rows(x2)  # one scale per token
            acc = torch._int_mm(xq, self.qweight.t())  # (M, out) int32
            y = acc.float() * (xs * self.scale[None, :])
            if self.bias is not None:
                y = y + self.bias.float()
        else:
            b = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2, self.dequantized(x.dtype), b)
        for down, up, factor in self.lora_terms:
            xd = x2.float() @ down.to(x.device).t()
            y = y + factor * (xd if up is None else xd @ up.to(x.device).t())
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _fbgemm_weight(self):
        """fbgemm's packed copy of the weight, rebuilt whenever the int8 state changes (a load, a move)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.scale._version,
               None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        if self._packed is None or self._packed[0] != key:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm's op still takes one
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(self.qweight.cpu(), self.scale.double().cpu(), zeros, 0)
            bias = None if self.bias is None else self.bias.detach().float().cpu()
            self._packed = (key, torch.ops.quantized.linear_prepack(qw, bias))
        return self._packed[1]


def quantizable(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and m.in_features % 8 == 0 and m.out_features % 8 == 0
            and m.weight.dtype in (torch.float32, torch.float16, torch.bfloat16))


def quantize_module(module: nn.Module, *, meta: bool = False) -> int:
    """Replace every quantizable Linear inside `module` by a QuantizedLinear, one at a time (each fp32 weight
    is freed as its int8 copy is made). `meta`: build empty int8 layers on the meta device, for loading an
    int8 file. Returns the number of layers replaced."""
    targets = [(name, m) for name, m in module.named_modules() if quantizable(m)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if meta:
            q = QuantizedLinear(lin.in_features, lin.out_features, lin.bias is not None, device="meta",
                                dtype=lin.weight.dtype)
        else:
            q = QuantizedLinear.from_linear(lin)
        setattr(parent, child, q)
    return len(targets)


def quantized_layers(module: nn.Module) -> int:
    return sum(isinstance(m, QuantizedLinear) for m in module.modules())


def stored_dtype_keys(module: nn.Module) -> set[str]:
    """State-dict keys that keep their own dtype whatever the model's: the int8 weights and their fp32 scales."""
    return {f"{name}.{b}" for name, m in module.named_modules() if isinstance(m, QuantizedLinear)
            for b in ("qweight", "scale")}


def check_mode(quantize: str | None) -> str | None:
    if quantize in (None, "none", "fp32", ""):
        return None
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; use one of: {', '.join(QUANTIZE_MODES)} (or none)")
    return quantize
