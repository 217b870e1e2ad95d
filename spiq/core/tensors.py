"""Tensor layouts shared by every layer: a quantization range, and per-input-channel vectors laid
out against (grouped) conv and linear weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Range:
    """A quantization range: per channel (C,) or per tensor (scalars), lo <= 0 <= hi."""
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def per_channel(self) -> bool:
        return self.lo.dim() == 1


def broadcast_input(v: torch.Tensor, w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A per-input-channel vector (C,) laid out against a linear (O, C) or (grouped) conv weight."""
    if w.dim() == 2:
        return v[None, :]
    cg = w.shape[1]
    return v.view(groups, cg).repeat_interleave(w.shape[0] // groups, 0)[:, :, None, None]


def per_input_channel(t: torch.Tensor, groups: int = 1, reduce: str = "sum") -> torch.Tensor:
    """Reduce a weight-shaped tensor (O, C) or (O, C/groups, kh, kw) over all but the input channel: (C,)."""
    if t.dim() == 2:
        return t.sum(0) if reduce == "sum" else t.amax(0)
    o, cg = t.shape[:2]
    t = t.reshape(groups, o // groups, cg, -1)
    return (t.sum((1, 3)) if reduce == "sum" else t.amax((1, 3))).reshape(-1)
