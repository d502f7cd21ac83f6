"""QLoRA's first half: weights quantized by bitsandbytes as they load (4-bit nf4/fp4 or 8-bit), on CUDA or the CPU.

Preparing a quantized model for training needs nothing beyond what every adapter run gets (frozen base weights,
gradient checkpointing with input gradients, fp32 adapter weights): unlike peft's prepare_model_for_kbit_training,
the non-quantized weights (norms, embeddings, head) are not all upcast to float32. Under autocast they compute in
fp32 where it matters anyway, and an fp32 copy of the embeddings and head of a large vocabulary costs gigabytes;
upcast_layernorm asks for fp32 norms explicitly.
"""

from __future__ import annotations

import importlib.util
import re
from typing import get_args

import torch

from lf import device
from lf.config.model import QuantizationBit, QuantizationType
from lf.errors import ModelError

METHODS = ("bnb", "bitsandbytes")
BITS = get_args(QuantizationBit)
TYPES = get_args(QuantizationType)
# LLaMA-Factory's other methods, each with why lf refuses it here (checked with transformers 5.23, torch 2.13 CPU)
REFUSED = {
    # hqq's own HQQLinear does run on the CPU: swapping the linears in without transformers would lift this
    "hqq": "transformers' HQQ quantizer refuses a device_map holding the CPU; not built yet",
    "eetq": "the eetq package has no distribution on the package index, and its kernels are CUDA-only",
}


def quantization_kwargs(model_args, finetuning_args, config, dtype: torch.dtype, *,
                        is_trainable: bool) -> tuple[dict, str | None]:
    """from_pretrained's quantization_config and device_map for quantization_bit (none when unset), with a line
    saying what is quantized and how."""
    bits = model_args.quantization_bit
    if bits is None:
        return {}, None
    if model_args.quantization_method not in METHODS:
        why = REFUSED.get(model_args.quantization_method, "not built yet")
        raise ModelError(f"quantization_method: {model_args.quantization_method!r} is not supported ({why}); lf "
                         f"quantizes with bitsandbytes (quantization_method: bnb)")
    if bits not in BITS:
        raise ModelError(f"quantization_bit: {bits} is not supported; bitsandbytes quantizes to 4 or 8 bits")
    if bits == 4 and model_args.quantization_type not in TYPES:
        raise ModelError(f"quantization_type: {model_args.quantization_type!r} is not one of {', '.join(TYPES)}")
    if getattr(config, "quantization_config", None) is not None:
        raise ModelError(f"{model_args.model_name_or_path} is already quantized "
                         f"({_method_name(config.quantization_config)}); remove quantization_bit")
    if model_args.train_from_scratch:
        raise ModelError("quantization_bit quantizes pretrained weights; train_from_scratch has none to quantize")
    if is_trainable and finetuning_args.finetuning_type != "lora":
        raise ModelError(f"quantized weights cannot train: quantization_bit needs finetuning_type: lora (QLoRA), "
                         f"not {finetuning_args.finetuning_type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("quantization_bit needs bitsandbytes: pip install 'lf[qlora]'")
    from transformers import BitsAndBytesConfig

    skip, kept = _unquantized(config)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                                   bnb_4bit_use_double_quant=model_args.double_quantization,
                                   bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
        what = (f"4-bit {model_args.quantization_type}{' with double quantization' * model_args.double_quantization}"
                f", computing in {str(dtype).removeprefix('torch.')}")
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        what = "8-bit (LLM.int8)"
    device_map = _device_map(model_args.quantization_device_map)
    return ({"quantization_config": quant, "device_map": device_map},
            f"quantization: {what} by bitsandbytes{kept}, placed by device_map {device_map}")


def _unquantized(config) -> tuple[list[str] | None, str]:
    """bitsandbytes' llm_int8_skip_modules for a vision-language model (None for others: transformers' defaults)
    and the words saying so: its vision tower and projector keep their dtype, as QLoRA trains the language model
    only. The list replaces transformers' default skips, so the output head (lm_head) is named again."""
    from lf.data.mm_plugins import plugin_for

    plugin = plugin_for(config.model_type)
    if plugin is None:
        return None, ""
    parts = plugin.vision_tower + plugin.projector
    # patterns match module paths from the start (as regexes, up to a "." boundary): the parts lie anywhere
    return [rf"(?:.*\.)?{re.escape(part)}" for part in parts] + ["lm_head"], (
        f" (the language model; {', '.join(parts)} kept unquantized)")


def _device_map(choice: str | None):
    """bitsandbytes quantizes as weights reach their device: all on this process's GPU (LOCAL_RANK under a
    distributed launcher), "auto" to spread a model over every GPU (inference), or the CPU without one."""
    if choice == "auto":
        return "auto"
    if choice is not None:
        raise ModelError(f"quantization_device_map: {choice!r} is not supported (auto, or unset for this "
                         f"process's device)")
    return {"": device.current().device()}


def _method_name(quantization_config) -> str:
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return str(getattr(method, "value", method))
