"""LongLoRA's shifted sparse attention (S²-Attn; LLaMA-Factory's `shift_attn`), in training only.

Each row of length L is cut into 4 groups of L/4 tokens (LongLoRA's and LLaMA-Factory's group_size_ratio 1/4, of
the batch's padded length: lf's collator pads to a multiple of 8) and attends causally within its group; the second
half of the heads sees the row rolled back by half a group (wrapping around, as LongLoRA does), so that their groups
straddle the others' and information crosses group borders. Evaluation and generation (the model in eval mode)
attend over the whole row with the attention the model had. The padding mask is not applied inside the groups, as
in LongLoRA: lf pads on the right, where a causal group only reaches pads from the wrapped first half-group of the
shifted heads, as LongLoRA's does.

It is a transformers attention implementation wrapping the model's own ("sdpa", or lf's "lf_packed"), so that the
families whose attention modules call transformers' attention interface take it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lf.errors import ModelError

GROUPS = 4  # LLaMA-Factory's group_size_ratio 0.25
# Llama-style full causal attention over one RoPE, no sliding window or softcap (LLaMA-Factory supports llama only)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
WRAPPED = ("sdpa", "lf_packed")  # the full attentions it runs outside training (both read transformers' sdpa mask)
PREFIX = "lf_shift_attn_over_"


def _shift(x: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    """(B, H, L, D) -> (B * L/group, H, group, D): heads from `kept` on rolled back by half a group, then grouped."""
    b, h, length, d = x.shape
    x = torch.cat((x[:, :kept], x[:, kept:].roll(-(group // 2), dims=2)), dim=1)
    return x.view(b, h, length // group, group, d).transpose(1, 2).reshape(-1, h, group, d)


def _unshift(out: torch.Tensor, batch: int, kept: int, group: int) -> torch.Tensor:
    """_shift's inverse for the attention output, returned as (B, L, H, D) (transformers' layout)."""
    _, h, _, d = out.shape
    out = out.view(batch, -1, h, group, d).transpose(1, 2).reshape(batch, h, -1, d)
    out = torch.cat((out[:, :kept], out[:, kept:].roll(group // 2, dims=2)), dim=1)
    return out.transpose(1, 2).contiguous()


def shifted_groups(query, key, value, *, scaling=None, dropout: float = 0.0) -> torch.Tensor:
    """S²-Attn of (B, H, L, D) query and (B, Hkv, L, D) key/value (grouped query attention: H a multiple of Hkv);
    (B, L, H, D) out."""
    heads, kv_heads, length = query.shape[1], key.shape[1], query.shape[2]
    if length % GROUPS:
        raise ModelError(f"shift_attn: a batch of {length} tokens does not split into {GROUPS} groups; pad batches to "
                         f"a multiple of {GROUPS} (lf's collator pads to 8) or remove shift_attn")
    kept = heads // 2  # query heads left in place
    if kept * kv_heads % heads:  # a kv head would serve shifted and unshifted query heads: give each its own
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
        kv_heads = heads
    group, kv_kept = length // GROUPS, kept * kv_heads // heads
    out = F.scaled_dot_product_attention(_shift(query, kept, group), _shift(key, kv_kept, group),
                                         _shift(value, kv_kept, group), dropout_p=dropout, is_causal=True,
                                         scale=scaling, enable_gqa=kv_heads != heads)
    return _unshift(out, query.shape[0], kept, group)


def _attention(full: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if not module.training:
            return ALL_ATTENTION_FUNCTIONS[full](module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        if kwargs.get("sliding_window") or kwargs.get("softcap") is not None or query.shape[2] != key.shape[2]:
            raise ModelError("shift_attn: this attention layer has a sliding window, a softcap or a KV cache, which "
                             "S²-Attn's groups do not reproduce; remove shift_attn")
        return shifted_groups(query, key, value, scaling=scaling, dropout=dropout), None
    return attention


def register(full: str) -> str:
    """Registers S²-Attn around the full attention `full` (one of WRAPPED) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = PREFIX + full
    AttentionInterface.register(name, _attention(full))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def apply(model) -> str:
    """Turns S²-Attn on in `model`'s language model (after lf's kernels chose its attention); says so in one line."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in FAMILIES:
        raise ModelError(f"shift_attn: model_type {config.model_type!r} is not one lf runs LongLoRA's shifted "
                         f"attention on ({', '.join(FAMILIES)}); remove shift_attn")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ModelError(f"shift_attn: this {config.model_type} model attends through a sliding window of "
                         f"{config.sliding_window} tokens, which S²-Attn's groups do not reproduce; remove shift_attn")
    full = config._attn_implementation
    if full not in WRAPPED:
        raise ModelError(f"shift_attn: the model's attention is {full!r}; lf runs S²-Attn over SDPA: set "
                         f"flash_attn: sdpa, or remove shift_attn")
    base.set_attn_implementation(register(full))
    return (f"shift_attn: LongLoRA's shifted sparse attention in training ({GROUPS} groups a row, half the heads "
            f"shifted by half a group); {full} attention at evaluation")
