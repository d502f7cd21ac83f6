"""lf._C's fused causal flash attention over packed segments (csrc/flash_attention.cpp, through
lf.kernels.packed_attention.flash_attention_cpu) against float64 SDPA under the block-diagonal causal mask."""

import pytest
import torch

from lf import _C
from lf.errors import KernelInputError
from lf.kernels import _alloc, packed_attention
from tests.test_packing import _rows, assert_matches_oracle

# Example lengths per row: 1-token examples, lengths off the 64-token tile (7, 33, 100), a segment of several
# tiles, rows holding different numbers of examples.
ROWS = ([1, 7, 33, 100, 59], [100, 100], [200])


@pytest.fixture(params=_C.available_isas().split(", "))
def isa(request, monkeypatch):
    """Each compiled CPU variant, with every buffer lf allocates poisoned (NaN): each element must be written."""
    monkeypatch.setattr(_alloc, "POISON", float("nan"))
    best = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(best)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 80)])  # GQA 4:1 and MHA
def test_flash_attention_equals_the_masked_oracle(isa, dtype, heads, kv_heads, dim):
    bounds = _rows(*ROWS)
    length = bounds[0][-1][1]
    # (B, L, H, D) storage seen as (B, H, L, D), as transformers' attention layers hand it over
    q, k, v = (torch.randn(len(bounds), length, h, dim, dtype=dtype).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    assert_matches_oracle(lambda *qkv: packed_attention.flash_attention_cpu(*qkv, bounds, scale=0.3),
                          q, k, v, bounds, 0.3, dout_layout=lambda g: g.transpose(1, 2).contiguous().transpose(1, 2))


def test_flash_attention_takes_contiguous_heads_and_the_default_scale():
    # (B, H, L, D) contiguous inputs, a gradient whose head_dim is not contiguous; scale None is head_dim ** -0.5
    bounds = _rows([7, 33], [40])
    q = torch.randn(2, 4, 40, 16, requires_grad=True)
    k, v = (torch.randn(2, 1, 40, 16, requires_grad=True) for _ in range(2))
    assert_matches_oracle(lambda *qkv: packed_attention.flash_attention_cpu(*qkv, bounds), q, k, v, bounds,
                          16 ** -0.5, dout_layout=lambda g: g.transpose(2, 3).contiguous().transpose(2, 3))


def test_flash_attention_refuses_bad_heads_and_other_devices():
    bounds = _rows([4])
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(KernelInputError, match="3 query heads are not a multiple of 2 key/value heads"):
        packed_attention.flash_attention_cpu(q, k, k, bounds)
    with pytest.raises(KernelInputError, match=r"head dims differ \(query 8, key 8, value 4\)"):
        packed_attention.flash_attention_cpu(q, q, q[..., :4], bounds)
    with pytest.raises(KernelInputError, match="CPU tensors, not meta"):
        packed_attention.flash_attention_cpu(*(t.to("meta") for t in (q, q, q)), bounds)


def test_choose_runs_the_fused_kernel_on_the_cpu_in_fp32(monkeypatch):
    choose = packed_attention.choose
    bounds = _rows([7, 33], [40])
    assert choose(bounds, 40, torch.float32, "cpu") == "lf_flash"
    assert choose(bounds, 40, torch.bfloat16, "cpu") != "lf_flash"  # see packed_attention.FLASH
    assert choose(bounds, 40, torch.float32, "cpu", dropout=0.1) != "lf_flash"  # the kernel has no dropout
    assert choose(bounds, 40, torch.float32, "cpu", one_head_dim=False) != "lf_flash"  # MLA's narrower values
    assert choose(bounds, 40, torch.float16, "cpu") != "lf_flash"  # not measured
    assert choose(bounds, 40, torch.bfloat16, "cuda") == "sdpa_mask"  # short rows: the mask, in one call
    monkeypatch.setenv("LF_KERNEL_BACKEND", "torch")  # lf._C forced off: SDPA's paths
    assert choose(bounds, 40, torch.float32, "cpu") == "sdpa_mask"
