"""Row-wise cross-entropy with its gradient written in the forward: one row per program, fp32 math.

Per valid row (label y): optional softcap z = c * tanh(x / c), then
``loss = lse - (1 - eps) z_y - eps / V * sum(z) + z_loss * lse^2`` and
``grad = scale * (softmax(z) (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]) * dz/dx``.
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    """(tanh(u), 1 - tanh(u)^2) in fp32 without libdevice, to a few ulp relative, near 0 and in the tails."""
    a = tl.abs(u)
    small = a < 0.25
    # |u| < 0.25: odd Taylor series to u^9 (next term below 1e-8 relative), where 1 - e^(-2a) would cancel;
    # evaluated at 0 elsewhere, so that poly^2 cannot overflow in the lanes it does not serve
    v = tl.where(small, u, 0.0)
    v2 = v * v
    poly = v * (1.0 + v2 * (-0.3333333333333333 + v2 * (0.13333333333333333 + v2 * (
        -0.05396825396825397 + v2 * 0.021869488536155203))))
    # |u| >= 0.25: e = e^(-2a) <= 0.61 keeps 1 - e clear of cancellation, and cannot overflow;
    # 1 - t^2 = 4e / (1 + e)^2 there, since 1 - t^2 itself cancels as t -> 1
    e = tl.exp(-2.0 * a)
    r = 1.0 / (1.0 + e)
    big = (1.0 - e) * r
    t = tl.where(small, poly, tl.where(u < 0, -big, big))
    d = tl.where(small, 1.0 - poly * poly, 4.0 * e * r * r)
    return t, d


@triton.jit
def _cap(x, softcap, inv_cap, SOFTCAP: tl.constexpr):
    """(z, dz/dx): the logits soft-capped to softcap * tanh(x / softcap), or x and 1."""
    if SOFTCAP:
        t, d = _tanh(x * inv_cap)  # not x / softcap: exp and 1 / (1 + e) keep the SFU busy enough
        return softcap * t, d
    else:
        return x, 1.0


@triton.jit
def _kernel(x_ptr, labels_ptr, grad_ptr, loss_ptr, V, ignore_index, eps, softcap, z_loss, grad_scale,
            HAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * V passes 2**31 at real sizes
    x_row = x_ptr + row * V
    g_row = grad_ptr + row * V
    dtype = grad_ptr.dtype.element_ty
    label = tl.load(labels_ptr + row)
    inv_cap = 1.0 / softcap if SOFTCAP else 0.0
    if label == ignore_index:  # no loss, zero gradient, no exp work
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK):
                c = start + tl.arange(0, BLOCK)
                tl.store(g_row + c, tl.zeros([BLOCK], dtype=dtype), mask=c < V)
    else:
        # z_y first: with grad aliasing the logits, pass 2 overwrites it
        z_y = _cap(tl.load(x_row + label).to(tl.float32), softcap, inv_cap, SOFTCAP)[0]
        # Pass 1: online log-sum-exp. Every block holds at least one column, so its max is finite and
        # the first rescale is exp(-inf) = 0 times an empty sum.
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane sum of z - z_y: one reduction at the end
        for start in range(0, V, BLOCK):
            c = start + tl.arange(0, BLOCK)
            mask = c < V
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            z = _cap(x, softcap, inv_cap, SOFTCAP)[0]
            z = tl.where(mask, z, float("-inf"))  # after the cap, which would map -inf to -softcap
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if SMOOTH:
                acc += tl.where(mask, z - z_y, 0.0)
        # lse = m + log_s is kept in two parts: z - m and m - z_y are exact or nearly, while rounding
        # lse itself would cost an ulp of |z| (~1e-3 at logits of 1e4) in every exponent below
        log_s = tl.log(s)
        lse = m + log_s
        # lse - (1 - eps) z_y - eps / V sum(z)  ==  (lse - z_y) - eps / V sum(z - z_y)
        loss = (m - z_y) + log_s + z_loss * lse * lse
        if SMOOTH:
            loss -= eps / V * tl.sum(acc, axis=0)
        tl.store(loss_ptr + row, loss)
        if HAS_GRAD:
            # Pass 2: softmax recomputed from the block just loaded: each block is read before it is written.
            # (p - [j == y]) + p 2 z_loss lse + eps ([j == y] - 1 / V): no 1 - 1 cancellation when p -> 1.
            zc = 2.0 * z_loss * lse
            for start in range(0, V, BLOCK):
                c = start + tl.arange(0, BLOCK)
                mask = c < V
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                z, dz = _cap(x, softcap, inv_cap, SOFTCAP)
                p = tl.exp((z - m) - log_s)
                hit = c == label
                g = (p - tl.where(hit, 1.0, 0.0)) + p * zc
                if SMOOTH:
                    g += eps * (tl.where(hit, 1.0, 0.0) - 1.0 / V)
                tl.store(g_row + c, (g * (dz * grad_scale)).to(dtype), mask=mask)


def _block(V):
    """(BLOCK, num_warps): up to 4096 columns a block, 16 values a thread. On sm_90 this takes 80 registers
    with the softcap and no spills; 8192 columns over 16 warps spilled (ptxas kept those to 64 registers)."""
    block = min(triton.next_power_of_2(V), 4096)
    return block, max(1, min(8, block // 512))


def forward(logits, labels, grad, loss, ignore_index: int, smoothing: float, softcap: float, z_loss: float,
            grad_scale: float) -> None:
    rows, V = logits.shape
    block, warps = _block(V)
    has_grad = grad is not None
    _kernel[(rows,)](logits, labels, grad if has_grad else logits, loss, V, ignore_index, smoothing, softcap,
                     z_loss, grad_scale, HAS_GRAD=has_grad, SOFTCAP=softcap != 0.0, SMOOTH=smoothing != 0.0,
                     BLOCK=block, num_warps=warps)
