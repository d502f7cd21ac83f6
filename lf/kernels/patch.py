"""Put lf's kernels into an instantiated Hugging Face model: ``lf.kernels.patch(model)``.

Each patch kind is one entry of :data:`PATCHERS`, a :class:`Patcher` saying how the kind goes into a model
(:func:`patch`), into a family's classes (:func:`apply_to`) and back out (:func:`unpatch`); ``patch(model,
rope=False)`` switches a kind off by its name. Per family (``config.model_type``) :data:`FAMILIES` names the HF
classes, what differs from Llama's numerics, and (``Family.kept``) the kinds whose modules lf cannot reproduce
exactly (interleaved RoPE, LayerNorms, ungated MLPs, GPT-OSS's clamped experts): those stay HF's and the report
says why. Adding a family is one entry there. The kinds:

- ``rms_norm``: RMSNorm modules (also Qwen3's q/k norms) run :func:`lf.kernels.rms_norm` with the family's
  numerics (parameters and state dict are untouched);
- ``swiglu``: dense MLPs run ``down_proj(swiglu(gate, up))`` (SiLU) or ``geglu`` (Gemma's GELU, tanh or exact;
  reported as geglu); works with PEFT LoRA layers in the projections (MoE experts are ``swiglu_experts``);
- ``swiglu_experts``: MoE experts stored as transformers' ``<prefix>Experts`` (gate_up_proj, down_proj) whose
  gate is silu(gate) * up run lf's swiglu there under every experts implementation: transformers' batched and
  grouped ones call the experts' gate, lf's; its eager one is replaced by lf's loop over the experts hit (Llama-4's
  experts, one batched product per projection, by the same with lf's swiglu between);
- ``rope``: attention modules run HF's own forward reading :func:`lf.kernels.rope` for the family's
  ``apply_rotary_pos_emb`` (see below);
- ``fused_linear_cross_entropy``: in training with labels, the causal LM's loss comes from
  :func:`fused_linear_cross_entropy` on the hidden states and no logits exist (``output.logits`` is None; a
  family that scales its logits, Granite, Cohere, Falcon-H1, has the hidden states scaled instead);
  otherwise (generation, evaluation, or ``skip_logits=False``) HF's own path runs; the keyword
  ``lf_token_weights`` (``{"dft": True}`` or ``{"eaft": alpha}``) weights each token's fused loss by DFT's or
  EAFT's detached weight, and with ``kl`` and :func:`reference_head`'s arguments adds a KL divergence from a
  reference model's next-token distribution (ASFT);
- ``cross_entropy`` (off unless asked): reported, not patched: the loss already needs no logits;
- ``packed_attention``: a model running SDPA switches to "lf_packed" (:mod:`lf.kernels.packed_attention`), which
  runs neat-packed rows example by example and leaves every other batch to SDPA;
- ``lora_nf4_linear``, ``lora_linear``: PEFT's LoRA layers over bitsandbytes 4-bit linears or plain nn.Linear run
  as one lf op each; the layers an op cannot take keep PEFT's forward and the report names them and why
  (:mod:`lf.kernels.lora_patch`). These run in any family.

Where the code goes: :func:`patch` binds lf's functions as the forwards of the model's own modules, so it
changes that model alone; nothing module-level is replaced, not even RoPE, whose attention forward is HF's code
object run with its modeling module's globals but ``apply_rotary_pos_emb`` bound to lf's. Patching twice changes
nothing, :func:`unpatch` restores HF's code in that model and no other (the one process-wide step, registering
the attention name "lf_packed" with transformers, changes no model that does not pick it). :func:`apply_to`
(asked for by name, for users who build models themselves) replaces a family's class forwards for the whole
process until ``unpatch(model_type)``. A family lf does not know patches nothing but PEFT's layers, and says so.
A vision-language model (:data:`VISION_LANGUAGE`) has its language model patched as its text family and in its
vision tower the kinds that fit its modules exactly (Qwen2.5-VL's RMSNorms and gated SiLU MLPs), the rest left to
HF; the report says what each tower got.

Adding a kind: one entry in ``_PATCHERS`` (its functions use :func:`bind`, :meth:`Call.bind`, :func:`unbind`);
:func:`register_kind` adds one for a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import operator
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lf.data.mm_plugins import forward_inputs as mm_forward_inputs
from lf.errors import KernelError, KernelInputError, did_you_mean
from lf.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from lf.kernels import packed_attention as _packed_attention
from lf.kernels import _recompute
from lf.kernels.glu import geglu, swiglu
from lf.kernels.lora_patch import LORA_OPS, layers_for
from lf.kernels.modules import GELU_APPROXIMATE
from lf.kernels.rms_norm import rms_norm
from lf.kernels.rope import rope
from lf.labels import IGNORE_INDEX

log = logging.getLogger("lf")


@dataclass(frozen=True)
class Family:
    """How lf's kinds go into one family's HF classes. Read from the family's modeling file: what differs from
    Llama's blocks is named here, and a kind whose modules lf cannot reproduce exactly is in ``kept``, with why."""
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix: <prefix>RMSNorm, <prefix>MLP, <prefix>Attention, <prefix>ForCausalLM
    mlp: str | None = "gated"  # a key of _MLP_FORWARDS, or None: the family's only MLPs are MoE experts
    norm: str = "llama"  # RMSNorm numerics, a key of _NORM_FORWARDS
    act_key: str = "hidden_act"  # the config field the MLP's activation comes from
    rope_keeps_dtype: bool = False  # its apply_rotary_pos_emb casts q/k back to their dtype (OLMo-2, OLMo-3)
    # MoE experts whose gate is silu(gate) * up: "routed" (transformers' experts interface: gate_up_proj (E, 2I, H),
    # down_proj (E, H, I), tokens routed to their top-k), "bmm" (Llama-4: (E, H, 2I), tokens sorted per expert)
    experts: str | None = None
    logit_scale: Callable | None = None  # config -> the factor HF's causal LM multiplies its logits by
    names: Mapping[str, str] = field(default_factory=dict)  # suffix -> class name where it is not prefix + suffix
    kept: Mapping[str, str] = field(default_factory=dict)  # kind -> why this family's modules stay HF's


# why a family's kinds stay HF's (shared by several families)
_INTERLEAVED = "its RoPE rotates interleaved pairs (x[0::2], x[1::2]); lf's rope kernel rotates halves"
_LAYER_NORM = "its norms subtract the mean (a LayerNorm), lf's rms_norm does not"


def _no_gate(mlp: str) -> dict[str, str]:
    return {"swiglu": f"its MLP is {mlp}: no gated product for lf's GLU kernels"}


def _moe(module: str, prefix: str, **fields) -> Family:
    """A mixture-of-experts family whose experts fit ``experts`` (and, where it has one, a gated dense MLP)."""
    return Family(module, prefix, experts="routed", **fields)


FAMILIES = types.MappingProxyType({
    "llama": Family("llama", "Llama"),
    "mistral": Family("mistral", "Mistral"),
    "ministral": Family("ministral", "Ministral"),
    "qwen2": Family("qwen2", "Qwen2"),
    "qwen3": Family("qwen3", "Qwen3"),
    "phi3": Family("phi3", "Phi3", mlp="fused"),  # Phi-3, Phi-3.5, Phi-4 and Phi-4-mini
    "gemma": Family("gemma", "Gemma", norm="gemma"),
    "gemma2": Family("gemma2", "Gemma2", norm="gemma", act_key="hidden_activation"),
    "gemma3_text": Family("gemma3", "Gemma3", norm="gemma", act_key="hidden_activation"),
    "vaultgemma": Family("vaultgemma", "VaultGemma", norm="gemma", act_key="hidden_activation"),
    "granite": Family("granite", "Granite", logit_scale=lambda c: 1 / c.logits_scaling),
    "olmo2": Family("olmo2", "Olmo2", norm="fp32", rope_keeps_dtype=True),
    "olmo3": Family("olmo3", "Olmo3", norm="fp32", rope_keeps_dtype=True),
    "glm": Family("glm", "Glm", mlp="fused", kept={"rope": f"{_INTERLEAVED}, of part of the head"}),
    "glm4": Family("glm4", "Glm4", mlp="fused", kept={"rope": f"{_INTERLEAVED}, of part of the head"}),
    "smollm3": Family("smollm3", "SmolLM3"),
    "exaone4": Family("exaone4", "Exaone4"),
    "hunyuan_v1_dense": Family("hunyuan_v1_dense", "HunYuanDenseV1"),
    "helium": Family("helium", "Helium", norm="fp32", kept={"rope": _INTERLEAVED}),
    "ernie4_5": Family("ernie4_5", "Ernie4_5", kept={"rope": _INTERLEAVED}),
    "seed_oss": Family("seed_oss", "SeedOss", mlp="dropout"),
    "arcee": Family("arcee", "Arcee", kept=_no_gate("down(relu2(up(x)))")),
    "apertus": Family("apertus", "Apertus", kept=_no_gate("down(xielu(up(x)))")),
    "bitnet": Family("bitnet", "BitNet", kept={"swiglu": "BitNetMLP normalises act(gate) * up (ffn_sub_norm) before "
                                                         "down_proj"}),
    "olmo": Family("olmo", "Olmo", rope_keeps_dtype=True, kept={"rms_norm": f"{_LAYER_NORM} (and has no weight)"}),
    "stablelm": Family("stablelm", "StableLm", kept={"rms_norm": _LAYER_NORM}),
    "phi": Family("phi", "Phi", kept={"rms_norm": _LAYER_NORM, **_no_gate("fc2(gelu(fc1(x)))")}),  # Phi-1, Phi-2
    "starcoder2": Family("starcoder2", "Starcoder2",
                         kept={"rms_norm": _LAYER_NORM, **_no_gate("c_proj(gelu(c_fc(x)))")}),
    "cohere": Family("cohere", "Cohere", logit_scale=lambda c: c.logit_scale,
                     kept={"rms_norm": _LAYER_NORM, "rope": _INTERLEAVED}),
    "cohere2": Family("cohere2", "Cohere2", logit_scale=lambda c: c.logit_scale,
                      kept={"rms_norm": _LAYER_NORM, "rope": _INTERLEAVED}),
    # its Mamba-2 mixers stay HF's
    "falcon_h1": Family("falcon_h1", "FalconH1", mlp="scaled", logit_scale=lambda c: c.lm_head_multiplier),
    "llama4_text": Family("llama4", "Llama4Text", experts="bmm", names={"ForCausalLM": "Llama4ForCausalLM"}, kept={
        "packed_attention": "its chunked-attention layers need transformers' chunk mask"}),
    "gpt_oss": Family("gpt_oss", "GptOss", mlp=None, norm="fp32", kept={
        "swiglu_experts": "GptOssExperts clamp gate (above) and up to swiglu_limit and compute (up + 1) * gate * "
                          "sigmoid(swiglu_alpha * gate) from interleaved columns: not silu(gate) * up",
        "rope": "its cos/sin hold each frequency once (half a head); lf's rope kernel takes them repeated"}),
    "mixtral": _moe("mixtral", "Mixtral", mlp=None),
    "qwen2_moe": _moe("qwen2_moe", "Qwen2Moe"),
    "qwen3_moe": _moe("qwen3_moe", "Qwen3Moe"),
    "qwen3_next": _moe("qwen3_next", "Qwen3Next", norm="gemma"),  # linear-attention layers stay HF's
    "olmoe": _moe("olmoe", "Olmoe"),
    "granitemoe": _moe("granitemoe", "GraniteMoe", mlp=None, logit_scale=lambda c: 1 / c.logits_scaling),
    "granitemoeshared": _moe("granitemoeshared", "GraniteMoeShared", mlp="input_output",
                             logit_scale=lambda c: 1 / c.logits_scaling),
    "glm4_moe": _moe("glm4_moe", "Glm4Moe"),
    "dots1": _moe("dots1", "Dots1"),
    "hunyuan_v1_moe": _moe("hunyuan_v1_moe", "HunYuanMoEV1"),
    "exaone_moe": _moe("exaone_moe", "ExaoneMoe"),
    "solar_open": _moe("solar_open", "SolarOpen"),
    "phimoe": _moe("phimoe", "Phimoe", mlp=None, kept={"rms_norm": _LAYER_NORM}),  # Phi-3.5-MoE
    "minimax": _moe("minimax", "MiniMax", mlp=None),  # lightning-attention layers stay HF's
    "ernie4_5_moe": _moe("ernie4_5_moe", "Ernie4_5_Moe", kept={"rope": _INTERLEAVED}),
    "deepseek_v2": _moe("deepseek_v2", "DeepseekV2"),  # its RoPE is complex-valued: not apply_rotary_pos_emb
    "deepseek_v3": _moe("deepseek_v3", "DeepseekV3", kept={
        "rope": f"with rope_interleave (its checkpoints' setting) {_INTERLEAVED}"}),
    # the language models of vision-language models (see VISION_LANGUAGE); their head is the VL model's
    "qwen2_vl_text": Family("qwen2_vl", "Qwen2VL", names={"MLP": "Qwen2MLP",
                                                          "ForCausalLM": "Qwen2VLForConditionalGeneration"}),
    "qwen2_5_vl_text": Family("qwen2_5_vl", "Qwen2_5_VL", names={"MLP": "Qwen2MLP",
                                                                 "ForCausalLM": "Qwen2_5_VLForConditionalGeneration"}),
    "qwen3_vl_text": Family("qwen3_vl", "Qwen3VLText", names={"ForCausalLM": "Qwen3VLForConditionalGeneration"}),
    "qwen2_5_omni_text": Family("qwen2_5_omni", "Qwen2_5Omni", names={
        "MLP": "Qwen2MLP", "ForCausalLM": "Qwen2_5OmniThinkerForConditionalGeneration"}),
})


@dataclass(frozen=True)
class Towers:
    """A vision-language model: its language model (at ``language``) is patched as the family of
    ``config.text_config.model_type`` and the LM head's loss as a causal LM's; in the vision tower (at ``vision``)
    the ``vision_kinds`` that fit its modules exactly are patched as in ``vision_family`` (its config is the vision
    config), and the rest keeps HF's modules, for the reason ``vision_kept`` gives."""
    language: str
    vision: str
    vision_kept: str
    text: str | None = None  # the language model's family when the model_type fixes it (what apply_to patches)
    vision_family: Family | None = None
    vision_kinds: tuple[str, ...] = ()


# Multimodal RoPE needs nothing more here: transformers 5 picks each column's position stream once per forward in
# the language model's rotary embedding, then every attention layer calls apply_rotary_pos_emb, which lf replaces.
_NO_VIT_KERNEL = "LayerNorms and (fc1, act, fc2) MLPs, which lf has no kernel for"
_VISION_ROPE = "its 2-D RoPE calls apply_rotary_pos_emb_vision, which lf does not replace"
VISION_LANGUAGE = types.MappingProxyType({
    "qwen2_vl": Towers("model.language_model", "model.visual", f"{_NO_VIT_KERNEL}; {_VISION_ROPE}", "qwen2_vl_text"),
    # its blocks are Llama-style: RMSNorms (computed in fp32, rounded before the weight) and gated MLPs with biases
    "qwen2_5_vl": Towers("model.language_model", "model.visual",
                         f"{_VISION_ROPE}; the patch merger's Linear-GELU-Linear MLP has no lf kernel",
                         "qwen2_5_vl_text", Family("qwen2_5_vl", "Qwen2_5_VL", names={"MLP": "Qwen2_5_VLMLP"}),
                         ("rms_norm", "swiglu")),
    "qwen3_vl": Towers("model.language_model", "model.visual", f"{_NO_VIT_KERNEL}; {_VISION_ROPE}", "qwen3_vl_text"),
    "llava": Towers("model.language_model", "model.vision_tower", f"CLIP's {_NO_VIT_KERNEL}"),
    "llava_next": Towers("model.language_model", "model.vision_tower", f"CLIP's {_NO_VIT_KERNEL}"),
    "gemma3": Towers("model.language_model", "model.vision_tower", f"SigLIP's {_NO_VIT_KERNEL}"),
    "internvl": Towers("model.language_model", "model.vision_tower", f"InternViT's {_NO_VIT_KERNEL}"),
    # an audio tower in the vision tower's place
    "qwen2_audio": Towers("model.language_model", "model.audio_tower", f"Whisper's {_NO_VIT_KERNEL}"),
    # Qwen2.5-Omni's thinker: a Qwen2.5-VL vision tower (its blocks patched alike) beside a Whisper-like audio tower
    "qwen2_5_omni_thinker": Towers(
        "model.language_model", "model.visual",
        f"{_VISION_ROPE}; the patch merger's Linear-GELU-Linear MLP has no lf kernel; the audio tower "
        f"(model.audio_tower) keeps Whisper's {_NO_VIT_KERNEL}", "qwen2_5_omni_text",
        Family("qwen2_5_omni", "Qwen2_5Omni", names={"MLP": "Qwen2_5OmniMLP"}), ("rms_norm", "swiglu")),
})


@dataclass
class PatchReport:
    family: str
    patched: dict[str, int] = field(default_factory=dict)  # kind -> how many places
    skipped: dict[str, str] = field(default_factory=dict)  # kind -> why not
    towers: dict[str, str] = field(default_factory=dict)  # vision-language models: tower -> what lf did there

    def __str__(self) -> str:
        done = ", ".join(f"{kind} ({n})" for kind, n in self.patched.items()) or "nothing"
        lines = [f"lf kernels in {self.family}: {done}"]
        lines += [f"  not {kind}: {why}" for kind, why in self.skipped.items()]
        lines += [f"  {tower}: {what}" for tower, what in self.towers.items()]
        return "\n".join(lines)


def _modeling(family: Family):
    return importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")


# ---- the replacements ----

def _norm_forward(offset: float, casting: str) -> Callable:
    def forward(self, hidden_states):
        eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps  # Llama-4, Gemma: eps
        return rms_norm(hidden_states, self.weight, eps, offset=offset, casting=casting)
    return forward


# Family.norm -> the RMSNorm forward: "llama" normalises in fp32, rounds, then multiplies by the weight; "fp32"
# multiplies in fp32 and rounds once (OLMo-2, GPT-OSS); "gemma" is that with (1 + weight)
_NORM_FORWARDS = types.MappingProxyType({"llama": _norm_forward(0.0, "llama"), "fp32": _norm_forward(0.0, "gemma"),
                                         "gemma": _norm_forward(1.0, "gemma")})


# HF activation modules (ACT2FN) by class name -> None for SiLU, else geglu's approximation
_ACT_MODULES = {"SiLUActivation": None, "SiLU": None, "GELUTanh": "tanh", "PytorchGELUTanh": "tanh",
                "NewGELUActivation": "tanh", "FastGELUActivation": "tanh", "GELUActivation": "none"}
_UNKNOWN = object()


def _act(self, gate, up):
    """act(gate) * up fused: the mode ``patch`` chose from the config (``_lf_act``), or, for classes patched by
    ``apply_to``, the one the module's own activation names; an activation lf does not know runs as HF's."""
    mode = self.__dict__.get("_lf_act", _UNKNOWN)
    if mode is _UNKNOWN:
        act_fn = next(getattr(self, n) for n in ("act_fn", "activation_fn", "activation") if hasattr(self, n))
        mode = _ACT_MODULES.get(type(act_fn).__name__, _UNKNOWN)
        if mode is _UNKNOWN:
            return act_fn(gate) * up
    return swiglu(gate, up) if mode is None else geglu(gate, up, mode)


def _down_of_act(self, down, gate, up):
    """``down(act(gate) * up)`` without keeping ``act(gate) * up`` for the backward pass: the product's own
    backward keeps gate and up, so the down projection's backward (its input gradient needs only the weight; LoRA's
    and a trained weight's gradients need the product) recomputes the product from them, an elementwise pass. On
    the bench's Llama that is 88 of the 499 MiB the autograd graph keeps at 4 x 512 fp32 tokens. Under gradient
    checkpointing (saved-tensor hooks already active) the layer recomputes anyway; under torch.compile the compiler
    picks what to recompute itself."""
    product = _act(self, gate, up)
    if not (torch.is_grad_enabled() and product.requires_grad) or _recompute.graph_decides():
        return down(product)
    # torch keeps both hooks with each saved tensor: pack must not hold the product, only where it lies
    storage, dtype, device = product.untyped_storage().data_ptr(), product.dtype, product.device

    def pack(t):  # the product, or a view of it (a 2-D reshape): its layout, to rebuild from the recomputed one
        # plain tensors only: a quantized weight (quanto's, a tensor subclass) has no storage to ask
        if type(t) is torch.Tensor and t.dtype == dtype and t.device == device and \
                t.untyped_storage().data_ptr() == storage:
            return t.size(), t.stride(), t.storage_offset()
        return t

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        with torch.no_grad():
            return _act(self, gate, up).as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return down(product)


def _gated_mlp_forward(self, x):
    return _down_of_act(self, self.down_proj, self.gate_proj(x), self.up_proj(x))


def _fused_mlp(gate_up: str, down: str) -> Callable:
    """The forward of an MLP whose one projection (named ``gate_up``) holds gate and up."""
    def forward(self, x):
        gate, up = getattr(self, gate_up)(x).chunk(2, dim=-1)
        return _down_of_act(self, getattr(self, down), gate, up)
    return forward


def _dropout_mlp_forward(self, x):  # Seed-OSS: dropout on the MLP's output
    return F.dropout(_gated_mlp_forward(self, x), p=self.residual_dropout, training=self.training)


def _scaled_mlp_forward(self, x):  # Falcon-H1: the gate and the output times its mlp_multipliers
    return _down_of_act(self, self.down_proj, self.gate_proj(x) * self.gate_multiplier, self.up_proj(x)) * \
        self.down_multiplier


# Family.mlp -> the MLP forward: "gated" (gate_proj, up_proj, down_proj), "fused" (Phi-3, GLM: gate_up_proj),
# "input_output" (Granite-MoE-shared: input_linear holds gate and up, output_linear), "scaled" (Falcon-H1),
# "dropout" (Seed-OSS)
_MLP_FORWARDS = types.MappingProxyType({"gated": _gated_mlp_forward, "fused": _fused_mlp("gate_up_proj", "down_proj"),
                                        "input_output": _fused_mlp("input_linear", "output_linear"),
                                        "scaled": _scaled_mlp_forward, "dropout": _dropout_mlp_forward})


def _swiglu_gate(gate_up):
    """The experts' ``_apply_gate``, which transformers' batched and grouped experts implementations call on
    each token's ``gate_up_proj`` output (gate first, then up)."""
    return swiglu(*gate_up.chunk(2, dim=-1))


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """A MoE layer's experts with lf's gate: transformers' own implementation when the model runs a batched or
    grouped one (it calls ``_apply_gate``), else this per-expert loop (transformers' eager one writes the gate
    inline). Each token's top-k outputs, weighted, are summed in expert order as transformers does."""
    if self.config._experts_implementation != "eager":
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    out = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        if expert >= self.num_experts:  # transformers' mark for a dropped slot
            continue
        token, slot = torch.where(top_k_index == expert)
        y = self._apply_gate(F.linear(hidden_states[token], self.gate_up_proj[expert]))
        y = F.linear(y, self.down_proj[expert]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _bmm_experts_forward(self, hidden_states):
    """Llama-4's experts: each expert's rows in one block, one batched product per projection."""
    gate, up = torch.bmm(hidden_states.view(self.num_experts, -1, self.hidden_size), self.gate_up_proj).chunk(2, -1)
    return torch.bmm(swiglu(gate, up), self.down_proj).view(-1, self.hidden_size)


def _rope(q, k, cos, sin, unsqueeze_dim=1):
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` for heads-first q/k (the layout every family here uses);
    with partial rotary embeddings (Phi-3's cos/sin narrower than the head) only that part rotates."""
    if unsqueeze_dim != 1:
        raise KernelInputError(f"lf's rope takes heads-first q/k (unsqueeze_dim=1), got unsqueeze_dim={unsqueeze_dim}")
    if q.dtype != cos.dtype:  # under autocast q/k are bf16 and cos/sin fp32: HF's math promotes, so does lf
        dtype = torch.promote_types(q.dtype, cos.dtype)
        q, k, cos, sin = q.to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype)
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return rope(q, k, cos, sin)
    q_rot, k_rot = rope(q[..., :rotary], k[..., :rotary], cos, sin)
    return torch.cat([q_rot, q[..., rotary:]], dim=-1), torch.cat([k_rot, k[..., rotary:]], dim=-1)


def _rope_keeping_dtype(q, k, cos, sin, unsqueeze_dim=1):
    q_embed, k_embed = _rope(q, k, cos, sin, unsqueeze_dim)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


# a forward keyword: fused_linear_cross_entropy's dft/eaft/kl options (lf.train.trainer passes them for use_dft_loss,
# use_eaft_loss and use_asft_loss, the last with reference_head's arguments)
TOKEN_WEIGHTS = "lf_token_weights"
_ROPE_FORWARDS: dict[type, Callable] = {}  # attention class -> its forward reading lf's RoPE


def _with_lf_rope(cls: type, lf_rope: Callable) -> Callable | None:
    """HF's ``cls.forward``, its code object unchanged, run with a copy of its modeling module's globals in which
    ``apply_rotary_pos_emb`` is ``lf_rope`` (:func:`_rope`, or :func:`_rope_keeping_dtype` where HF's casts back):
    bound to a module, that module alone runs lf's RoPE (names the module rebinds later are not seen; transformers
    rebinds none). None when the forward does not call it."""
    if cls not in _ROPE_FORWARDS:
        hf = _ORIGINAL_CLASS_FORWARD.get(cls, cls.forward)
        if "apply_rotary_pos_emb" not in hf.__code__.co_names:
            return None
        fn = types.FunctionType(hf.__code__, {**hf.__globals__, "apply_rotary_pos_emb": lf_rope}, hf.__name__,
                                hf.__defaults__, hf.__closure__)
        fn.__kwdefaults__ = hf.__kwdefaults__
        _ROPE_FORWARDS[cls] = functools.update_wrapper(fn, hf)
    return _ROPE_FORWARDS[cls]


def _causal_lm_forward(self, input_ids=None, *args, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, skip_logits=None,
                       **kwargs):
    """HF's causal-LM forward, with the loss from fused_linear_cross_entropy when training with labels. Positional
    arguments after ``input_ids`` are named by HF's own signature, whose order differs by family (LLaVA's second is
    pixel_values); the named ones stay in this signature, where HF's Trainer looks for its input columns."""
    if args:
        named = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                     inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                     skip_logits=skip_logits)
        named.update(zip(list(inspect.signature(self._lf_hf_forward).parameters)[1:], args))
        return _causal_lm_forward(self, input_ids, **named, **kwargs)
    weights = kwargs.pop(TOKEN_WEIGHTS, None) or {}
    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if not skip_logits or type(self.lm_head) is not nn.Linear:  # e.g. an adapter on the head: HF's path
        if weights:
            raise KernelInputError(f"{TOKEN_WEIGHTS}={weights} needs lf's fused loss, which this forward cannot take (logits "
                                   f"asked for, or an lm_head that is not a plain nn.Linear, e.g. with an adapter)")
        return self._lf_hf_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    if labels is None and kwargs.get("shift_labels") is None:
        raise KernelInputError("skip_logits=True needs labels (or shift_labels): without them there is no loss to "
                               "compute")
    return_dict = kwargs.pop("return_dict", None)
    shift_labels = kwargs.pop("shift_labels", None)
    router = kwargs.pop("output_router_logits", None)
    router = getattr(self.config, "output_router_logits", False) if router is None else router
    if router:  # a MoE model's load-balancing loss joins the loss, as in HF's forward (moe_aux_loss_coef)
        kwargs["output_router_logits"] = True
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = _head_input(self, outputs.last_hidden_state[:, keep, :])
    if shift_labels is None:  # as HF's ForCausalLMLoss: token t predicts label t + 1
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device),
                                      bias=self.lm_head.bias, num_items_in_batch=kwargs.get("num_items_in_batch"),
                                      softcap=_softcap(self), **weights)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    if router:
        aux = _router_loss(self, outputs.router_logits, attention_mask)
        out = MoeCausalLMOutputWithPast(loss=loss + self.router_aux_loss_coef * aux.to(loss.device), aux_loss=aux,
                                        logits=None, past_key_values=outputs.past_key_values,
                                        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                        router_logits=outputs.router_logits)
    else:
        out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out.to_tuple() if return_dict is False else out


def _head_input(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states as lm_head takes them: HF scales some families' logits, lf their input."""
    family = FAMILIES.get(model.config.model_type)
    return hidden if family is None or family.logit_scale is None else hidden * family.logit_scale(model.config)


def _softcap(model: nn.Module) -> float | None:
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def reference_head(model: nn.Module, inputs: dict) -> dict:
    """fused_linear_cross_entropy's reference arguments (ref_hidden, ref_weight, ref_bias, ref_softcap) for the
    forward inputs `inputs` (labels are left out): `model`'s (a causal LM, or a PEFT model around one) decoder run
    without gradient, and its head. The reference sees what the trained model sees, packed rows' positions too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(getattr(base, "lm_head", None)) is not nn.Linear or not hasattr(base, "model"):
        raise KernelInputError(f"the reference model ({type(base).__name__}) needs a decoder (`.model`) and a plain "
                               f"nn.Linear lm_head for lf's fused KL term")
    inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", TOKEN_WEIGHTS)}
    with torch.no_grad():
        hidden = base.model(**inputs, use_cache=False).last_hidden_state
    return dict(ref_hidden=_head_input(base, hidden), ref_weight=base.lm_head.weight, ref_bias=base.lm_head.bias,
                ref_softcap=_softcap(base))


def _router_loss(model: nn.Module, router_logits, attention_mask) -> torch.Tensor:
    """The family's own load-balancing loss of its routers' logits (its modeling file's load_balancing_loss_func,
    with the expert counts HF's forward passes)."""
    loss_of = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    if loss_of is None or not hasattr(model, "num_experts_per_tok"):
        raise KernelInputError(f"output_router_logits: {type(model).__name__} has no router load-balancing loss that "
                               f"lf's fused loss can add: set output_router_logits (moe_aux_loss_coef) off, or "
                               f"use_lf_kernels: false")
    return loss_of(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def fused_loss_on(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a PEFT wrapper) computes its training loss with lf's fused op."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.forward, "__func__", None) is _causal_lm_forward


# generate() refuses model_kwargs that its model's forward signature does not name: the media inputs a multimodal
# head takes (passed through **kwargs above), which each family's entry in lf.data.mm_plugins declares, are named
# here, keyword-only.
_params = list(inspect.signature(_causal_lm_forward).parameters.values())
_causal_lm_forward.__signature__ = inspect.Signature(
    _params[:-1] + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in mm_forward_inputs()]
    + _params[-1:])


# ---- binding: lf's functions as forwards, and back ----

_ORIGINAL_CLASS_FORWARD: dict[type, Callable] = {}  # classes apply_to patched -> HF's forward


def bind(module: nn.Module, fn: Callable) -> bool:
    """Binds ``fn`` as the instance's forward; False if it already is."""
    current = module.__dict__.get("forward")
    if current is not None and getattr(current, "__func__", None) is fn:
        return False
    module.forward = types.MethodType(fn, module)
    return True


def bind_instances(model: nn.Module, cls: type, fn: Callable, **attributes) -> int:
    """Binds ``fn`` as the forward of every ``cls`` module in ``model`` (with ``attributes`` set on each);
    returns how many there are."""
    found = [m for m in model.modules() if isinstance(m, cls)]
    for m in found:
        for name, value in attributes.items():
            setattr(m, name, value)
        bind(m, fn)
    return len(found)


def patch_class(cls: type, fn: Callable) -> int:
    """Makes ``fn`` the forward of ``cls`` (kept as ``_lf_hf_forward``) until ``unpatch(model_type)``; returns 1,
    the places patched."""
    if cls.forward is not fn:
        _ORIGINAL_CLASS_FORWARD[cls] = cls.forward
        cls._lf_hf_forward = cls.forward
        cls.forward = fn
    return 1


def unbind(model: nn.Module, fns: Iterable[Callable], attributes: tuple[str, ...] = ()) -> None:
    """Takes back every instance forward in ``model`` that is one of ``fns`` (and the ``attributes`` bound with
    it): the class's forward runs again."""
    fns = set(fns)
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) in fns:
            del m.forward
            for name in attributes:
                m.__dict__.pop(name, None)


@dataclass(frozen=True)
class Call:
    """One :func:`patch` or :func:`apply_to` call, as each kind's :class:`Patcher` sees it."""
    family: Family | None  # None: a model_type lf does not know (only kinds with any_family run)
    switches: Mapping[str, bool]  # every kind, on or off
    report: PatchReport
    base: nn.Module | None = None  # patch(): the HF model (inside a PEFT wrapper); apply_to(): None
    scope: nn.Module | None = None  # patch(): where the family's layers are (a VL model's language model, else base)

    def cls(self, suffix: str) -> type:
        """The family's HF class ``<prefix><suffix>`` (or its ``names`` entry), e.g. ``call.cls("MLP")``."""
        return getattr(_modeling(self.family), self.family.names.get(suffix, self.family.prefix + suffix))

    def bind(self, cls: type, fn: Callable, **attributes) -> int:
        """patch(): ``fn`` as the forward of every ``cls`` in ``scope`` (:func:`bind_instances`); apply_to(): as
        the class's forward (:func:`patch_class`, without ``attributes``). Returns the places patched."""
        return patch_class(cls, fn) if self.base is None else bind_instances(self.scope, cls, fn, **attributes)


# ---- the kinds ----

def _rms_norm(call: Call, kind: str) -> None:
    call.report.patched[kind] = call.bind(call.cls("RMSNorm"), _NORM_FORWARDS[call.family.norm])


def _mlp(call: Call, kind: str) -> None:
    family = call.family
    if family.mlp is None:
        call.report.skipped[kind] = "the family has no dense MLP: its MLPs are experts (swiglu_experts)"
        return
    forward = _MLP_FORWARDS[family.mlp]
    if call.base is None:  # apply_to: each MLP reads its activation from its own module when it runs
        call.report.patched[kind] = call.bind(call.cls("MLP"), forward)
        return
    act = getattr(call.scope.config, family.act_key, None)
    if act != "silu" and act not in GELU_APPROXIMATE:
        call.report.skipped[kind] = f"{family.act_key} is {act!r}, neither silu nor a GELU"
    elif count := call.bind(call.cls("MLP"), forward, _lf_act=GELU_APPROXIMATE.get(act)):
        call.report.patched[kind if act == "silu" else "geglu"] = count
    else:  # a MoE model whose every layer is sparse
        call.report.skipped[kind] = f"no {call.cls('MLP').__name__} in this model: its MLPs are experts"


def _calls_gate(implementation: str) -> bool:
    """Whether transformers' experts implementation calls the experts' ``_apply_gate`` (its eager one: lf's loop
    does; those outside its registry, fp8's, all do)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    fn = ALL_EXPERTS_FUNCTIONS.get(implementation)
    return fn is None or "_apply_gate" in inspect.unwrap(fn).__code__.co_names


def _experts(call: Call, kind: str) -> None:
    """MoE experts: reported only in families that have them (dense ones say nothing)."""
    experts = call.family.experts
    if experts is None:
        return
    if call.base is not None and (act := getattr(call.scope.config, call.family.act_key, None)) != "silu":
        call.report.skipped[kind] = f"{call.family.act_key} is {act!r}: the experts' gate is not silu(gate) * up"
    elif experts == "bmm":  # one implementation: the same in apply_to
        call.report.patched[kind] = call.bind(call.cls("Experts"), _bmm_experts_forward)
    elif call.base is None:
        call.report.skipped[kind] = ("chosen per model (transformers picks each model's experts implementation): "
                                     "lf.kernels.patch(model)")
    elif not _calls_gate(impl := call.scope.config._experts_implementation):
        call.report.skipped[kind] = f"experts_implementation {impl!r} computes the experts' gate in its own kernel"
    else:
        call.report.patched[kind] = call.bind(call.cls("Experts"), _experts_forward, _apply_gate=_swiglu_gate)


def _rope_forwards(call: Call, kind: str) -> None:
    cls = call.cls("Attention")
    forward = _with_lf_rope(cls, _rope_keeping_dtype if call.family.rope_keeps_dtype else _rope)
    if forward is None:
        call.report.skipped[kind] = f"{cls.__name__}.forward does not call apply_rotary_pos_emb; RoPE stays HF's"
    elif call.bind(cls, forward):
        call.report.patched[kind] = 1  # the family's one RoPE function, however many attention modules run it


def _lm_head_loss(call: Call, kind: str) -> None:
    base = call.base
    if base is None:
        call.report.patched[kind] = call.bind(call.cls("ForCausalLM"), _causal_lm_forward)
        return
    head = getattr(base, "lm_head", None)
    if head is None or not hasattr(base, "model"):
        call.report.skipped[kind] = f"{type(base).__name__} is not a causal LM with an lm_head"
    elif type(head) is not nn.Linear:
        call.report.skipped[kind] = f"lm_head is a {type(head).__name__} (e.g. an adapter on it), not a plain nn.Linear"
    else:
        if "_lf_hf_forward" not in base.__dict__:  # the instance's own (e.g. an accelerate hook's), kept on its path
            base._lf_hf_forward = base.forward
        bind(base, _causal_lm_forward)
        call.report.patched[kind] = 1


def _cross_entropy(call: Call, kind: str) -> None:
    call.report.skipped[kind] = (
        "the loss already comes from fused_linear_cross_entropy, which needs no logits"
        if call.switches["fused_linear_cross_entropy"] else "not available yet: with fused_linear_cross_entropy off "
                                                            "the loss stays HF's")


def _attention(call: Call, kind: str) -> None:
    base = call.scope  # a VL model's language model alone: its vision tower keeps its attention
    impl = getattr(base.config, "_attn_implementation", None)
    if impl == _packed_attention.NAME:
        call.report.patched[kind] = 1
    elif impl != "sdpa":
        call.report.skipped[kind] = (f"attention is {impl!r}; lf takes over SDPA only (flash-attention reads packed "
                                     f"rows itself, eager is kept for its attention weights)")
    else:
        base.set_attn_implementation(_packed_attention.register())
        base._lf_hf_attn = impl
        call.report.patched[kind] = 1


def _attention_per_model(call: Call, kind: str) -> None:  # registered, so that models can be loaded with it
    call.report.skipped[kind] = (f"chosen per model: lf.kernels.patch(model), or attn_implementation="
                                 f"{_packed_attention.register()!r} when loading")


def _unpatch_attention(base: nn.Module, kind: str) -> None:
    for module in base.modules():
        if "_lf_hf_attn" in module.__dict__:
            module.set_attn_implementation(module.__dict__.pop("_lf_hf_attn"))


def _lora(call: Call, kind: str) -> None:
    taken, why_not = layers_for(call.base, kind)
    for layer in taken:
        bind(layer, LORA_OPS[kind].forward)
    if taken:
        call.report.patched[kind] = len(taken)
    if why_not:
        call.report.skipped[kind] = why_not


def _lora_per_layer(call: Call, kind: str) -> None:
    call.report.skipped[kind] = "chosen per layer: lf.kernels.patch(model) once PEFT has added the adapters"


def _nothing(base: nn.Module, kind: str) -> None:
    pass


@dataclass(frozen=True)
class Patcher:
    """One patch kind. Each function gets the :class:`Call` (or the model) and the kind's name, and reports under
    that name. ``unpatch`` takes back what ``model`` bound; class forwards set through :func:`patch_class` come
    back with ``unpatch(model_type)``, whatever the kind."""
    model: Callable[[Call, str], None]  # patch(): binds lf's code in call.base
    classes: Callable[[Call, str], None]  # apply_to(): patches the family's classes, or reports why it cannot
    unpatch: Callable[[nn.Module, str], None] = _nothing  # unpatch(model)
    any_family: bool = False  # runs in a model_type lf does not know (PEFT's LoRA layers are the same in all)
    default: bool = True  # the switch's value when the caller does not set it


# kind -> Patcher, in the order the report lists them
_PATCHERS: dict[str, Patcher] = {
    "rms_norm": Patcher(_rms_norm, _rms_norm, lambda base, kind: unbind(base, _NORM_FORWARDS.values())),
    "swiglu": Patcher(_mlp, _mlp, lambda base, kind: unbind(base, _MLP_FORWARDS.values(), ("_lf_act",))),
    "swiglu_experts": Patcher(_experts, _experts,
                              lambda base, kind: unbind(base, (_experts_forward, _bmm_experts_forward),
                                                        ("_apply_gate",))),
    "rope": Patcher(_rope_forwards, _rope_forwards, lambda base, kind: unbind(base, _ROPE_FORWARDS.values())),
    "fused_linear_cross_entropy": Patcher(_lm_head_loss, _lm_head_loss,
                                          lambda base, kind: unbind(base, (_causal_lm_forward,), ("_lf_hf_forward",))),
    "cross_entropy": Patcher(_cross_entropy, _cross_entropy, default=False),
    "packed_attention": Patcher(_attention, _attention_per_model, _unpatch_attention),
    **{kind: Patcher(_lora, _lora_per_layer, lambda base, kind: unbind(base, (LORA_OPS[kind].forward,)),
                     any_family=True) for kind in LORA_OPS},
}
PATCHERS: Mapping[str, Patcher] = types.MappingProxyType(_PATCHERS)


@contextlib.contextmanager
def register_kind(kind: str, patcher: Patcher):
    """Makes ``kind`` a patch kind inside the ``with`` block (tests, experiments); lf's own are ``_PATCHERS``."""
    if kind in _PATCHERS:
        raise KernelError(f"register_kind: {kind!r} is a patch kind already; pick another name")
    _PATCHERS[kind] = patcher
    try:
        yield patcher
    finally:
        del _PATCHERS[kind]


# ---- patch, apply_to, unpatch ----

def _base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _run(function: str, model_type, switches: Mapping[str, bool], step: str, base: nn.Module | None = None):
    """Runs the ``step`` ("model" or "classes") of every kind switched on, in table order, after noting the kinds
    switched off; logs and returns the report. A vision-language model's language model is patched as its text
    family, and the report says what each tower got."""
    for kind in switches:
        if kind not in PATCHERS:
            raise KernelError(f"{function}: {kind!r} is not a patch kind.{did_you_mean(kind, PATCHERS)} The kinds: "
                              f"{', '.join(PATCHERS)}")
    on = {kind: bool(switches.get(kind, patcher.default)) for kind, patcher in PATCHERS.items()}
    report, towers, scope, family = PatchReport(str(model_type)), VISION_LANGUAGE.get(model_type), base, model_type
    if towers is not None:
        family = towers.text if base is None else base.config.text_config.model_type
        if base is not None:
            scope = operator.attrgetter(towers.language)(base)
            report.towers["language model"] = (f"{towers.language} ({type(scope).__name__}) patched as {family!r}"
                                               f"{'' if family in FAMILIES else ', a family lf does not patch'}")
        report.towers["vision tower"] = _vision_tower(towers, on, step, base)
    call = Call(FAMILIES.get(family), on, report, base, scope)
    unknown = (f"model_type {family!r} is not a family lf patches (supported: {', '.join([*FAMILIES, *VISION_LANGUAGE])})"
               f"; the model runs unchanged")
    if towers is not None and family is None:  # apply_to: each model's config names its language model's family
        unknown = (f"{model_type}'s language model is the family its config's text_config.model_type names: "
                   f"apply_to that one (e.g. 'llama'), or patch(model)")
    for kind, patcher in PATCHERS.items():
        if not on[kind] and patcher.default:
            report.skipped[kind] = "turned off by the caller"
    for kind, patcher in PATCHERS.items():
        if not on[kind]:
            continue
        if call.family is None and not patcher.any_family:
            report.skipped[kind] = unknown
        elif call.family is not None and kind in call.family.kept:
            report.skipped[kind] = call.family.kept[kind]
        else:
            getattr(patcher, step)(call, kind)
    (log.info if call.family is not None else log.warning)("%s", report)
    return report


def _vision_tower(towers: Towers, on: Mapping[str, bool], step: str, base: nn.Module | None) -> str:
    """Patches the vision tower's kinds that are switched on (its modules in ``base``, or its classes); says what
    it got."""
    kinds = [kind for kind in towers.vision_kinds if on[kind]]
    if not kinds:
        return f"{towers.vision} keeps HF's modules: {towers.vision_kept}"
    scope = None if base is None else operator.attrgetter(towers.vision)(base)
    report = PatchReport(towers.vision)
    call = Call(towers.vision_family, on, report, base, scope)
    for kind in kinds:
        getattr(PATCHERS[kind], step)(call, kind)
    done = ", ".join(f"{kind} ({n})" for kind, n in report.patched.items()) or "nothing"
    skipped = "".join(f"; not {kind}: {why}" for kind, why in report.skipped.items())
    return f"{towers.vision}: {done}{skipped}; the rest keeps HF's modules: {towers.vision_kept}"


def patch(model: nn.Module, **switches: bool) -> PatchReport:
    """Patches lf's kernels into ``model`` (an HF model, or one wrapped by PEFT) and returns (and logs) a report
    of what was patched and what was not, and why. ``switches`` turn kinds on or off by name (``rope=False``);
    every kind of :data:`PATCHERS` is on but ``cross_entropy``. See the module docstring for each kind."""
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return _run("lf.kernels.patch", model_type, switches, "model", base)


def apply_to(model_type: str, **switches: bool) -> PatchReport:
    """Patches a family's HF classes (``model_type`` as in its config, e.g. "llama") for users who build models
    themselves: every model of the family used afterwards runs lf's kernels, whenever it was created. Each MLP's
    activation is read from its own activation module; attention and LoRA layers are chosen per model
    (:func:`patch`). :func:`unpatch` with the same ``model_type`` undoes it."""
    return _run("lf.kernels.apply_to", model_type, switches, "classes")


def unpatch(target: nn.Module | str) -> None:
    """Restores HF's code: in a model patched by :func:`patch` (no other model changes), or, given a
    ``model_type``, in the classes :func:`apply_to` patched (a model_type lf does not know has none)."""
    if not isinstance(target, str):
        base = _base_model(target)
        for kind, patcher in PATCHERS.items():
            patcher.unpatch(base, kind)
    elif (target := getattr(VISION_LANGUAGE.get(target), "text", None) or target) in FAMILIES:
        module = _modeling(FAMILIES[target]).__name__
        for cls in [c for c in _ORIGINAL_CLASS_FORWARD if c.__module__ == module]:
            cls.forward = _ORIGINAL_CLASS_FORWARD.pop(cls)
            del cls._lf_hf_forward
