"""How idle OpenMP threads wait, for lf's CPU kernels and torch's alike (one OpenMP runtime: torch's libgomp).

An OpenMP parallel region ends when its last thread has run. With more runnable threads than cores (dataloader
workers, other jobs), threads spinning at a region's barrier take cores from the ones they wait for, and libgomp's
default spins for a long while before sleeping. Measured on a loaded 2-core Xeon (bench/README.md,
"Oversubscription"), a 64-row bf16 RMSNorm fwd+bwd on 2 threads took 264-543 ms with libgomp's default and 1.4-9 ms
with passive waiting. So :func:`apply_wait_policy` (run when lf is imported, before torch loads OpenMP) makes idle
threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) unless the environment already chose (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT``); ``LF_THREADS_POLICY=fixed`` leaves libgomp's default.
"""

from __future__ import annotations

import os

from lf.errors import ConfigError

ENV_VAR = "LF_THREADS_POLICY"


def policy() -> str:
    """LF_THREADS_POLICY ('passive' by default); any other value is a ConfigError naming the choices."""
    value = os.environ.get(ENV_VAR, "passive").strip().lower()
    if value not in ("passive", "fixed"):
        raise ConfigError(f"{ENV_VAR}={value!r} is not a policy; use 'passive' (the default) or 'fixed'")
    return value


def apply_wait_policy() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the environment says otherwise. Takes effect only
    before the OpenMP runtime loads (with torch): lf/__init__.py calls it. A bad LF_THREADS_POLICY changes nothing
    here (importing lf never fails on it): lf's commands refuse it in one line (lf.cli.main)."""
    try:
        value = policy()
    except ConfigError:
        return
    if value == "passive" and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
