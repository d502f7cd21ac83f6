"""glibc's allocator settings for lf's CPU runs (and the benchmarks).

On the CPU, tensors above glibc's mmap threshold come from fresh mmaps that are unmapped again on free, so every
large allocation page-faults its memory in anew: measured here, HF eager RMSNorm forward+backward at 4096x4096
went from 251 to 58 ms with "tuned". "tuned" serves large blocks from the heap and keeps freed heap for reuse.
The price: memory freed inside the process is not given back to the OS, and the heap fragments: a bf16 training
run without gradient checkpointing grew from 1.25 to 2.2 GiB resident over 30 steps with ~1 GiB live (glibc's
defaults did the same). So "tuned" training also hands freed memory back (malloc_trim) whenever the resident set
at a step's end has grown by a tenth past a step's working size (:class:`GrowthRelease`): that run then peaked at
1.27 GiB, 8% slower than never handing back (every step: 1.16 GiB, 12% slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from lf.errors import ConfigError

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
        raise ConfigError(f"cpu_allocator: {setting} cannot be applied: {reason}; set cpu_allocator: default")
    for name, (param, value) in MALLOPT[setting].items():
        if libc.mallopt(param, value) != 1:
            raise ConfigError(f"cpu_allocator: {setting} cannot be applied: glibc refused mallopt({name}, {value}); "
                              f"set cpu_allocator: default")
    return {name: value for name, (_, value) in MALLOPT[setting].items()}


def describe(setting: str, mallopt: dict[str, int]) -> str:
    if not mallopt:
        return f"{setting} (glibc defaults)"
    values = ", ".join(f"{k}={_bytes(v) if v >= 0 else f'{v} (never)'}" for k, v in mallopt.items())
    return f"{setting} (mallopt {values})"


def _bytes(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB" if n >= MiB else f"{n / 1024:g} KiB"


def rss_bytes() -> int:
    """This process's resident set, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def available_bytes() -> int:
    """Memory the OS can still give this process (MemAvailable), or 0 where /proc does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release() -> bool:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim); False where there is no glibc."""
    libc, reason = glibc()
    return not reason and bool(libc.malloc_trim(0))


class GrowthRelease:
    """Calls ``release`` at a step's end when ``rss`` has grown by ``growth`` times past the step's working size:
    the resident set at the end of the first step after the last release (freed pages the step used stay
    resident until a release). A hand-back costs the page faults of the memory the next step reuses, so it waits
    for the fragmentation to be worth it. ``check()`` returns whether it released."""

    def __init__(self, rss=rss_bytes, release=release, growth: float = 1.1):
        self.rss, self.release, self.growth = rss, release, growth
        self.level: int | None = None
        self.releases = 0

    def check(self) -> bool:
        now = self.rss()
        if self.level is None or now <= self.level * self.growth:
            self.level = self.level or now
            return False
        self.release()
        self.releases += 1
        self.level = None
        return True
