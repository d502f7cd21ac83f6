"""RMSNorm forward and backward: one row per program, fp32 math, one rounding on store."""
import torch
import triton
import triton.language as tl


@triton.jit
def _xhat(x, rstd, dtype: tl.constexpr, LLAMA: tl.constexpr):
    xn = x * rstd
    if LLAMA:  # HF Llama rounds the normalised row to the input dtype before the weight
        xn = xn.to(dtype).to(tl.float32)
    return xn


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, cols, eps, offset,
                LLAMA: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * cols may pass 2**31
    x_row = x_ptr + row * cols
    y_row = y_ptr + row * cols
    dtype = y_ptr.dtype.element_ty
    if ONE_BLOCK:  # the row stays in registers: x is read once
        c = tl.arange(0, BLOCK)
        mask = c < cols
        x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / cols + eps)
        s = offset + tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + c, (_xhat(x, rstd, dtype, LLAMA) * s).to(dtype), mask=mask)
    else:  # too wide for registers: a pass for the sum of squares, a second to scale
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            c = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + c, mask=c < cols, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / cols + eps)
        for start in range(0, cols, BLOCK):
            c = start + tl.arange(0, BLOCK)
            mask = c < cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            s = offset + tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (_xhat(x, rstd, dtype, LLAMA) * s).to(dtype), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _load_chunk(x_ptr, dy_ptr, w_ptr, base, start, cols, offset, BLOCK: tl.constexpr):
    """Columns [start, start + BLOCK) of a row of x and dy, and of offset + w, in fp32."""
    c = start + tl.arange(0, BLOCK)
    mask = c < cols
    x = tl.load(x_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
    s = offset + tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    return c, mask, x, dy, s


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, part_ptr, rows, cols, offset,
                LLAMA: tl.constexpr, HAS_DW: tl.constexpr, BLOCK: tl.constexpr,
                ONE_BLOCK: tl.constexpr):
    # Persistent: program p takes rows p, p + G, ... and owns row p of the (G, cols) partial dw.
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0)
    part_row = part_ptr + pid * cols
    dtype = dx_ptr.dtype.element_ty
    if ONE_BLOCK:  # weight and partial dw stay in registers across all the program's rows
        c = tl.arange(0, BLOCK)
        mask = c < cols
        s = offset + tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, rows, n_prog):
            base = row * cols
            x = tl.load(x_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            g = dy * s
            # dx = rstd * (g - xhat * mean(g * xhat)), with xhat = x * rstd folded into k
            k = tl.sum(g * x, axis=0) * (rstd * rstd / cols)
            tl.store(dx_ptr + base + c, (rstd * (g - x * k)).to(dtype), mask=mask)
            if HAS_DW:
                dw += dy * _xhat(x, rstd, dtype, LLAMA)
        if HAS_DW:
            tl.store(part_row + c, dw, mask=mask)
    else:  # too wide for registers: the partial dw lives in this program's (zeroed) buffer row
        for row in range(pid, rows, n_prog):
            base = row * cols
            rstd = tl.load(rstd_ptr + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, cols, BLOCK):
                c, mask, x, dy, s = _load_chunk(x_ptr, dy_ptr, w_ptr, base, start, cols, offset, BLOCK)
                acc += dy * s * x
            k = tl.sum(acc, axis=0) * (rstd * rstd / cols)
            for start in range(0, cols, BLOCK):
                c, mask, x, dy, s = _load_chunk(x_ptr, dy_ptr, w_ptr, base, start, cols, offset, BLOCK)
                tl.store(dx_ptr + base + c, (rstd * (dy * s - x * k)).to(dtype), mask=mask)
                if HAS_DW:
                    p = tl.load(part_row + c, mask=mask, other=0.0)
                    tl.store(part_row + c, p + dy * _xhat(x, rstd, dtype, LLAMA), mask=mask)


# The widest block each pass takes in one piece: past them ptxas spills (bench/triton_aot.py, sm_80 and sm_90; at
# 32 warps a thread gets 64 registers). The forward holds one row of x; the backward's one-block path holds x, dy,
# the weight and the partial dw, which spilled from 16384 columns, and 65536-column chunks spilled in both passes.
FWD_MAX_BLOCK = 16384
BWD_MAX_BLOCK = 8192


def _block(cols, max_block):
    """(BLOCK, ONE_BLOCK, num_warps): the whole row, or chunks of max_block rounded down to 2**k."""
    if cols <= max_block:
        block, one = triton.next_power_of_2(cols), True
    else:
        block, one = 1 << (max_block.bit_length() - 1), False
    return block, one, max(1, min(32, block // 512))  # 16 values a thread: no spills up to 8K


def forward(x, w, y, rstd, eps: float, offset: float, casting: str, max_block: int = FWD_MAX_BLOCK) -> None:
    rows, cols = x.shape
    block, one, warps = _block(cols, max_block)
    _fwd_kernel[(rows,)](x, w, y, rstd, cols, eps, offset,
                         LLAMA=casting == "llama", BLOCK=block, ONE_BLOCK=one, num_warps=warps)


def backward(dy, x, w, rstd, dx, dw, offset: float, casting: str, max_block: int = BWD_MAX_BLOCK) -> None:
    rows, cols = x.shape
    block, one, warps = _block(cols, max_block)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    n_prog = max(1, min(sms, rows))
    has_dw = dw is not None
    # The one-block kernel writes its whole partial row; the chunked one accumulates into it.
    alloc = torch.empty if one else torch.zeros
    part = alloc((n_prog, cols) if has_dw else (1,), dtype=torch.float32, device=x.device)
    _bwd_kernel[(n_prog,)](dy, x, w, rstd, dx, part, rows, cols, offset,
                           LLAMA=casting == "llama", HAS_DW=has_dw, BLOCK=block, ONE_BLOCK=one,
                           num_warps=warps)
    if has_dw:
        dw.copy_(part.sum(0))
