"""LoRA over a frozen 4-bit (NF4/FP4) weight stored by bitsandbytes (QLoRA):
``y = x W^T + scaling * (x A^T) B^T (+ bias)``.

:func:`dequantize_4bit` is lf's own reading of bitsandbytes' storage; it equals
``bitsandbytes.functional.dequantize_4bit`` bit for bit. The format: each uint8 holds two 4-bit codes, the high
nibble first, over the row-major flattened weight (an odd count is padded with one nibble); a code indexes the
16-entry table ``quant_state.code`` (fp32); each run of ``blocksize`` values shares one fp32 ``absmax`` (the last
block may be short). With double quantisation (``quant_state.nested``) ``absmax`` is itself uint8 codes into
``state2.code`` scaled by one fp32 ``state2.absmax`` per ``state2.blocksize`` codes, plus the fp32 ``offset``.
bitsandbytes computes every product in fp32 and rounds once to ``quant_state.dtype``; so does lf.

:func:`lora_nf4_linear` dequantises W in the forward and again in the backward instead of saving it: between
the two only x, A, B, x A^T and the packed codes stay in memory. The low-rank terms take the cheap order
(tokens x r intermediates). Backends, for the two products with W (``x W^T`` forward, ``dy W`` backward):

- cpu: ``csrc/lora_nf4_linear.cpp`` dequantises W one tile at a time (rows of W forward, columns backward, so
  that each output element comes out of one BLAS call: no partial sums rounded to 16 bits) into a workspace
  reused from call to call (no fresh pages to fault in), and torch's BLAS multiplies each tile; the
  full-precision W never exists. Measured against dequantising all of W first, then one matmul, and against
  PEFT + bitsandbytes: ``python -m bench qlora-linear``.
- triton: ``kernels/lora_nf4_linear.py`` dequantises all of W into a buffer and cuBLAS multiplies. At training
  sizes (hundreds of tokens and more) the matmul is compute-bound on tensor cores, where cuBLAS beats a fused
  dequantise-matmul kernel; fused kernels pay off for a few tokens (decoding), not here.
- torch: :func:`_dequantize` then matmul: the reference.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from lf.errors import KernelDTypeError
from lf.kernels import _alloc, _checks
from lf.kernels._backend import Implementations, matmul_in_fp32
from lf.kernels.lora_linear import LoraLinearFunction, check_lora

QUANT_TYPES = ("nf4", "fp4")


def _check_quantized(op: str, qweight, quant_state) -> None:
    if not isinstance(qweight, torch.Tensor):
        _checks.fail(op, f"`qweight` must be a torch.Tensor, got {type(qweight).__name__}")
    if qweight.dtype != torch.uint8:
        raise KernelDTypeError(
            f"{op}: `qweight` has dtype {qweight.dtype}; lf reads bitsandbytes 4-bit weights stored as uint8 "
            f"(quantise with `quant_storage=torch.uint8`, the default)"
        )
    for field in ("quant_type", "shape", "dtype", "blocksize", "absmax", "code"):
        if not hasattr(quant_state, field):
            _checks.fail(op, f"`quant_state` has no `{field}`; pass the bitsandbytes QuantState of `qweight` "
                             f"(e.g. `layer.weight.quant_state`)")
    _checks.choice(op, "quant_state.quant_type", quant_state.quant_type, QUANT_TYPES)
    if quant_state.dtype not in _checks.FLOAT_DTYPES:
        raise KernelDTypeError(f"{op}: `quant_state.dtype` is {quant_state.dtype}; lf dequantises to float32, "
                               f"bfloat16 or float16")
    n = math.prod(quant_state.shape)
    if qweight.numel() != (n + 1) // 2:
        _checks.fail(op, f"`qweight` holds {qweight.numel()} bytes but `quant_state.shape` "
                         f"{tuple(quant_state.shape)} needs {(n + 1) // 2} (two 4-bit codes a byte); pass the "
                         f"QuantState that belongs to `qweight`")
    if quant_state.absmax.numel() != -(-n // quant_state.blocksize):
        _checks.fail(op, f"`quant_state.absmax` has {quant_state.absmax.numel()} blocks but "
                         f"{tuple(quant_state.shape)} in blocks of {quant_state.blocksize} needs "
                         f"{-(-n // quant_state.blocksize)}; pass the QuantState that belongs to `qweight`")
    nested = getattr(quant_state, "nested", False)
    if quant_state.absmax.dtype != (torch.uint8 if nested else torch.float32):
        _checks.fail(op, f"`quant_state.absmax` has dtype {quant_state.absmax.dtype}; bitsandbytes stores it as "
                         f"{'uint8 codes (nested)' if nested else 'float32'}: pass the QuantState of `qweight`")
    for name, t in (("quant_state.absmax", quant_state.absmax), ("quant_state.code", quant_state.code)):
        if t.device != qweight.device:
            _checks.fail(op, f"`{name}` is on {t.device} but `qweight` is on {qweight.device}; move the layer "
                             f"to one device")


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in fp32; the last block may be short."""
    n = values.numel()
    padded = F.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * scales.view(-1, 1)).view(-1)[:n]


def _absmax(quant_state) -> torch.Tensor:
    if not getattr(quant_state, "nested", False):
        return quant_state.absmax.float()
    inner = quant_state.state2
    # bnb: dequantize_blockwise to fp32, then `+= offset` in fp32: two roundings, kept as two ops
    codes = inner.code.float()[quant_state.absmax.reshape(-1).long()]
    return _scale_blocks(codes, inner.absmax.float(), inner.blocksize) + quant_state.offset


def _dequantize(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    n = math.prod(quant_state.shape)
    packed = qweight.reshape(-1)
    nibbles = torch.stack((packed >> 4, packed & 0xF), dim=-1).view(-1)[:n]
    values = quant_state.code.float()[nibbles.long()]
    weight = _scale_blocks(values, _absmax(quant_state), quant_state.blocksize)
    return weight.to(quant_state.dtype).view(tuple(quant_state.shape))


def dequantize_4bit(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight packed by ``bitsandbytes.functional.quantize_4bit`` (``qweight`` uint8 and its QuantState),
    in ``quant_state.dtype`` with ``quant_state.shape``; equal bit for bit to bitsandbytes' own."""
    _check_quantized("dequantize_4bit", qweight, quant_state)
    return _dequantize(qweight, quant_state)


# ---- the products with W, by backend ----

def _torch_weight(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    return _dequantize(qweight, quant_state)


def _triton_weight(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    from lf._triton.kernels.lora_nf4_linear import dequantize

    w = _alloc.empty(tuple(quant_state.shape), qweight, quant_state.dtype)
    dequantize(qweight, *_storage(quant_state), quant_state.shape[1], w)
    return w


def _x_wt_whole(weight, x2, qweight, quant_state):
    return x2 @ weight(qweight, quant_state).to(x2.dtype).t()


def _dy_w_whole(weight, dy2, qweight, quant_state):
    return dy2 @ weight(qweight, quant_state).to(dy2.dtype)


# Elements of W per CPU tile: 32 MiB in bf16, a 4096 x 4096 attention projection in one tile. Smaller tiles
# cost more: BLAS packs the other operand again for every call (measured on Llama-3-8B's projections, 512
# tokens, bf16 fwd+bwd: 2M-element tiles 1.5x slower than one tile; 16M within 10% of dequantising all of W,
# which a 14336 x 4096 MLP weight would need 112 MiB for). `python -m bench qlora-linear` compares the two.
TILE_ELEMENTS = 1 << 24


def _storage(quant_state) -> tuple:
    """(absmax, code, nested) as the kernels read them: nested is None or (absmax2, code2, blocksize2, offset)."""
    nested = None
    if getattr(quant_state, "nested", False):
        inner = quant_state.state2
        nested = (inner.absmax.float().contiguous(), inner.code.float().contiguous(), inner.blocksize,
                  float(quant_state.offset))
    return quant_state.absmax.contiguous(), quant_state.code.float().contiguous(), nested, quant_state.blocksize


def _cpu_dequantize(qweight: torch.Tensor, quant_state, out: torch.Tensor, row0: int, col0: int) -> None:
    """W[row0:row0 + rows, col0:col0 + cols] into ``out`` (rows, cols), contiguous, in out's dtype."""
    from lf import _C

    absmax, code, nested, blocksize = _storage(quant_state)
    inner = {}
    if nested:  # the absmax are uint8 codes: code2[absmax] * absmax2[block / blocksize2] + offset
        absmax2, code2, blocksize2, offset = nested
        inner = dict(nested=True, absmax2=absmax2.data_ptr(), code2=code2.data_ptr(), blocksize2=blocksize2,
                     offset=offset)
    q = qweight.contiguous()  # held until the kernel has run
    _C.dequant_4bit(_C.Dequant4bit(q=q.data_ptr(), absmax=absmax.data_ptr(), code=code.data_ptr(),
                                   blocksize=blocksize, in_features=quant_state.shape[1], row0=row0, col0=col0,
                                   rows=out.shape[0], cols=out.shape[1], out=out.data_ptr(),
                                   weight_dtype=_checks.cpu_dtype(quant_state.dtype),
                                   dtype=_checks.cpu_dtype(out.dtype), threads=_checks.threads(), **inner))


def _tile_size(n: int, width: int) -> int:
    """How many rows (or columns) of width ``width`` make one tile: whole cache lines of 64 where possible."""
    count = max(1, min(n, TILE_ELEMENTS // width))
    return count if count == n or count < 64 else count // 64 * 64


def _tiled_product(m: torch.Tensor, qweight, quant_state, *, rows_of_w: bool) -> torch.Tensor:
    """``m W^T`` by tiles of W's rows (rows_of_w; the forward's x W^T) or ``m W`` by tiles of W's columns (the
    backward's dy W). Either way a tile yields whole columns of the result from one BLAS call: no partial sums
    are rounded to 16 bits. The tile lives in a per-thread workspace, reused from call to call."""
    out_f, in_f = quant_state.shape
    n, width = (out_f, in_f) if rows_of_w else (in_f, out_f)
    step = _tile_size(n, width)
    result = _alloc.empty((m.shape[0], n), m)
    # 16-bit on a CPU without native 16-bit dot products: the tile (W rounded to its dtype, then widened) and m
    # widened to fp32 exactly, so the products are those of a 16-bit matmul with fp32 accumulation, only faster
    wide = matmul_in_fp32(m)
    operand = m.float() if wide else m
    tile = _alloc.workspace(step * width, operand)
    for i in range(0, n, step):
        count = min(step, n - i)
        w = tile[:count * width].view((count, width) if rows_of_w else (width, count))
        _cpu_dequantize(qweight, quant_state, w, *((i, 0) if rows_of_w else (0, i)))
        if wide:  # rounded once to m's dtype on the way in
            result[:, i:i + count] = operand @ (w.t() if rows_of_w else w)
        else:  # BLAS writes the result's columns in place (a row-major view with the result's row stride)
            torch.mm(m, w.t() if rows_of_w else w, out=result[:, i:i + count])
    return result


X_WT = Implementations(triton=functools.partial(_x_wt_whole, _triton_weight),
                       cpu=functools.partial(_tiled_product, rows_of_w=True),
                       torch=functools.partial(_x_wt_whole, _torch_weight))
DY_W = Implementations(triton=functools.partial(_dy_w_whole, _triton_weight),
                       cpu=functools.partial(_tiled_product, rows_of_w=False),
                       torch=functools.partial(_dy_w_whole, _torch_weight))


def lora_nf4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, quant_state, lora_A: torch.Tensor,
                              lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise, then plain matmuls in x's dtype (autograd gives the backward): the oracle."""
    w = _dequantize(qweight, quant_state).to(x.dtype)
    base = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return base + scaling * F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))


class _NF4:
    """The 4-bit W's products, by the backend chosen for the activations' device."""

    def __init__(self, qweight: torch.Tensor, quant_state):
        self.qweight, self.quant_state = qweight, quant_state

    def x_wt(self, x2: torch.Tensor) -> torch.Tensor:
        return X_WT.for_device(x2.device)(x2, self.qweight, self.quant_state)

    def dy_w(self, dy2: torch.Tensor) -> torch.Tensor:  # W recomputed: never saved
        return DY_W.for_device(dy2.device)(dy2, self.qweight, self.quant_state)


def lora_nf4_linear(x: torch.Tensor, qweight: torch.Tensor, quant_state, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + scaling * (x A^T) B^T (+ bias)`` with W the frozen bitsandbytes 4-bit weight (``qweight``,
    ``quant_state``: ``layer.weight`` and ``layer.weight.quant_state`` of a ``bnb.nn.Linear4bit``).

    x: (..., in); lora_A: (r, in); lora_B: (out, r); bias: (out,) or None. Computed in x's dtype (A, B, bias and
    W are cast to it, as bitsandbytes casts W and bias), also under autocast (cast x to the dtype wanted);
    gradients for x, A, B and bias come in their own dtypes.
    """
    op = "lora_nf4_linear"
    _check_quantized(op, qweight, quant_state)
    if len(quant_state.shape) != 2:
        _checks.fail(op, f"`quant_state.shape` {tuple(quant_state.shape)} must be (out_features, in_features)")
    check_lora(op, x, lora_A, lora_B, scaling, bias, *quant_state.shape, "the 4-bit weight", qweight=qweight)
    with torch.autocast(x.device.type, enabled=False):  # x's dtype decides, as documented; not autocast's
        return LoraLinearFunction.apply(x, _NF4(qweight, quant_state), lora_A, lora_B, float(scaling), bias)
