"""Argument checks shared by the ops. They run once, in Python, before any backend; each error names the
argument, what is wrong with it and how to fix it."""

from __future__ import annotations

import torch

from lf.errors import KernelDTypeError, KernelInputError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise KernelInputError(f"{op}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise KernelDTypeError(
            f"{op}: `{name}` has dtype {value.dtype}; lf kernels take float32, bfloat16 or float16 "
            f"(cast it with `.to(torch.bfloat16)` or `.float()`)"
        )
    return value


def same_device_and_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise KernelInputError(
                f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; move both to one device "
                f"(e.g. `{name}.to({ref_name}.device)`)"
            )
        if t.dtype != ref.dtype:
            raise KernelDTypeError(
                f"{op}: `{name}` is {t.dtype} but `{ref_name}` is {ref.dtype}; cast `{name}` to {ref.dtype} "
                f"(e.g. `{name}.to({ref_name}.dtype)`)"
            )


def choice(op: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise KernelInputError(f"{op}: `{name}`={value!r} is not one of {', '.join(map(repr, allowed))}")


def fail(op: str, message: str) -> None:
    raise KernelInputError(f"{op}: {message}")


def threads() -> int:
    """Threads for the CPU kernels: the same as torch uses, so torch.set_num_threads applies to lf too."""
    return torch.get_num_threads()


def cpu_dtype(dtype: torch.dtype):
    """``dtype`` as the CPU kernels' ``lf._C.DType``, whose members carry torch's names."""
    from lf import _C

    return _C.DType[str(dtype).removeprefix("torch.")]
