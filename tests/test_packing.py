"""Sequence packing: the packer, the collator, and the test that matters: a packed batch gives the loss and the
gradients of its examples run one by one (a tiny Llama/Qwen2 from a config; HF's SDPA mask path and lf's packed
attention; with and without lf's kernels patched in)."""

import functools
import random
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lf.data.collator import Collator
from lf.data.pipeline import LENGTH_BUCKET, collator
from lf.data.packing import best_fit_decreasing, padding_fraction
from lf.data.packing import pack as pack_table
from lf.data.processors import IGNORE_INDEX
from lf.kernels import packed_attention
from lf.kernels import patch as patch_model
from lf.kernels import unpatch

# fp32 model, sums over ~100 tokens: the packed and one-by-one runs differ only in summation order.
RTOL, ATOL = 1e-4, 1e-5


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        capacity = rng.randint(1, 300)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 200))]
        bins = best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        lower_bound = -(-sum(lengths) // capacity)
        # best-fit decreasing uses at most 11/9 OPT + 6/9 bins
        assert len(bins) <= 11 * lower_bound / 9 + 1


def test_best_fit_decreasing_fills_the_tightest_row():
    # 6 goes first into a new row; 5 opens another; 4 fits only next to 5 (6+4 > 10? no: 6+4=10 fits tightest)
    assert best_fit_decreasing([6, 5, 4, 5], 10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([11], 10)


def pack(batch, **kwargs):
    return pack_table(pa.table(batch), **kwargs).to_pydict()


def _examples(rng, n, vocab=100, longest=40):
    batch = {"input_ids": [], "labels": []}
    for _ in range(n):
        length = rng.randint(1, longest)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(0, length - 1)
        batch["input_ids"].append(ids)
        batch["labels"].append([IGNORE_INDEX] * prompt + ids[prompt:])
    return batch


@pytest.mark.parametrize("neat", [True, False])
def test_pack_rows_keep_every_token_and_label(neat):
    rng = random.Random(1)
    batch = _examples(rng, 30)
    packed = pack(batch, capacity=64, neat=neat)
    assert ("position_ids" in packed) == neat
    assert sum(map(len, packed["input_ids"])) == sum(map(len, batch["input_ids"]))
    assert all(len(row) <= 64 for row in packed["input_ids"])
    # every example's labels appear, its first one replaced by -100
    expected = sorted(tuple([IGNORE_INDEX] + labels[1:]) for labels in batch["labels"])
    found = []
    for r, labels in enumerate(packed["labels"]):
        positions = packed["position_ids"][r] if neat else None
        if neat:
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(labels)]
            found += [tuple(labels[s:e]) for s, e in zip(starts[:-1], starts[1:])]
    if neat:
        assert sorted(found) == expected
    assert padding_fraction(list(map(len, batch["input_ids"])), len(packed["input_ids"]), 64) < 0.2


def test_collator_pads_right_and_continues_positions():
    collate = Collator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
                     {"input_ids": [8], "labels": [8], "position_ids": [0]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 2]]
    assert "attention_mask" not in batch
    plain = Collator(pad_token_id=1, pad_to_multiple_of=None)([{"input_ids": [5, 6], "labels": [5, 6]},
                                                              {"input_ids": [7], "labels": [7]}])
    assert plain["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert plain["input_ids"].tolist() == [[5, 6], [7, 1]]
    pairs = Collator(0, None)([{"chosen_input_ids": [1, 2], "chosen_labels": [1, 2], "rejected_input_ids": [3],
                                "rejected_labels": [3], "kto_tags": True}])
    # chosen and rejected rows run as one forward: padded to one length
    assert pairs["rejected_attention_mask"].tolist() == [[1, 0]] and pairs["rejected_input_ids"].tolist() == [[3, 0]]
    assert pairs["kto_tags"].tolist() == [True]


def test_training_batches_pad_to_length_buckets_without_changing_the_loss():
    """pipeline.collator pads to a multiple of LENGTH_BUCKET (few distinct shapes); the pads add no loss."""
    model = _tiny("llama", "sdpa")
    rng = random.Random(4)
    examples = _examples(rng, 5, longest=90)
    features = [dict(input_ids=i, labels=lab) for i, lab in zip(examples["input_ids"], examples["labels"])]
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    for rows in (features[:2], features[2:]):
        bucketed = collator(tokenizer)(rows)
        longest = max(len(f["input_ids"]) for f in rows)
        assert bucketed["input_ids"].shape[1] == -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET > longest
        for row, f in zip(bucketed["labels"].tolist(), rows):
            assert row[len(f["labels"]):] == [IGNORE_INDEX] * (len(row) - len(f["labels"]))
        exact = Collator(pad_token_id=0, pad_to_multiple_of=None)(rows)
        torch.testing.assert_close(model(**bucketed).loss, model(**exact).loss, rtol=RTOL, atol=ATOL)


def test_length_buckets_stop_at_cutoff_len():
    """A batch is never padded past max_length (the run's cutoff_len: a model with learned positions may have none
    past it), unless one of its rows is itself longer (media tokens)."""
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)

    def rows(*lengths):
        return [dict(input_ids=[5] * n, labels=[5] * n) for n in lengths]

    cap = LENGTH_BUCKET + 3
    assert collator(tokenizer, max_length=cap)(rows(LENGTH_BUCKET + 1, 4))["input_ids"].shape[1] == cap
    assert collator(tokenizer, max_length=cap)(rows(cap + 5))["input_ids"].shape[1] == cap + 5
    assert collator(tokenizer, max_length=cap)(rows(3))["input_ids"].shape[1] == LENGTH_BUCKET
    assert collator(tokenizer)(rows(LENGTH_BUCKET + 1))["input_ids"].shape[1] == 2 * LENGTH_BUCKET


def test_segments_read_restarts_and_ignore_left_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packed_attention.segments(pos, 6) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert packed_attention.segments(torch.arange(6)[None], 6) is None  # nothing packed
    assert packed_attention.segments(torch.tensor([[1, 1, 0, 1, 2]]), 5) is None  # generation's left padding
    assert packed_attention.segments(None, 5) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sdpa_equals_each_segment_alone(dtype):
    bounds = [[(0, 5), (5, 6), (6, 13)], [(0, 13)]]
    q = torch.randn(2, 4, 13, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 13, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 13, 8, dtype=dtype, requires_grad=True)
    out = packed_attention.packed_sdpa(q, k, v, bounds, scale=0.3)
    ref, leaves = _masked_reference(q, k, v, bounds, 0.3)
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, leaves, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 4)


def _masked_reference(q, k, v, bounds, scale):
    """float64 SDPA under the block-diagonal causal mask: the oracle for every packed-attention path."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = packed_attention.block_mask(bounds, q.shape[2], torch.float64)
    out = F.scaled_dot_product_attention(q64, k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1),
                                         attn_mask=mask, scale=scale)
    return out, (q64, k64, v64)


# packed_attention_cpu: SDPA's flash forward (by segments or masked) and lf's backward over each segment's causal
# block, its elementwise passes in C++ ("cpu") or torch. Tolerances per dtype, against float64.
PACKED_TOL = {torch.float32: (2e-5, 8e-5), torch.bfloat16: (1.6e-2, 6.4e-2), torch.float16: (2e-3, 8e-3)}


@pytest.mark.parametrize("dtype", list(PACKED_TOL))
@pytest.mark.parametrize("by_segments", [False, True])
@pytest.mark.parametrize("shape", ["odd", "long"])
def test_packed_attention_cpu_equals_the_masked_oracle(dtype, by_segments, shape, backend):
    if shape == "odd":  # 1-token examples, lengths off every block size, a row of one example, grouped queries
        bounds, heads, kv_heads, dim = [[(0, 5), (5, 6), (6, 13)], [(0, 13)], [(0, 1), (1, 13)]], 4, 2, 8
    else:  # rows of a few hundred tokens as in training, multi-head (no grouping), head_dim 64
        bounds, heads, kv_heads, dim = _rows([1, 300, 211], [512]), 3, 3, 64
    length = bounds[0][-1][1]
    # (B, L, H, D) storage seen as (B, H, L, D), as transformers' attention layers hand it over
    q, k, v = (torch.randn(len(bounds), length, h, dim, dtype=dtype).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    # `backend` (conftest) forces each backend and CPU variant and poisons what lf allocates: every gradient
    # element must be written. Triton has no kernel here (a GPU runs SDPA by segments): it takes the torch passes.
    assert_matches_oracle(lambda *qkv: packed_attention.packed_attention_cpu(*qkv, bounds, by_segments=by_segments),
                          q, k, v, bounds, dim ** -0.5)  # the models' scale


def assert_matches_oracle(attention, q, k, v, bounds, scale, dout_layout=lambda g: g):
    """attention(q, k, v) and its gradients equal :func:`_masked_reference`'s, within PACKED_TOL for q's dtype;
    dout_layout gives the incoming gradient its memory layout."""
    ref, leaves = _masked_reference(q, k, v, bounds, scale)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, g)
    out = attention(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), dout_layout(g.to(q.dtype)))
    rtol, atol = PACKED_TOL[q.dtype]
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == q.dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


def test_packed_attention_cpu_backends_agree_and_refuse_other_devices():
    bounds = _rows([7, 9], [16])
    q, k, v = (torch.randn(2, 4, 16, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    grads = [torch.autograd.grad(packed_attention.packed_attention_cpu(q, k, v, bounds, backend=b), (q, k, v), g)
             for b in ("cpu", "torch")]
    for a, b in zip(*grads):  # the same products; the passes differ only in rounding order
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1.6e-2)
    with pytest.raises(ValueError, match="CPU tensors, not meta"):
        packed_attention.packed_attention_cpu(*(t.to("meta") for t in (q, k, v)), bounds)


def _rows(*rows):
    """Bounds as :func:`packed_attention.segments` gives them, from each row's example lengths."""
    bounds = []
    for lengths in rows:
        starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        bounds.append(list(zip(starts[:-1], starts[1:])))
    return bounds


def test_segments_pay_when_rows_are_long_against_their_examples():
    # segments cost sum(n * max(n, 512)) * 1.25 against rows * length^2 for the mask
    assert packed_attention.segment_block(torch.bfloat16) == packed_attention.segment_block(torch.float16) == 512
    assert packed_attention.segment_block(torch.float32) == 192
    pay = functools.partial(packed_attention.segments_pay, dtype=torch.bfloat16)
    # fp32's block is 192: there the 512-token rows of 64-token examples pay, 1.25 * 2048 * 64 * 192 < 4 * 512^2
    assert packed_attention.segments_pay(_rows(*[[64] * 8] * 4), 512, torch.float32)
    assert not pay(_rows(*[[64] * 8] * 4), 512)  # 4 rows of 512, 64-token examples: one masked call
    assert pay(_rows([256] * 8), 2048)  # one row of 2048, 8 examples of 256: 1.25 * 8 * 256 * 512 < 2048^2
    # rows of examples <= 512 tokens: segments cost 1.25 * 512 per token, the mask one row length per token,
    # so segments pay from rows longer than 640 tokens on, however the rows are split
    assert not pay(_rows([320, 320]), 640)  # a tie goes to the mask
    assert not pay(_rows([100] * 6 + [32]), 632)
    assert pay(_rows([100] * 6 + [48]), 648)
    assert pay(_rows([8] * 81), 648)
    # a long example costs its length squared: with one of 1800 in a 2048 row the mask is cheaper
    assert not pay(_rows([1800, 248]), 2048)  # 1.25 * (1800^2 + 248 * 512) = 4208720 > 4194304
    assert pay(_rows([1790, 258]), 2048)  # 1.25 * (1790^2 + 258 * 512) = 4170245 < 4194304
    assert not pay(_rows([2048]), 2048) and not pay(_rows([300]), 300)  # one example: the mask is causal alone
    # the batch counts as a whole: a row of one example costs more as segments than it saves; with another
    # of short examples, 1.25 * (1024^2 + 1024 * 512) = 1966080 < 2 * 1024^2
    assert pay(_rows([1024], [128] * 8), 1024)
    assert not pay(_rows([1024], [1024]), 1024)


def test_own_backward_pays_when_its_padded_blocks_hold_fewer_cells_than_the_mask():
    pays = packed_attention.own_backward_pays
    assert [packed_attention.padded_length(n) for n in (1, 64, 65, 200, 512, 1025)] == [64, 64, 128, 256, 512, 1152]
    assert pays(_rows([316, 196], [260, 250, 2]), 512)  # train_e2e's batches: 256^2 + 320^2 + ... < 2 * 512^2
    assert pays(_rows([256] * 8), 2048)
    # rows of 128 holding examples of 8-50: each pads to 64, 6 * 64^2 > 128^2 per row; the mask stays
    assert not pays(_rows([50, 37, 23, 18], [45, 30, 25, 16, 12], [40, 28, 24, 20, 8, 8]), 128)
    assert not pays(_rows([100, 28]), 128)  # 128^2 + 64^2 > 128^2
    assert not pays(_rows([512]), 512)  # one example per row: a tie keeps SDPA


def _tiny(family, attn, kv_heads=2):
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = Qwen2ForCausalLM(config)
    model.set_attn_implementation(attn)
    return model


def _loss_sum(model, batch):
    """Sum of token losses and its gradients (the same normalisation for packed and one-by-one runs)."""
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "lf_packed", "lf_packed_mask", "lf_packed_segments", "lf_packed_cpu",
                                  "eager"])
@pytest.mark.parametrize("kernels", [False, True])
def test_packed_batch_equals_examples_one_by_one(family, attn, kernels, monkeypatch):
    """"lf_packed" on the CPU in fp32 runs lf's fused kernel (flash_attention_cpu); the other "lf_packed_*" take
    it away (FLASH empty): "lf_packed_mask" then takes the mask path on these short rows (segments do not pay);
    "lf_packed_segments" has a segment block of 1, so that segments pay and packed_sdpa runs inside the model;
    "lf_packed_cpu" lets fp32 take lf's own backward (packed_attention_cpu, bf16's path before the fused kernel)."""
    packed_attention.register()
    calls, own_calls, flash_calls = [], [], []
    for name, log in (("packed_sdpa", calls), ("packed_attention_cpu", own_calls), ("flash_attention_cpu", flash_calls)):
        real = getattr(packed_attention, name)
        monkeypatch.setattr(packed_attention, name, lambda *a, real=real, log=log, **k: log.append(a[3]) or real(*a, **k))
    if attn != "lf_packed":
        monkeypatch.setattr(packed_attention, "FLASH", ())
    if attn == "lf_packed_segments":
        monkeypatch.setattr(packed_attention, "segment_block", lambda dtype: 1)
    if attn == "lf_packed_cpu":  # these short rows of short examples would keep the mask (own_backward_pays)
        monkeypatch.setattr(packed_attention, "OWN_BACKWARD", (torch.float32,))
        monkeypatch.setattr(packed_attention, "own_backward_pays", lambda bounds, length: True)
    model = _tiny(family, "lf_packed" if attn.startswith("lf_packed") else attn)
    if kernels:
        patch_model(model, fused_linear_cross_entropy=False)  # logits are needed here
    try:
        rng = random.Random(2)
        examples = _examples(rng, 9, longest=30)
        rows = pack(examples, capacity=48, neat=True)
        assert any(len([p for p in pos if p == 0]) > 1 for pos in rows["position_ids"])  # really packed
        collate = Collator(pad_token_id=0, pad_to_multiple_of=8)
        packed_loss, packed_grads = _loss_sum(model, collate([dict(zip(rows, v)) for v in zip(*rows.values())]))
        loss, grads = torch.zeros(()), None
        for ids, labels in zip(examples["input_ids"], examples["labels"]):
            one_loss, one_grads = _loss_sum(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
            loss += one_loss
            grads = one_grads if grads is None else {n: grads[n] + g for n, g in one_grads.items()}
        torch.testing.assert_close(packed_loss, loss, rtol=RTOL, atol=ATOL)
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        # one call per layer of the packed forward, over its packed rows; never in the one-by-one runs (no restarts)
        mine = {"lf_packed_segments": calls, "lf_packed_cpu": own_calls, "lf_packed": flash_calls}.get(attn)
        if mine is not None:
            assert len(mine) == model.config.num_hidden_layers
            assert all(len(bounds) == len(rows["input_ids"]) and max(map(len, bounds)) > 1 for bounds in mine)
        assert [c for c in (calls, own_calls, flash_calls) if c is not mine] == [[]] * (2 + (mine is None))
    finally:
        unpatch(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])  # of 4 query heads: MHA, GQA 2:1
def test_a_padded_batch_shares_one_additive_mask_and_keeps_kv_heads_grouped(kv_heads, dtype, monkeypatch):
    """An unpacked, right-padded batch takes the SDPA path under transformers' boolean mask: "lf_packed" hands SDPA
    that mask made additive once for all layers (SDPA would convert and keep a copy in each) and the key/value heads
    unexpanded. Against plain "sdpa": the loss has the same bits; the gradients too without GQA, and with it the
    key/value heads' sum over their group differs in the last bits only."""
    packed_attention.register()
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: calls.append((k, kw)) or
                        sdpa(q, k, v, **kw))
    examples = _examples(random.Random(3), 3, longest=40)
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)([dict(input_ids=i, labels=lab) for i, lab in
                                                           zip(examples["input_ids"], examples["labels"])])
    assert not bool(batch["attention_mask"].all())  # really padded
    (loss, grads), (plain_loss, plain_grads) = (_loss_sum(_tiny("llama", attn, kv_heads).to(dtype), batch)
                                                for attn in ("lf_packed", "sdpa"))
    mine, plain = calls[:2], calls[2:]  # a call per layer each
    assert len(mine) == len(plain) == 2
    masks = [kw["attn_mask"] for _, kw in mine]
    assert all(m.dtype == dtype for m in masks) and len({m.untyped_storage().data_ptr() for m in masks}) == 1
    assert all(kw["attn_mask"].dtype == torch.bool and k.shape[1] == 4 for k, kw in plain)
    assert all(k.shape[1] == kv_heads for k, _ in mine)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        if kv_heads == 4:
            assert torch.equal(grad, plain_grads[name]), name
        fp32 = dtype == torch.float32  # bf16's gradients round to 8 bits: off by some of their largest's ulps
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5 if fp32 else 2e-2,
                                   atol=(1e-6 if fp32 else 2e-2) * plain_grads[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_a_padded_batch_under_inference_mode_takes_transformers_path():
    """Serving and evaluation run a padded batch without gradients (inference_mode's tensors keep no version
    counter, which the shared additive mask checks): transformers' boolean-mask path, the logits of plain "sdpa"."""
    packed_attention.register()
    examples = _examples(random.Random(4), 3, longest=30)
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)([dict(input_ids=i, labels=lab) for i, lab in
                                                           zip(examples["input_ids"], examples["labels"])])
    assert not bool(batch["attention_mask"].all())
    logits = []
    for attn in ("lf_packed", "sdpa"):
        model = _tiny("llama", attn, 2)
        with torch.inference_mode():
            logits.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    assert torch.equal(*logits)


def test_unneat_packing_lets_examples_see_each_other():
    """The contrast that shows the test above can fail: without position restarts the losses differ."""
    model = _tiny("llama", "sdpa")
    rng = random.Random(3)
    examples = _examples(rng, 6, longest=20)
    rows = pack(examples, capacity=64, neat=False)
    collate = Collator(pad_token_id=0, pad_to_multiple_of=None)
    packed_loss, _ = _loss_sum(model, collate([dict(zip(rows, v)) for v in zip(*rows.values())]))
    alone = sum(_loss_sum(model, {"input_ids": torch.tensor([i]), "labels": torch.tensor([lab])})[0]
                for i, lab in zip(examples["input_ids"], examples["labels"]))
    assert not torch.allclose(packed_loss, alone, rtol=1e-3)
