"""The Triton 4-bit dequantisation (run in Triton's interpreter on CPU tensors) against bitsandbytes, bit for bit:
the whole weight, and tiles of it that start on either nibble of a byte."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything: there is no GPU here

import bitsandbytes.functional as bnb_f  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lf._triton.kernels.lora_nf4_linear import dequantize  # noqa: E402

SHAPES = [(64, 128), (1, 64), (300, 200), (129, 3), (7, 33), (3, 5)]
# (row0, col0, rows, cols) inside a (300, 200) weight: odd col0 starts on a low nibble, the last one is ragged
TILES = [(0, 0, 16, 64), (5, 3, 7, 33), (1, 1, 1, 1), (64, 127, 9, 73), (299, 199, 1, 1), (123, 7, 177, 193)]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _quantize(shape, dtype, quant_type, nested):
    w = torch.randn(shape, dtype=dtype) * 3
    qweight, state = bnb_f.quantize_4bit(w, quant_type=quant_type, compress_statistics=nested)
    # bnb's fallback for odd widths is torch.compile'd: eager does the same fp32 products and one rounding
    with torch.compiler.set_stance("force_eager"):
        expected = bnb_f.dequantize_4bit(qweight, state)
    return qweight, state, expected


def _run(qweight, state, out, row0=0, col0=0):
    nested = None
    if state.nested:
        s2 = state.state2
        nested = (s2.absmax, s2.code, s2.blocksize, float(state.offset))
    out.fill_(float("nan"))  # poison: an element the kernel does not write fails the comparison
    dequantize(qweight, state.absmax, state.code, nested, state.blocksize, state.shape[1], out, row0=row0, col0=col0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_full_weight_equals_bitsandbytes(quant_type, nested, dtype):
    for shape in SHAPES:
        qweight, state, expected = _quantize(shape, dtype, quant_type, nested)
        got = _run(qweight, state, torch.empty(shape, dtype=dtype))
        assert torch.equal(got, expected), f"{quant_type} nested={nested} {dtype} {shape}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tiles_equal_bitsandbytes_slices(quant_type, nested, dtype):
    qweight, state, expected = _quantize((300, 200), dtype, quant_type, nested)
    for row0, col0, rows, cols in TILES:
        got = _run(qweight, state, torch.empty(rows, cols, dtype=dtype), row0, col0)
        assert torch.equal(got, expected[row0:row0 + rows, col0:col0 + cols]), f"tile {(row0, col0, rows, cols)}"


def test_nested_scale_is_not_fused():
    """The nested scale is code2 * absmax2, rounded to fp32, then + offset, rounded again: pick values where one
    fused multiply-add would round differently, and check the kernel matches the two-rounding result."""
    absmax2 = torch.tensor([1.0 + 2.0**-23], dtype=torch.float32)
    code2 = torch.full((256,), 1.0 + 2.0**-23, dtype=torch.float32)  # product has a 2**-46 tail to lose
    offset = -1.0 - 2.0**-22  # cancels the rounded product exactly; an FMA keeps the 2**-46 tail
    prod = code2[0] * absmax2[0]
    two_roundings = prod + torch.tensor(offset, dtype=torch.float32)
    fused = (code2[0].double() * absmax2[0].double() + offset).float()
    assert two_roundings.item() != fused.item()  # the case discriminates
    code = torch.ones(16, dtype=torch.float32)
    qweight = torch.zeros(8, dtype=torch.uint8)
    absmax = torch.zeros(1, dtype=torch.uint8)
    out = torch.full((1, 16), float("nan"))
    dequantize(qweight, absmax, code, (absmax2, code2, 256, offset), 64, 16, out)
    assert torch.equal(out, two_roundings.expand(1, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounding_edges(dtype):
    """The one rounding on store, round to nearest even like torch: ties both ways, overflow to inf, subnormals,
    signed zero, inf and NaN (the interpreter's own fp32 -> bf16 cast truncates: the kernel must not use it)."""
    code = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), -(1 + 3 * 2.0**-8), 65520.0, 3.3961e38,
                         float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, -0.0, 1 + 2.0**-11 + 2.0**-20,
                         1 + 3 * 2.0**-11, 6e-8, 2.9e-8], dtype=torch.float32)
    qweight = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8)
    absmax = torch.ones(1, dtype=torch.float32)
    out = torch.full((1, 16), float("nan"), dtype=dtype)
    dequantize(qweight, absmax, code, None, 64, 16, out)
    expected = code.to(dtype).view(1, 16)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # compare bits: -0.0 == 0.0 otherwise
    assert bool(((out.view(bits) == expected.view(bits)) | torch.isnan(expected)).all()), (out, expected)
