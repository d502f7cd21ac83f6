"""Attention over packed rows: each example of a row attends only to itself (causally), on every device.

A neat-packed row marks its examples by position_ids that restart at 0. transformers turns such rows into a
block-diagonal (L x L) mask for SDPA, whose cost grows with the whole row. Three ways around it, all giving the
mask's outputs and gradients (:func:`choose` picks one per batch):

- :func:`flash_attention_cpu` (CPU; by default in fp32, see FLASH): lf's fused causal kernel over each example's tiles
  (csrc/flash_attention.cpp), forward and backward; 3.9-6.4x the fastest other path (those below, or the mask)
  in `python -m bench.packed_attention` on the AMD EPYC (2 cores).
- :func:`packed_sdpa`: one causal SDPA per example (varlen attention by segments). On a GPU SDPA's flash kernel
  runs each segment; on the CPU, where the fused kernel does not (dropout, the torch backend), it runs batches
  where :func:`segments_pay` (the mask otherwise).
- :func:`packed_attention_cpu` (16-bit CPU tensors): SDPA's flash forward,
  and lf's backward over each example's causal block only, as BLAS products and two elementwise passes (C++ in
  lf._C, or torch). SDPA's CPU backward costs 5x its forward in bf16 and runs every cell of a masked row. Rows of
  many tiny examples keep the mask (:func:`own_backward_pays`).

packed_attention_cpu, forward + backward in bf16 on the 2-core CPU (`python -m bench.packed_attention`, before the
fused kernel): 3.8x faster than the mask over one 2048-token row of 8 examples, 1.7x over 4 rows of 512 (where
segments alone lose to the mask).

`register()` adds this as the attention implementation "lf_packed" to transformers; batches that are not packed
(no restart, a KV cache, left padding), layers that need more than a causal mask (a sliding window shorter
than an example, logit softcapping, attention sinks) and code compiled by torch.compile go to transformers' own
SDPA path unchanged, with its mask.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lf.errors import KernelInputError
from lf.kernels import _alloc, _backend, _checks

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


def block_mask(bounds, length: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The additive (B, 1, L, L) mask of packed rows: 0 where a token sees a token of its own example at or
    before it, -inf elsewhere."""
    mask = torch.full((len(bounds), 1, length, length), float("-inf"), dtype=dtype, device=device)
    for r, row in enumerate(bounds):
        for s, e in row:
            mask[r, 0, s:e, s:e].triu_(1)  # -inf above the diagonal, 0 on and below
    return mask


@functools.lru_cache(maxsize=1)
def _batch_mask(bounds_key, length: int, dtype: torch.dtype) -> torch.Tensor:
    # One batch's layers (and their recomputation under checkpointing) share one mask; read only.
    return block_mask(bounds_key, length, dtype)


def _above_diagonal(n: int, device=None) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _flash(query, key, value, scale, causal, mask=None):
    """SDPA's CPU flash kernel, keeping the log-sum-exp its forward computes: (out, lse (B, H, L) fp32)."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal,
                                                                          attn_mask=mask, scale=scale)
    return out, lse


# The two elementwise passes of a segment's backward, on (Hkv, G*n, n) blocks whose row r holds query r % n:
# probabilities from the scores and the forward's log-sum-exp, then dS = P * (dP - rowsum(O * dO)) * scale.
def _probs_torch(s, lse, scale):
    n = s.shape[-1]
    p = torch.exp(s.float() * scale - lse.reshape(*s.shape[:-1], 1))
    return p.view(-1, n, n).masked_fill_(_above_diagonal(n, s.device), 0).view(s.shape).to(s.dtype)


def _score_grad_torch(p, dp, o, dout, scale):
    delta = (o.float() * dout.float()).sum(-1).reshape(*p.shape[:-1], 1)
    return (p.float() * (dp.float() - delta) * scale).to(p.dtype)


def _probs_cpu(s, lse, scale):
    from lf import _C

    p = _alloc.empty_like(s)
    _C.attn_block(_C.AttnBlock(s=s.data_ptr(), lse=lse.data_ptr(), p=p.data_ptr(), rows=s.shape[0] * s.shape[1],
                               n=s.shape[2], scale=scale, grad=False, dtype=_checks.cpu_dtype(s.dtype),
                               threads=_checks.threads()))
    return p


def _score_grad_cpu(p, dp, o, dout, scale):
    from lf import _C

    _C.attn_block(_C.AttnBlock(p=p.data_ptr(), dp=dp.data_ptr(), o=o.data_ptr(), dout=dout.data_ptr(),
                               rows=p.shape[0] * p.shape[1], n=p.shape[2], dim=o.shape[-1], scale=scale, grad=True,
                               dtype=_checks.cpu_dtype(p.dtype), threads=_checks.threads()))
    return dp


# Where lf's backward runs on the CPU: SDPA's CPU flash backward costs 5x its forward in 16-bit dtypes (4.3 ms
# forward, 21.7 ms backward for 4 rows of 512 tokens, 8 heads of 64, bf16), lf's 12-14 ms (segments padded as
# padded_length says); in fp32 SDPA's backward by segments is as fast (13.3 ms against lf's 14.8), so fp32 keeps it.
OWN_BACKWARD = (torch.bfloat16, torch.float16)
ELEMENTWISE = {"cpu": (_probs_cpu, _score_grad_cpu), "torch": (_probs_torch, _score_grad_torch)}


class PackedAttentionFunction(torch.autograd.Function):
    """Causal attention within each segment of packed rows, for CPU tensors. Forward: SDPA's flash kernel, by
    segment or over the whole batch under the block-diagonal mask (whichever :func:`segments_pay` picks), keeping
    its log-sum-exp. Backward: each segment's causal block only, as five BLAS products and two elementwise passes
    (``lf._C`` or torch). SDPA's own CPU backward runs every cell of a masked row, 5x its forward's time in bf16."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale, by_segments, backend):
        with torch.autocast("cpu", enabled=False):
            if by_segments:
                outs, lses = [], []
                for b, row in enumerate(bounds):
                    parts = [_flash(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], scale, True)
                             for s, e in row]
                    outs.append(torch.cat([o for o, _ in parts], 2))
                    lses.append(torch.cat([lse for _, lse in parts], 2))
                out, lse = torch.cat(outs), torch.cat(lses)
            else:
                key_ = tuple(tuple(map(tuple, row)) for row in bounds)
                out, lse = _flash(query, key, value, scale, False, _batch_mask(key_, query.shape[2], query.dtype))
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.bounds, ctx.scale, ctx.backend = bounds, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        probs, score_grad = ELEMENTWISE[ctx.backend]
        heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
        scale = ctx.scale if ctx.scale is not None else dim ** -0.5
        dq, dk, dv = _alloc.empty_like(query), _alloc.empty_like(key), _alloc.empty_like(value)
        with torch.autocast("cpu", enabled=False):
            for b, row in enumerate(ctx.bounds):
                for s, e in row:
                    n, m = e - s, padded_length(e - s)
                    # (H, m, D) zero-padded copies, so that a KV head's G query heads are one (G*m, D) matrix;
                    # padded rows and columns add zeros (the causal mask hides padded keys from real queries)
                    q, do, o, k, v, lse_ = (_pad(t[b, :, s:e], m) for t in (query, dout, out, key, value, lse))
                    qg, dog = q.view(kv_heads, -1, dim), do.view(kv_heads, -1, dim)
                    p = probs(torch.bmm(qg, k.transpose(1, 2)), lse_, scale)
                    dv[b, :, s:e] = torch.bmm(p.transpose(1, 2), dog)[:, :n]
                    ds = score_grad(p, torch.bmm(dog, v.transpose(1, 2)), o, do, scale)
                    dq[b, :, s:e] = torch.bmm(ds, k).view(heads, m, dim)[:, :n]
                    dk[b, :, s:e] = torch.bmm(ds.transpose(1, 2), qg)[:, :n]
        return dq, dk, dv, None, None, None, None


def padded_length(n: int) -> int:
    """The length a segment's backward runs at: n rounded up to a multiple of 64, or from 1024 on of an eighth of
    the power of two below n (at most 12.5% more work there). oneDNN compiles and keeps a kernel per distinct
    product shape (~0.7 MB each here, up to 1024 of them): free lengths grew a bf16 training run's resident set by
    ~16 MB a step. Rows of up to 512 tokens now use 8 lengths, and each doubling of the row adds 8."""
    step = max(64, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


def own_backward_pays(bounds, length: int) -> bool:
    """Whether lf's backward (the padded causal blocks, plus a fixed cost per example) beats SDPA's masked one:
    the blocks' cells, sum(padded_length(n)^2), against the mask's rows * length^2. Measured in bf16
    (`python -m bench.packed_attention`, and its --quick shapes): 0.18-0.38 of the mask's cells ran 1.4-5x faster,
    train_e2e's batches (~0.65) 1.6x; rows of 128 tokens holding 4-6 examples of 8-50 (1.31x the cells) ran 0.71x,
    so those keep the mask."""
    return sum(padded_length(e - s) ** 2 for row in bounds for s, e in row) < len(bounds) * length * length


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """t (heads, n, ...) copied into zeros of (heads, length, ...), contiguous."""
    out = t.new_zeros(t.shape[0], length, *t.shape[2:])
    out[:, :t.shape[1]] = t
    return out


def packed_attention_cpu(query, key, value, bounds, *, scale=None, by_segments=None, backend=None) -> torch.Tensor:
    """:func:`packed_sdpa`'s result for CPU tensors through :class:`PackedAttentionFunction`; ``by_segments``
    None lets :func:`segments_pay` pick the forward, ``backend`` None picks the elementwise passes by device."""
    if query.device.type != "cpu":
        raise KernelInputError(f"packed_attention_cpu runs CPU tensors, not {query.device}; use packed_sdpa there")
    if by_segments is None:
        by_segments = segments_pay(bounds, query.shape[2], query.dtype)
    backend = backend or _backend.choose_backend("cpu")
    return PackedAttentionFunction.apply(query, key, value, bounds, scale, by_segments,
                                         backend if backend in ELEMENTWISE else "torch")


def _heads(t: torch.Tensor):
    from lf import _C

    return _C.HeadsTensor(data=t.data_ptr(), stride=list(t.stride()[:3]))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_kernel(backward: bool, tensors: dict, lse, segments, query, key, scale) -> None:
    from lf import _C

    _C.flash_attention(_C.FlashAttention(
        **{name: _heads(t) for name, t in tensors.items()}, lse=lse.data_ptr(), segments=segments.data_ptr(),
        nseg=segments.shape[0], heads=query.shape[1], kv_heads=key.shape[1], seq=query.shape[2],
        dim=query.shape[3], scale=scale, backward=backward, dtype=_checks.cpu_dtype(query.dtype),
        threads=_checks.threads()))


class FlashAttentionFunction(torch.autograd.Function):
    """Causal attention within each segment of packed rows, fused in C++ (csrc/flash_attention.cpp): tiles of
    64 x 64, blocks above the diagonal skipped, online softmax in fp32; the forward saves each row's log-sum-exp
    and the backward recomputes the probabilities tile by tile. Grouped-query heads read their kv head in place."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale):
        query, key, value = map(_last_dim_contiguous, (query, key, value))
        segments = torch.tensor([(b, s, e) for b, row in enumerate(bounds) for s, e in row], dtype=torch.int64)
        batch, heads, length, dim = query.shape
        # (B, L, H, D) storage, as transformers' attention output: its (B, H, L, D) view's transpose is free
        out = _alloc.empty((batch, length, heads, dim), query).transpose(1, 2)
        lse = _alloc.empty((batch, heads, length), query, torch.float32)
        _flash_kernel(False, dict(q=query, k=key, v=value, out=out), lse, segments, query, key, scale)
        ctx.save_for_backward(query, key, value, out, lse, segments)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse, segments = ctx.saved_tensors
        dq, dk, dv = _alloc.empty_like(query), _alloc.empty_like(key), _alloc.empty_like(value)
        _flash_kernel(True, dict(q=query, k=key, v=value, out=out, dout=_last_dim_contiguous(dout), dq=dq, dk=dk,
                                 dv=dv), lse, segments, query, key, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention_cpu(query, key, value, bounds, *, scale=None) -> torch.Tensor:
    """:func:`packed_sdpa`'s result for CPU tensors through :class:`FlashAttentionFunction` (lf._C)."""
    if query.device.type != "cpu":
        raise KernelInputError(f"flash_attention_cpu runs CPU tensors, not {query.device}; use packed_sdpa there")
    if query.shape[1] % key.shape[1]:
        raise KernelInputError(f"flash_attention_cpu: {query.shape[1]} query heads are not a multiple of "
                               f"{key.shape[1]} key/value heads; give each kv head the same number of query heads")
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        raise KernelInputError(f"flash_attention_cpu: head dims differ (query {query.shape[-1]}, key {key.shape[-1]}, "
                               f"value {value.shape[-1]}); use packed_sdpa for values of another width")
    _checks.same_device_and_dtype("flash_attention_cpu", "query", query, key=key, value=value)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    return FlashAttentionFunction.apply(query, key, value, bounds, scale)


_ADDITIVE = "_lf_additive"  # on a boolean mask: (its version, its additive form)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA itself turns it into floats (0 where attended, -inf elsewhere), once for all layers:
    transformers hands every layer the same mask, and SDPA would convert it in each call and keep each copy for its
    backward pass (a (B, 1, L, L) tensor a layer: 4 MiB at 4 x 512 fp32 tokens). The same values reach the same
    kernel: the same bits."""
    version, additive = getattr(mask, _ADDITIVE, (None, None))
    if version != mask._version or additive.dtype != dtype:
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(),
                                                                                         float("-inf"))
        setattr(mask, _ADDITIVE, (mask._version, additive))
    return additive


def _sdpa_mask(module, query, key, value, mask, dropout, scaling, kwargs):
    """transformers' SDPA path: one call under its mask (block-diagonal, padding). A training forward's boolean
    mask on the CPU goes to SDPA made additive once (:func:`_additive`), with grouped-query key/value heads as they
    are (``enable_gqa``: the CPU flash kernel reads each for its group of query heads). transformers copies them out
    to one per query head under a mask (its CUDA kernels would take the math path), and SDPA keeps the copies for
    its backward pass: 4 MiB a layer at 4 x 512 fp32 tokens of the bench's Llama. Outputs and the query gradient
    keep their bits; the key and value gradients sum a group in another order (last-bit differences). A cache, a
    position bias, softcapping, sinks, dropout, no gradient (evaluation, serving), torch.compile and other devices take
    transformers' path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # grad on: what is saved is the training pass's cost (and inference_mode's tensors keep no version to check)
    own = (query.device.type == "cpu" and torch.is_grad_enabled() and mask is not None and mask.dtype == torch.bool
           and not mask.is_inference() and not dropout and
           query.shape[2] == key.shape[2] and not torch.compiler.is_compiling() and
           all(kwargs.get(k) is None for k in ("position_bias", "cache", "softcap", "s_aux")))
    if not own:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=_additive(mask, query.dtype), scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: (attn_output (B, L, H, D), attention weights or None)."""
    # Reading the boundaries is data-dependent control flow: under torch.compile the mask path stays in one graph.
    plain = query.shape[2] != key.shape[2] or torch.compiler.is_compiling()
    bounds = None if plain else segments(kwargs.get("position_ids"), query.shape[2])
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if bounds is not None and window:
        bounds = None if max(e - s for row in bounds for s, e in row) > window else bounds
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        bounds = None
    path = "sdpa_mask" if bounds is None else choose(bounds, query.shape[2], query.dtype, query.device.type, dropout,
                                                     one_head_dim=query.shape[-1] == key.shape[-1] == value.shape[-1])
    if path == "sdpa_mask":
        return _sdpa_mask(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if path == "lf_flash":
        out = flash_attention_cpu(query, key, value, bounds, scale=scaling)
    elif path == "lf_cpu":
        out = packed_attention_cpu(query, key, value, bounds, scale=scaling)
    else:
        out = packed_sdpa(query, key, value, bounds, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None  # free after lf_flash: its output is (B, L, H, D) storage


# The dtypes the fused kernel runs by default. It beat every other path at every shape of
# `python -m bench.packed_attention` on the AMD EPYC (2 cores), in one interleaved run, in fp32 and bf16: 3.9-6.4x
# the fastest other path (its 2026-12-06 results in bench/results/cpu-amd-epyc-avx512bf16-2cores). bf16 stays off for now:
# tests/test_patch.py's qwen3_next in bf16 (patched against unpatched, two bf16 runs) then differs in its MoE router's
# gradient by more than the test allows, though the kernel's bf16 error against float64 equals SDPA's. fp16 was not
# measured.
FLASH = (torch.float32,)


def choose(bounds, length: int, dtype: torch.dtype, device_type: str, dropout: float = 0.0,
           one_head_dim: bool = True) -> str:
    """The one place lf picks how to run attention over packed rows, by the names bench.packed_attention times:
    "lf_flash" (:func:`flash_attention_cpu`), "lf_cpu" (:func:`packed_attention_cpu`), "lf_packed"
    (:func:`packed_sdpa`, by segments) or "sdpa_mask" (one SDPA call under the block-diagonal mask).
    one_head_dim: q, k and v share a head dim (the fused kernel's layout; MLA's values are narrower)."""
    on_cpu = device_type == "cpu" and not dropout and _backend.choose_backend("cpu") == "cpu"
    if on_cpu and dtype in FLASH and one_head_dim:
        return "lf_flash"
    if device_type == "cpu" and not dropout and dtype in OWN_BACKWARD and own_backward_pays(bounds, length):
        return "lf_cpu"
    return "lf_packed" if segments_pay(bounds, length, dtype) else "sdpa_mask"


def register() -> str:
    """Makes "lf_packed" a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
