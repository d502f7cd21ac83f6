"""Put lf's kernels into an instantiated Hugging Face model: ``lf.kernels.patch(model)``.

Per family (``config.model_type``) a table names the HF classes and how lf replaces them:

- RMSNorm modules (also Qwen3's q/k norms): their ``forward`` becomes :func:`lf.kernels.rms_norm` with the
  family's numerics, on the instance (parameters and state dict are untouched);
- dense MLPs: ``down_proj(swiglu(gate, up))`` (SiLU) or ``geglu`` (Gemma's GELU, tanh or exact), on the
  instance (works with PEFT LoRA layers in the projections); MoE experts are left as they are;
- RoPE: the modeling module's ``apply_rotary_pos_emb`` becomes :func:`lf.kernels.rope` (a module-level function,
  so this part applies to every model of the family in the process until :func:`unpatch`);
- attention: a model running SDPA switches to "lf_packed" (:mod:`lf.kernels.packed_attention`), which runs
  neat-packed rows example by example and leaves every other batch to SDPA;
- QLoRA: PEFT's LoRA layers over bitsandbytes 4-bit linears (attention and MLP projections alike) run as one
  :func:`lora_nf4_linear` each, on the instance; layers it cannot take (lora_dropout > 0, DoRA, weights not
  stored as uint8 or not in a float dtype) keep PEFT's forward and the report names them and why; PEFT's LoRA
  layers over plain nn.Linear the same way through :func:`lora_linear` (also not: fan_in_fan_out, a trained base
  weight, lora_bias);
- the causal-LM head: in training with labels, the loss comes from :func:`fused_linear_cross_entropy` on the
  hidden states and no logits exist (``output.logits`` is None); otherwise (generation, evaluation, or
  ``skip_logits=False``) HF's own path runs.

Patching twice changes nothing; :func:`unpatch` restores HF's code. An unsupported family patches nothing and
says so. :func:`apply_to` does the same to a family's classes, before any model exists.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lf.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from lf.kernels import packed_attention as _packed_attention
from lf.kernels.glu import geglu, swiglu
from lf.kernels.lora_linear import lora_linear
from lf.kernels.lora_nf4_linear import lora_nf4_linear
from lf.kernels.modules import GELU_APPROXIMATE
from lf.kernels.rms_norm import rms_norm
from lf.kernels.rope import rope

log = logging.getLogger("lf")
IGNORE_INDEX = -100  # transformers' label padding


@dataclass(frozen=True)
class Family:
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix: <prefix>RMSNorm, <prefix>MLP
    mlp: str | None = "gated"  # "gated" (gate_proj/up_proj), "fused" (Phi-3's gate_up_proj), None (MoE experts)
    gemma_norm: bool = False  # (1 + w) scaling, normalised row times weight in fp32, rounded once
    act_key: str = "hidden_act"  # the config field the MLP's activation comes from


FAMILIES = {
    "llama": Family("llama", "Llama"),
    "mistral": Family("mistral", "Mistral"),
    "qwen2": Family("qwen2", "Qwen2"),
    "qwen3": Family("qwen3", "Qwen3"),
    "phi3": Family("phi3", "Phi3", mlp="fused"),
    "gemma": Family("gemma", "Gemma", gemma_norm=True),
    "gemma2": Family("gemma2", "Gemma2", gemma_norm=True, act_key="hidden_activation"),
    "gemma3_text": Family("gemma3", "Gemma3", gemma_norm=True, act_key="hidden_activation"),
    "qwen2_moe": Family("qwen2_moe", "Qwen2Moe", mlp=None),
    "qwen3_moe": Family("qwen3_moe", "Qwen3Moe", mlp=None),
    "mixtral": Family("mixtral", "Mixtral", mlp=None),
}
# the patch() switches; geglu goes with swiglu
KINDS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "packed_attention", "lora_nf4_linear",
         "lora_linear")


@dataclass
class PatchReport:
    family: str
    patched: dict[str, int] = field(default_factory=dict)  # kind -> how many places
    skipped: dict[str, str] = field(default_factory=dict)  # kind -> why not

    def __str__(self) -> str:
        done = ", ".join(f"{kind} ({n})" for kind, n in self.patched.items()) or "nothing"
        lines = [f"lf kernels in {self.family}: {done}"]
        lines += [f"  not {kind}: {why}" for kind, why in self.skipped.items()]
        return "\n".join(lines)


def _modeling(family: Family):
    return importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")


# ---- the replacements ----

def _llama_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gemma_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.eps, offset=1.0, casting="gemma")


# HF activation modules (ACT2FN) by class name -> None for SiLU, else geglu's approximation
_ACT_MODULES = {"SiLUActivation": None, "SiLU": None, "GELUTanh": "tanh", "PytorchGELUTanh": "tanh",
                "NewGELUActivation": "tanh", "FastGELUActivation": "tanh", "GELUActivation": "none"}
_UNKNOWN = object()


def _act(self, gate, up):
    """act(gate) * up fused: the mode ``patch`` chose from the config (``_lf_act``), or, for classes patched by
    ``apply_to``, the one the module's own activation names; an activation lf does not know runs as HF's."""
    mode = self.__dict__.get("_lf_act", _UNKNOWN)
    if mode is _UNKNOWN:
        act_fn = getattr(self, "act_fn", None) or getattr(self, "activation_fn", None)
        mode = _ACT_MODULES.get(type(act_fn).__name__, _UNKNOWN)
        if mode is _UNKNOWN:
            return act_fn(gate) * up
    return swiglu(gate, up) if mode is None else geglu(gate, up, mode)


def _gated_mlp_forward(self, x):
    return self.down_proj(_act(self, self.gate_proj(x), self.up_proj(x)))


def _fused_mlp_forward(self, x):  # Phi-3: one projection holds gate and up
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(_act(self, gate, up))


def _rope(q, k, cos, sin, unsqueeze_dim=1):
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` for heads-first q/k (the layout every family here uses);
    with partial rotary embeddings (Phi-3's cos/sin narrower than the head) only that part rotates."""
    if unsqueeze_dim != 1:
        raise ValueError(f"lf's rope takes heads-first q/k (unsqueeze_dim=1), got unsqueeze_dim={unsqueeze_dim}")
    if q.dtype != cos.dtype:  # under autocast q/k are bf16 and cos/sin fp32: HF's math promotes, so does lf
        dtype = torch.promote_types(q.dtype, cos.dtype)
        q, k, cos, sin = q.to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype)
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return rope(q, k, cos, sin)
    q_rot, k_rot = rope(q[..., :rotary], k[..., :rotary], cos, sin)
    return torch.cat([q_rot, q[..., rotary:]], dim=-1), torch.cat([k_rot, k[..., rotary:]], dim=-1)


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, skip_logits=None,
                       **kwargs):
    """HF's causal-LM forward, with the loss from fused_linear_cross_entropy when training with labels."""
    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if not skip_logits or type(self.lm_head) is not nn.Linear:  # e.g. an adapter on the head: HF's path
        return self._lf_hf_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    if labels is None and kwargs.get("shift_labels") is None:
        raise ValueError("skip_logits=True needs labels: without them there is no loss to compute")
    return_dict = kwargs.pop("return_dict", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = hidden[:, keep, :]
    if shift_labels is None:  # as HF's ForCausalLMLoss: token t predicts label t + 1
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device),
                                      bias=self.lm_head.bias, num_items_in_batch=kwargs.get("num_items_in_batch"),
                                      softcap=getattr(self.config, "final_logit_softcapping", None))
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out.to_tuple() if return_dict is False else out


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


def _lora_class(kind: str):
    """PEFT's LoRA layer that ``kind`` runs (over bnb.nn.Linear4bit, or over nn.Linear), or None when no such
    layer can exist in this process (peft, or bitsandbytes for 4-bit, not imported: nothing is imported just to
    look)."""
    needed = ("peft", "bitsandbytes") if kind == "lora_nf4_linear" else ("peft",)
    if any(m not in sys.modules for m in needed):
        return None
    try:
        if kind == "lora_nf4_linear":
            from peft.tuners.lora.bnb import Linear4bit as cls
        else:
            from peft.tuners.lora.layer import Linear as cls
    except ImportError:
        return None
    return cls


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


LORA_OPS = {"lora_nf4_linear": (_lora_4bit_forward, _lora_4bit_obstacle, "4-bit LoRA layers"),
            "lora_linear": (_lora_dense_forward, _lora_dense_obstacle, "LoRA linear layers")}


def _patch_lora(base: nn.Module, report: PatchReport, kind: str) -> None:
    """Binds the LoRA op ``kind`` as the forward of each PEFT layer it can run; the report counts them and names
    the ones left to PEFT, and why."""
    forward, obstacle, what = LORA_OPS[kind]
    cls = _lora_class(kind)
    layers = [(name, m) for name, m in base.named_modules() if cls is not None and type(m) is cls]
    left: dict[str, list[str]] = {}
    for name, layer in layers:
        why = _lora_obstacle(layer) or obstacle(layer)
        if why is None:
            _set_forward(layer, forward)
        else:
            left.setdefault(why, []).append(name)
    if len(layers) > sum(map(len, left.values())):
        report.patched[kind] = len(layers) - sum(map(len, left.values()))
    if left:
        report.skipped[kind] = "; ".join(f"{len(names)} of {len(layers)} {what} (e.g. {names[0]}) left to PEFT: "
                                         f"{why}" for why, names in left.items())


def _patch_loras(base: nn.Module, report: PatchReport, **wanted: bool) -> None:
    """The LoRA ops switched on, in any family: PEFT's LoRA layers are the same in all of them."""
    for kind, on in wanted.items():
        if on:
            _patch_lora(base, report, kind)


# ---- patching ----

def _set_forward(module: nn.Module, fn) -> bool:
    """Binds ``fn`` as the instance's forward; False if it already is."""
    current = module.__dict__.get("forward")
    if current is not None and getattr(current, "__func__", None) is fn:
        return False
    module.forward = types.MethodType(fn, module)
    return True


def _patch_instances(model: nn.Module, cls: type, fn, **attributes) -> int:
    """Binds ``fn`` as the forward of every ``cls`` module in ``model`` (with ``attributes`` set on each);
    returns how many there are."""
    found = [m for m in model.modules() if isinstance(m, cls)]
    for m in found:
        for name, value in attributes.items():
            setattr(m, name, value)
        _set_forward(m, fn)
    return len(found)


def _base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch(model: nn.Module, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          fused_linear_cross_entropy: bool = True, cross_entropy: bool = False,
          packed_attention: bool = True, lora_nf4_linear: bool = True, lora_linear: bool = True) -> PatchReport:
    """Patches lf's kernels into ``model`` (an HF model, or one wrapped by PEFT) and returns (and logs) a report
    of what was patched and what was not, and why. See the module docstring for what each kind replaces."""
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    report = PatchReport(str(model_type))
    family = FAMILIES.get(model_type)
    if family is None:
        _patch_loras(base, report, lora_nf4_linear=lora_nf4_linear, lora_linear=lora_linear)
        return _unsupported(report, model_type)
    modeling = _modeling(family)
    wanted = {"rms_norm": rms_norm, "rope": rope, "swiglu": swiglu,
              "fused_linear_cross_entropy": fused_linear_cross_entropy, "packed_attention": packed_attention,
              "lora_nf4_linear": lora_nf4_linear, "lora_linear": lora_linear}
    if cross_entropy:
        report.skipped["cross_entropy"] = (
            "the loss already comes from fused_linear_cross_entropy, which needs no logits"
            if fused_linear_cross_entropy else "not available yet: with fused_linear_cross_entropy off the loss "
                                               "stays HF's")
    for kind, on in wanted.items():
        if not on:
            report.skipped[kind] = "turned off by the caller"
    if rms_norm:
        norm_forward = _gemma_norm_forward if family.gemma_norm else _llama_norm_forward
        report.patched["rms_norm"] = _patch_instances(base, getattr(modeling, f"{family.prefix}RMSNorm"),
                                                      norm_forward)
    if swiglu:
        act = getattr(base.config, family.act_key, None)
        if family.mlp is None:
            report.skipped["swiglu"] = "mixture-of-experts MLPs are left to HF (lf has no fused MoE kernel)"
        elif act != "silu" and act not in GELU_APPROXIMATE:
            report.skipped["swiglu"] = f"{family.act_key} is {act!r}, neither silu nor a GELU"
        else:
            forward = _fused_mlp_forward if family.mlp == "fused" else _gated_mlp_forward
            kind = "swiglu" if act == "silu" else "geglu"
            report.patched[kind] = _patch_instances(base, getattr(modeling, f"{family.prefix}MLP"), forward,
                                                    _lf_act=GELU_APPROXIMATE.get(act))
    if rope:
        _patch_rope(modeling)
        report.patched["rope"] = 1
    if fused_linear_cross_entropy:
        head = getattr(base, "lm_head", None)
        if head is None or not hasattr(base, "model"):
            report.skipped["fused_linear_cross_entropy"] = f"{type(base).__name__} is not a causal LM with an lm_head"
        elif type(head) is not nn.Linear:
            report.skipped["fused_linear_cross_entropy"] = (f"lm_head is a {type(head).__name__} (e.g. an adapter on "
                                                            f"it), not a plain nn.Linear")
        else:
            if "_lf_hf_forward" not in base.__dict__:
                base._lf_hf_forward = base.forward
            _set_forward(base, _causal_lm_forward)
            report.patched["fused_linear_cross_entropy"] = 1
    if packed_attention:
        _patch_attention(base, report)
    _patch_loras(base, report, lora_nf4_linear=lora_nf4_linear, lora_linear=lora_linear)
    log.info("%s", report)
    return report


def _unsupported(report: PatchReport, model_type) -> PatchReport:
    for kind in [k for k in KINDS if k not in report.patched and k not in report.skipped]:
        report.skipped[kind] = (f"model_type {model_type!r} is not a family lf patches "
                                f"(supported: {', '.join(FAMILIES)}); the model runs unchanged")
    log.warning("%s", report)
    return report


def _patch_attention(base: nn.Module, report: PatchReport) -> None:
    impl = getattr(base.config, "_attn_implementation", None)
    if impl == _packed_attention.NAME:
        report.patched["packed_attention"] = 1
    elif impl != "sdpa":
        report.skipped["packed_attention"] = (f"attention is {impl!r}; lf takes over SDPA only (flash-attention "
                                              f"reads packed rows itself, eager is kept for its attention weights)")
    else:
        base.set_attn_implementation(_packed_attention.register())
        base._lf_hf_attn = impl
        report.patched["packed_attention"] = 1


def _patch_rope(modeling) -> None:
    if modeling.apply_rotary_pos_emb is not _rope:
        _ORIGINAL_ROPE[modeling.__name__] = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = _rope


def apply_to(model_type: str, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
             fused_linear_cross_entropy: bool = True) -> PatchReport:
    """Patches a family's HF classes (``model_type`` as in its config, e.g. "llama") for users who build models
    themselves: every model of the family used afterwards runs lf's kernels, whenever it was created. Each MLP's
    activation is read from its own activation module. :func:`unpatch` with the same ``model_type`` undoes it."""
    report = PatchReport(model_type)
    family = FAMILIES.get(model_type)
    if family is None:
        return _unsupported(report, model_type)
    modeling = _modeling(family)
    classes = []
    if rms_norm:
        classes.append(("rms_norm", f"{family.prefix}RMSNorm",
                        _gemma_norm_forward if family.gemma_norm else _llama_norm_forward))
    if swiglu and family.mlp is None:
        report.skipped["swiglu"] = "mixture-of-experts MLPs are left to HF (lf has no fused MoE kernel)"
    elif swiglu:
        classes.append(("swiglu", f"{family.prefix}MLP",
                        _fused_mlp_forward if family.mlp == "fused" else _gated_mlp_forward))
    if fused_linear_cross_entropy:
        classes.append(("fused_linear_cross_entropy", f"{family.prefix}ForCausalLM", _causal_lm_forward))
    for kind, name, fn in classes:
        cls = getattr(modeling, name)
        if cls.forward is not fn:
            _ORIGINAL_CLASS_FORWARD[cls] = cls.forward
            cls._lf_hf_forward = cls.forward
            cls.forward = fn
        report.patched[kind] = 1
    if rope:
        _patch_rope(modeling)
        report.patched["rope"] = 1
    report.skipped["packed_attention"] = (f"chosen per model: lf.kernels.patch(model), or attn_implementation="
                                          f"{_packed_attention.register()!r} when loading")
    for kind in ("lora_nf4_linear", "lora_linear"):
        report.skipped[kind] = "chosen per layer: lf.kernels.patch(model) once PEFT has added the adapters"
    log.info("%s", report)
    return report


_ORIGINAL_ROPE: dict[str, object] = {}
_ORIGINAL_CLASS_FORWARD: dict[type, object] = {}
_FORWARDS = (_llama_norm_forward, _gemma_norm_forward, _gated_mlp_forward, _fused_mlp_forward, _causal_lm_forward,
             _lora_4bit_forward, _lora_dense_forward)


def unpatch(target: nn.Module | str) -> None:
    """Restores HF's code: in a model patched by :func:`patch` (and its family's RoPE function), or, given a
    ``model_type``, in the classes :func:`apply_to` patched."""
    if isinstance(target, str):
        model_type = target
        for cls, forward in list(_ORIGINAL_CLASS_FORWARD.items()):
            if cls.__module__ == _modeling(FAMILIES[model_type]).__name__:
                cls.forward = _ORIGINAL_CLASS_FORWARD.pop(cls)
                del cls._lf_hf_forward
    else:
        base = _base_model(target)
        for m in base.modules():
            forward = m.__dict__.get("forward")
            if getattr(forward, "__func__", None) in _FORWARDS:
                del m.forward
                m.__dict__.pop("_lf_act", None)
        base.__dict__.pop("_lf_hf_forward", None)
        if "_lf_hf_attn" in base.__dict__:
            base.set_attn_implementation(base.__dict__.pop("_lf_hf_attn"))
        model_type = getattr(getattr(base, "config", None), "model_type", None)  # patch() takes config-less models
    family = FAMILIES.get(model_type)
    if family is not None:
        modeling = _modeling(family)
        if modeling.__name__ in _ORIGINAL_ROPE:
            modeling.apply_rotary_pos_emb = _ORIGINAL_ROPE.pop(modeling.__name__)
