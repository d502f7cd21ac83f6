"""What differs between the model families lf writes as GGUF: llama.cpp's architecture, the checks that a model fits
what llama.cpp computes for it, the architecture's own metadata keys and the tensors that are not one HF weight
under a llama.cpp name.

Facts from llama.cpp (its model loaders and convert_hf_to_gguf.py; the facts, not its code):
  - its llama architecture rotates adjacent pairs of each q/k head, the others (qwen2, qwen3, qwen3moe, gemma2,
    gemma3, phi3) rotate halves as transformers does, so only llama's q/k rows are permuted;
  - Gemma's RMSNorm multiplies by 1 + weight, llama.cpp's by the weight: Gemma's norms are written plus one;
  - Gemma 2 and 3 scale queries by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the 27B models, which llama.cpp
    recognises by their layer count), and Gemma 2 always soft-caps and reuses token_embd as the output head;
  - qwen3moe always renormalises the chosen experts' weights, and every layer is an MoE layer;
  - transformers 5 stores an MoE layer's experts as one gate_up_proj [experts, 2 x ff, hidden] (gate first) and one
    down_proj [experts, hidden, ff]; llama.cpp wants ffn_gate_exps, ffn_up_exps and ffn_down_exps;
  - llama.cpp's llama architecture has no sliding window and its phi3 turns Phi-3's off, so a Mistral 7B v0.1 or a
    Phi-3 whose sliding_window is shorter than the context computes the same only up to that window (llama.cpp's
    converter writes them all the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np


def _no_keys(writer, config) -> None:
    pass


def _fits(config) -> str | None:
    return None


@dataclass(frozen=True)
class Family:
    arch: str  # gguf's MODEL_ARCH member
    permute_qk: bool = False
    norm_shift: float = 0.0  # added to every norm weight
    pre_tokenizer: str | None = None  # llama.cpp's name for the split before BPE, when the family fixes it
    untied_head: bool = True  # whether llama.cpp reads an output head of its own
    check: Callable[[object], str | None] = _fits  # what in the config llama.cpp would compute differently
    keys: Callable[[object, object], None] = _no_keys  # the architecture's own metadata


def _query_scale(layers_27b: int):
    def check(config) -> str | None:
        heads, head_dim = config.num_attention_heads, config.head_dim
        want = config.hidden_size // heads if config.num_hidden_layers == layers_27b else head_dim
        if config.query_pre_attn_scalar != want:
            return (f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from the {want} llama.cpp "
                    f"scales queries by for a {config.num_hidden_layers}-layer {config.model_type}")
        return None
    return check


def _sliding(writer, config) -> None:
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])


def _gemma2_check(config) -> str | None:
    if not config.tie_word_embeddings:
        return "an untied output head (llama.cpp's gemma2 reuses token_embd)"
    if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
        return "no logit soft-capping (llama.cpp's gemma2 always soft-caps)"
    return _query_scale(46)(config)


def _gemma2_keys(writer, config) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding(writer, config)


def _gemma3_check(config) -> str | None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (llama.cpp's gemma3 has none)"
    local = config.rope_parameters.get("sliding_attention", {})
    if local.get("rope_type", "default") != "default":
        return f"rope scaling {local['rope_type']!r} on the sliding-window layers"
    return _query_scale(62)(config)


def _gemma3_keys(writer, config) -> None:
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding(writer, config)


def _moe_check(config) -> str | None:
    if not config.norm_topk_prob:
        return "norm_topk_prob false (llama.cpp's qwen3moe renormalises the chosen experts' weights)"
    if config.mlp_only_layers or config.decoder_sparse_step != 1:
        return "dense layers among the MoE ones (llama.cpp's qwen3moe makes every layer MoE)"
    return None


def _moe_keys(writer, config) -> None:
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)


# HF architecture -> its family
FAMILIES = MappingProxyType({
    "LlamaForCausalLM": Family("LLAMA", permute_qk=True),
    "MistralForCausalLM": Family("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Family("QWEN2", pre_tokenizer="qwen2"),
    "Qwen3ForCausalLM": Family("QWEN3", pre_tokenizer="qwen2"),
    "Qwen3MoeForCausalLM": Family("QWEN3MOE", pre_tokenizer="qwen2", check=_moe_check, keys=_moe_keys),
    "Gemma2ForCausalLM": Family("GEMMA2", norm_shift=1.0, untied_head=False, check=_gemma2_check,
                                keys=_gemma2_keys),
    "Gemma3ForCausalLM": Family("GEMMA3", norm_shift=1.0, check=_gemma3_check, keys=_gemma3_keys),
    "Phi3ForCausalLM": Family("PHI3"),
})


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (first half of the head's dimensions, then the second) to the
    interleaved pairs llama.cpp rotates; a bias (1-D) is permuted like the rows."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def split_experts(name: str, data: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """An MoE layer's fused gate_up_proj [experts, 2 x ff, hidden] as llama.cpp's ffn_gate_exps and ffn_up_exps."""
    import gguf

    layer = int(name.split(".")[2])
    gate, up = np.split(data, 2, axis=1)
    for tensor, part in ((gguf.MODEL_TENSOR.FFN_GATE_EXP, gate), (gguf.MODEL_TENSOR.FFN_UP_EXP, up)):
        yield gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight", np.ascontiguousarray(part)
