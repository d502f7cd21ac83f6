"""quanto (optimum-quanto) weight quantization of a loaded model's linear layers: int2, int4 or int8, on the CPU or
a GPU.

lf swaps each nn.Linear for quanto's QLinear and freezes it at once (its weight becomes quanto's packed codes and
scales), one layer at a time, so that quantizing holds one layer's float weight beyond the quantized model.
QLinear subclasses nn.Linear, so PEFT puts its plain LoRA layer over it; its forward runs F.linear on the quantized
weight, which quanto computes as x @ dequantize().T (+ bias) on the CPU, with a backward for the input. Settings as
quanto's own: int8 per output channel (absmax), int2/int4 in groups of up to 128 inputs (min/max with a shift).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

QTYPES = {2: "qint2", 4: "qint4", 8: "qint8"}


def quantize_linears(model: nn.Module, bits: int, kept: Callable[[str], bool]) -> int:
    """Replaces, in place, every nn.Linear of `model` whose path `kept` does not name by a frozen quanto QLinear
    of `bits`, computing in the linear's dtype. Returns how many were quantized."""
    from optimum.quanto import qtypes
    from optimum.quanto.nn import quantize_module

    done = 0
    for path, linear in [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and not kept(p)]:
        parent, _, name = path.rpartition(".")
        qlinear = quantize_module(linear, weights=qtypes[QTYPES[bits]])
        with torch.no_grad():
            qlinear.freeze()  # the float weight is quantized now and dropped
        qlinear.weight.requires_grad_(False)
        setattr(model.get_submodule(parent), name, qlinear)
        done += 1
    return done
