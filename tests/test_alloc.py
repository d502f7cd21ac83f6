"""lf.kernels._alloc.recycled_like: a freed output's memory comes back; memory something still references never does."""

import collections

import torch

from lf.kernels import _alloc, swiglu


def big(*shape, dtype=torch.float32):
    """A tensor of at least RECYCLE_MIN_BYTES, so that it is recycled."""
    return torch.empty(*shape, _alloc.RECYCLE_MIN_BYTES // 4, dtype=dtype)


def test_a_freed_output_is_reused_and_a_referenced_one_never():
    like = big(3)
    first = _alloc.recycled_like(like)
    address = first.data_ptr()
    view = first[1]  # keeps the storage referenced after `first` goes
    del first
    second = _alloc.recycled_like(like)
    assert second.data_ptr() != address
    del view
    assert _alloc.recycled_like(like).data_ptr() == address


def test_same_shape_strides_and_dtype_as_empty_like():
    like = big(2, 4, dtype=torch.bfloat16).transpose(0, 1)
    out = _alloc.recycled_like(like)
    reference = torch.empty_like(like)
    assert (out.shape, out.stride(), out.dtype) == (reference.shape, reference.stride(), reference.dtype)
    assert out.untyped_storage().nbytes() == like.numel() * like.element_size()


def test_at_most_recycle_slots_buffers_are_kept_per_size():
    like = big(5)
    held = [_alloc.recycled_like(like) for _ in range(_alloc.RECYCLE_SLOTS + 2)]
    slots = _alloc._recycled[(like.device, like.numel() * like.element_size())]
    assert len(slots) == _alloc.RECYCLE_SLOTS
    # the newest are pooled: freeing them makes their memory the next outputs'
    newest = {t.data_ptr() for t in held[-_alloc.RECYCLE_SLOTS:]}
    del held
    assert _alloc.recycled_like(like).data_ptr() in newest


def test_an_output_autograd_saved_is_not_overwritten(monkeypatch):
    """swiglu's output kept by the caller and its inputs saved for backward: a second call writes elsewhere."""
    monkeypatch.setenv("LF_KERNEL_BACKEND", "cpu")
    gate, up = (torch.randn(2, _alloc.RECYCLE_MIN_BYTES // 4, requires_grad=True) for _ in range(2))
    first = swiglu(gate, up)
    expected = first.detach().clone()
    second = swiglu(gate * 2, up)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first.detach(), expected, rtol=0, atol=0)
    first.backward(torch.ones_like(first))
    torch.testing.assert_close(up.grad, torch.nn.functional.silu(gate.detach()))


def test_only_the_sizes_asked_for_last_keep_a_pool(monkeypatch):
    """Batches of other lengths ask for other sizes: past RECYCLE_SIZES sizes, the one asked for longest ago loses
    its pool (its freed buffers go back to glibc); a size asked for again is the newest."""
    monkeypatch.setattr(_alloc, "_recycled", collections.OrderedDict())
    likes = [big(1 + i) for i in range(_alloc.RECYCLE_SIZES + 1)]
    size = [like.numel() * like.element_size() for like in likes]
    for like in likes[:-1]:
        _alloc.recycled_like(like)
    _alloc.recycled_like(likes[0])
    _alloc.recycled_like(likes[-1])  # one size too many
    pooled = [nbytes for _, nbytes in _alloc._recycled]
    assert pooled == size[2:-1] + [size[0], size[-1]]
    assert size[1] not in pooled
