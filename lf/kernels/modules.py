"""Drop-in ``nn.Module``s built on lf's ops, with the parameter names of the HF modules they replace
(so state dicts load unchanged)."""

from __future__ import annotations

import torch
from torch import nn

from lf.errors import KernelError
from lf.kernels.glu import geglu, swiglu
from lf.kernels.rms_norm import rms_norm

# HF's names for the MLP activations and the approximation lf's geglu uses for each.
GELU_APPROXIMATE = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class LFRMSNorm(nn.Module):
    """RMSNorm over the last dimension. ``offset=1.0, casting="gemma"`` is Gemma's norm (weight starts at 0)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama",
                 device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.offset = offset
        self.casting = casting

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.offset, self.casting)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, offset={self.offset}, casting={self.casting}"


class _GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the sizes and bias flag of an HF config."""

    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(self.gate_proj(x), self.up_proj(x)))


class LFSwiGLUMLP(_GatedMLP):
    """Llama/Mistral/Qwen-style MLP (SiLU gate)."""

    def gate_up(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)


class LFGeGLUMLP(_GatedMLP):
    """Gemma-style MLP (GELU gate; the approximation follows ``config.hidden_activation``)."""

    def __init__(self, config):
        super().__init__(config)
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in GELU_APPROXIMATE:
            raise KernelError(f"LFGeGLUMLP: activation {act!r} is not a GELU; set one of {sorted(GELU_APPROXIMATE)} "
                              f"or use LFSwiGLUMLP for silu")
        self.approximate = GELU_APPROXIMATE[act]

    def gate_up(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return geglu(gate, up, self.approximate)
