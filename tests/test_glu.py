import pytest
import torch
from transformers import Gemma2Config, GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from lf.kernels import LFGeGLUMLP, LFSwiGLUMLP, geglu, geglu_reference, swiglu, swiglu_reference
from support import DTYPES, assert_close, oracle

SHAPES = [(1, 7), (3, 127), (2, 3, 4097), (1, 1)]
OPS = {
    "swiglu": (swiglu, swiglu_reference),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_reference(g, u, "tanh")),
    "geglu_erf": (lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_reference(g, u, "none")),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, shape, op):
    fn, ref = OPS[op]
    gate = (torch.randn(shape) * 2.5).to(dtype).requires_grad_()  # wide range: both tails (beyond: test_extreme_gates)
    up = torch.randn(shape, dtype=dtype).requires_grad_()
    out = fn(gate, up)
    dy = torch.randn_like(out)
    dgate, dup = torch.autograd.grad(out, (gate, up), dy)
    out64, (dgate64, dup64) = oracle(ref, (gate, up), dy)
    assert out.dtype == dtype
    assert_close(out, out64, dtype, "out")
    # dgate = dy * up * act'(gate), and act' crosses 0 (SiLU's at gate ~ -1.28) as a difference of terms of size
    # ~1: near there its error is relative to |dy * up|, not to dgate (a 1-element draw can land there)
    terms = (dy.double() * up.detach().double()).abs().max().item()
    assert_close(dgate, dgate64, dtype, "dgate", min_scale=terms)
    assert_close(dup, dup64, dtype, "dup")


def test_extreme_gates_stay_finite(backend):
    # saturation, the far tails (results down to fp32 denormals), and 0
    gate = torch.tensor([-1e4, -100.0, -30.0, -14.0, -11.0, -9.5, -7.0, 0.0, 7.0, 30.0, 100.0, 1e4]).requires_grad_()
    up = torch.ones(12).requires_grad_()
    for op, (fn, ref) in OPS.items():
        out = fn(gate, up)
        dy = torch.ones_like(out)
        dgate, dup = torch.autograd.grad(out, (gate, up), dy)
        out64, (dgate64, dup64) = oracle(ref, (gate, up), dy)
        assert_close(out, out64, torch.float32, f"{op} out")
        assert_close(dgate, dgate64, torch.float32, f"{op} dgate")


def test_non_contiguous_inputs(backend):
    gate = torch.randn(33, 8).t().requires_grad_()
    up = torch.randn(33, 8).t().requires_grad_()
    out = swiglu(gate, up)
    dy = torch.randn_like(out)
    dgate, dup = torch.autograd.grad(out, (gate, up), dy)
    out64, (dgate64, dup64) = oracle(swiglu_reference, (gate, up), dy)
    assert_close(out, out64, torch.float32, "out")
    assert_close(dgate, dgate64, torch.float32, "dgate")
    assert_close(dup, dup64, torch.float32, "dup")


@pytest.mark.parametrize("family", ["llama", "gemma_tanh", "gemma_erf"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_matches_hf(backend, dtype, family):
    sizes = dict(hidden_size=48, intermediate_size=136, num_attention_heads=4, num_key_value_heads=4)
    if family == "llama":
        cfg = LlamaConfig(hidden_act="silu", **sizes)
        hf, lf = LlamaMLP(cfg), LFSwiGLUMLP(cfg)
    elif family == "gemma_tanh":  # Gemma reads hidden_act
        cfg = GemmaConfig(hidden_act="gelu_pytorch_tanh", **sizes)
        hf, lf = GemmaMLP(cfg), LFGeGLUMLP(cfg)
    else:  # Gemma-2/3 read hidden_activation; "gelu" is the exact (erf) GELU
        cfg = Gemma2Config(hidden_activation="gelu", **sizes)
        hf, lf = Gemma2MLP(cfg), LFGeGLUMLP(cfg)
    hf, lf = hf.to(dtype), lf.to(dtype)
    lf.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 48, dtype=dtype).requires_grad_()
    y_hf = hf(x)
    dy = torch.randn_like(y_hf)
    g_hf = torch.autograd.grad(y_hf, [x, *hf.parameters()], dy)
    y = lf(x)
    g = torch.autograd.grad(y, [x, *lf.parameters()], dy)
    assert_close(y, y_hf, dtype, "y", factor=2)
    names = ["x"] + [n for n, _ in lf.named_parameters()]
    for name, a, e in zip(names, g, g_hf):
        assert_close(a, e, dtype, f"grad {name}", factor=2)
