"""Rotary embedding (HF rotate_half pairing) of q and k: one launch, one position per program."""
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, sx_h, so_h, n_heads, half, c1, c2, sa, sb,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # x_ptr / o_ptr point at (b, head 0, s, 0); a tile is BLOCK_H heads x the first half-dims,
    # the partner half is the same tile shifted by `half`.
    d = tl.arange(0, BLOCK_D)[None, :]
    dtype = o_ptr.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
        mask = (h < n_heads) & (d < half)
        xp = x_ptr + h * sx_h + d
        op = o_ptr + h * so_h + d
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(op, (x1 * c1 + x2 * sa).to(dtype), mask=mask)
        tl.store(op + half, (x2 * c2 + x1 * sb).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, seq, n_q, n_k, half,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
                 sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                 sc_b, sc_s, ss_b, ss_s,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq
    s = pid % seq
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    # cos/sin of this position are read once and shared by every head of q and k
    cp = cos_ptr + b * sc_b + s * sc_s + d
    sp = sin_ptr + b * ss_b + s * ss_s + d
    c1 = tl.load(cp, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cp + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sp + half, mask=dmask, other=0.0).to(tl.float32)
    # out1 = x1*c1 + x2*sa, out2 = x2*c2 + x1*sb; the backward is the transpose of the rotation
    if BACKWARD:
        sa = s2
        sb = -s1
    else:
        sa = -s1
        sb = s2
    _rotate_heads(q_ptr + b * sq_b + s * sq_s, qo_ptr + b * sqo_b + s * sqo_s, sq_h, sqo_h,
                  n_q, half, c1, c2, sa, sb, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr + b * sk_b + s * sk_s, ko_ptr + b * sko_b + s * sko_s, sk_h, sko_h,
                  n_k, half, c1, c2, sa, sb, BLOCK_HK, BLOCK_D)


def apply(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    block_d = triton.next_power_of_2(half)
    cap = max(1, 2048 // block_d)  # at most ~2K elements per half-tile keeps registers in check
    block_hq = min(triton.next_power_of_2(n_q), cap)
    block_hk = min(triton.next_power_of_2(n_k), cap)
    warps = max(1, min(8, block_hq * block_d // 256))
    # cos/sin of batch 1 broadcast over the batch through a zero batch stride
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    ss_b = sin.stride(0) if sin.shape[0] > 1 else 0
    _rope_kernel[(bsz * seq,)](
        q, k, cos, sin, q_out, k_out, seq, n_q, n_k, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        sc_b, cos.stride(1), ss_b, sin.stride(1),
        BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=warps)
