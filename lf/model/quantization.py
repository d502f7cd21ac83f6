"""QLoRA's first half: the base model's weights quantized, by bitsandbytes as they load (4-bit nf4/fp4 or 8-bit,
on CUDA or the CPU) or once loaded by hqq (1 to 8 bits, lf.model.hqq) or quanto (int2/int4/int8, lf.model.quanto);
or quantized offline, a checkpoint given as model_name_or_path (AQLM, GPTQ, AWQ: CHECKPOINTS). lf.config.model's tables
say which bits each method takes and why the other methods are refused.

Preparing a quantized model for training needs nothing beyond what every adapter run gets (frozen base weights,
gradient checkpointing with input gradients, fp32 adapter weights): unlike peft's prepare_model_for_kbit_training,
the non-quantized weights (norms, embeddings, head) are not all upcast to float32. Under autocast they compute in
fp32 where it matters anyway, and an fp32 copy of the embeddings and head of a large vocabulary costs gigabytes;
upcast_layernorm asks for fp32 norms explicitly.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import NamedTuple, get_args

import torch

from lf import device
from lf.config.model import QUANTIZATION_BITS, QUANTIZATION_REFUSED, QuantizationType
from lf.errors import ModelError

TYPES = get_args(QuantizationType)
EXTRAS = {"bnb": ("bitsandbytes", "qlora"), "bitsandbytes": ("bitsandbytes", "qlora"), "hqq": ("hqq", "hqq"),
          "quanto": ("optimum.quanto", "quanto")}


class Quantization(NamedTuple):
    """What quantizing takes: from_pretrained's keyword arguments and the line saying what is quantized and how,
    or a step that quantizes the loaded model (hqq, quanto) and returns that line."""
    kwargs: dict
    line: str | None
    after_load: Callable[[torch.nn.Module], str] | None = None


NONE = Quantization({}, None)


def quantization(model_args, finetuning_args, config, dtype: torch.dtype, *, is_trainable: bool) -> Quantization:
    """How to quantize the model quantization_bit asks for (NONE when unset), refusing what cannot be built."""
    method, bits = model_args.quantization_method, model_args.quantization_bit
    prequantized = getattr(config, "quantization_config", None)
    if prequantized is not None and method_name(prequantized) in QUANTIZATION_REFUSED:
        name = method_name(prequantized)
        if name not in CHECKPOINTS:
            raise ModelError(f"{model_args.model_name_or_path} is quantized by {name}, which lf cannot load: "
                             f"{QUANTIZATION_REFUSED[name]}; use its unquantized base model")
        line = _checkpoint(name, model_args, finetuning_args, prequantized, is_trainable)
        if bits is None:
            return Quantization({}, line)
    if bits is None:
        return NONE
    if method in QUANTIZATION_REFUSED:
        raise ModelError(f"quantization_method: {method!r} is not supported ({QUANTIZATION_REFUSED[method]}); "
                         f"quantize with bnb, hqq or quanto")
    if bits not in QUANTIZATION_BITS[method]:
        raise ModelError(f"quantization_bit: {bits} is not supported by quantization_method: {method} (it takes "
                         f"{', '.join(map(str, QUANTIZATION_BITS[method]))} bits)")
    if method not in IN_PLACE and bits == 4 and model_args.quantization_type not in TYPES:
        raise ModelError(f"quantization_type: {model_args.quantization_type!r} is not one of {', '.join(TYPES)}")
    if prequantized is not None:
        raise ModelError(f"{model_args.model_name_or_path} is already quantized "
                         f"({method_name(prequantized)}); remove quantization_bit")
    if model_args.train_from_scratch:
        raise ModelError("quantization_bit quantizes pretrained weights; train_from_scratch has none to quantize")
    if is_trainable and finetuning_args.finetuning_type != "lora":
        raise ModelError(f"quantized weights cannot train: quantization_bit needs finetuning_type: lora (QLoRA), "
                         f"not {finetuning_args.finetuning_type}")
    package, extra = EXTRAS[method]
    if not installed(package):
        raise ModelError(f"quantization_method: {method} needs {package}: pip install 'lf[{extra}]'")
    device_map = _device_map(model_args.quantization_device_map)
    skip, kept = _unquantized(config)
    if method in IN_PLACE:
        return _in_place(method, bits, dtype, device_map, skip, kept)
    from transformers import BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                                   bnb_4bit_use_double_quant=model_args.double_quantization,
                                   bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
        what = (f"4-bit {model_args.quantization_type}{' with double quantization' * model_args.double_quantization}"
                f", computing in {str(dtype).removeprefix('torch.')}")
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        what = "8-bit (LLM.int8)"
    return Quantization({"quantization_config": quant, "device_map": device_map},
                        f"quantization: {what} by bitsandbytes{kept}, placed by device_map {device_map}")


def _in_place(method: str, bits: int, dtype: torch.dtype, device_map, skip: list[str] | None,
              kept: str) -> Quantization:
    """hqq and quanto quantize the loaded model's linear layers in place on this process's device (lf.model.hqq,
    lf.model.quanto); the output head, a value head and a vision-language model's vision parts keep their weights,
    as with bitsandbytes."""
    if device_map == "auto":
        raise ModelError(f"quantization_device_map: auto spreads a model as bitsandbytes loads it; {method} "
                         f"quantizes on this process's device: remove quantization_device_map")
    target = torch.device(device_map[""])  # (_device_map's "cpu" or "cuda:LOCAL_RANK")
    patterns = [re.compile(rf"(?:{p})(?:\.|$)") for p in skip or ()]

    def after_load(model) -> str:
        # the output head, whatever its name, and a value head ("score": transformers' sequence classifiers)
        heads = {path for path, m in model.named_modules() if m is model.get_output_embeddings()} | {"score"}
        model.to(target)
        how, done, note = IN_PLACE[method](model, bits, dtype, target,
                                           lambda path: path in heads or any(p.match(path) for p in patterns))
        model.quantized_by_lf = method  # see is_quantized
        return (f"quantization: {bits}-bit by {method} ({how}), computing in {str(dtype).removeprefix('torch.')}"
                f"{kept}, on {target}: {done} linear layers{note}")

    return Quantization({}, None, after_load)


def _hqq(model, bits: int, dtype: torch.dtype, target: torch.device, skipped) -> tuple[str, int, str]:
    from lf.model.hqq import GROUP_SIZE, quantize_linears

    done, ragged = quantize_linears(model, bits, dtype, target, skipped)
    return (f"groups of {GROUP_SIZE} along axis 0", done,
            f"; {', '.join(ragged)} kept (not a whole number of groups)" if ragged else "")


def _quanto(model, bits: int, dtype: torch.dtype, target: torch.device, skipped) -> tuple[str, int, str]:
    from lf.model.quanto import quantize_linears

    how = "int8 per output channel" if bits == 8 else f"int{bits} in groups of up to 128 inputs"
    return how, quantize_linears(model, bits, skipped), ""


# the methods lf quantizes once the model is loaded: (what they do, how many layers, a note on the others)
IN_PLACE = {"hqq": _hqq, "quanto": _quanto}


class Checkpoint(NamedTuple):
    """A method whose checkpoints lf loads (quantized offline, by a transformers quantizer): the modules it needs,
    the install line, and what reads its quantization_config (fixing it where needed) into the line saying what
    is quantized and how."""
    modules: tuple[str, ...]
    install: str
    describe: Callable[[dict], str]


def _checkpoint(name: str, model_args, finetuning_args, quantization_config: dict, is_trainable: bool) -> str:
    """A checkpoint quantized by `name` (one of CHECKPOINTS) loads through transformers' quantizer for it, and
    LoRA trains over its layers (PEFT's layer for the method)."""
    method = CHECKPOINTS[name]
    missing = [module for module in method.modules if not installed(module)]
    if missing:
        raise ModelError(f"{model_args.model_name_or_path} is quantized by {name.upper()}, which needs "
                         f"{', '.join(missing)}: {method.install}")
    if is_trainable and finetuning_args.finetuning_type != "lora":
        raise ModelError(f"quantized weights cannot train: {model_args.model_name_or_path} is quantized by "
                         f"{name.upper()}; set finetuning_type: lora, not {finetuning_args.finetuning_type}")
    return method.describe(quantization_config)


def _aqlm(q: dict) -> str:
    """AQLM names the layers it left unquantized by their weights ("lm_head.weight"), which transformers 5.23
    matches against module names: without the suffix, the output head would be built quantized and come out of
    the checkpoint uninitialised."""
    q["linear_weights_not_to_quantize"] = [name.removesuffix(".weight")
                                           for name in q.get("linear_weights_not_to_quantize") or []]
    return (f"quantization: an AQLM checkpoint ({q.get('num_codebooks')} codebook(s) of "
            f"{q.get('nbits_per_codebook')} bits over groups of {q.get('in_group_size')} inputs), by aqlm's kernels")


def _by_gptqmodel(title: str) -> Callable[[dict], str]:
    return lambda q: (f"quantization: {title} checkpoint ({q.get('bits')}-bit in groups of {q.get('group_size')} "
                      f"inputs), by GPTQModel's kernels")


# GPTQModel pins numpy 2.2.6 and protobuf>=7.34, which lf[test]'s swanlab refuses: README, lf[gptq]
GPTQ_INSTALL = "pip install 'lf[gptq]' (in a venv without swanlab: README, Quantized training)"
CHECKPOINTS = {
    "aqlm": Checkpoint(("aqlm",), "pip install 'lf[aqlm]' (aqlm with its CPU kernels)", _aqlm),
    "gptq": Checkpoint(("gptqmodel", "optimum.gptq"), GPTQ_INSTALL, _by_gptqmodel("a GPTQ")),
    "awq": Checkpoint(("gptqmodel",), GPTQ_INSTALL, _by_gptqmodel("an AWQ")),
}


# the quantized linear layers PEFT puts LoRA over that do not subclass nn.Linear (bitsandbytes' do): module, class
# (GPTQModel's: the base class of its many kernels' layers)
QUANTIZED_LINEARS = {("hqq.core.quantize", "HQQLinear"), ("aqlm.inference", "QuantizedLinear"),
                     ("gptqmodel.nn_modules.qlinear", "BaseQuantLinear")}


def is_quantized_linear(module) -> bool:
    """Whether `module` is (a subclass of) one of QUANTIZED_LINEARS, by name: their packages need not be
    installed."""
    return any((cls.__module__, cls.__name__) in QUANTIZED_LINEARS for cls in type(module).__mro__)


def is_quantized(model) -> bool:
    """Whether the model's weights are quantized (its adapters then stay unmerged, and it stays where it was
    placed): by a transformers quantizer (bitsandbytes), or by lf (hqq, quanto), which marks the model its own way
    because transformers' Trainer expects a model with is_quantized to carry a transformers quantizer."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "quantized_by_lf", None))


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


def installed(module: str) -> bool:
    """Whether `module` imports; a dotted name whose parent package is missing (optimum.quanto) counts as not."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _device_map(choice: str | None):
    """bitsandbytes quantizes as weights reach their device: all on this process's GPU (LOCAL_RANK under a
    distributed launcher), "auto" to spread a model over every GPU (inference), or the CPU without one."""
    if choice == "auto":
        return "auto"
    if choice is not None:
        raise ModelError(f"quantization_device_map: {choice!r} is not supported (auto, or unset for this "
                         f"process's device)")
    return {"": device.current().device()}


def method_name(quantization_config) -> str:
    """The quant_method of a checkpoint's quantization_config (a dict, or transformers' config object)."""
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return str(getattr(method, "value", method))
