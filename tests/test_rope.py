import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lf.kernels import rope, rope_reference
from support import DTYPES, assert_close, oracle

# (batch, q_heads, k_heads, seq, head_dim): one position; GQA; odd seq; head_dim 128 and a small odd half.
SHAPES = [(1, 1, 1, 1, 2), (2, 4, 2, 5, 64), (1, 8, 1, 7, 128), (3, 3, 3, 4, 6)]


def _qk(b, hq, hk, s, d, dtype, transposed):
    """q and k as HF makes them: (batch, seq, heads, dim) projections transposed to heads-first views."""
    if transposed:
        q = torch.randn(b, s, hq, d, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, s, hk, d, dtype=dtype).transpose(1, 2)
    else:
        q, k = torch.randn(b, hq, s, d, dtype=dtype), torch.randn(b, hk, s, d, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_()


@pytest.mark.parametrize("cos_batch", ["per_batch", "broadcast", "2d"])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, shape, transposed, cos_batch):
    b, hq, hk, s, d = shape
    q, k = _qk(b, hq, hk, s, d, dtype, transposed)
    cs_shape = {"per_batch": (b, s, d), "broadcast": (1, s, d), "2d": (s, d)}[cos_batch]
    # arbitrary (not duplicated-half) angles, so each of the four cos/sin halves is checked
    cos, sin = torch.randn(cs_shape, dtype=dtype), torch.randn(cs_shape, dtype=dtype)
    qe, ke = rope(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(qe), torch.randn_like(ke)
    dq, dk = torch.autograd.grad((qe, ke), (q, k), (dq_out, dk_out))
    (qe64, ke64), (dq64, dk64) = oracle(
        lambda a, c: rope_reference(a, c, cos.double(), sin.double()), (q, k), (dq_out, dk_out))
    assert qe.dtype == dtype and qe.shape == q.shape and ke.shape == k.shape
    assert_close(qe, qe64, dtype, "q_embed")
    assert_close(ke, ke64, dtype, "k_embed")
    assert_close(dq, dq64, dtype, "dq")
    assert_close(dk, dk64, dtype, "dk")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_with_packed_positions(backend, dtype):
    """Two sequences packed in one row (positions restart): HF's rotary embedding + apply_rotary_pos_emb."""
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(cfg)
    b, s, d = 2, 11, 64
    position_ids = torch.tensor([list(range(6)) + list(range(5)), list(range(11))])
    x = torch.randn(b, s, 256, dtype=dtype)
    cos, sin = rotary(x, position_ids)
    q, k = _qk(b, 4, 2, s, d, dtype, transposed=True)
    qe_hf, ke_hf = apply_rotary_pos_emb(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(qe_hf), torch.randn_like(ke_hf)
    dq_hf, dk_hf = torch.autograd.grad((qe_hf, ke_hf), (q, k), (dq_out, dk_out))
    qe, ke = rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad((qe, ke), (q, k), (dq_out, dk_out))
    for name, a, e in (("q_embed", qe, qe_hf), ("k_embed", ke, ke_hf), ("dq", dq, dq_hf), ("dk", dk, dk_hf)):
        assert_close(a, e, dtype, name, factor=2)  # HF rounds each product in half precision
