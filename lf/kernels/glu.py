"""Gated activations of the MLP: ``act(gate) * up`` with SiLU (SwiGLU: Llama, Mistral, Qwen, Phi-3) or
GELU (GeGLU: Gemma, tanh approximation or exact erf).

The backward pass recomputes ``act(gate)`` instead of saving it. Backends: Triton (``kernels/glu.py``),
C++ (``csrc/glu.cpp``), torch (here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lf.kernels import _alloc, _checks
from lf.kernels._backend import Implementations

GEGLU_KIND = {"tanh": "geglu_tanh", "none": "geglu_erf"}  # kinds are lf._C.GluKind's member names


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU: the oracle."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """HF's ``act_fn(gate_proj(x)) * up_proj(x)`` with GELU: the oracle. Written as ``g * sigmoid(2z)`` (tanh)
    and ``g * erfc(-g/sqrt(2)) / 2`` (erf), identical to ``F.gelu``'s ``g (1 + tanh z) / 2`` and
    ``g (1 + erf(g/sqrt(2))) / 2`` but without their cancellation in the negative tail, which loses all
    precision there even in float64."""
    if approximate == "tanh":
        return gate * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)) * up
    return 0.5 * gate * torch.erfc(-gate * math.sqrt(0.5)) * up


# ---- torch backend ----

def _torch_act(g: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(g) and its derivative, written out (the backend computes them in fp32)."""
    if kind == "swiglu":
        sg = torch.sigmoid(g)
        return g * sg, sg * (1 + g * (1 - sg))
    if kind == "geglu_tanh":  # 0.5 g (1 + tanh z) = g sigmoid(2z), which does not cancel where tanh z nears -1
        c = 2 * math.sqrt(2 / math.pi)
        sg = torch.sigmoid(c * (g + 0.044715 * g**3))
        return g * sg, sg + g * sg * (1 - sg) * c * (1 + 3 * 0.044715 * g * g)
    cdf = 0.5 * torch.erfc(-g * math.sqrt(0.5))  # Phi(g) through erfc: precise in the negative tail
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)


def _torch_forward(gate, up, out, kind):
    out.copy_(_torch_act(gate.float(), kind)[0] * up.float())


def _torch_backward(dy, gate, up, dgate, dup, kind):
    act, dact = _torch_act(gate.float(), kind)
    dyf = dy.float()
    dgate.copy_(dyf * up.float() * dact)
    dup.copy_(dyf * act)


# ---- cpu backend ----

def _cpu_forward(gate, up, out, kind):
    from lf import _C

    _C.glu_fwd(_C.GluFwd(gate=gate.data_ptr(), up=up.data_ptr(), out=out.data_ptr(), n=gate.numel(),
                         kind=_C.GluKind[kind], dtype=_checks.cpu_dtype(gate.dtype), threads=_checks.threads()))


def _cpu_backward(dy, gate, up, dgate, dup, kind):
    from lf import _C

    _C.glu_bwd(_C.GluBwd(dy=dy.data_ptr(), gate=gate.data_ptr(), up=up.data_ptr(), dgate=dgate.data_ptr(),
                         dup=dup.data_ptr(), n=gate.numel(), kind=_C.GluKind[kind], dtype=_checks.cpu_dtype(gate.dtype),
                         threads=_checks.threads()))


FORWARD = Implementations(triton="lf._triton.kernels.glu:forward", cpu=_cpu_forward, torch=_torch_forward)
BACKWARD = Implementations(triton="lf._triton.kernels.glu:backward", cpu=_cpu_backward, torch=_torch_backward)


@torch.library.custom_op("lf::glu_fwd", mutates_args=())
def _glu_fwd(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    out = _alloc.recycled_like(gate)
    FORWARD.for_device(gate.device)(gate, up, out, kind)
    return out


@_glu_fwd.register_fake
def _(gate, up, kind):
    return torch.empty_like(gate)


@torch.library.custom_op("lf::glu_bwd", mutates_args=())
def _glu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = _alloc.recycled_like(gate), _alloc.recycled_like(up)
    BACKWARD.for_device(gate.device)(dy, gate, up, dgate, dup, kind)
    return dgate, dup


@_glu_bwd.register_fake
def _(dy, gate, up, kind):
    return torch.empty_like(gate), torch.empty_like(up)


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind):
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return torch.ops.lf.glu_fwd(gate, up, kind)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.lf.glu_bwd(dy.contiguous(), gate, up, ctx.kind)
        return dgate, dup, None


def _glu(op: str, gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    _checks.tensor(op, "gate", gate)
    _checks.tensor(op, "up", up)
    _checks.same_device_and_dtype(op, "gate", gate, up=up)
    if gate.shape != up.shape:
        _checks.fail(op, f"`gate` {tuple(gate.shape)} and `up` {tuple(up.shape)} must have the same shape "
                         f"(the outputs of gate_proj and up_proj)")
    return GLUFunction.apply(gate.contiguous(), up.contiguous(), kind)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, fused, differentiable in both."""
    return _glu("swiglu", gate, up, "swiglu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up`` (``approximate="tanh"`` as Gemma's ``gelu_pytorch_tanh``, ``"none"`` for erf)."""
    _checks.choice("geglu", "approximate", approximate, tuple(GEGLU_KIND))
    return _glu("geglu", gate, up, GEGLU_KIND[approximate])
