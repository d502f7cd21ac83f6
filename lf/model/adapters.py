"""Which parameters train: all (full), some decoder layers (freeze) or LoRA or OFT adapters (peft); loading saved
adapters; and the parameter counts that say so.

A vision-language model (one lf.data.mm_plugins names) has three parts, each frozen or not by a key:
freeze_vision_tower (default true), freeze_multi_modal_projector (default true), freeze_language_model (default
false); train_mm_proj_only leaves the projector alone to train. full trains the parts not frozen; freeze trains
the chosen decoder layers of the language model and the other parts not frozen; LoRA puts adapters on the linear
layers of the language model and, when it is not frozen, of the vision tower (`lora_target` names filtered the
same way), and trains an unfrozen projector whole beside them.

Dtypes of what trains: LoRA (and OFT) weights are float32 whatever the model's dtype (peft's autocast_adapter_dtype:
they are tiny, and peft casts their inputs, so they train with or without autocast), but bfloat16 with pure_bf16
(LLaMA-Factory's: everything in bf16, no fp32 copy anywhere). Full and freeze keep the loaded
dtype, as HF's Trainer expects (a bf16 model trains in pure bf16, with no fp32 copy of every weight), except
float16, whose gradients the Trainer's GradScaler cannot unscale: trainable fp16 weights become float32.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from lf.config.finetuning import PEFT_TYPES, FinetuningType
from lf.data.mm_plugins import in_part, plugin_for
from lf.errors import ModelError
from lf.model import llama_pro, mixture_of_depths, pissa
from lf.model.quantization import is_quantized, is_quantized_linear
from lf.model.paths import check_adapter_path

FINETUNING_TYPES = get_args(FinetuningType)


def value_head(model) -> nn.Module | None:
    """A reward model's value head (XForSequenceClassification's `score`): it starts untrained, so it trains
    fully, never as a LoRA target."""
    head = getattr(model, "score", None)
    return head if isinstance(head, nn.Linear) else None


def _not_targets(model) -> tuple[nn.Module, ...]:
    """Linear layers that never take an adapter: the output head, a value head and mixture-of-depths routers' maps
    (the last two start untrained and train whole)."""
    routers = mixture_of_depths.routers(model)
    return (model.get_output_embeddings(), value_head(model), *(router.mod_score for router in routers))


def split_names(text: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def attach(model, model_args, finetuning_args, *, is_trainable: bool) -> tuple[nn.Module, list[str]]:
    """Sets what trains (or loads the adapters to infer with) and returns the model, possibly wrapped by peft,
    with plain-language lines. Untrainable runs get every parameter frozen."""
    kind = finetuning_args.finetuning_type
    if kind not in FINETUNING_TYPES:
        raise ModelError(f"finetuning_type: {kind!r} is not one of {', '.join(FINETUNING_TYPES)}")
    adapters = split_names(model_args.adapter_name_or_path)
    if adapters and kind not in PEFT_TYPES:
        raise ModelError(f"adapter_name_or_path holds PEFT adapters; it needs finetuning_type: lora (or oft), not "
                         f"{kind}")
    lines = []
    if adapters:
        model, lines = _load_adapters(model, adapters, finetuning_args, is_trainable=is_trainable)
    if not is_trainable:
        model.requires_grad_(False)
        return model, lines
    if kind in PEFT_TYPES:
        from peft import PeftModel

        if not isinstance(model, PeftModel):  # no loaded adapter to train further
            model, line = _new_adapter(model, finetuning_args, model_args.resize_vocab)
            lines.append(line)
    else:
        model.requires_grad_(kind == "full")
        if kind == "full":
            lines += _freeze_parts(model, finetuning_args)
        if kind == "freeze":
            lines.append(_freeze(model, finetuning_args, model_args.resize_vocab))
        lines += _fp16_to_fp32(model)
    return model, lines


# ---- vision-language parts ----

def _frozen_parts(model, finetuning_args) -> tuple[object, dict[str, tuple[str, ...]]]:
    """(the model's multimodal plugin or None, {key: module path parts} of the parts that stay frozen)."""
    plugin = plugin_for(getattr(model.config, "model_type", ""))
    if plugin is None:
        return None, {}
    f, only_projector = finetuning_args, finetuning_args.train_mm_proj_only
    frozen = {"freeze_vision_tower": (f.freeze_vision_tower or only_projector, plugin.vision_tower),
              "freeze_multi_modal_projector": (f.freeze_multi_modal_projector and not only_projector,
                                               plugin.projector),
              "freeze_language_model": (f.freeze_language_model or only_projector, plugin.language_model)}
    return plugin, {key: parts for key, (on, parts) in frozen.items() if on}


def _all_parts(frozen: dict) -> tuple[str, ...]:
    return tuple(part for parts in frozen.values() for part in parts)


def _freeze_parts(model, finetuning_args) -> list[str]:
    """full on a vision-language model: the frozen parts' parameters stop training."""
    plugin, frozen = _frozen_parts(model, finetuning_args)
    if plugin is None:
        return []
    for name, param in model.named_parameters():
        if in_part(name, _all_parts(frozen)):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("full: nothing would train: freeze_vision_tower, freeze_multi_modal_projector and "
                         "freeze_language_model freeze every part; set one of them to false")
    return [f"{plugin.name} parts frozen: {', '.join(frozen) or 'none'}"]


# ---- freeze ----

def _decoder_layers(model, plugin=None) -> str:
    """The qualified name of the model's decoder layer list (e.g. model.layers; in the language model of a
    vision-language model, whose vision tower may have as many blocks)."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and (
                plugin is None or in_part(name, plugin.language_model)):
            return name
    raise ModelError(f"freeze: found no list of {count} decoder layers in {type(model).__name__}")


def _freeze(model, finetuning_args, resize_vocab: bool) -> str:
    """Unfreezes the chosen decoder layers (their chosen modules) and extra modules, and a vision-language
    model's parts that are not frozen; returns what trains."""
    plugin, frozen = _frozen_parts(model, finetuning_args)
    prefix = _decoder_layers(model, plugin)
    layers = model.get_submodule(prefix)
    n = finetuning_args.freeze_trainable_layers
    if abs(n) > len(layers):
        raise ModelError(f"freeze_trainable_layers: {n}, but the model has {len(layers)} decoder layers")
    if finetuning_args.use_llama_pro:
        ids = llama_pro.expanded_layer_ids(len(layers), n)
    else:
        ids = range(len(layers) - n, len(layers)) if n > 0 else range(-n)
    chosen = [layers[i] for i in ids]
    if in_part(prefix, _all_parts(frozen)):  # freeze_language_model
        chosen = []
    wanted = split_names(finetuning_args.freeze_trainable_modules)
    if wanted == ["all"]:
        for layer in chosen:
            layer.requires_grad_(True)
    elif chosen:
        inside = [(path, m) for layer in chosen for path, m in layer.named_modules() if path]
        _unfreeze_by_name(inside, wanted, "freeze_trainable_modules", "a decoder layer")
    extra = split_names(finetuning_args.freeze_extra_modules)
    # modules neither in the layers nor holding them (the inner model would unfreeze every layer)
    outside = [(path, m) for path, m in model.named_modules()
               if path and not f"{path}.".startswith(f"{prefix}.") and not prefix.startswith(f"{path}.")]
    _unfreeze_by_name(outside, extra, "freeze_extra_modules", "the model outside its decoder layers")
    if resize_vocab:
        extra += _train_embeddings(model)
    if value_head(model) is not None:
        value_head(model).requires_grad_(True)
        extra.append("score")
    routers = mixture_of_depths.routers(model)  # new: they train whatever the layers chosen
    for router in routers:
        router.requires_grad_(True)
    extra += [mixture_of_depths.ROUTER] if routers else []
    if plugin is not None:
        unfrozen = [part for part in plugin.vision_tower + plugin.projector if part not in _all_parts(frozen)]
        for name, param in model.named_parameters():
            if in_part(name, tuple(unfrozen)):
                param.requires_grad_(True)
        extra += unfrozen
    if not chosen and not extra:
        raise ModelError("freeze: nothing would train (freeze_trainable_layers: 0 and no freeze_extra_modules)")
    which = (f"the expanded (LLaMA Pro) decoder layers {', '.join(map(str, ids))}" if finetuning_args.use_llama_pro
             else f"the {'last' if n > 0 else 'first'} {abs(n)} decoder layers")
    which = which if chosen else "no decoder layers"
    return f"freeze: {which} ({', '.join(wanted)}) train" + (f", with {', '.join(extra)}" if extra else "")


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _unfreeze_by_name(named: list[tuple[str, nn.Module]], names: list[str], option: str, where: str) -> None:
    """Unfreezes the modules whose last name part is one of `names`; a name that matches none is an error."""
    found = {name: [m for path, m in named if _leaf(path) == name] for name in names}
    missing = [name for name, modules in found.items() if not modules]
    if missing:
        raise ModelError(f"{option}: no module named {', '.join(missing)} in {where}; the names there are: "
                         f"{', '.join(sorted({_leaf(path) for path, _ in named}))}")
    for module in (m for modules in found.values() for m in modules):
        module.requires_grad_(True)


def _train_embeddings(model) -> list[str]:
    """resize_vocab: the (grown) input and output embeddings train; returns their module names."""
    names = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.requires_grad_(True)
            names += [_leaf(path) for path, m in model.named_modules() if m is module][:1]
    return names


def _fp16_to_fp32(model) -> list[str]:
    upcast = [p for p in model.parameters() if p.requires_grad and p.dtype == torch.float16]
    if not upcast:
        return []
    for p in upcast:
        p.data = p.data.float()
    return ["trainable float16 weights upcast to float32 (the fp16 GradScaler needs fp32 master weights)"]


# ---- LoRA ----

def _linear_names(model) -> list[str]:
    """Names (last path part) of the model's linear layers, quantized ones included (bitsandbytes' subclass
    nn.Linear; hqq's and AQLM's: is_quantized_linear), without those of `_not_targets`."""
    heads = _not_targets(model)
    return sorted({_leaf(path) for path, m in model.named_modules()
                   if _is_linear(m) and not any(m is head for head in heads)})


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def _mm_lora_targets(model, lora_target: str, plugin, frozen: dict) -> list[str]:
    """A vision-language model's LoRA targets as full module paths: the linear layers of the language model and
    of an unfrozen vision tower (never the projector, which trains whole when unfrozen), all of them or those
    whose last name part `lora_target` lists."""
    heads = _not_targets(model)
    allowed = tuple(part for part in plugin.language_model + plugin.vision_tower if part not in _all_parts(frozen))
    linear = {path: _leaf(path) for path, m in model.named_modules()
              if _is_linear(m) and not any(m is head for head in heads) and in_part(path, allowed)}
    wanted = None if lora_target.strip() == "all" else split_names(lora_target)
    unknown = [t for t in wanted or () if t not in linear.values()]
    if unknown or not linear:
        raise ModelError(f"lora_target: no linear layer named {', '.join(unknown) or lora_target} in the parts of "
                         f"the model that may train ({', '.join(allowed) or 'none: every part is frozen'}); their "
                         f"linear layers are: {', '.join(sorted(set(linear.values()))) or 'none'}")
    return sorted(path for path, leaf in linear.items() if wanted is None or leaf in wanted)


def _lora_targets(model, lora_target: str) -> list[str]:
    linear = _linear_names(model)
    if lora_target.strip() == "all":
        return linear
    targets = split_names(lora_target)
    embeddings = {_leaf(path) for path, m in model.named_modules() if isinstance(m, nn.Embedding)}
    head = [_leaf(path) for path, m in model.named_modules() if m is model.get_output_embeddings()]
    unknown = [t for t in targets if t not in {*linear, *embeddings, *head}]
    if unknown:
        raise ModelError(f"lora_target: no linear layer named {', '.join(unknown)}; the model's linear layers are: "
                         f"{', '.join(linear)} (or all)")
    return targets


def _in_expanded_layers(model, targets: list[str], num_expand: int, plugin) -> list[str]:
    """use_llama_pro: the full paths of the LoRA targets (last name parts or full paths) inside the expanded
    decoder layers, which alone take adapters."""
    prefix = _decoder_layers(model, plugin)
    layers = [f"{prefix}.{i}." for i in llama_pro.expanded_layer_ids(len(model.get_submodule(prefix)), num_expand)]
    wanted = set(targets)
    found = [path for path, _ in model.named_modules()
             if (path in wanted or _leaf(path) in wanted) and any(path.startswith(layer) for layer in layers)]
    if not found:
        raise ModelError(f"use_llama_pro: lora_target {', '.join(targets)} names no module inside the expanded "
                         f"decoder layers ({', '.join(layers)}): name their linear layers, or all")
    return found


def _new_adapter(model, finetuning_args, resize_vocab: bool):
    """A fresh LoRA or OFT adapter (finetuning_type) on the chosen linear layers, with the modules that train
    whole beside it; returns the PEFT model and a line saying what trains."""
    from peft import TaskType, get_peft_model

    kind = finetuning_args.finetuning_type
    target = finetuning_args.oft_target if kind == "oft" else finetuning_args.lora_target
    plugin, frozen = _frozen_parts(model, finetuning_args)
    targets = (_mm_lora_targets(model, target, plugin, frozen) if plugin is not None
               else _lora_targets(model, target))
    if finetuning_args.use_llama_pro:
        targets = _in_expanded_layers(model, targets, finetuning_args.freeze_trainable_layers, plugin)
    saved = split_names(finetuning_args.additional_target)
    if plugin is not None and "freeze_multi_modal_projector" not in frozen:
        saved += [part for part in plugin.projector if part not in saved]
    if resize_vocab:
        saved += [name for name in _train_embeddings(model) if name not in saved]
    reward = value_head(model) is not None
    if reward and "score" not in saved:
        saved.append("score")
    if mixture_of_depths.routers(model) and mixture_of_depths.ROUTER not in saved:
        saved.append(mixture_of_depths.ROUTER)
    task = TaskType.SEQ_CLS if reward else TaskType.CAUSAL_LM  # peft saves a SEQ_CLS model's score with the adapter
    # a copy of the list: peft adds to a SEQ_CLS one
    config, what = (_oft if kind == "oft" else _lora)(finetuning_args, task, targets, list(saved) or None)
    model = get_peft_model(model, config, autocast_adapter_dtype=not finetuning_args.pure_bf16)
    # full paths: too many to list
    shown = sorted({_leaf(t) for t in targets}) if plugin is not None or finetuning_args.use_llama_pro else targets
    return model, (f"{what} on {', '.join(shown)}" + (f"; fully trained beside it: {', '.join(saved)}" if saved
                                                      else ""))


def _lora(finetuning_args, task, targets, saved):
    from peft import LoraConfig

    alpha = finetuning_args.lora_alpha or 2 * finetuning_args.lora_rank
    config = LoraConfig(task_type=task, r=finetuning_args.lora_rank, lora_alpha=alpha,
                        lora_dropout=finetuning_args.lora_dropout, target_modules=targets,
                        use_rslora=finetuning_args.use_rslora, use_dora=finetuning_args.use_dora,
                        init_lora_weights=pissa.init_lora_weights(finetuning_args), modules_to_save=saved)
    flavour = "".join(name for name, on in ((" rsLoRA", finetuning_args.use_rslora),
                                            (" DoRA", finetuning_args.use_dora),
                                            (" PiSSA", finetuning_args.pissa_init)) if on)
    return config, f"LoRA{flavour} r={config.r} alpha={alpha:g} dropout={config.lora_dropout:g}"


def _oft(finetuning_args, task, targets, saved):
    """PEFT's OFT with LLaMA-Factory's keys: r = oft_rank blocks or blocks of oft_block_size (one of them 0)."""
    from peft import OFTConfig

    f = finetuning_args
    config = OFTConfig(task_type=task, r=f.oft_rank, oft_block_size=f.oft_block_size,
                       module_dropout=f.module_dropout, target_modules=targets, modules_to_save=saved)
    size = f"r={f.oft_rank}" if f.oft_rank else f"block size {f.oft_block_size}"
    return config, f"OFT {size} module_dropout={f.module_dropout:g}"


def _load_adapters(model, paths: list[str], finetuning_args, *, is_trainable: bool):
    """Loads saved adapters in order. Merged into the weights: all but the last when training continues on the
    last; all when a new adapter trains on top (create_new_adapter) or at inference. A quantized model cannot take
    merged weights, so it loads exactly one adapter, unmerged."""
    from peft import PeftModel

    for path in paths:
        check_adapter_path(path)
    quantized = is_quantized(model)
    keep_last = quantized or (is_trainable and not finetuning_args.create_new_adapter)
    merged = paths[:-1] if keep_last else paths
    if quantized and merged:
        raise ModelError(f"a quantized model cannot merge adapters into its weights: give one adapter, not "
                         f"{len(paths)} ({', '.join(paths)})")
    for path in merged:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    lines = [f"merged adapter(s) into the weights: {', '.join(merged)}"] if merged else []
    if keep_last:
        model = PeftModel.from_pretrained(model, paths[-1], is_trainable=is_trainable)
        lines.append(f"adapter {paths[-1]} loaded" + (" to train further (its own LoRA settings apply)"
                                                      if is_trainable else " (unmerged: the model is quantized)"))
    return model, lines


# ---- counts ----

def _numel(p: torch.Tensor) -> int:
    """Values a parameter holds: a packed 4-bit bitsandbytes weight stores two or more per element."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def parameter_summary(model) -> str:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    # hqq's and AQLM's layers hold their weight as codes (not parameters, or not one per value): counted as values
    quantized = [m for m in model.modules() if is_quantized_linear(m)]
    inside = {id(p) for m in quantized for p in m.parameters()}
    total = (sum(_numel(p) for p in model.parameters() if id(p) not in inside)
             + sum(m.in_features * m.out_features for m in quantized))
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4g}%)"


def parameter_status(model) -> list[str]:
    """print_param_status: one line per parameter."""
    return [f"  {name}: {p.dtype}, {'trainable' if p.requires_grad else 'frozen'}"
            for name, p in model.named_parameters()]
