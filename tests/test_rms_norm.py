import importlib

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from lf import _C
from lf.kernels import LFRMSNorm, rms_norm, rms_norm_reference
from support import DTYPES, assert_close, oracle

# 1 row; odd widths; a width above the CPU kernels' vector and Triton's power-of-two block; batch x seq.
SHAPES = [(1, 7), (3, 127), (2, 5, 4097), (4, 3, 64)]
CASTINGS = [("llama", 0.0), ("gemma", 1.0), ("none", 0.0), ("llama", 1.0)]


def _weight(width, offset, dtype):
    # around 1 after the offset, so the output has the input's scale
    return (torch.randn(width) * 0.3 + 1.0 - offset).to(dtype).requires_grad_()


@pytest.mark.parametrize("casting,offset", CASTINGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, shape, casting, offset):
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    w = _weight(shape[-1], offset, dtype)
    y = rms_norm(x, w, 1e-6, offset, casting)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, (dx64, dw64) = oracle(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, casting), (x, w), dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(dx, dx64, dtype, "dx")
    assert_close(dw, dw64, dtype, "dw")


@pytest.mark.parametrize("hf_cls,casting,offset", [
    (LlamaRMSNorm, "llama", 0.0), (Qwen3RMSNorm, "llama", 0.0),
    (GemmaRMSNorm, "gemma", 1.0), (Gemma2RMSNorm, "gemma", 1.0), (Gemma3RMSNorm, "gemma", 1.0),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_module(backend, dtype, hf_cls, casting, offset):
    width = 257
    hf = hf_cls(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(width) * 0.3 + 1.0 - offset)
    lf = LFRMSNorm(width, eps=1e-5, offset=offset, casting=casting).to(dtype)
    lf.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, width, dtype=dtype).requires_grad_()
    y_hf = hf(x)
    dy = torch.randn_like(y_hf)
    dx_hf, dw_hf = torch.autograd.grad(y_hf, (x, hf.weight), dy)
    y = lf(x)
    dx, dw = torch.autograd.grad(y, (x, lf.weight), dy)
    assert y.dtype == y_hf.dtype
    assert_close(y, y_hf, dtype, "y", factor=2)  # HF rounds intermediates in half precision
    assert_close(dx, dx_hf, dtype, "dx", factor=2)
    assert_close(dw, dw_hf, dtype, "dw", factor=2)


def test_frozen_weight_gets_no_gradient(backend):
    x = torch.randn(3, 33).requires_grad_()
    w = torch.randn(33)  # frozen, as under LoRA
    y = rms_norm(x, w, 1e-6)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    _, (dx64,) = oracle(lambda a, b: rms_norm_reference(a, b, 1e-6), (x, w), dy)
    assert_close(dx, dx64, torch.float32, "dx")


def test_non_contiguous_input(backend):
    x = torch.randn(40, 6).t().requires_grad_()  # (6, 40), column-major
    w = _weight(40, 0.0, torch.float32)
    y = rms_norm(x, w, 1e-6)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, (dx64, dw64) = oracle(lambda a, b: rms_norm_reference(a, b, 1e-6), (x, w), dy)
    assert_close(y, y64, torch.float32, "y")
    assert_close(dx, dx64, torch.float32, "dx")
    assert_close(dw, dw64, torch.float32, "dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_triton_column_chunks(dtype, casting, monkeypatch):
    """Rows wider than Triton's largest block are processed in column chunks: force a tiny block."""
    from lf._triton.kernels import rms_norm as tri

    op = importlib.import_module("lf.kernels.rms_norm")  # the module (lf.kernels.rms_norm is the function)

    rows, cols = 5, 75
    x = torch.randn(rows, cols, dtype=dtype)
    w = (torch.randn(cols) * 0.3 + 1).to(dtype)
    dy = torch.randn_like(x)
    expect = [torch.full_like(x, float("nan")), torch.full((rows,), float("nan")),
              torch.full_like(x, float("nan")), torch.full_like(w, float("nan"))]
    got = [t.clone() for t in expect]
    op._torch_forward(x, w, expect[0], expect[1], 1e-6, 0.0, casting)
    op._torch_backward(dy, x, w, expect[1], expect[2], expect[3], 0.0, casting)
    tri.forward(x, w, got[0], got[1], 1e-6, 0.0, casting, max_block=16)
    tri.backward(dy, x, w, got[1], got[2], got[3], 0.0, casting, max_block=16)
    for name, a, e in zip(("y", "rstd", "dx", "dw"), got, expect):
        assert_close(a, e, dtype, name)
