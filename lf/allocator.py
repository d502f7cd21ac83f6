"""glibc's allocator settings for lf's CPU runs (and the benchmarks).

On the CPU, tensors above glibc's mmap threshold come from fresh mmaps that are unmapped again on free, so every
large allocation page-faults its memory in anew: measured here, HF eager RMSNorm forward+backward at 4096x4096
went from 251 to 58 ms with "tuned". "tuned" serves large blocks from the heap and keeps freed heap for reuse.
The price: memory freed inside the process is not given back to the OS, so the resident set stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MiB = 1 << 20
# glibc <malloc.h> parameter numbers and values, by setting. mallopt takes a C int, so "never trim" is written -1
# (documented in mallopt(3) as disabling trimming) rather than a 64 GiB threshold, which overflows.
MALLOPT = {
    "default": {},
    "tuned": {
        "M_MMAP_THRESHOLD": (-3, 1 << 30),  # tensors come from the heap, not from fresh mmaps that page-fault
        "M_TRIM_THRESHOLD": (-1, -1),  # freed heap is kept, never returned to the OS
        "M_TOP_PAD": (-2, 256 * MiB),  # the heap grows in big steps
    },
    # For peak-memory measurements: glibc's initial mmap threshold, pinned. Left alone, it grows (up to 32 MiB) as
    # mapped blocks are freed, after which such blocks come from the heap, whose resident high-water mark then
    # depends on the order of frees; pinned, every block above 128 KiB is mapped on allocation and unmapped on free,
    # so the resident set follows live memory.
    "mmap": {"M_MMAP_THRESHOLD": (-3, 128 << 10)},
}


def glibc() -> tuple[ctypes.CDLL | None, str | None]:
    """glibc, or None and why its mallopt cannot be used here."""
    name, _ = platform.libc_ver()
    if name != "glibc":
        return None, f"the C library is {name or 'unknown'}, not glibc, whose mallopt parameters 'tuned' sets"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        return None, "this glibc has no mallopt"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc, None


def unavailable(setting: str) -> str | None:
    """None if `setting` can be applied in this process, else why not."""
    return glibc()[1] if MALLOPT[setting] else None


def apply(setting: str) -> dict[str, int]:
    """Applies `setting` to this process; returns the mallopt values set ({} for "default"). Call it before any
    large allocation: every later allocation shares it."""
    if not MALLOPT[setting]:
        return {}
    libc, reason = glibc()
    if reason:
        raise RuntimeError(reason)
    for name, (param, value) in MALLOPT[setting].items():
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({name}, {value}) was refused")
    return {name: value for name, (_, value) in MALLOPT[setting].items()}


def describe(setting: str, mallopt: dict[str, int]) -> str:
    if not mallopt:
        return f"{setting} (glibc defaults)"
    values = ", ".join(f"{k}={_bytes(v) if v >= 0 else f'{v} (never)'}" for k, v in mallopt.items())
    return f"{setting} (mallopt {values})"


def _bytes(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB" if n >= MiB else f"{n / 1024:g} KiB"
