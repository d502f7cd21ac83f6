"""lf's 4-bit dequantisation against bitsandbytes (bit for bit: the torch reference, and the C++ kernel for whole
weights and for tiles) and lora_nf4_linear, on every backend, against the float64 oracle and PEFT's LoRA over
bnb.nn.Linear4bit. Tolerances: support.TOL per dtype (the op rounds like the reference: W once to its dtype,
each matmul once)."""

import importlib

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lf import _C
from lf.errors import KernelDTypeError, KernelInputError
from lf.kernels.lora_nf4_linear import dequantize_4bit, lora_nf4_linear, lora_nf4_linear_reference
from tests.support import DTYPES, assert_close, oracle, saved_numels

SHAPES = [(64, 128), (1, 64), (300, 200), (4096, 3), (7, 33), (3, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_equals_bitsandbytes(quant_type, nested, dtype):
    for shape in SHAPES:
        w = torch.randn(shape, dtype=dtype) * 3
        qweight, state = bnb_f.quantize_4bit(w, quant_type=quant_type, compress_statistics=nested)
        expected = _bnb_dequantized(qweight, state)
        got = dequantize_4bit(qweight, state)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, expected), f"{quant_type} nested={nested} {dtype} {shape}"


def _bnb_dequantized(qweight, state):
    # bnb's fallback for odd widths is torch.compile'd: eager does the same fp32 products and one rounding
    with torch.compiler.set_stance("force_eager"):
        return bnb_f.dequantize_4bit(qweight, state)


@pytest.mark.parametrize("isa", _C.available_isas().split(", "))
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_kernel_dequantizes_tiles_bit_for_bit(quant_type, nested, isa, monkeypatch):
    op = importlib.import_module("lf.kernels.lora_nf4_linear")
    best = _C.isa()
    _C.set_isa(isa)
    try:
        for dtype in DTYPES:
            for shape in SHAPES + [(129, 3), (5, 1000)]:
                qweight, state = bnb_f.quantize_4bit(torch.randn(shape, dtype=dtype) * 3, quant_type=quant_type,
                                                     compress_statistics=nested)
                expected = _bnb_dequantized(qweight, state)
                rows, cols = shape
                # the whole weight; a tile starting on a low nibble (odd flat index) inside a block; the last
                # row and column; and the weight rounded to its dtype, stored in fp32 (the CPU matmul's tile)
                for r0, c0, r, c, out_dtype in ((0, 0, rows, cols, dtype), (rows // 3, cols // 2, rows - rows // 3,
                                                 cols - cols // 2, dtype), (rows - 1, cols - 1, 1, 1, dtype),
                                                (0, 0, rows, cols, torch.float32)):
                    out = torch.full((r, c), float("nan"), dtype=out_dtype)
                    op._cpu_dequantize(qweight, state, out, r0, c0)
                    want = expected[r0:r0 + r, c0:c0 + c].to(out_dtype)
                    assert torch.equal(out, want), f"{dtype} {shape} tile {(r0, c0, r, c)} as {out_dtype}"
    finally:
        _C.set_isa(best)


@pytest.mark.parametrize("nested", [False, True])
def test_rows_narrower_than_a_block_multiple_follow_the_format(nested):
    """bitsandbytes 0.50's native CPU kernel (AVX-512 machines) misreads rows whose width is a multiple of 16 but
    not of the 64-value block (112 here): blocks run over the flattened weight, as its quantizer, its GPU kernels
    and its generic implementation read them; lf reads them so too."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    w = torch.randn(64, 112)
    qweight, state = bnb_f.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    absmax = state.absmax if not nested else bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    generic = _dequantize_4bit_compute(qweight.reshape(-1), absmax, _get_4bit_code("nf4", qweight.device), 64,
                                       state.shape, torch.float32)
    assert torch.equal(dequantize_4bit(qweight, state), generic)
    # and the weight comes back within half the widest NF4 step (0.28 of the block's absmax), as it must
    assert (dequantize_4bit(qweight, state) - w).abs().max() < 0.15 * w.abs().max()


def _quantized(out_f, in_f, dtype, quant_type="nf4", nested=True):
    qweight, state = bnb_f.quantize_4bit(torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5, quant_type=quant_type,
                                         compress_statistics=nested)
    return qweight, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_oracle(rank, dtype, with_bias, backend):
    in_f, out_f, scaling = 96, 80, 16 / rank
    qweight, state = _quantized(out_f, in_f, dtype, "nf4" if rank != 8 else "fp4", nested=rank != 1)
    x = torch.randn(2, 5, in_f, dtype=dtype, requires_grad=True)
    lora_A = (torch.randn(rank, in_f, dtype=dtype) / in_f**0.5).requires_grad_()
    lora_B = torch.randn(out_f, rank, dtype=dtype).requires_grad_()
    bias = torch.randn(out_f, dtype=dtype).requires_grad_() if with_bias else None
    leaves = [t for t in (x, lora_A, lora_B, bias) if t is not None]
    dy = torch.randn(2, 5, out_f, dtype=dtype)

    y = lora_nf4_linear(x, qweight, state, lora_A, lora_B, scaling, bias)
    grads = torch.autograd.grad(y, leaves, dy)

    def ref(x, a, b, *maybe_bias):
        return lora_nf4_linear_reference(x, qweight, state, a, b, scaling, *maybe_bias)

    y_ref, grads_ref = oracle(ref, leaves, dy)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref, leaf in zip(("dx", "dA", "dB", "dbias"), grads, grads_ref, leaves):
        assert g.dtype == leaf.dtype
        assert_close(g, g_ref, dtype, name)


class _Tiny(torch.nn.Module):
    is_loaded_in_4bit = True  # what PEFT looks at to wrap bnb.nn.Linear4bit with its 4-bit LoRA layer

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_matches_peft_over_bitsandbytes(rank, dtype, backend):
    in_f, out_f, quant_type = 128, 72, "nf4" if rank != 8 else "fp4"
    linear = torch.nn.Linear(in_f, out_f, dtype=dtype)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=dtype, quant_type=quant_type, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True)
    layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    model = get_peft_model(_Tiny(layer.to("cpu")), LoraConfig(r=rank, lora_alpha=2 * rank + 1,
                                                              target_modules=["proj"]))
    lora = model.base_model.model.proj
    lora_A, lora_B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    torch.nn.init.normal_(lora_B.data)  # PEFT starts B at zero, which would leave dA zero
    scaling = lora.scaling["default"]
    x = torch.randn(2, 5, in_f, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 5, out_f, dtype=dtype)

    y_peft = model(x)
    dx_peft, dA_peft, dB_peft = torch.autograd.grad(y_peft, (x, lora_A, lora_B), dy)
    # PEFT keeps A and B in fp32 under a bf16 base (computing the LoRA path in fp32); lf computes in x's dtype
    y = lora_nf4_linear(x, layer.weight, layer.weight.quant_state, lora_A, lora_B, scaling, layer.bias)
    dx, dA, dB = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
    assert_close(y, y_peft, dtype, "y")
    assert_close(dx, dx_peft, dtype, "dx")
    assert dA.dtype == lora_A.dtype and dB.dtype == lora_B.dtype
    assert_close(dA, dA_peft, dtype, "dA")
    assert_close(dB, dB_peft, dtype, "dB")


@pytest.mark.parametrize("widened", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [1, 100, 64 * 67, 1 << 20])
def test_cpu_tiles_cover_every_row_and_column(tile, dtype, widened, monkeypatch):
    """Odd shapes (neither in nor out a multiple of 64) cut into tiles of a single row or column, a few, a
    whole number of 64 and the default (one tile): every tile lands in its place, forward and backward; bf16
    both natively and widened to fp32 (the path of CPUs without native bf16), whatever this CPU has."""
    monkeypatch.setenv("LF_KERNEL_BACKEND", "cpu")
    op = importlib.import_module("lf.kernels.lora_nf4_linear")
    monkeypatch.setattr(op, "TILE_ELEMENTS", tile)
    monkeypatch.setattr(op, "matmul_in_fp32", lambda t: widened and t.dtype != torch.float32)
    in_f, out_f, rank = 67, 131, 4
    qweight, state = _quantized(out_f, in_f, dtype, nested=False)
    x = torch.randn(3, 7, in_f, dtype=dtype, requires_grad=True)
    lora_A = torch.randn(rank, in_f, requires_grad=True)
    lora_B = torch.randn(out_f, rank, requires_grad=True)
    dy = torch.randn(3, 7, out_f, dtype=dtype)
    y = lora_nf4_linear(x, qweight, state, lora_A, lora_B, 0.5)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
    y_ref, grads_ref = oracle(lambda *t: lora_nf4_linear_reference(t[0], qweight, state, t[1], t[2], 0.5),
                              [x, lora_A, lora_B], dy)
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref):
        assert_close(g, g_ref, dtype, name)


def test_autocast_does_not_change_the_dtype(backend):
    """The op computes in x's dtype: an fp32 x under bf16 autocast gives the fp32 result (the patched PEFT layer
    casts x to autocast's dtype itself)."""
    qweight, state = _quantized(48, 64, torch.float32)
    x, a, b = torch.randn(3, 64, requires_grad=True), torch.randn(4, 64), torch.randn(48, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_nf4_linear(x, qweight, state, a, b, 2.0)
    assert y.dtype == torch.float32
    assert_close(y, lora_nf4_linear_reference(x, qweight, state, a, b, 2.0), torch.float32, "y")
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_graph_saves_no_dequantised_weight():
    in_f, out_f = 256, 192
    qweight, state = _quantized(out_f, in_f, torch.float32)
    x = torch.randn(2, 5, in_f, requires_grad=True)
    lora_A = torch.randn(8, in_f, requires_grad=True)
    lora_B = torch.randn(out_f, 8, requires_grad=True)
    args = (x, qweight, state, lora_A, lora_B, 2.0)
    assert max(saved_numels(lambda: lora_nf4_linear(*args))) < out_f * in_f
    # the check can see W: the plain autograd reference saves it
    assert max(saved_numels(lambda: lora_nf4_linear_reference(*args))) >= out_f * in_f


def test_bad_inputs():
    qweight, state = _quantized(16, 64, torch.float32)
    x, a, b, bias = torch.randn(3, 64), torch.randn(4, 64), torch.randn(16, 4), torch.randn(16)

    def call(**changes):
        args = dict(x=x, qweight=qweight, quant_state=state, lora_A=a, lora_B=b, scaling=2.0, bias=bias) | changes
        return lora_nf4_linear(**args)

    with pytest.raises(KernelInputError, match=r"`x` \(3, 32\) must end in in_features=64"):
        call(x=torch.randn(3, 32))
    with pytest.raises(KernelInputError, match=r"`lora_A` \(4, 32\) must be \(r, 64\)"):
        call(lora_A=torch.randn(4, 32))
    with pytest.raises(KernelInputError, match=r"`lora_B` \(16, 5\) must be \(16, 4\)"):
        call(lora_B=torch.randn(16, 5))
    with pytest.raises(KernelInputError, match=r"`lora_B` \(8, 4\) must be \(16, 4\)"):
        call(lora_B=torch.randn(8, 4))
    with pytest.raises(KernelInputError, match=r"`bias` \(8,\) must be \(16,\)"):
        call(bias=torch.randn(8))
    with pytest.raises(KernelDTypeError, match=r"`qweight` has dtype torch.int8; .* uint8"):
        call(qweight=qweight.view(torch.int8))
    with pytest.raises(KernelInputError, match=r"`qweight` holds 8 bytes but .* needs 512"):
        call(qweight=qweight[:8])
    with pytest.raises(KernelDTypeError, match=r"`x` has dtype torch.int64"):
        call(x=torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(KernelInputError, match=r"`qweight` is on cpu but `x` is on meta"):
        call(x=torch.randn(3, 64, device="meta"))
    with pytest.raises(KernelInputError, match=r"`lora_A` is on meta but `x` is on cpu"):
        call(lora_A=torch.randn(4, 64, device="meta"))
    with pytest.raises(KernelInputError, match=r"`scaling`=nan must be a finite number"):
        call(scaling=float("nan"))
    with pytest.raises(KernelInputError, match=r"`quant_state` has no `quant_type`; pass the bitsandbytes QuantState"):
        call(quant_state=object())
    other_qweight, int8_state = _quantized(16, 64, torch.float32)
    int8_state.quant_type = "int8"
    with pytest.raises(KernelInputError, match=r"`quant_state.quant_type`='int8' is not one of 'nf4', 'fp4'"):
        dequantize_4bit(other_qweight, int8_state)
