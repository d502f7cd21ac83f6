"""The one place that says which accelerator lf runs on, and what follows from it: how many there are, the
distributed backend, the variable that picks the visible ones, bf16, the attention implementations that apply, and
lf's kernel backend there (asked of lf.kernels, not repeated here).

Kinds: ``cuda``; ``rocm`` (PyTorch's ROCm build reports its GPUs as ``cuda`` devices, with ``torch.version.hip``
set); ``npu`` (Ascend, through the ``torch_npu`` package, which adds ``torch.npu``); ``xpu`` (Intel); ``mps``
(Apple); ``cpu``. Detection runs on every call (it is cheap; torch caches its own probes), so tests that replace
``torch.cuda.is_available`` and friends see their stand-ins.

An installed ``torch_npu`` that fails to load, or sees no NPU, is an error, never a silent run on the CPU: on an
Ascend machine that would be hours of training on the wrong device.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os

import torch

from lf.errors import KernelError, ModelError

# torch's device type, distributed backend and visible-devices variable per kind (rocm: RCCL goes by "nccl" in
# torch, and HIP_VISIBLE_DEVICES is ROCm's own variable; xpu: see _xpu_backend)
DEVICE_TYPE = {"cuda": "cuda", "rocm": "cuda", "npu": "npu", "xpu": "xpu", "mps": "mps", "cpu": "cpu"}
DIST_BACKEND = {"cuda": "nccl", "rocm": "nccl", "npu": "hccl", "mps": "gloo", "cpu": "gloo"}
VISIBLE_DEVICES = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES",
                   "xpu": "ZE_AFFINITY_MASK"}
# flash-attention 2 has CUDA and ROCm builds only; SDPA and eager run everywhere
FLASH_ATTENTION_KINDS = ("cuda", "rocm")


class DeviceError(ModelError):
    """The accelerator lf was told to use (torch_npu installed) is not usable."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    kind: str  # cuda, rocm, npu, xpu, mps, cpu
    count: int  # accelerators visible to this process (0 on the CPU)
    bf16: bool  # native bf16 math (on the CPU: AVX512-BF16 or AMX; elsewhere bf16 is emulated, slower than fp32)
    dist_backend: str

    @property
    def device_type(self) -> str:
        """torch's name for the device (rocm GPUs are "cuda" devices)."""
        return DEVICE_TYPE[self.kind]

    @property
    def visible_devices_var(self) -> str | None:
        return VISIBLE_DEVICES.get(self.kind)

    @property
    def attention(self) -> tuple[str, ...]:
        """The attention implementations (HF's names) that apply here, installed or not."""
        return (("flash_attention_2",) if self.kind in FLASH_ATTENTION_KINDS else ()) + ("sdpa", "eager")

    def device(self, local_rank: int | None = None) -> str:
        """This process's device: the one numbered LOCAL_RANK (0 unless a launcher set it) on an accelerator."""
        if self.kind == "cpu":
            return "cpu"
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        return f"{self.device_type}:{rank}"

    def kernel_backend(self) -> str:
        """lf's kernel backend for tensors on this device (LF_KERNEL_BACKEND and fallbacks included)."""
        from lf.kernels import choose_backend

        return choose_backend(self.device_type)


def cpu_has_bf16() -> bool:
    """Native bf16 math on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


@functools.cache
def _load_torch_npu() -> str | None:
    """None if torch_npu is absent or loaded (adding torch.npu), else why it did not load."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:  # noqa: BLE001 - any failure (CANN missing, version mismatch) is reported as is
        return f"{type(exc).__name__}: {exc}"
    return None


def _npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None or hasattr(torch, "npu")


def _xpu_backend() -> str:
    """torch's own XPU collective library (xccl, torch 2.8+), else Intel's oneCCL bindings' "ccl"."""
    available = getattr(torch.distributed, "is_xccl_available", lambda: False)
    return "xccl" if torch.distributed.is_available() and available() else "ccl"


def _npu() -> Accelerator | None:
    if not _npu_installed():
        return None
    problem = _load_torch_npu()
    if problem:
        raise DeviceError(f"torch_npu is installed but does not load ({problem}); source CANN's set_env.sh "
                          f"(e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh), or uninstall torch_npu to run "
                          f"on the CPU")
    if not torch.npu.is_available():
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        raise DeviceError("torch_npu is installed but sees no NPU" + (f" (ASCEND_RT_VISIBLE_DEVICES={visible})"
                          if visible is not None else "") + "; check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES, "
                          "or uninstall torch_npu to run on the CPU")
    return Accelerator("npu", torch.npu.device_count(), bool(torch.npu.is_bf16_supported()), "hccl")


def current() -> Accelerator:
    """The accelerator this process runs on (see the module's docstring for the order and the NPU rule)."""
    npu = _npu()
    if npu:
        return npu
    if torch.cuda.is_available():
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        return Accelerator(kind, torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported()), DIST_BACKEND[kind])
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return Accelerator("xpu", torch.xpu.device_count(), bool(torch.xpu.is_bf16_supported()), _xpu_backend())
    if torch.backends.mps.is_available():
        # bf16 on Apple GPUs needs macOS 14 (Sonoma)
        newer = getattr(torch.backends.mps, "is_macos_or_newer", lambda *_: False)
        return Accelerator("mps", 1, bool(newer(14, 0)), "gloo")
    return Accelerator("cpu", 0, cpu_has_bf16(), "gloo")


def describe(acc: Accelerator) -> dict[str, str]:
    """The accelerator as `lf env` prints it: LLaMA-Factory's fields for it (name, number, memory; CANN's
    version on an NPU) and lf's own (backends, visible-devices variable, bf16, attention, kernels)."""
    info = {"accelerator": acc.kind + (f" (HIP {torch.version.hip})" if acc.kind == "rocm" else ""),
            "number": str(acc.count)}
    if acc.kind != "cpu":
        module = getattr(torch, acc.device_type)
        info["type"] = module.get_device_name() if hasattr(module, "get_device_name") else acc.kind
        if hasattr(module, "mem_get_info"):
            info["memory"] = f"{module.mem_get_info()[1] / 1024 ** 3:.2f} GiB"
    if acc.kind == "npu":
        info["CANN version"] = str(getattr(torch.version, "cann", "unknown"))
    # torch calls ROCm's RCCL "nccl": say which library runs
    info["distributed backend"] = acc.dist_backend + (" (RCCL)" if acc.kind == "rocm" else "")
    info["visible-devices variable"] = acc.visible_devices_var or "none"
    info["bf16"] = "yes" if acc.bf16 else "no"
    info["attention"] = ", ".join(acc.attention)
    from lf.kernels import choose_backend

    # the accelerator's tensors, and the CPU's (offloaded or CPU-side work) where they differ
    for device_type, backend in {"cpu": lambda: choose_backend("cpu"), acc.device_type: acc.kernel_backend}.items():
        try:
            info[f"lf kernels on {device_type}"] = f"{backend()} backend"
        except KernelError as exc:  # a bad LF_KERNEL_BACKEND: say so, and print the rest
            info[f"lf kernels on {device_type}"] = str(exc)
    return info
