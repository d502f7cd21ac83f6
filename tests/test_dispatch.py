import importlib
import os
import subprocess
import sys

import pytest
import torch

from lf import _C
from lf.errors import KernelError
from lf.kernels import _backend, choose_backend, default_backend, rms_norm


@pytest.mark.parametrize("device_type,expected", [
    ("cuda", "triton"),  # NVIDIA, and ROCm (its tensors report "cuda")
    ("hip", "triton"),
    ("cpu", "cpu"),
    ("npu", "torch"), ("mps", "torch"), ("xpu", "torch"), ("meta", "torch"), ("some_future_device", "torch"),
])
def test_default_table(device_type, expected):
    assert default_backend(device_type) == expected


def test_env_forces_backend(monkeypatch):
    monkeypatch.setenv("LF_KERNEL_BACKEND", "torch")
    assert choose_backend("cpu") == "torch"
    monkeypatch.setenv("LF_KERNEL_BACKEND", "CPU")  # case-insensitive
    assert choose_backend("cpu") == "cpu"
    monkeypatch.delenv("LF_KERNEL_BACKEND")
    assert choose_backend("cpu") == "cpu"


def test_env_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("LF_KERNEL_BACKEND", "cuda")
    with pytest.raises(KernelError, match="not a backend.*triton, cpu, torch"):  # a ValueError
        choose_backend("cpu")


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("LF_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        choose_backend("cpu")
    monkeypatch.setenv("LF_KERNEL_BACKEND", "cpu")
    with pytest.raises(KernelError, match="CPU tensors only"):
        choose_backend("mps")


def test_falls_back_to_torch_with_a_warning(monkeypatch):
    monkeypatch.delenv("LF_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_importable", lambda module: "ModuleNotFoundError: no triton")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="no triton.*torch reference"):
        assert choose_backend("cuda") == "torch"


def test_ops_run_the_chosen_backend(monkeypatch):
    """The op really calls the backend the table names (not just any that gives the right answer)."""
    calls = []
    rms = __import__("lf.kernels.rms_norm", fromlist=["FORWARD"])
    for name in ("cpu", "torch"):
        original = rms.FORWARD._table[name]
        monkeypatch.setitem(rms.FORWARD._table, name, lambda *a, _n=name, _f=original: (calls.append(_n), _f(*a)))
    monkeypatch.delenv("LF_KERNEL_BACKEND", raising=False)
    rms_norm(torch.randn(2, 8), torch.ones(8))
    monkeypatch.setenv("LF_KERNEL_BACKEND", "torch")
    rms_norm(torch.randn(2, 8), torch.ones(8))
    assert calls == ["cpu", "torch"]


def test_cpu_variants():
    available = _C.available_isas().split(", ")
    assert available[-1] == "generic" and _C.isa() == available[0]  # the best variant is the default
    with pytest.raises(ValueError, match="not available here"):
        _C.set_isa("sse9")


def test_codes_come_from_the_extension():
    """The dtype, casting and GLU codes the kernels receive are lf._C's enums, matched by name: Python copies no
    numbers."""
    from lf.kernels import _checks, glu

    assert [getattr(torch, name) for name in _C.DType.__members__] == list(_checks.FLOAT_DTYPES)
    for member in _C.DType:
        assert _checks.cpu_dtype(getattr(torch, member.name)) is member
    assert importlib.import_module("lf.kernels.rms_norm").CASTINGS == tuple(_C.Casting.__members__)
    assert {"swiglu", *glu.GEGLU_KIND.values()} == set(_C.GluKind.__members__)


def test_argument_struct_round_trips_its_fields():
    x, w = torch.randn(3, 8), torch.ones(8)
    args = _C.RmsNormFwd(x=x.data_ptr(), w=w.data_ptr(), rows=3, cols=8, eps=0.5, casting=_C.Casting.gemma,
                         dtype=_C.DType.bfloat16, threads=2)
    assert (args.x, args.w, args.y, args.rows, args.cols, args.eps, args.offset) == (x.data_ptr(), w.data_ptr(), 0,
                                                                                      3, 8, 0.5, 0.0)
    assert (args.casting, args.dtype, args.threads) == (_C.Casting.gemma, _C.DType.bfloat16, 2)
    args.offset, args.y = 1.0, 64
    assert (args.offset, args.y) == (1.0, 64)
    rope = _C.Rope(q=_C.RopeTensor(src=16, heads=4, src_stride=(96, 24, 8)), cs_stride=(0, 8))
    rope.k.dst_stride = (1, 2, 3)  # a nested struct is changed in place
    assert (rope.q.src, rope.q.heads, rope.q.src_stride, rope.k.dst_stride, rope.cs_stride) == (
        16, 4, [96, 24, 8], [1, 2, 3], [0, 8])
    with pytest.raises(AttributeError, match="RmsNormFwd.epsilon"):
        _C.RmsNormFwd(epsilon=1e-6)
    with pytest.raises(TypeError, match="RmsNormFwd.casting"):
        _C.RmsNormFwd(casting=0)  # an enum member, not its number


def test_torch_backend_runs_without_the_extension():
    """The names, not lf._C's numbers, travel through the ops: when lf._C cannot load, the torch backend still runs
    (with the one-time warning the README describes)."""
    script = """
import sys, warnings
sys.modules["lf._C"] = None  # as if the extension had not been built
import torch
from lf.kernels import geglu, geglu_reference, rms_norm, rms_norm_reference
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(rms_norm(x, w, casting="gemma"), rms_norm_reference(x, w, 1e-6, casting="gemma"))
    torch.testing.assert_close(geglu(x, w.expand(3, 8), "none"), geglu_reference(x, w.expand(3, 8), "none"))
assert any("lf._C did not load" in str(c.message) for c in caught), [str(c.message) for c in caught]
"""
    env = {k: v for k, v in os.environ.items() if k != "LF_KERNEL_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_one_except_catches_every_kernel_refusal():
    # A kernel call's bad arguments are KernelErrors too: lf train's one-line error handler and a user's
    # `except KernelError` see them (a weight of the wrong width here).
    with pytest.raises(KernelError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
