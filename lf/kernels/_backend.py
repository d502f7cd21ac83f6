"""Which backend runs an op: one table keyed by device type, overridable with LF_KERNEL_BACKEND (a backend it
names that is unknown or cannot run here is an :class:`lf.errors.KernelError`).

- ``triton``: CUDA and ROCm tensors (ROCm tensors report device type ``cuda``); also CPU tensors when
  ``TRITON_INTERPRET=1``, which is how the Triton kernels are tested without a GPU.
- ``cpu``: CPU tensors, through the C++ extension ``lf._C``.
- ``torch``: the reference implementation; NPU, MPS, XPU and any other device.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
import warnings
from typing import Callable

import torch

from lf.errors import KernelError

BACKENDS = ("triton", "cpu", "torch")
# device type -> the backend that runs there (every other device type: the torch reference). Adding a device is
# an entry here.
DEFAULT_BACKEND = types.MappingProxyType({"cuda": "triton", "hip": "triton", "cpu": "cpu"})
ENV_VAR = "LF_KERNEL_BACKEND"


def default_backend(device_type: str) -> str:
    """The backend lf picks for a device type when nothing is forced."""
    return DEFAULT_BACKEND.get(device_type, "torch")


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> str | None:
    """None if the module imports, else the reason it does not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable", with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def unusable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run tensors on ``device_type`` here, else why not (a sentence)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors only, these are on '{device_type}'"
        problem = _importable("lf._C")
        return problem and f"the C++ extension lf._C did not load ({problem}); reinstall lf with `pip install -e .`"
    if backend == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
        if device_type not in ("cuda", "hip", "cpu"):
            return f"lf's Triton kernels target CUDA and ROCm, not '{device_type}'"
        problem = _importable("triton")
        return problem and f"triton is not importable ({problem}); `pip install triton`"
    return f"unknown backend '{backend}'"


_warned: set[tuple[str, str]] = set()


def choose_backend(device_type: str) -> str:
    """The backend for tensors on ``device_type``: forced by LF_KERNEL_BACKEND, else the table's choice,
    falling back to ``torch`` (with a one-time warning) when the table's choice cannot run here."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise KernelError(f"{ENV_VAR}={forced!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it")
        problem = unusable_reason(forced, device_type)
        if problem:
            raise KernelError(f"{ENV_VAR}={forced} cannot run here: {problem}")
        return forced
    backend = default_backend(device_type)
    problem = unusable_reason(backend, device_type)
    if problem:
        if (backend, device_type) not in _warned:
            _warned.add((backend, device_type))
            warnings.warn(f"lf: {problem}; using the slower torch reference kernels instead", stacklevel=3)
        return "torch"
    return backend


def matmul_in_fp32(t: torch.Tensor) -> bool:
    """Whether matmuls of 16-bit ``t`` should run widened to fp32: on a CPU without native 16-bit dot products
    (AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16) torch's 16-bit matmuls are emulated, many times slower than
    fp32 ones, while widening is exact and the products accumulate in fp32 either way."""
    probes = {  # private, absent from older torch releases: then assume no native support
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }
    if t.device.type != "cpu" or t.dtype not in probes:
        return False
    return not any(getattr(torch.cpu, probe, lambda: False)() for probe in probes[t.dtype])


def onednn_fp32_linear(weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` for an fp32 CPU ``weight`` (as nn.Linear stores it) should run as oneDNN's inner
    product (the private ``torch.ops.mkldnn._linear_pointwise``, which inductor's CPU fusions use) rather than
    torch.mm's MKL sgemm with the weight transposed: over Llama-3's lm_head on the 2-core AMX Xeon, 57 and 230
    tokens, it took 0.69x torch.mm's time (same process, loaded). Only where AMX is, the CPU it was measured on;
    torch releases without the op: no."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() and hasattr(torch.ops.mkldnn,
                                                                                      "_linear_pointwise")


@functools.cache
def _function(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class Implementations:
    """One op's implementations by backend. Triton entries are ``"module:function"`` strings, imported on
    first use so that machines without Triton never import it."""

    def __init__(self, *, triton: str | Callable, cpu: Callable, torch: Callable):
        self._table: dict[str, Callable | str] = {"triton": triton, "cpu": cpu, "torch": torch}

    def for_device(self, device: torch.device) -> Callable:
        backend = choose_backend(device.type)
        impl = self._table[backend]
        if isinstance(impl, str):
            impl = self._table[backend] = _function(impl)
        return impl
