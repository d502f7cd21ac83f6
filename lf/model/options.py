"""How the weights are loaded: dtype, attention implementation, RoPE scaling and a MoE router's loss, each decided
from the arguments and the machine, and returned with its reason in plain words."""

from __future__ import annotations

import importlib.util
import math
from types import MappingProxyType
from typing import get_args

import torch

from lf import device
from lf.config.model import Dtype, FlashAttn, RopeScaling
from lf.errors import ModelError

# infer_dtype's names but auto -> torch's dtypes, widest first (as errors list them)
DTYPES = MappingProxyType({name: getattr(torch, name) for name in reversed(get_args(Dtype)) if name != "auto"})
# flash_attn but auto -> HF's name
ATTENTION = MappingProxyType({"disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"})
ROPE_TYPES = get_args(RopeScaling)
DEFAULT_ROPE_FACTOR = 2.0  # without cutoff_len (inference) and no factor in the config
LLAMA3_FREQ_FACTORS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's published values


def choose_dtype(infer_dtype: str, pure_bf16: bool = False) -> tuple[torch.dtype, str]:
    """The dtype the weights load in, and why (pure_bf16: bfloat16, whatever the device prefers)."""
    if pure_bf16:
        return torch.bfloat16, "dtype bfloat16 (pure_bf16: weights, adapters included, train in bf16 without autocast)"
    if infer_dtype in DTYPES:
        return DTYPES[infer_dtype], f"dtype {infer_dtype} (infer_dtype: {infer_dtype})"
    if infer_dtype != "auto":
        raise ModelError(f"infer_dtype: {infer_dtype!r} is not one of auto, {', '.join(DTYPES)}")
    acc = device.current()
    if acc.kind != "cpu":
        if acc.bf16:
            return torch.bfloat16, f"dtype bfloat16 (infer_dtype auto: the {acc.kind} device supports bf16)"
        return torch.float16, f"dtype float16 (infer_dtype auto: the {acc.kind} device has no bf16)"
    if acc.bf16:
        return torch.bfloat16, "dtype bfloat16 (infer_dtype auto: no GPU; the CPU has native bf16, AVX512-BF16/AMX)"
    return torch.float32, (f"dtype float32 (infer_dtype auto: no GPU, and this CPU "
                           f"({torch.backends.cpu.get_cpu_capability()}) has no native bf16)")


def choose_attention(flash_attn: str, dtype: torch.dtype) -> tuple[str, str]:
    """The attention implementation to load the model with (HF's name), and why."""
    installed = importlib.util.find_spec("flash_attn") is not None
    acc = device.current()
    gpu = "flash_attention_2" in acc.attention  # CUDA or ROCm
    half = dtype in (torch.float16, torch.bfloat16)  # flash-attention has no fp32 kernels
    if flash_attn == "auto":
        if installed and gpu and half:
            return "flash_attention_2", (f"attention: flash-attention 2 (flash_attn auto: installed, {acc.kind}, "
                                         f"16-bit)")
        why = (f"a {acc.kind} device, not CUDA/ROCm" if not gpu else "flash_attn not installed" if not installed
               else "float32 weights")
        return "sdpa", f"attention: sdpa (flash_attn auto: {why} for flash-attention)"
    if flash_attn not in ATTENTION:
        raise ModelError(f"flash_attn: {flash_attn!r} is not one of {', '.join(get_args(FlashAttn))}")
    if flash_attn == "fa2":
        if not installed:
            raise ModelError("flash_attn: fa2 needs the flash-attn package: pip install flash-attn "
                             "--no-build-isolation (or set flash_attn: sdpa)")
        if not gpu:
            raise ModelError(f"flash_attn: fa2 needs a CUDA or ROCm GPU, this is {acc.kind}; set flash_attn: sdpa "
                             f"on this machine")
        if not half:
            raise ModelError("flash_attn: fa2 runs in float16/bfloat16 only; set infer_dtype: bfloat16 or "
                             "flash_attn: sdpa")
    return ATTENTION[flash_attn], f"attention: {ATTENTION[flash_attn]} (flash_attn: {flash_attn})"


def apply_rope_scaling(config, rope_scaling: str | None, cutoff_len: int | None) -> str | None:
    """Stretches the config's RoPE to longer sequences (in place) and says how; None when rope_scaling is unset.

    The factor: with `cutoff_len` (training) cutoff_len / max_position_embeddings rounded up to a whole number,
    and no scaling at all when cutoff_len already fits. Without it (inference) a config that already scales RoPE
    is kept as it is (scaling it again would stretch it twice); otherwise the factor is 2. max_position_embeddings
    grows by the factor, except for dynamic scaling, which stretches itself past the trained length; yarn and
    llama3 keep the trained length as original_max_position_embeddings.
    """
    if rope_scaling is None:
        return None
    if rope_scaling not in ROPE_TYPES:
        raise ModelError(f"rope_scaling: {rope_scaling!r} is not one of {', '.join(ROPE_TYPES)}")
    params = getattr(config, "rope_parameters", None) or {}
    trained = getattr(config, "max_position_embeddings", None)
    if "rope_theta" not in params or trained is None:  # no RoPE, or RoPE parameters per layer type
        raise ModelError(f"rope_scaling: model type {config.model_type!r} has no single RoPE to scale")
    if cutoff_len is not None and cutoff_len <= trained:
        return (f"rope_scaling {rope_scaling} not applied: cutoff_len {cutoff_len} fits in the model's "
                f"max_position_embeddings {trained}")
    if cutoff_len is None and params.get("factor"):
        return (f"rope_scaling {rope_scaling}: kept the model config's own RoPE scaling "
                f"({params['rope_type']}, factor {params['factor']:g})")
    if cutoff_len is None:
        factor, why = DEFAULT_ROPE_FACTOR, "no cutoff_len to derive it from"
    else:
        factor, why = float(math.ceil(cutoff_len / trained)), f"cutoff_len {cutoff_len} / {trained}, rounded up"
    scaled = {key: params[key] for key in ("rope_theta", "partial_rotary_factor") if key in params}
    scaled.update(rope_type=rope_scaling, factor=factor)
    if rope_scaling in ("yarn", "llama3"):
        scaled["original_max_position_embeddings"] = trained
    if rope_scaling == "llama3":
        scaled.update(LLAMA3_FREQ_FACTORS)
    config.rope_parameters = scaled
    if rope_scaling != "dynamic":
        config.max_position_embeddings = int(trained * factor)
    return (f"rope_scaling {rope_scaling}, factor {factor:g} ({why}); max_position_embeddings "
            f"{config.max_position_embeddings}")


def apply_moe_aux_loss(config, coef: float | None) -> str | None:
    """Adds the router's load-balancing loss, `coef` times, to a mixture-of-experts model's training loss, as
    transformers computes it (in place: its config's router_aux_loss_coef and output_router_logits, which
    LLaMA-Factory sets); None when coef is unset or 0 (LLaMA-Factory's no-op too)."""
    if not coef:
        return None
    if not hasattr(config, "router_aux_loss_coef") or hasattr(config, "vision_config"):
        raise ModelError(f"moe_aux_loss_coef: model_type {config.model_type!r} has no router load-balancing loss in "
                         f"transformers (no router_aux_loss_coef in its config; lf adds it to text MoE models "
                         f"only): remove moe_aux_loss_coef")
    config.router_aux_loss_coef, config.output_router_logits = coef, True
    return f"moe_aux_loss_coef: the router's load-balancing loss, {coef:g} times, is added to the training loss"
