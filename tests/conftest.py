import os

# No GPU here: the Triton kernels run in Triton's interpreter on CPU tensors. Set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import importlib.util
import logging

import pytest
import torch

from lf import _C  # the C++ extension must load: a broken build fails the suite instead of skipping tests
from lf.kernels import _alloc

# The Triton kernels are tested in Triton's interpreter: a missing triton fails the run, it skips nothing.
if importlib.util.find_spec("triton") is None:
    raise pytest.UsageError("the tests need triton (its interpreter runs lf's Triton kernels on the CPU): "
                            "pip install -e '.[test]'")

# Every backend this machine can run: the torch reference, each compiled CPU variant, Triton (interpreted).
BACKENDS = ["torch"] + [f"cpu:{isa}" for isa in _C.available_isas().split(", ")] + ["triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Forces one backend (and CPU variant) for the test, and poisons every output the ops allocate."""
    name, _, isa = request.param.partition(":")
    monkeypatch.setenv("LF_KERNEL_BACKEND", name)
    monkeypatch.setattr(_alloc, "POISON", float("nan"))
    if isa:
        best = _C.isa()
        _C.set_isa(isa)
        request.addfinalizer(lambda: _C.set_isa(best))
    return name


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run (the seed is printed when a test fails, to reproduce it)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


@contextlib.contextmanager
def _lf_logger_kept():
    logger = logging.getLogger("lf")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture(autouse=True)
def lf_logger_restored():
    """A test that runs a command through lf.cli gets lf's "[lf]" log handler on pytest's captured stderr, which
    closes after the test, and lf's logger stops propagating (so the CLI prints each line once): both are undone
    here, so that later tests' caplog sees lf's lines."""
    with _lf_logger_kept():
        yield


@pytest.fixture(autouse=True, scope="module")
def lf_logger_restored_after_module():
    """The same for a module-scoped fixture that runs a command (tests/test_llama_pro.py's `lf expand`)."""
    with _lf_logger_kept():
        yield
