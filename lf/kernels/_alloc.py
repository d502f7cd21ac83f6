"""Every op allocates its outputs here, so tests can poison them (fill with NaN) and prove that each
kernel writes every element it returns."""

from __future__ import annotations

import torch

POISON: float | None = None  # tests set this; None in normal use (no fill, no cost)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out if POISON is None else out.fill_(POISON)


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out if POISON is None else out.fill_(POISON)
