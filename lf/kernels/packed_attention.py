"""Attention over packed rows: each example of a row attends only to itself (causally), on every device.

A neat-packed row marks its examples by position_ids that restart at 0. transformers turns such rows into a
block-diagonal (L x L) mask for SDPA, whose cost grows with the whole row. Here each example can run its own
causal SDPA instead (varlen attention by segments): the same outputs and gradients, with work that grows with the
examples' lengths: 3.9x faster than the mask in fp32, 2.8x in bf16, forward + backward of one 2048-token row of 8
examples on this 2-core CPU (`python -m bench.packed_attention`). Short rows of short examples cost SDPA about as
much either way, and one masked call then wins: :func:`segments_pay` picks per batch, from the measured cost of a
segment. On a GPU, SDPA's flash kernel runs each segment.

`register()` adds this as the attention implementation "lf_packed" to transformers; batches that are not packed
(no restart, a KV cache, left padding), and layers that need more than a causal mask (a sliding window shorter
than an example, logit softcapping, attention sinks) and code compiled by torch.compile go to transformers' own SDPA path unchanged, with its mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lf_packed"


def segments(position_ids: torch.Tensor | None, length: int) -> list[list[tuple[int, int]]] | None:
    """[(start, end), ...] per row when the rows are packed (every row starts at position 0 and some position
    restarts at 0 later), else None. Rows of one batch may hold different numbers of examples."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != length:
        return None
    starts = position_ids == 0
    if not bool(starts[:, 0].all()) or int(starts[:, 1:].sum()) == 0:
        return None
    rows = []
    for row in starts.tolist():
        bounds = [i for i, s in enumerate(row) if s] + [length]
        rows.append(list(zip(bounds[:-1], bounds[1:])))
    return rows


def packed_sdpa(query, key, value, bounds, *, scale=None, dropout_p=0.0) -> torch.Tensor:
    """Causal attention within each segment. query (B, H, L, D), key/value (B, Hkv, L, D) with H a multiple of
    Hkv (grouped-query attention); bounds from :func:`segments`. Returns (B, H, L, D). Rows are unbound and split
    rather than indexed: their backwards are one stack and one cat, where each indexed slice's backward would
    zero-fill a gradient of the whole input (2x slower in fp32 and bf16 at 512-token rows here)."""
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), bounds):
        sizes = [e - s for s, e in row]
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scale,
                                                dropout_p=dropout_p, enable_gqa=gqa)
                 for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


# SDPA's CPU flash kernel spends about as long on a segment of n tokens as on n x max(n, block) cells: causal
# fwd+bwd, 8 heads of 64, on this CPU: bf16 0.72/1.42/2.68/4.52/9.04 ms at 32/64/128/256/512 tokens (a block of
# 512), fp32 0.25/0.57/1.28/4.06/11.8 ms (about 192). So segments save work only when rows are long against their
# examples: 4 rows of 512 tokens holding 21 examples of 32-200 ran 1.2x faster as one masked call in bf16, 1.6x
# faster as segments in fp32 (`python -m bench.packed_attention`).
SEGMENT_BLOCK = {torch.float32: 192}  # 16-bit dtypes: 512


def segment_block(dtype: torch.dtype) -> int:
    return SEGMENT_BLOCK.get(dtype, 512)


def segments_pay(bounds, length: int, dtype: torch.dtype) -> bool:
    """Whether running segments beats one masked SDPA call over the whole batch: segments cost about their
    length times max(length, segment_block(dtype)), plus a quarter for slicing; the mask costs every row's
    length squared."""
    block = segment_block(dtype)
    work = sum((e - s) * max(e - s, block) for row in bounds for s, e in row)
    return 1.25 * work < len(bounds) * length * length


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: (attn_output (B, L, H, D), attention weights or None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Reading the boundaries is data-dependent control flow: under torch.compile the mask path stays in one graph.
    plain = query.shape[2] != key.shape[2] or torch.compiler.is_compiling()
    bounds = None if plain else segments(kwargs.get("position_ids"), query.shape[2])
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if bounds is not None and window:
        bounds = None if max(e - s for row in bounds for s, e in row) > window else bounds
    if bounds is not None and not segments_pay(bounds, query.shape[2], query.dtype):
        bounds = None  # transformers' block-diagonal mask, in one call
    if bounds is None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = packed_sdpa(query, key, value, bounds, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Makes "lf_packed" a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
