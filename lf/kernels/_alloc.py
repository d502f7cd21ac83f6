"""Every op allocates its outputs here, so tests can poison them (fill with NaN) and prove that each
kernel writes every element it returns; and scratch space that outlives a call (:func:`workspace`)."""

from __future__ import annotations

import threading

import torch

POISON: float | None = None  # tests set this; None in normal use (no fill, no cost)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out if POISON is None else out.fill_(POISON)


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out if POISON is None else out.fill_(POISON)


_workspaces = threading.local()


def workspace(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat scratch tensor of ``numel`` elements (like's dtype and device), reused by every later call in this
    thread: a buffer filled and consumed within one call need not be allocated (and, on the CPU, page-faulted
    in) again for the next. Its contents are undefined; the caller must not keep it past the call."""
    if POISON is not None:  # under test: fresh and poisoned, so nothing can depend on an earlier call's data
        return empty(numel, like)
    cache = _workspaces.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]
