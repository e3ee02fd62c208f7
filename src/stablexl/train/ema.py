"""Exponential moving average of weights with warm-up (sgm `LitEma`; diffusers `EMAModel`).

decay_n = min(decay, (1 + n) / (10 + n)) for update n (sgm ema.py), so early averages follow the
weights closely instead of being dominated by the random initialisation.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter, sharing its storage; a plain tensor as it is.
    EMA arithmetic is elementwise, so shards update independently."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        pairs = [(_local(self.shadow[k]), _local(p.detach()).float()) for k, p in module.named_parameters() if k in self.shadow]
        if pairs:  # one multi-tensor call instead of a Python loop over every parameter
            torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                _local(p).copy_(_local(self.shadow[k]).to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """Run with the EMA weights, then restore the raw ones (sgm `ema_scope`)."""
        saved = {k: p.detach().clone() for k, p in module.named_parameters() if k in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for k, p in module.named_parameters():
                    if k in saved:
                        _local(p).copy_(_local(saved[k]))

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v for k, v in self.shadow.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, updates: int) -> None:
        missing = [k for k in self.shadow if f"{prefix}{k}" not in tensors]
        if missing:
            raise ValueError(f"EMA state is missing {len(missing)} tensors, e.g. {missing[0]}")
        for k in self.shadow:
            self.shadow[k].copy_(tensors[f"{prefix}{k}"])
        self.updates = updates
