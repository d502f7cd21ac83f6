"""The op cases at Llama-3-8B widths: lf's op and the HF code it replaces, on the same inputs.

Minimum bytes each op must move, the numerator of lf's achieved bandwidth (e = bytes per element, N = tokens,
H = hidden, I = intermediate, D = head dim, Hq/Hkv = q/kv heads; rstd is fp32):

- rms_norm fwd: reads x and w, writes y and rstd: ``2*N*H*e + H*e + 4*N``
- rms_norm bwd: reads dy, x, w and rstd, writes dx and dw: ``3*N*H*e + 2*H*e + 4*N``
- rope fwd, and bwd alike: reads and writes q and k, reads cos and sin: ``2*N*(Hq + Hkv)*D*e + 2*N*D*e``
- swiglu / geglu fwd: reads gate and up, writes out: ``3*N*I*e``
- swiglu / geglu bwd: reads dy, gate and up, writes dgate and dup: ``5*N*I*e``
- fwd+bwd: the sum of the two, as they run as two passes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from lf.kernels import geglu, rms_norm, rope, swiglu

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128  # Llama-3-8B
EPS = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Targets that --check enforces: lf's speed-up over HF eager, per op (every direction and dtype); lf no
# slower than torch.compile beyond the noise margin (every op); RMSNorm forward's share of copy bandwidth.
SPEEDUP_VS_EAGER = {"rms_norm": 4.0, "rope": 3.0, "swiglu": 2.0}
COMPILE_NOISE_MARGIN = 1.10
RMS_NORM_FWD_COPY_FRACTION = 0.70


@dataclass
class Case:
    args: tuple[torch.Tensor, ...]  # the op's inputs, shared by every implementation
    leaves: tuple[torch.Tensor, ...]  # everything that receives a .grad: the inputs and any weight
    lf: Callable
    eager: Callable  # HF's code; the benchmark also times torch.compile of it
    fwd_bytes: int
    bwd_bytes: int


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def rms_norm_case(tokens: int, dtype: torch.dtype) -> Case:
    x = _randn(1, tokens, HIDDEN, dtype=dtype)
    hf = LlamaRMSNorm(HIDDEN, eps=EPS).to(dtype)  # weight of ones, as initialised
    w = hf.weight.detach().clone().requires_grad_()
    e, n = x.element_size(), tokens
    return Case(args=(x,), leaves=(x, w, hf.weight), lf=lambda x: rms_norm(x, w, EPS), eager=hf,
                fwd_bytes=2 * n * HIDDEN * e + HIDDEN * e + 4 * n,
                bwd_bytes=3 * n * HIDDEN * e + 2 * HIDDEN * e + 4 * n)


def rope_case(tokens: int, dtype: torch.dtype) -> Case:
    # As HF's attention makes them: (batch, seq, heads, dim) projections viewed heads-first.
    q = torch.randn(1, tokens, Q_HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2).requires_grad_()
    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    cos, sin = LlamaRotaryEmbedding(config)(q, torch.arange(tokens)[None])
    e = q.element_size()
    moved = 2 * tokens * (Q_HEADS + KV_HEADS) * HEAD_DIM * e + 2 * tokens * HEAD_DIM * e
    return Case(args=(q, k, cos, sin), leaves=(q, k), lf=rope, eager=apply_rotary_pos_emb,
                fwd_bytes=moved, bwd_bytes=moved)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The activation part of HF's LlamaMLP: ``act_fn(gate_proj(x)) * up_proj(x)``."""
    return F.silu(gate) * up


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same in Gemma's MLP, whose act_fn is gelu_pytorch_tanh."""
    return F.gelu(gate, approximate="tanh") * up


def glu_case(tokens: int, dtype: torch.dtype, lf: Callable, eager: Callable) -> Case:
    gate, up = _randn(tokens, INTERMEDIATE, dtype=dtype), _randn(tokens, INTERMEDIATE, dtype=dtype)
    size = gate.numel() * gate.element_size()
    return Case(args=(gate, up), leaves=(gate, up), lf=lf, eager=eager, fwd_bytes=3 * size, bwd_bytes=5 * size)


OPS: dict[str, Callable[[int, torch.dtype], Case]] = {
    "rms_norm": rms_norm_case,
    "rope": rope_case,
    "swiglu": functools.partial(glu_case, lf=swiglu, eager=silu_mul),
    "geglu": functools.partial(glu_case, lf=functools.partial(geglu, approximate="tanh"), eager=gelu_tanh_mul),
}


def direction_bytes(case: Case, direction: str) -> int:
    return {"fwd": case.fwd_bytes, "bwd": case.bwd_bytes, "fwd+bwd": case.fwd_bytes + case.bwd_bytes}[direction]
