"""PEFT's LoRA layers as one lf op each: which layers an op can run, the forward it runs them with, and why the
others stay PEFT's.

- ``lora_nf4_linear``: LoRA over a bitsandbytes 4-bit linear (attention and MLP projections alike), through
  :func:`lora_nf4_linear`; not when the codes are not stored as uint8 or not in a float dtype;
- ``lora_linear``: LoRA over a plain nn.Linear, through :func:`lora_linear`; not with fan_in_fan_out, a trained
  base weight or a base that is a subclass.

LoRA over any other base (hqq's HQQLinear, AQLM's QuantizedLinear, bitsandbytes 8-bit) stays PEFT's and its
quantization's kernel; ``lora_linear``'s report counts those layers. Neither op takes lora_dropout > 0, DoRA, lora_bias or a ZeRO-3 partitioned base weight; per call, whatever PEFT
decides that lf's op does not (adapters disabled or merged, several adapters, extra arguments) runs PEFT's
forward. PEFT's layers are the same in every model family. :mod:`lf.kernels.patch` binds the forwards and
reports what :func:`layers_for` found.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lf.kernels.lora_linear import lora_linear
from lf.kernels.lora_nf4_linear import lora_nf4_linear


def _lora_call(self, x, args, kwargs):
    """(adapter name, autocast's dtype or None) when lf's op can run this call of a PEFT LoRA layer, else None:
    what PEFT decides per call (adapters disabled or merged, several active adapters, per-sample adapter names,
    extra arguments) runs PEFT's forward."""
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A:
        return None
    device = x.device.type
    return active[0], torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _lora_4bit_forward(self, x, *args, **kwargs):
    """PEFT's LoRA over a bitsandbytes Linear4bit as one lora_nf4_linear. Computes in the dtype bitsandbytes
    would (autocast's, else the layer's compute_dtype, else x's): the LoRA path too, as PEFT does under autocast,
    where HF's Trainer runs bf16/fp16 training."""
    call = _lora_call(self, x, args, kwargs)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    (name, dtype), base = call, self.base_layer
    y = lora_nf4_linear(x.to(dtype or base.compute_dtype or x.dtype), base.weight, base.weight.quant_state,
                        self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], base.bias)
    return y.to(x.dtype)


def _lora_dense_forward(self, x, *args, **kwargs):
    """PEFT's LoRA over a plain nn.Linear as one lora_linear, in autocast's dtype, else x's (PEFT, outside
    autocast, would run the LoRA path in the adapters' dtype). Returns that dtype, as nn.Linear (and so PEFT)
    does: under autocast its dtype, not x's."""
    call = _lora_call(self, x, args, kwargs)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    (name, dtype), base = call, self.base_layer
    return lora_linear(x.to(dtype or x.dtype), base.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], base.bias)


def _lora_obstacle(layer) -> str | None:
    """Why neither LoRA op can run this PEFT LoRA layer, or None."""
    if layer.lora_variant:
        return "DoRA (or another LoRA variant): PEFT's forward"
    dropout = [m.p for m in layer.lora_dropout.values() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropout:
        return f"lora_dropout {dropout[0]} > 0: lf's op has no dropout on the LoRA input (set lora_dropout: 0)"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias: lf's op has no bias on lora_B"
    if any(hasattr(p, "ds_id") for p in layer.base_layer.parameters()):
        # ZeRO-3 gathers a partitioned weight in hooks around the base layer's own call, which lf's op skips
        return "DeepSpeed ZeRO-3 partitions the base weight"
    return None


def _lora_4bit_obstacle(layer) -> str | None:
    """Why lora_nf4_linear cannot run this PEFT 4-bit LoRA layer, or None."""
    weight = layer.base_layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "the 4-bit weight is not quantized yet (no quant_state)"
    if weight.dtype != torch.uint8:
        return f"4-bit codes stored as {weight.dtype}, not uint8 (bnb_4bit_quant_storage)"
    if state.quant_type not in ("nf4", "fp4") or state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{state.quant_type} weights of dtype {state.dtype}: lf takes nf4/fp4 in float32/bfloat16/float16"
    return None


def _lora_dense_obstacle(layer) -> str | None:
    """Why lora_linear cannot run this PEFT LoRA layer, or None."""
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return f"the base layer is a {type(base).__name__}, not a plain nn.Linear"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out (a transposed Conv1D-style weight)"
    if base.weight.requires_grad:
        return "the base weight trains too (lf's op keeps it frozen)"
    if base.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the base weight is {base.weight.dtype}, not a float dtype"
    return None


@dataclass(frozen=True)
class LoraOp:
    forward: Callable  # bound as the forward of each layer the op takes
    obstacle: Callable[[nn.Module], str | None]  # why the op cannot run a layer (beyond _lora_obstacle), or None
    what: str  # the layers, as the report names them
    needs: tuple[str, ...]  # modules that must be imported already for such a layer to exist
    layer: str  # PEFT's layer class, "module:name"
    reports_others: bool = False  # also names the LoRA layers that no op takes (the report's catch-all)


LORA_OPS = types.MappingProxyType({
    "lora_nf4_linear": LoraOp(_lora_4bit_forward, _lora_4bit_obstacle, "4-bit LoRA layers", ("peft", "bitsandbytes"),
                              "peft.tuners.lora.bnb:Linear4bit"),
    "lora_linear": LoraOp(_lora_dense_forward, _lora_dense_obstacle, "LoRA linear layers", ("peft",),
                          "peft.tuners.lora.layer:Linear", reports_others=True),
})


def _lora_class(op: LoraOp) -> type | None:
    """PEFT's LoRA layer class that ``op`` runs, or None when no such layer can exist in this process (peft, or
    bitsandbytes for 4-bit, not imported: nothing is imported just to look)."""
    if any(m not in sys.modules for m in op.needs):
        return None
    module, name = op.layer.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def layers_for(base: nn.Module, kind: str) -> tuple[list[nn.Module], str | None]:
    """The PEFT LoRA layers in ``base`` that the op ``kind`` of :data:`LORA_OPS` can run, and why the others are
    left to PEFT (one clause per reason, naming how many and one of them), or None when none is."""
    op = LORA_OPS[kind]
    cls = _lora_class(op)
    layers = [(name, m) for name, m in base.named_modules() if cls is not None and type(m) is cls]
    taken, left = [], {}
    for name, layer in layers:
        why = _lora_obstacle(layer) or op.obstacle(layer)
        if why is None:
            taken.append(layer)
        else:
            left.setdefault(why, []).append(name)
    clauses = [f"{len(names)} of {len(layers)} {op.what} (e.g. {names[0]}) left to PEFT: {why}"
               for why, names in left.items()]
    others = _others(base) if op.reports_others else None
    return taken, "; ".join(clauses + ([others] if others else [])) or None


def _others(base: nn.Module) -> str | None:
    """The LoRA layers (linear, with an adapter) over a base that no op of LORA_OPS takes, by the base's class."""
    known = {_lora_class(op) for op in LORA_OPS.values()}
    others = [(name, m) for name, m in base.named_modules()
              if type(m) not in known and hasattr(m, "base_layer") and len(getattr(m, "lora_A", ())) > 0]
    if not others:
        return None
    bases = ", ".join(sorted({type(m.base_layer).__name__ for _, m in others}))
    return (f"{len(others)} LoRA layers over {bases} (e.g. {others[0][0]}) left to PEFT and their quantization's "
            f"kernel: lf's LoRA ops take plain and bitsandbytes 4-bit weights")
