"""bitsandbytes 4-bit (NF4/FP4) dequantisation, of the whole weight or a 2-D tile of it, bit for bit equal to
``bitsandbytes.functional.dequantize_4bit``: code[nibble] * absmax in fp32, one rounding on store."""
import triton
import triton.language as tl

_MAX_BLOCK = 1024  # columns a program: 4 warps x 32 lanes x 8 values, 512 contiguous bytes of codes


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 -> dtype, round to nearest even. bf16 by integer arithmetic: the same bits on the GPU, and right in
    Triton's interpreter too, whose own fp32 -> bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # a carry into the exponent rounds up to inf correctly
        bits = tl.where(x != x, 0x7FC0, bits)  # NaN: the bias could carry its payload into the sign or inf
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _dequant_kernel(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, out_ptr, offset, in_features, row0, col0,
                    cols, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                    BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # int64: rows * in_features passes 2**31 for large weights
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    e = (row0 + r) * in_features + col0 + c  # flat element of W
    byte = tl.load(q_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    nib = tl.where((e & 1) == 0, byte >> 4, byte & 0xF)  # even element in the high nibble
    value = tl.load(code_ptr + nib)  # nib < 16 also where masked: no mask needed
    blk = e // BLOCKSIZE
    if NESTED:  # absmax is uint8 codes into code2, scaled per BLOCKSIZE2 codes, plus offset
        a8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + offset  # bnb rounds the product, then the sum: launched without FMA fusion
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    tl.store(out_ptr + r * cols + c, _round(value * scale, out_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight, absmax, code, nested, blocksize: int, in_features: int, out, row0: int = 0,
               col0: int = 0) -> None:
    """out (R, C) <- W[row0:row0 + R, col0:col0 + C] of the 4-bit weight W with rows of in_features values.

    nested: None, or (absmax2 fp32, code2 fp32 (256,), blocksize2, offset) when absmax holds uint8 codes."""
    rows, cols = out.shape
    if rows == 0 or cols == 0:
        return
    if nested is None:
        absmax2, code2, blocksize2, offset = absmax, code, 1, 0.0  # unused: NESTED is off
    else:
        absmax2, code2, blocksize2, offset = nested
    block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(cols)))  # narrow tiles leave no lanes idle
    grid = (rows, triton.cdiv(cols, block))  # rows on axis 0, whose limit is 2**31 - 1, not 65535
    _dequant_kernel[grid](qweight, absmax, code, absmax2, code2, out, float(offset), in_features, row0, col0, cols,
                          NESTED=nested is not None, BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, BLOCK=block,
                          num_warps=4, enable_fp_fusion=False)
