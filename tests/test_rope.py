import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from lf.errors import KernelInputError
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


# Multimodal RoPE: HF (transformers 5) picks each column's stream inside the model's rotary embedding and then calls
# apply_rotary_pos_emb; lf gets the three streams' angles and picks itself. (interleaved, head_dim) -> the sections
# of Qwen2-VL/2.5-VL ([16, 24, 24] at 128) and Qwen3-VL ([24, 20, 20] at 128), scaled to head_dim 64.
MROPE = {(False, 128): [16, 24, 24], (False, 64): [8, 12, 12], (True, 128): [24, 20, 20], (True, 64): [12, 10, 10]}


def _hf_mrope_angles(interleaved, d, position_ids, dtype):
    """The three streams' (3, batch, seq, d) cos/sin that lf takes, and the (batch, seq, d) ones HF's Qwen2-VL /
    Qwen3-VL rotary embedding picks from them (its own recomposition code). The cosines are taken in float64:
    here torch's fp32 cos was seen off by 1.5e-4 on the first call of some processes, which would fail the
    comparison for a reason outside lf."""
    config, rotary = ((Qwen3VLTextConfig, Qwen3VLTextRotaryEmbedding) if interleaved
                      else (Qwen2VLTextConfig, Qwen2VLRotaryEmbedding))
    rotary = rotary(config(hidden_size=2 * d, num_attention_heads=2, head_dim=d, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE[interleaved, d]}))
    freqs = position_ids[..., None].double() * rotary.inv_freq.double()
    angles = []
    for half in (freqs.cos().to(dtype), freqs.sin().to(dtype)):
        # Qwen3-VL's recomposition writes into its argument: give it a copy
        angles += [torch.cat((half, half), dim=-1), rotary.recomposition_frequencies(half.clone())]
    return angles


@pytest.mark.parametrize("cos_batch", ["per_batch", "broadcast"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("interleaved", [False, True], ids=["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrope_matches_hf(backend, dtype, interleaved, d, cos_batch):
    b, s = 2, 7
    # three different streams (as for image tokens), so a column read from the wrong stream shows
    position_ids = torch.randint(0, 40, (3, b if cos_batch == "per_batch" else 1, s))
    cos3, cos_hf, sin3, sin_hf = _hf_mrope_angles(interleaved, d, position_ids, dtype)
    q, k = _qk(b, 4, 2, s, d, dtype, transposed=True)
    qe_hf, ke_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    dq_out, dk_out = torch.randn_like(qe_hf), torch.randn_like(ke_hf)
    dq_hf, dk_hf = torch.autograd.grad((qe_hf, ke_hf), (q, k), (dq_out, dk_out))
    qe, ke = rope(q, k, cos3, sin3, mrope_section=MROPE[interleaved, d], mrope_interleaved=interleaved)
    dq, dk = torch.autograd.grad((qe, ke), (q, k), (dq_out, dk_out))
    for name, a, e in (("q_embed", qe, qe_hf), ("k_embed", ke, ke_hf), ("dq", dq, dq_hf), ("dk", dk, dk_hf)):
        assert_close(a, e, dtype, name, factor=2)  # HF rounds each product in half precision


@pytest.mark.parametrize("section, interleaved, why", [
    ([16, 24, 24], False, "does not split head_dim/2 = 32 frequencies"),  # head_dim 128's sections at 64
    ([12, 12, 8], True, "does not split head_dim/2 = 32 frequencies as 3 interleaved sections"),  # H outruns T
    ([16, 16], True, "as 3 interleaved sections"),
    ([8, -4, 28], False, "must be a list of non-negative ints"),
    ([], False, "must be a list of non-negative ints"),
])
def test_mrope_bad_sections_are_one_clear_error(section, interleaved, why):
    q, k = _qk(1, 2, 2, 3, 64, torch.float32, transposed=False)
    cos = torch.randn(3, 1, 3, 64)
    with pytest.raises(KernelInputError, match=why) as error:
        rope(q, k, cos, cos, mrope_section=section, mrope_interleaved=interleaved)
    assert "\n" not in str(error.value)


def test_mrope_needs_the_three_streams():
    q, k = _qk(1, 2, 2, 3, 64, torch.float32, transposed=False)
    cos = torch.randn(1, 3, 64)  # already one angle per column: no mrope_section
    with pytest.raises(KernelInputError, match=r"must both be \(3, batch, seq, head_dim\) with mrope_section"):
        rope(q, k, cos, cos, mrope_section=[8, 12, 12])
