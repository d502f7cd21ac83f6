"""Every op allocates its outputs here, so tests can poison them (fill with NaN) and prove that each
kernel writes every element it returns; scratch space that outlives a call (:func:`workspace`); and the
elementwise ops' large outputs from a small pool of recycled buffers (:func:`recycled_like`)."""

from __future__ import annotations

import collections
import threading

import torch

POISON: float | None = None  # tests set this; None in normal use (no fill, no cost)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out if POISON is None else out.fill_(POISON)


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out if POISON is None else out.fill_(POISON)


# recycled_like: per (device, bytes), the storages of the last RECYCLE_SLOTS such outputs. On the CPU a fresh large
# buffer costs more than the memory-bound kernel that fills it: glibc maps it anew and the kernel faults and zeroes
# every page on first touch (bench/README.md: clone vs copy-into-existing), and whether it does depends on what
# glibc's heap holds just then. Recycling keeps at most RECYCLE_SLOTS freed buffers per size resident, for the
# RECYCLE_SIZES sizes asked for last: batches of other lengths (length buckets, packing, MoE experts' token counts)
# bring new sizes, and the pools of sizes no longer asked for would otherwise stay resident for good.
RECYCLE_SLOTS = 4
RECYCLE_SIZES = 8
RECYCLE_MIN_BYTES = 1 << 20  # below this glibc serves from its heap, without page faults
_recycled: collections.OrderedDict[tuple, collections.deque] = collections.OrderedDict()  # oldest size first
_recycled_lock = threading.Lock()


def recycled_like(t: torch.Tensor) -> torch.Tensor:
    """``empty_like(t)`` (the same strides), on the CPU backed by the storage of an earlier output of
    the same size that nothing references any more, if one is pooled. The most recent outputs are the ones
    pooled: in a backward pass they are the first freed."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < RECYCLE_MIN_BYTES:
        return empty_like(t)
    with _recycled_lock:
        key = (t.device, nbytes)
        slots = _recycled.get(key)
        if slots is None:
            slots = _recycled[key] = collections.deque(maxlen=RECYCLE_SLOTS)
            if len(_recycled) > RECYCLE_SIZES:  # the size asked for longest ago: its buffers stay with their users
                _recycled.popitem(last=False)
        else:
            _recycled.move_to_end(key)
        # 1: only the pool references the storage (each tensor on it, and each Python storage object, adds one)
        free = next((s for s in slots if torch._C._storage_Use_Count(s._cdata) == 1), None)
        if free is None:
            free = torch.UntypedStorage(nbytes, device=t.device)
        else:
            slots.remove(free)
        slots.append(free)  # newest last: a full deque forgets the oldest, which stays with its users
        out = torch.empty(0, dtype=t.dtype, device=t.device)
        out.set_(free, 0, t.shape, torch.empty_like(t, device="meta").stride())  # empty_like's (dense) strides
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
