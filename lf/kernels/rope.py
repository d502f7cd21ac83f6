"""Rotary position embedding in the layout of HF's ``apply_rotary_pos_emb``.

``q`` is ``(batch, q_heads, seq, head_dim)`` and ``k`` is ``(batch, k_heads, seq, head_dim)`` (GQA: the head
counts differ); any strides with a contiguous last dimension are read as they are, so HF's transposed
projections are not copied. ``cos``/``sin`` hold one row per position, ``(batch, seq, head_dim)``,
``(1, seq, head_dim)`` or ``(seq, head_dim)``, so packed sequences with restarting ``position_ids`` work.
Element ``i`` pairs with ``i + head_dim/2`` (``rotate_half``). Gradients flow to ``q`` and ``k``; ``cos`` and
``sin`` are constants (HF computes them without grad).

Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): with ``mrope_section``, ``cos``/``sin`` are
``(3, batch or 1, seq, head_dim)``, one set of angles per position stream (temporal, height, width), and each
angle column comes from the stream its section names (:func:`mrope_streams`). That choice is per position, not
per head, so it is made once, by two selects into an ordinary ``(batch, seq, head_dim)`` cos/sin, and the usual
kernels run on every backend. Measured (28 q / 4 kv heads x 128, 1024 tokens, forward + backward, one thread of a
2-core Intel Xeon with AMX, best of 30, a busy machine): the selection costs 0.4-1.1 ms of lf's 7-11 ms, which
runs 3.7-4.5x faster than transformers 4's apply_multimodal_rotary_pos_emb math (its section split, then
apply_rotary_pos_emb) in fp32 and bf16; passing the section table into the three kernels could save only that
selection. transformers 5 selects once per forward in the model's rotary embedding and calls
apply_rotary_pos_emb, which lf's patch replaces as for text models.

Backends: Triton (``kernels/rope.py``), C++ (``csrc/rope.cpp``), torch (here).
"""

from __future__ import annotations

import functools

import torch

from lf.kernels import _alloc, _checks
from lf.kernels._backend import Implementations


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin):
    """The plain torch formula (HF's, with cos/sin broadcast over heads): the oracle for every backend."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ---- torch backend ----

def _torch_rotate(x, cos, sin, backward):
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    x = x.float()
    if backward:  # the transpose of the forward map
        return x * cos - _rotate_half(x * sin)
    return x * cos + _rotate_half(x) * sin


def _torch_apply(q, k, cos, sin, q_out, k_out, backward):
    q_out.copy_(_torch_rotate(q, cos, sin, backward))
    k_out.copy_(_torch_rotate(k, cos, sin, backward))


# ---- cpu backend ----

def _cpu_apply(q, k, cos, sin, q_out, k_out, backward):
    from lf import _C

    def tensor(x, out):
        return _C.RopeTensor(src=x.data_ptr(), dst=out.data_ptr(), heads=x.shape[1], src_stride=x.stride()[:3],
                             dst_stride=out.stride()[:3])

    b, _, s, d = q.shape
    _C.rope(_C.Rope(q=tensor(q, q_out), k=tensor(k, k_out), cos=cos.data_ptr(), sin=sin.data_ptr(),
                    cs_stride=(cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1)), batch=b, seq=s, dim=d,
                    backward=backward, dtype=_checks.cpu_dtype(q.dtype), threads=_checks.threads()))


APPLY = Implementations(triton="lf._triton.kernels.rope:apply", cpu=_cpu_apply, torch=_torch_apply)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("lf::rope", mutates_args=())
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = _alloc.recycled_like(q), _alloc.recycled_like(k)
    APPLY.for_device(q.device)(q, k, cos, sin, q_out, k_out, backward)
    return q_out, k_out


@_rope.register_fake
def _(q, k, cos, sin, backward):
    return torch.empty_like(q), torch.empty_like(k)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.lf.rope(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.lf.rope(_last_dim_contiguous(dq), _last_dim_contiguous(dk), cos, sin, True)
        return dq, dk, None, None


@functools.lru_cache(maxsize=None)
def mrope_streams(mrope_section: tuple[int, ...], interleaved: bool, head_dim: int) -> tuple[int, ...] | None:
    """The position stream (0 temporal, 1 height, 2 width) of each of the ``head_dim`` angle columns, or None
    when ``mrope_section`` does not describe ``head_dim``. Qwen2-VL/2.5-VL: consecutive sections of the
    ``head_dim/2`` frequencies, section i from stream i % 3. Qwen3-VL (interleaved): frequency j comes from stream
    j % 3 while that stream's section lasts (height and width), from the temporal stream otherwise. Both halves of
    the head (``rotate_half``'s pairs) share their angles."""
    half = head_dim // 2
    if interleaved:
        if len(mrope_section) != 3:
            return None
        streams = [0] * half
        for stream in (1, 2):
            for j in range(stream, min(3 * mrope_section[stream], half), 3):
                streams[j] = stream
        if any(streams.count(i) != n for i, n in enumerate(mrope_section)):
            return None
    else:
        streams = [i % 3 for i, n in enumerate(mrope_section) for _ in range(n)]
        if len(streams) != half:
            return None
    return tuple(streams * 2)


@functools.lru_cache(maxsize=None)
def _stream_masks(streams: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.tensor(streams, device=device)  # made once per device, not once per layer call
    return stream == 0, stream == 1


def _select_mrope(op: str, cos, sin, q_shape, mrope_section, interleaved):
    """(3, batch or 1, seq, head_dim) cos/sin -> the (batch or 1, seq, head_dim) angles of each column's stream."""
    section = tuple(mrope_section)
    d = q_shape[-1]
    if not section or not all(isinstance(n, int) and n >= 0 for n in section):
        _checks.fail(op, f"`mrope_section` {list(mrope_section)} must be a list of non-negative ints, one per section "
                         f"(the config's rope_parameters['mrope_section'], e.g. [16, 24, 24])")
    streams = mrope_streams(section, interleaved, d)
    if streams is None:
        how = "as 3 interleaved sections (Qwen3-VL: [24, 20, 20] for head_dim 128)" if interleaved else \
            "(Qwen2-VL: [16, 24, 24] for head_dim 128)"
        _checks.fail(op, f"`mrope_section` {list(section)} does not split head_dim/2 = {d // 2} frequencies {how}: "
                         f"pass the model config's rope_parameters['mrope_section'] for this head_dim")
    if cos.shape != sin.shape or cos.dim() != 4 or cos.shape[0] != 3:
        _checks.fail(op, f"`cos`/`sin` {tuple(cos.shape)}/{tuple(sin.shape)} must both be (3, batch, seq, head_dim) "
                         f"with mrope_section: one set of angles per stream (temporal, height, width)")
    # two selects over (batch, seq, head_dim): torch.gather along the stream axis ran 0.1 to 11 ms for fp32
    # (3, 1, 1024, 128) here, the selects 0.1 ms
    temporal, height = _stream_masks(streams, cos.device)
    return tuple(torch.where(temporal, x[0], torch.where(height, x[1], x[2])) for x in (cos, sin))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         mrope_section: list[int] | tuple[int, ...] | None = None,
         mrope_interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by the angles in ``cos``/``sin``; returns ``(q_embed, k_embed)`` like HF's
    ``apply_rotary_pos_emb(q, k, cos, sin)``. With ``mrope_section`` (multimodal RoPE, see the module
    docstring), ``cos``/``sin`` hold the three position streams, ``(3, batch or 1, seq, head_dim)``, as
    ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)`` took them; ``mrope_interleaved`` is
    Qwen3-VL's layout (its config's ``rope_parameters['mrope_interleaved']``)."""
    op = "rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _checks.tensor(op, name, t)
    _checks.same_device_and_dtype(op, "q", q, k=k, cos=cos, sin=sin)
    if mrope_section is not None:
        cos, sin = _select_mrope(op, cos, sin, q.shape, mrope_section, mrope_interleaved)
    if q.dim() != 4 or k.dim() != 4:
        _checks.fail(op, f"`q` {tuple(q.shape)} and `k` {tuple(k.shape)} must be 4-D (batch, heads, seq, head_dim); "
                         f"from (batch, seq, heads, head_dim) use `.transpose(1, 2)`")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        _checks.fail(op, f"`k` {tuple(k.shape)} must match `q` {tuple(q.shape)} in batch, seq and head_dim")
    if d % 2:
        _checks.fail(op, f"head_dim {d} must be even (rotate_half pairs element i with i + head_dim/2)")
    if cos.shape != sin.shape:
        _checks.fail(op, f"`cos` {tuple(cos.shape)} and `sin` {tuple(sin.shape)} must have the same shape")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1:] != (s, d):
        _checks.fail(op, f"`cos`/`sin` {tuple(cos.shape)} must be ({b} or 1, {s}, {d}) or ({s}, {d}): one row of "
                         f"head_dim angles per position")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        _checks.fail(op, "`cos`/`sin` require grad, but lf's rope treats them as constants; pass `cos.detach()`")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    return RoPEFunction.apply(q, k, _last_dim_contiguous(cos), _last_dim_contiguous(sin))
