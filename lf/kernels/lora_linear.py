"""LoRA over a frozen weight as one autograd node: ``y = x W^T + scaling * (x A^T) B^T (+ bias)``.

:class:`LoraLinearFunction` is shared by :func:`lora_linear` (W a plain tensor) and
:func:`lf.kernels.lora_nf4_linear` (W stored 4-bit by bitsandbytes): each hands it an object giving the two
products with W (``x W^T`` forward, ``dy W`` backward), which is where their backends differ.

What the fusion saves against PEFT's ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``: PEFT casts x to
the adapters' dtype (fp32 under bf16 autocast: a tokens x in copy, and another back for the matmul), scales the
LoRA output in a separate pass and adds it in another, and autograd keeps several tokens x in/out tensors. Here
the low-rank terms take the cheap order (tokens x r intermediates), the LoRA product is added by BLAS into the
base product's output (``addmm_``), and only x, A, B and x A^T are saved; where x is an lf RMSNorm's output, not
even x: the norm's own input and weight, which its node keeps anyway, and the backward pass computes x again
(:mod:`lf.kernels._recompute`).

Backends: for a plain W both products are single BLAS calls on every device (cuBLAS on CUDA/ROCm, torch's CPU
BLAS, whatever the device's torch has), so there is nothing for a Triton or C++ kernel to fuse: the three
backends are the same code. :func:`lora_linear_reference` (autograd over plain matmuls) is the oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lf.kernels import _checks, _recompute


class LoraLinearFunction(torch.autograd.Function):
    """``frozen`` gives ``x_wt(x2)`` (a fresh (tokens, out) tensor the caller may write into) and ``dy_w(dy2)``
    (a fresh (tokens, in) tensor); W gets no gradient, so it is kept on ``frozen``, never saved."""

    @staticmethod
    def forward(ctx, x, frozen, lora_A, lora_B, scaling, bias):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        xa = x2 @ a.t()  # (tokens, r): small, saved so the backward need not recompute it
        y = frozen.x_wt(x2).addmm_(xa, b.t(), alpha=scaling)
        if bias is not None:
            y += bias.to(dtype)
        _recompute.save(ctx, x, lora_A, lora_B, xa)  # x, or what computes it again (an lf RMSNorm output)
        ctx.frozen, ctx.scaling, ctx.x_shape = frozen, scaling, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa = _recompute.saved(ctx)
        x2 = x.reshape(-1, x.shape[-1])
        dtype, s = x2.dtype, ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        dy_b = (dy2 @ b) * s  # (tokens, r): the cheap order, shared by dx and dA
        dx = dA = dB = dbias = None
        if ctx.needs_input_grad[0]:
            dx = ctx.frozen.dy_w(dy2).addmm_(dy_b, a).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            dA = (dy_b.t() @ x2).to(lora_A.dtype)
        if ctx.needs_input_grad[3]:
            dB = ((dy2.t() @ xa) * s).to(lora_B.dtype)
        if ctx.needs_input_grad[5]:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        return dx, None, dA, dB, None, dbias


def check_lora(op: str, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling, bias,
               out_f: int, in_f: int, what: str, **frozen: torch.Tensor) -> None:
    """The checks both LoRA ops share: tensors, one device, shapes against W's (out_f, in_f), a finite scaling.
    ``what`` names W in messages ("the weight", "the 4-bit weight"); ``frozen`` are W's tensors by name."""
    _checks.tensor(op, "x", x)
    _checks.tensor(op, "lora_A", lora_A)
    _checks.tensor(op, "lora_B", lora_B)
    named = {**frozen, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = _checks.tensor(op, "bias", bias)
    for name, t in named.items():
        if t.device != x.device:
            _checks.fail(op, f"`{name}` is on {t.device} but `x` is on {x.device}; move both to one device "
                             f"(e.g. `x.to({name}.device)`)")
    if x.dim() == 0 or x.shape[-1] != in_f:
        _checks.fail(op, f"`x` {tuple(x.shape)} must end in in_features={in_f} ({what} is {(out_f, in_f)})")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        _checks.fail(op, f"`lora_A` {tuple(lora_A.shape)} must be (r, {in_f}): (rank, in_features)")
    if lora_B.dim() != 2 or lora_B.shape != (out_f, lora_A.shape[0]):
        _checks.fail(op, f"`lora_B` {tuple(lora_B.shape)} must be ({out_f}, {lora_A.shape[0]}): (out_features "
                         f"of {what}, rank of `lora_A`)")
    if bias is not None and bias.shape != (out_f,):
        _checks.fail(op, f"`bias` {tuple(bias.shape)} must be ({out_f},): out_features of {what}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        _checks.fail(op, f"`scaling`={scaling!r} must be a finite number (lora_alpha / r)")


class _Dense:
    """A plain frozen W's products, in the activations' dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def x_wt(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 @ self.weight.to(x2.dtype).t()

    def dy_w(self, dy2: torch.Tensor) -> torch.Tensor:
        return dy2 @ self.weight.to(dy2.dtype)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain matmuls in x's dtype (autograd gives the backward): the oracle."""
    base = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return base + scaling * F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + scaling * (x A^T) B^T (+ bias)`` with W (``weight``, (out, in)) frozen: it gets no gradient.

    x: (..., in); lora_A: (r, in); lora_B: (out, r); bias: (out,) or None. Computed in x's dtype (W, A, B and bias
    are cast to it), also under autocast (cast x to the dtype wanted); gradients for x, A, B and bias come in
    their own dtypes.
    """
    op = "lora_linear"
    _checks.tensor(op, "weight", weight)
    if weight.dim() != 2:
        _checks.fail(op, f"`weight` {tuple(weight.shape)} must be 2-D: (out_features, in_features)")
    if weight.requires_grad:
        _checks.fail(op, "`weight` requires grad, but lora_linear trains only the adapters (and bias); "
                         "freeze it (`weight.requires_grad_(False)`) or use F.linear for a trained weight")
    check_lora(op, x, lora_A, lora_B, scaling, bias, *weight.shape, "the weight", weight=weight)
    with torch.autocast(x.device.type, enabled=False):  # x's dtype decides, as documented; not autocast's
        return LoraLinearFunction.apply(x, _Dense(weight), lora_A, lora_B, float(scaling), bias)
