"""How many threads lf's CPU kernels run, and how idle OpenMP threads wait, on a machine that may be busy.

An OpenMP parallel region ends when its last thread has run. With more runnable threads than cores (dataloader
workers, other jobs) a parked thread holds the whole region for a scheduler tick or more, and threads spinning at
the region's barrier take cores from the ones they wait for: measured on a loaded 2-core Xeon (bench/README.md,
"Oversubscription"), a 64-row RMSNorm fwd+bwd took ~290 ms with libgomp's default spin-then-sleep and 2 threads,
~9 ms with passive waiting and ~2 ms on one thread. So:

- :func:`apply_wait_policy` (run when lf is imported, before torch loads OpenMP) makes idle threads sleep at once
  (``OMP_WAIT_POLICY=PASSIVE``) unless the environment already chose (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``);
- :func:`kernel_threads` gives lf's kernels torch's thread count less the cores that other runnable threads hold
  now (``/proc/loadavg``'s running count, read at most every ``SAMPLE_S``), at least one.

``LF_THREADS_POLICY=fixed`` turns both off: torch's thread count and libgomp's defaults, as before.
"""

from __future__ import annotations

import os
import time

ENV_VAR = "LF_THREADS_POLICY"
SAMPLE_S = 0.05  # how stale the load sample may be: a few training steps' kernels, far below a dataloader's phases
_sample = {"at": -1.0, "idle": 0}


def adaptive() -> bool:
    value = os.environ.get(ENV_VAR, "adaptive").strip().lower()
    if value not in ("adaptive", "fixed"):
        from lf.errors import ConfigError

        raise ConfigError(f"{ENV_VAR}={value!r} is not a policy; use 'adaptive' (the default) or 'fixed'")
    return value == "adaptive"


def apply_wait_policy() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the environment says otherwise. Takes effect only
    before the OpenMP runtime loads (with torch): lf/__init__.py calls it."""
    if adaptive() and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def running_threads() -> int:
    """The machine's runnable threads now, this one included: /proc/loadavg's 4th field. 1 (this thread alone)
    where it cannot be read (not Linux)."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 1


def _idle_cores(cores: int) -> int:
    """Cores not held by other runnable threads, sampled at most every SAMPLE_S."""
    now = time.monotonic()
    if now - _sample["at"] > SAMPLE_S:
        _sample.update(at=now, idle=cores - (running_threads() - 1))
    return _sample["idle"]


def kernel_threads(torch_threads: int) -> int:
    """Threads for one call of an lf CPU kernel: ``torch_threads`` (torch.get_num_threads()), cut to the idle
    cores when the machine is oversubscribed."""
    if torch_threads <= 1 or not adaptive():
        return torch_threads
    return max(1, min(torch_threads, _idle_cores(len(os.sched_getaffinity(0)))))
