"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last dimension.

One public function, :func:`rms_norm`, with a fused forward and backward on three backends: Triton
(``lf._triton.kernels.rms_norm``, from ``kernels/rms_norm.py``), C++ (``csrc/rms_norm.cpp`` through ``lf._C``) and
torch (here; also the oracle the others are tested against, with HF's modules).

``casting`` reproduces each model family's numerics:

- ``"llama"``: normalise in fp32, round to the input dtype, then multiply by the weight (Llama, Mistral,
  Qwen, Phi-3);
- ``"gemma"``: everything in fp32, rounded once at the end; with ``offset=1.0`` this is Gemma's
  ``(1 + weight)``;
- ``"none"``: the formula in the input dtype. lf's kernels compute it in fp32 and round once, which is at
  least as accurate; the reference below computes it literally.
"""

from __future__ import annotations

import torch

from lf.kernels import _alloc, _checks, _recompute
from lf.kernels._backend import Implementations

CASTINGS = ("llama", "gemma", "none")  # lf._C.Casting's member names, which the backends are given


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       casting: str = "llama") -> torch.Tensor:
    """The plain torch formula (autograd gives its backward): the oracle for every backend."""
    if casting == "none":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        return (offset + weight) * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


# ---- torch backend: explicit forward/backward on (rows, cols) tensors, writing into the outputs ----

def _torch_forward(x, w, y, rstd, eps, offset, casting):
    xf = x.float()
    rstd.copy_(torch.rsqrt(xf.square().mean(-1) + eps))
    normed = xf * rstd[:, None]
    if casting == "llama":
        normed = normed.to(x.dtype).float()
    y.copy_(normed * (offset + w.float()))


def _torch_backward(dy, x, w, rstd, dx, dw, offset, casting):
    dyf, xhat = dy.float(), x.float() * rstd[:, None]
    g = dyf * (offset + w.float())
    dx.copy_(rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True)))
    if dw is not None:
        if casting == "llama":
            xhat = xhat.to(x.dtype).float()
        dw.copy_((dyf * xhat).sum(0))


# ---- cpu backend: lf._C, given pointers ----

def _cpu_forward(x, w, y, rstd, eps, offset, casting):
    from lf import _C

    _C.rms_norm_fwd(_C.RmsNormFwd(x=x.data_ptr(), w=w.data_ptr(), y=y.data_ptr(), rstd=rstd.data_ptr(),
                                  rows=x.shape[0], cols=x.shape[1], eps=eps, offset=offset,
                                  casting=_C.Casting[casting], dtype=_checks.cpu_dtype(x.dtype),
                                  threads=_checks.threads()))


def _cpu_backward(dy, x, w, rstd, dx, dw, offset, casting):
    from lf import _C

    _C.rms_norm_bwd(_C.RmsNormBwd(dy=dy.data_ptr(), x=x.data_ptr(), w=w.data_ptr(), rstd=rstd.data_ptr(),
                                  dx=dx.data_ptr(), dw=0 if dw is None else dw.data_ptr(), rows=x.shape[0],
                                  cols=x.shape[1], offset=offset, casting=_C.Casting[casting],
                                  dtype=_checks.cpu_dtype(x.dtype), threads=_checks.threads()))


FORWARD = Implementations(triton="lf._triton.kernels.rms_norm:forward", cpu=_cpu_forward, torch=_torch_forward)
BACKWARD = Implementations(triton="lf._triton.kernels.rms_norm:backward", cpu=_cpu_backward, torch=_torch_backward)


# ---- custom ops (opaque to torch.compile) and the autograd Function ----

@torch.library.custom_op("lf::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                  casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    y = _alloc.recycled_like(x)
    rstd = _alloc.empty(x.shape[0], x, torch.float32)
    FORWARD.for_device(x.device)(x, weight, y, rstd, eps, offset, casting)
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset, casting):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("lf::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                  casting: str, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx = _alloc.recycled_like(x)
    dw = _alloc.empty_like(weight) if weight_grad else weight.new_empty(0)
    BACKWARD.for_device(x.device)(dy, x, weight, rstd, dx, dw if weight_grad else None, offset, casting)
    return dx, dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset, casting, weight_grad):
    return torch.empty_like(x), torch.empty_like(weight) if weight_grad else weight.new_empty(0)


class RMSNormFunction(torch.autograd.Function):
    """On (rows, cols) contiguous ``rows``; :func:`rms_norm` reshapes."""

    @staticmethod
    def forward(ctx, rows, weight, eps, offset, casting):
        y, rstd = torch.ops.lf.rms_norm_fwd(rows, weight.contiguous(), eps, offset, casting)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.offset, ctx.casting = offset, casting
        return y

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        want_dw = ctx.needs_input_grad[1]
        dx, dw = torch.ops.lf.rms_norm_bwd(dy.contiguous(), rows, weight.contiguous(), rstd, ctx.offset, ctx.casting,
                                           want_dw)
        return dx, dw if want_dw else None, None, None, None


def _forward_again(rows, weight, eps, offset, casting, shape):
    """The forward's output from what its node keeps (the same kernel on the same inputs: the same bits)."""
    return torch.ops.lf.rms_norm_fwd(rows, weight.contiguous(), eps, offset, casting)[0].view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             casting: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), differentiable in ``x`` and ``weight``.

    ``weight`` has shape ``(x.shape[-1],)`` and x's dtype and device. Non-contiguous ``x`` is copied once.
    """
    op = "rms_norm"
    _checks.tensor(op, "x", x)
    _checks.tensor(op, "weight", weight)
    _checks.same_device_and_dtype(op, "x", x, weight=weight)
    _checks.choice(op, "casting", casting, CASTINGS)
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        _checks.fail(op, f"`weight` has shape {tuple(weight.shape)} but must be ({x.shape[-1] if x.dim() else '?'},), "
                         f"the size of the last dimension of `x` {tuple(x.shape)}")
    if x.numel() == 0:
        _checks.fail(op, f"`x` {tuple(x.shape)} is empty")
    if not eps > 0:
        _checks.fail(op, f"`eps`={eps} must be positive (e.g. 1e-6)")
    rows, eps, offset = x.reshape(-1, x.shape[-1]).contiguous(), float(eps), float(offset)
    out = RMSNormFunction.apply(rows, weight, eps, offset, casting).view(x.shape)
    # a LoRA projection taking it keeps rows and weight, which this node keeps anyway, in its place
    return _recompute.mark(out, _forward_again, rows, weight, eps=eps, offset=offset, casting=casting, shape=x.shape)
