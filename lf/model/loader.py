"""The tokenizer and the causal LM (or vision-language model) for training and inference.

`load_model` runs these steps in order and returns a plain-language line for each: config (RoPE scaling) ->
dtype -> attention -> quantization -> weights (embeddings fitted to the tokenizer) -> training setup (KV cache,
gradient checkpointing, upcasts) -> mixture-of-depths routers -> adapters (what trains) -> lf's kernels ->
parameter counts.

Models load on the CPU unless quantized (bitsandbytes places them as they load): the Trainer, or whoever infers,
moves them to the accelerator.
"""

from __future__ import annotations

import logging
import os

import torch

from lf import device as accelerator
from lf import stages
from lf.errors import ModelError
from lf.model import longlora, mixture_of_depths, offloaded_checkpoint, special_tokens
from lf.model.adapters import attach, parameter_status, parameter_summary, split_names
from lf.model.options import apply_moe_aux_loss, apply_rope_scaling, choose_attention, choose_dtype
from lf.model.paths import download_error, resolve_model_path
from lf.model.quantization import is_quantized, quantization

log = logging.getLogger("lf")
EMBEDDING_MULTIPLE = 64  # grown embeddings are padded to a multiple of this: faster matmuls on GPUs


def _hub_kwargs(model_args) -> dict:
    return {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir,
            "token": model_args.hf_hub_token, "trust_remote_code": model_args.trust_remote_code}


def _warn_remote_code(model_args, part: str) -> None:
    """trust_remote_code lets transformers import the Python files a model ships: said loudly before each load
    (train, chat, api, export, eval and the web UI all load through here)."""
    if model_args.trust_remote_code:
        log.warning("WARNING: trust_remote_code: true: code from %s will run (the Python files its %s ships, with "
                    "this process's rights): keep it only for a model you trust", model_args.model_name_or_path,
                    part)


def load_tokenizer(model_args):
    """The tokenizer of model_name_or_path, with add_tokens and add_special_tokens (or new_special_tokens) added."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args)
    _warn_remote_code(model_args, "tokenizer")
    try:
        # transformers 5 ignores use_fast: it only has fast (Rust-backed) tokenizers
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=model_args.use_fast_tokenizer,
                                                  split_special_tokens=model_args.split_special_tokens,
                                                  **_hub_kwargs(model_args))
    except (OSError, ValueError) as exc:
        raise download_error(model_args.model_name_or_path, exc) from exc
    special = split_names(model_args.add_special_tokens) + split_names(model_args.new_special_tokens)
    if model_args.new_special_tokens_config:
        special += list(special_tokens.read_descriptions(model_args.new_special_tokens_config))
    for tokens, is_special in ((split_names(model_args.add_tokens), False), (special, True)):
        if tokens:
            added = tokenizer.add_tokens(tokens, special_tokens=is_special)
            log.info("added %d of the %s %s to the tokenizer, which now has %d tokens; embeddings smaller than that "
                     "need resize_vocab: true", added, "special tokens" if is_special else "tokens",
                     ", ".join(tokens), len(tokenizer))
    return tokenizer


def load_model(tokenizer, model_args, finetuning_args, *, is_trainable: bool, cutoff_len: int | None = None,
               tokens_per_step: int | None = None) -> tuple[torch.nn.Module, list[str]]:
    """The model ready to train (`is_trainable`) or to infer, and what was done, in plain lines.

    `cutoff_len` (the data's) sets the RoPE scaling factor when rope_scaling is on (see `apply_rope_scaling`).
    `tokens_per_step` (a micro-batch's most tokens) lets CPU training leave gradient checkpointing off when
    disable_gradient_checkpointing is not set (see `_checkpointing_skipped`).
    """
    from transformers import AutoConfig

    path = resolve_model_path(model_args)
    _warn_remote_code(model_args, "config and model")
    try:
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(model_args))
    except (OSError, ValueError) as exc:
        raise download_error(model_args.model_name_or_path, exc) from exc
    # Qwen2.5-Omni saved whole (thinker, talker, token2wav): its thinker, which reads the media and writes text, is
    # the model, as LLaMA-Factory trains it; the talker's weights are not read
    whole = {"key_mapping": {r"^thinker\.": ""}} if hasattr(config, "thinker_config") else {}
    config = getattr(config, "thinker_config", config)
    rope = apply_rope_scaling(config, model_args.rope_scaling, cutoff_len)
    moe = apply_moe_aux_loss(config, model_args.moe_aux_loss_coef) if is_trainable else None
    dtype, dtype_line = choose_dtype(model_args.infer_dtype, getattr(finetuning_args, "pure_bf16", False))
    attention, attention_line = choose_attention(model_args.flash_attn, dtype)
    quant = quantization(model_args, finetuning_args, config, dtype, is_trainable=is_trainable)
    value_head = stages.get(getattr(finetuning_args, "stage", "sft")).value_head
    if value_head:  # one score per sequence (rm), from a value head on the model (XForSequenceClassification)
        config.num_labels = 1
    model = _instantiate(path, config, dtype, attention,
                         {**quant.kwargs, **_offload(model_args, is_trainable), **whole}, model_args, value_head)
    quantization_line = quant.after_load(model) if quant.after_load else quant.line
    source = "with random weights (train_from_scratch)" if model_args.train_from_scratch else f"from {path}"
    lines = [f"loaded {model_args.model_name_or_path} ({config.model_type}, {type(model).__name__}) {source}",
             dtype_line, attention_line] + [line for line in (rope, moe, quantization_line) if line]
    lines += _fit_embeddings(model, tokenizer, model_args)
    upcast_norms = is_trainable and model_args.upcast_layernorm and dtype != torch.float32
    if is_trainable:
        lines += _prepare_training(model, model_args, finetuning_args, upcast_norms, tokens_per_step)
    else:
        model.config.use_cache = model_args.use_cache
    if model_args.mixture_of_depths:  # before the adapters: beside LoRA, the routers train as modules it saves
        lines.append(mixture_of_depths.apply(model, model_args.mixture_of_depths, path))
    model, adapter_lines = attach(model, model_args, finetuning_args, is_trainable=is_trainable)
    lines += adapter_lines
    if _offloaded(model):
        lines.append(f"offload_folder: {model_args.offload_folder}: weights beyond free memory are read from disk "
                     f"around each forward ({_placement(model)}); lf kernels off: accelerate's hooks bring the "
                     f"weights in around transformers' own code")
    else:
        lines += _patch_kernels(model, model_args, upcast_norms)  # after the adapters: QLoRA's layers too
    if is_trainable and model_args.shift_attn:  # around the attention lf's kernels chose
        lines.append(longlora.apply(model))
    lines.append(parameter_summary(model))
    model.train(is_trainable)
    if model_args.print_param_status:
        lines += ["parameters:"] + parameter_status(model)
    return model, lines


def load_inference_model(tokenizer, model_args, finetuning_args, device: str | None = None) -> torch.nn.Module:
    """The model to generate or score with: load_model's for inference (adapters as it attaches them there), its
    lines logged, in eval mode, on `device` (default: this process's accelerator, see lf.device; bitsandbytes has
    already placed a quantized model)."""
    model, lines = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    for line in lines:
        log.info("%s", line)
    if not (is_quantized(model) or _offloaded(model)):  # (accelerate has placed an offloaded one)
        model.to(device or accelerator.current().device())
    return model.eval()


def _offload(model_args, is_trainable: bool) -> dict:
    """from_pretrained's arguments for offload_folder (inference only: the parser refuses it for training):
    accelerate's device_map "auto" keeps what fits in free memory and leaves the rest on disk in the folder (or
    in a safetensors checkpoint itself, read in place)."""
    folder = model_args.offload_folder
    if folder is None or is_trainable:
        return {}
    for key in ("quantization_bit", "adapter_name_or_path"):
        if getattr(model_args, key) is not None:
            raise ModelError(f"offload_folder and {key} together: lf offloads plain weights only (a quantized layer "
                             f"or a merged adapter needs its weights in memory): merge with lf export first and "
                             f"name the merged model, or remove offload_folder")
    return {"device_map": "auto", "offload_folder": os.path.expanduser(folder)}


def _offloaded(model) -> bool:
    return "disk" in (getattr(model, "hf_device_map", None) or {}).values()


def _placement(model) -> str:
    places = list(model.hf_device_map.values())
    return ", ".join(f"{places.count(place)} part(s) on {place}" for place in dict.fromkeys(places))


def generating_class(config):
    """The transformers auto class of `config`'s generating model: a vision-language config (it has a vision tower)
    loads with the class that takes images, an audio-language one (Qwen2-Audio) with the one that takes audio."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    return (AutoModelForImageTextToText if hasattr(config, "vision_config") else
            AutoModelForMultimodalLM if hasattr(config, "audio_config") else AutoModelForCausalLM)


def _instantiate(path: str, config, dtype, attention: str, quantization: dict, model_args, value_head: bool):
    from transformers import AutoModelForSequenceClassification

    generating = generating_class(config)
    auto = ((_vision_value_head(config) if hasattr(config, "vision_config") else AutoModelForSequenceClassification)
            if value_head else generating)
    try:
        if model_args.train_from_scratch:
            return auto.from_config(config, dtype=dtype, attn_implementation=attention,
                                    trust_remote_code=model_args.trust_remote_code)
        # low_cpu_mem_usage is not passed: transformers 5 always loads that way and ignores the argument
        return auto.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attention,
                                    **quantization, **_hub_kwargs(model_args))
    except (OSError, ValueError) as exc:
        raise download_error(model_args.model_name_or_path, exc) from exc


def _vision_value_head(config):
    """XForSequenceClassification for a vision-language model, which transformers has none of: the family's own
    model (vision tower and language model: AutoModel, which takes the images) under transformers' generic value
    head (`score`, read at each sequence's last token), as the family's PreTrainedModel: its checkpoints load into
    it (their lm_head is left out)."""
    from transformers import AutoModelForImageTextToText, PreTrainedModel
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)
    from transformers.modeling_layers import GenericForSequenceClassification

    generating = AutoModelForImageTextToText._model_mapping[type(config)]
    family = next(base for base in generating.__mro__[1:] if issubclass(base, PreTrainedModel))
    name = generating.__name__.replace("ForConditionalGeneration", "") + "ForSequenceClassification"
    renames = get_checkpoint_conversion_mapping(generating.__name__)
    if renames is not None:  # the checkpoint's key layout, which transformers names by class for some (Qwen2-VL)
        register_checkpoint_conversion_mapping(name, renames, overwrite=True)
    return type(name, (GenericForSequenceClassification, family), {"__module__": __name__})


def _rows(model) -> int:
    """The embeddings' row count (DeepSpeed ZeRO-3 keeps only a shard of the weight here; ds_shape is the whole)."""
    weight = model.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def _fit_embeddings(model, tokenizer, model_args) -> list[str]:
    """Grows the embeddings to the tokenizer with resize_vocab (new rows start at the mean of the old ones, or from
    their descriptions: init_special_tokens); without it a tokenizer larger than the embeddings is an error (its new
    tokens would index past them)."""
    lines = _resize_embeddings(model, tokenizer, model_args.resize_vocab)
    if model_args.init_special_tokens != "noise_init":
        lines.append(special_tokens.init_from_descriptions(
            model, tokenizer, special_tokens.read_descriptions(model_args.new_special_tokens_config),
            noise=model_args.init_special_tokens == "desc_init_w_noise"))
    return lines


def _resize_embeddings(model, tokenizer, resize_vocab: bool) -> list[str]:
    rows = _rows(model)
    size = len(tokenizer)
    if size <= rows:
        return [f"resize_vocab: the embeddings' {rows} rows already hold the tokenizer's {size} tokens"
                ] if resize_vocab else []
    if not resize_vocab:
        raise ModelError(f"the tokenizer has {size} tokens but the model's embeddings only {rows} rows (tokens were "
                         f"added by add_tokens, add_special_tokens or the template); set resize_vocab: true to grow "
                         f"the embeddings to match (they then train)")
    model.resize_token_embeddings(size, pad_to_multiple_of=EMBEDDING_MULTIPLE)
    return [f"resize_vocab: embeddings grown from {rows} to {_rows(model)} rows for "
            f"the tokenizer's {size} tokens (a multiple of {EMBEDDING_MULTIPLE})"]


def _prepare_training(model, model_args, finetuning_args, upcast_norms: bool, tokens_per_step=None) -> list[str]:
    model.config.use_cache = False  # the KV cache only serves generation
    lines = ["KV cache off for training"]
    skip, reason = model_args.disable_gradient_checkpointing, "(disable_gradient_checkpointing)"
    if skip is None:  # gradient_checkpointing_every asks for checkpointing in some layers
        skip, reason = (False, "") if model_args.gradient_checkpointing_every != 1 else _checkpointing_skipped(
            model, tokens_per_step)
    if skip:
        lines.append(f"gradient checkpointing off {reason}")
    elif not model.supports_gradient_checkpointing:
        lines.append(f"gradient checkpointing: {type(model).__name__} does not support it")
    else:
        # activation_checkpointing_enable is transformers' new name; both take the checkpoint kwargs first
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": model_args.use_reentrant_gc})
        if finetuning_args.finetuning_type != "full" and getattr(model, "_require_grads_hook", None) is None:
            # with frozen embeddings, reentrant checkpointing would pass no gradient back to earlier layers
            model.enable_input_require_grads()
        lines.append(f"gradient checkpointing on (use_reentrant={model_args.use_reentrant_gc})"
                     + _checkpoint_every(model, model_args.gradient_checkpointing_every))
        if model_args.use_unsloth_gc:
            offloaded_checkpoint.apply(model)
    if model_args.use_unsloth_gc:
        lines.append(_offload_line())
    if upcast_norms:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.float()
        lines.append("upcast_layernorm: normalisation weights in float32 (for autocast mixed-precision training)")
    if model_args.upcast_lmhead_output:
        model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: output.float())
        lines.append("upcast_lmhead_output: logits in float32 (the training loss of lf's fused head is fp32 anyway)")
    return lines


def _offload_line() -> str:
    kind = accelerator.current().kind
    if kind == "cpu":
        return ("use_unsloth_gc: training on the CPU, where the activations already are: nothing to offload (plain "
                "gradient checkpointing where it is on)")
    return (f"use_unsloth_gc: each checkpointed layer keeps its input in CPU memory, not the {kind} device's, until "
            f"the backward pass (offloaded gradient checkpointing)")


# Activations a decoder layer keeps per token without checkpointing, in elements: 6 of the hidden size (the
# norms' inputs and outputs, q, the attention output, the residual) and 3 of the MLP's (gate, up, their product);
# k and v are smaller. Measured: 31 MB a layer for 2048 bf16 tokens of hidden 512, intermediate 1408.
HIDDEN_SAVED, MLP_SAVED = 6, 3
# ... and the share of the available memory they may take before CPU training checkpoints by default
CPU_ACTIVATION_SHARE = 0.1


def _checkpointing_skipped(model, tokens_per_step: int | None) -> tuple[bool, str]:
    """(skip, why) for disable_gradient_checkpointing left unset: on the CPU, checkpointing every layer made the
    end-to-end benchmark 23% slower in bf16 (2,291 against 2,968 tokens/s) and 33% in fp32, and memory is
    usually plentiful there, so checkpointing stays
    off when a micro-batch's activations fit in CPU_ACTIVATION_SHARE of the available memory. On a GPU (where
    memory is the limit) it stays on, as in LLaMA-Factory."""
    from lf import allocator

    param = next(model.parameters(), None)
    if tokens_per_step is None or param is None or param.device.type != "cpu" or accelerator.current().kind != "cpu":
        return False, ""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, mlp = getattr(config, "hidden_size", 0), getattr(config, "intermediate_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    saved = tokens_per_step * layers * (HIDDEN_SAVED * hidden + MLP_SAVED * mlp) * param.element_size()
    available = allocator.available_bytes()
    if not saved or saved > CPU_ACTIVATION_SHARE * available:
        return False, ""
    return True, (f"(on the CPU the ~{saved / 2**20:,.0f} MiB of activations it would save for {tokens_per_step} "
                  f"tokens a step fit in a tenth of the {available / 2**30:.1f} GiB available, and recomputing "
                  f"them costs time; disable_gradient_checkpointing: false turns it on)")


def _checkpoint_every(model, every: int) -> str:
    """Leaves checkpointing on in one decoder layer of ``every`` (transformers' GradientCheckpointingLayer,
    switched per layer); says which, or nothing when every layer keeps it."""
    from transformers import PreTrainedModel

    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True
              and not isinstance(m, PreTrainedModel)]
    if every == 1 or not layers:
        return ""
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    kept = sum(layer.gradient_checkpointing for layer in layers)
    return (f" in {kept} of {len(layers)} decoder layers (gradient_checkpointing_every: {every}): the others keep "
            f"their activations, which costs memory and saves recomputing them")


def _patch_kernels(model, model_args, upcast_norms: bool) -> list[str]:
    asked = [(key, name) for key, name in (("enable_liger_kernel", "Liger"), ("use_unsloth", "Unsloth"))
             if getattr(model_args, key)]
    if not (model_args.use_lf_kernels or asked):
        return ["lf kernels off (use_lf_kernels: false): the model runs transformers' own code"]
    from lf.kernels import patch

    lines = [f"{key}: lf's own fused kernels take {name}'s place" for key, name in asked]
    # lf's rms_norm takes the weight in the input's dtype; float32 norms in a 16-bit model stay transformers'
    patch(model, rms_norm=not upcast_norms)  # logs its own report: what was patched, what not and why
    if upcast_norms:
        lines.append("rms_norm left to transformers: upcast_layernorm keeps float32 norms, which lf's rms_norm "
                     "does not take")
    return lines
