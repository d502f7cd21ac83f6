"""HQQ (half-quadratic quantization, the hqq package) of a loaded model's linear layers, on the CPU or a GPU.

lf swaps each nn.Linear for hqq's own HQQLinear rather than going through transformers' HQQ quantizer, which
refuses a device_map that holds the CPU. HQQLinear's forward is x @ dequantize().T (+ bias) on any device, with a
backward for the input, so PEFT's HQQ LoRA layer trains over it. Settings as LLaMA-Factory's: no quantized
zeros/scales, groups of 64 along axis 0 (hqq flattens the weight into groups, so a layer whose weight does not
split into whole groups stays unquantized).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GROUP_SIZE = 64


def quantize_linears(model: nn.Module, bits: int, dtype: torch.dtype, device: torch.device | str,
                     kept: Callable[[str], bool]) -> tuple[int, list[str]]:
    """Replaces, in place, every nn.Linear of `model` whose path `kept` does not name by an HQQLinear of `bits`
    computing in `dtype` on `device`. Returns how many were quantized and the paths left unquantized because their
    weight does not split into groups of GROUP_SIZE."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=GROUP_SIZE, axis=0)
    done, ragged = 0, []
    for path, linear in [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and not kept(p)]:
        if linear.weight.numel() % GROUP_SIZE:
            ragged.append(path)
            continue
        parent, _, name = path.rpartition(".")
        linear.to(device)
        setattr(model.get_submodule(parent), name,
                HQQLinear(linear, config, compute_dtype=dtype, device=str(device), del_orig=True))
        done += 1
    return done, ragged


