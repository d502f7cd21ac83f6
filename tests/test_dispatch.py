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
