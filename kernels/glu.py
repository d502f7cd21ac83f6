"""Gated linear units (SwiGLU, GeGLU tanh / exact): elementwise over flat tensors, fp32 math."""
import triton
import triton.language as tl

_BLOCK = 1024  # 4 warps x 32 lanes x 8 elements: 16-byte accesses for 16-bit dtypes


@triton.jit
def _erfc(x):
    """erfc by a Chebyshev fit with relative error below 1.2e-7 everywhere (1 + erf(x) cancels for x < 0)."""
    z = tl.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    r = t * tl.exp(-z * z + poly)
    return tl.where(x >= 0, r, 2.0 - r)


@triton.jit
def _act_and_grad(g, KIND: tl.constexpr):
    """act(g) and act'(g) in fp32; where only act is used the compiler drops the derivative."""
    if KIND == 0:  # silu
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    elif KIND == 1:  # 0.5 g (1 + tanh(z)) = g * sigmoid(2z): no tanh needed, and no cancellation
        z2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2 * sqrt(2/pi) * (...)
        sig = tl.sigmoid(z2)
        act = g * sig
        dact = sig + g * sig * (1.0 - sig) * 1.5957691216057308 * (1.0 + 0.134145 * g * g)
    else:  # exact gelu: g * Phi(g), Phi through erfc so that the negative tail keeps its precision
        cdf = 0.5 * _erfc(-g * 0.7071067811865476)
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # + g * phi(g)
    return act, dact


@triton.jit
def _fwd_kernel(g_ptr, u_ptr, o_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, KIND)
    tl.store(o_ptr + i, (act * u).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    # act is recomputed from gate: nothing is saved by the forward
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    dy = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, KIND)
    dtype = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + i, (dy * u * dact).to(dtype), mask=mask)
    tl.store(du_ptr + i, (dy * act).to(dtype), mask=mask)


# The activation's name (lf.kernels.glu's kinds) -> _act_and_grad's branch.
_KIND = {"swiglu": 0, "geglu_tanh": 1, "geglu_erf": 2}


def forward(gate, up, out, kind: str) -> None:
    n = gate.numel()
    _fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, KIND=_KIND[kind], BLOCK=_BLOCK, num_warps=4)


def backward(dy, gate, up, dgate, dup, kind: str) -> None:
    n = gate.numel()
    _bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dgate, dup, n, KIND=_KIND[kind], BLOCK=_BLOCK,
                                           num_warps=4)
