import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from lf.errors import KernelInputError
from lf.kernels import _alloc
from lf.kernels import (cross_entropy, cross_entropy_reference, fused_linear_cross_entropy,
                        fused_linear_cross_entropy_reference)
from support import DTYPES, assert_close, oracle

IGNORE = -100
# (rows, vocab): one row, one column, odd sizes, vocabularies that are multiples of no block (Llama-2 + pad,
# Qwen2), the large ones on few rows so that the Triton interpreter stays quick.
SHAPES = [(1, 1), (3, 7), (9, 1000), (4, 32003), (2, 151936)]
OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=30.0),
    "z_loss": dict(z_loss=1e-4),
    "all": dict(label_smoothing=0.2, softcap=5.0, z_loss=1e-3),
    "sum": dict(reduction="sum", label_smoothing=0.1),
    "none": dict(reduction="none", softcap=30.0),
    "num_items": dict(num_items_in_batch=11),
}


def _labels(rows, vocab, ignored=0.3):
    labels = torch.randint(0, vocab, (rows,))
    labels[torch.rand(rows) < ignored] = IGNORE
    return labels


def _check_ce(logits, labels, dtype, factor=1.0, **options):
    """lf's loss and logits gradient against the float64 oracle on the same inputs."""
    loss = cross_entropy(logits, labels, **options)
    assert loss.dtype == torch.float32
    grad_out = torch.randn_like(loss) if loss.dim() else torch.tensor(1.7)  # never 1: backward must scale
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    loss64, (grad64,) = oracle(lambda x: cross_entropy_reference(x, labels, **options), (logits,), grad_out)
    assert_close(loss, loss64, dtype, "loss", factor, min_scale=1.0)
    # a gradient entry is (softmax - target) x the reduction's scale: differences of numbers of that size
    reduction = options.get("reduction", "mean")
    count = options.get("num_items_in_batch") or max(int((labels != IGNORE).sum()), 1)
    grad_scale = float(grad_out.abs().max()) / (count if reduction == "mean" else 1)
    assert_close(grad, grad64, dtype, "grad logits", factor, min_scale=grad_scale)


# every option on the small vocabularies, three of them on the large ones (keeps interpreted Triton quick)
CASES = [(shape, option) for shape in SHAPES for option in OPTIONS
         if shape[1] < 10_000 or option in ("plain", "all", "none")]


@pytest.mark.parametrize("shape,option", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, shape, option):
    logits = (torch.randn(shape) * 4).to(dtype).requires_grad_()
    _check_ce(logits, _labels(*shape), dtype, **OPTIONS[option])


def test_matches_torch_cross_entropy(backend):
    """torch's own cross_entropy on fp32-upcast logits (smoothing, ignore_index, every reduction)."""
    logits = torch.randn(3, 5, 77, dtype=torch.bfloat16, requires_grad=True)
    labels = _labels(15, 77).reshape(3, 5)
    for reduction in ("mean", "sum", "none"):
        loss = cross_entropy(logits, labels, label_smoothing=0.1, reduction=reduction)
        want = F.cross_entropy(logits.float().reshape(-1, 77), labels.reshape(-1), ignore_index=IGNORE,
                               label_smoothing=0.1, reduction=reduction)
        grad_out = torch.randn_like(want)
        (grad,) = torch.autograd.grad(loss, logits, grad_out.reshape(loss.shape))
        (grad_want,) = torch.autograd.grad(want, logits, grad_out)
        assert_close(loss, want.reshape(loss.shape), torch.float32, f"loss ({reduction})")
        assert_close(grad, grad_want, torch.bfloat16, f"grad ({reduction})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_causal_lm_loss(backend, dtype):
    """HF's ForCausalLMLoss (labels shifted inside, fp32 upcast, num_items_in_batch) vs lf on shifted labels:
    cross_entropy on the logits and fused_linear_cross_entropy on the hidden states."""
    batch, seq, hidden_size, vocab = 2, 9, 32, 1001
    hidden = torch.randn(batch, seq, hidden_size, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 4).to(dtype).requires_grad_()
    labels = _labels(batch * seq, vocab).reshape(batch, seq)
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    for num_items in (None, 23):
        logits_hf = hidden @ weight.T
        loss_hf = ForCausalLMLoss(logits_hf, labels, vocab, num_items_in_batch=num_items)
        grads_hf = torch.autograd.grad(loss_hf, (hidden, weight))
        logits = hidden @ weight.T
        loss = cross_entropy(logits, shifted, num_items_in_batch=num_items)
        grads = torch.autograd.grad(loss, (hidden, weight))
        loss_fused = fused_linear_cross_entropy(hidden, weight, shifted, num_items_in_batch=num_items, chunk_size=5)
        grads_fused = torch.autograd.grad(loss_fused, (hidden, weight))
        for what, got, got_grads in (("cross_entropy", loss, grads), ("fused", loss_fused, grads_fused)):
            assert_close(got, loss_hf, dtype, f"{what} loss, num_items={num_items}")
            for name, g, e in zip(("hidden", "weight"), got_grads, grads_hf):
                assert_close(g, e, dtype, f"{what} grad {name}, num_items={num_items}", factor=2)


def test_overwrite_logits_keeps_results_and_reuses_memory(backend):
    logits = torch.randn(6, 301, requires_grad=True)
    labels = _labels(6, 301)
    loss = cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    buffer = (logits.detach() * 1).requires_grad_()  # a non-leaf, as lm_head's output would be
    logits_out = buffer * 1
    loss_over = cross_entropy(logits_out, labels, overwrite_logits=True)
    (grad_over,) = torch.autograd.grad(loss_over, buffer)
    torch.testing.assert_close(loss_over, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_over, grad, rtol=0, atol=0)
    torch.testing.assert_close(logits_out.detach(), grad, rtol=0, atol=0)  # the gradient lives in the logits


def test_huge_logits_stay_finite(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0, 9999.0], [-1e4, -1e4, -1e4, -1e4 + 1]]).requires_grad_()
    labels = torch.tensor([1, 3])
    for options in ({}, dict(label_smoothing=0.1, z_loss=1e-4), dict(softcap=30.0)):
        loss = cross_entropy(logits, labels, **options)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), options
        loss64, (grad64,) = oracle(lambda x: cross_entropy_reference(x, labels, **options), (logits,),
                                   torch.tensor(1.0))
        assert_close(loss, loss64, torch.float32, f"loss {options}")
        assert_close(grad, grad64, torch.float32, f"grad {options}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(backend, reduction):
    logits = torch.randn(4, 33, requires_grad=True)
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(33, 8, requires_grad=True)
    labels = torch.full((4,), IGNORE)
    for loss, leaves in ((cross_entropy(logits, labels, reduction=reduction), (logits,)),
                         (fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction), (hidden, weight))):
        grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss))
        assert (loss == 0).all()
        for g in grads:
            assert (g == 0).all()


def test_backward_twice_after_scaling_is_an_error(backend):
    logits = torch.randn(3, 10, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([1, 2, 3])) * 2
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        loss.backward()


FUSED_CASES = {  # chunk_size, bias, which leaves need gradients, options
    "chunks+bias": (4, True, "hwb", {}),
    "default chunk": (None, False, "hw", dict(label_smoothing=0.1, z_loss=1e-4)),
    "softcap, frozen weight": (3, False, "h", dict(softcap=30.0)),
    "frozen hidden": (5, True, "wb", dict(reduction="sum")),
    "none (deferred)": (4, True, "hwb", dict(reduction="none", softcap=10.0)),
    "none, frozen head": (4, True, "h", dict(reduction="none")),  # hidden gradient from the forward, per row
    "no ignored": (7, False, "hw", {}),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("vocab", [1000, 32003])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference(backend, dtype, vocab, case):
    chunk, with_bias, leaves, options = FUSED_CASES[case]
    tokens, hidden_size = (11, 48) if vocab > 10_000 else (23, 64)
    hidden = torch.randn(tokens, hidden_size).to(dtype).requires_grad_("h" in leaves)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype).requires_grad_("w" in leaves)
    bias = torch.randn(vocab).to(dtype).requires_grad_("b" in leaves) if with_bias else None
    labels = _labels(tokens, vocab, ignored=0.0 if case == "no ignored" else 0.3)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk, **options)
    grad_out = torch.randn_like(loss) if loss.dim() else torch.tensor(0.6)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_out)
    loss64, grads64 = oracle(
        lambda h, w, *b: fused_linear_cross_entropy_reference(h, w, labels, b[0] if b else None, **options),
        inputs, grad_out)
    # bf16/fp16 logits are rounded once by the matmul, and the weight gradient once per chunk
    factor = 1.0 if dtype == torch.float32 else 2.0
    assert_close(loss, loss64, dtype, "loss", factor, min_scale=1.0)
    for name, g, g64 in zip([n for n, t in zip("hwb", inputs) if t.requires_grad], grads, grads64):
        assert_close(g, g64, dtype, f"grad {name}", factor)


def test_fused_without_grad_computes_loss_only(backend):
    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    labels = _labels(5, 40)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    assert_close(loss, fused_linear_cross_entropy_reference(hidden.double(), weight.double(), labels), torch.float32,
                 "loss")


@pytest.mark.parametrize("widened", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_16bit_matmuls_native_and_widened(backend, dtype, widened, monkeypatch):
    """Both paths whatever this CPU has: matmuls in the 16-bit dtype itself (GPUs, CPUs with AVX512-BF16/AMX),
    and 16-bit weights widened to fp32 block by block (CPUs without native 16-bit dot products)."""
    module = importlib.import_module("lf.kernels.fused_linear_cross_entropy")  # the function shadows the module
    monkeypatch.setattr(module, "matmul_in_fp32", lambda weight: widened)
    hidden = torch.randn(13, 32).to(dtype).requires_grad_()
    weight = (torch.randn(300, 32) / 6).to(dtype).requires_grad_()
    bias = torch.randn(300).to(dtype).requires_grad_()
    labels = _labels(13, 300)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    loss64, grads64 = oracle(lambda h, w, b: fused_linear_cross_entropy_reference(h, w, labels, b, label_smoothing=0.1),
                             (hidden, weight, bias), torch.tensor(1.0))
    assert_close(loss, loss64, dtype, "loss", 2.0, min_scale=1.0)
    for name, g, g64 in zip("hwb", grads, grads64):
        assert_close(g, g64, dtype, f"grad {name}", 2.0)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_realistic_sizes(name, monkeypatch):
    """Llama-3's vocabulary for the loss; a 512-wide lm_head with Llama-2's vocabulary over 384 tokens for the
    fused op, with the default chunk and with several chunks (bf16, the training dtype; the interpreted Triton
    is too slow here)."""
    monkeypatch.setenv("LF_KERNEL_BACKEND", name)
    dtype = torch.bfloat16
    logits = (torch.randn(64, 128256) * 3).to(dtype).requires_grad_()
    _check_ce(logits, _labels(64, 128256), dtype, label_smoothing=0.1)
    hidden = torch.randn(384, 512).to(dtype).requires_grad_()
    weight = (torch.randn(32000, 512) / 23).to(dtype).requires_grad_()
    labels = _labels(384, 32000)
    loss64, grads64 = oracle(lambda h, w: fused_linear_cross_entropy_reference(h, w, labels), (hidden, weight),
                             torch.tensor(1.0))
    for chunk in (None, 100):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert_close(loss, loss64, dtype, f"loss, chunk {chunk}", min_scale=1.0)
        for what, g, g64 in zip(("hidden", "weight"), grads, grads64):
            assert_close(g, g64, dtype, f"grad {what}, chunk {chunk}", 2.0)


def _weighted_reference(hidden, weight, bias, labels, reduction, num_items, weighting, softcap):
    """DFT and EAFT written out: each token's cross-entropy times a constant (detached) weight: DFT's its
    probability exp(-ce), EAFT's (entropy of the softmax of its 20 largest logits / 3) ** alpha."""
    logits = hidden @ weight.T + bias
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    if weighting.get("dft"):
        factor = torch.exp(-ce)
    else:
        top = logits.topk(20, dim=-1).values.softmax(-1)
        factor = (-(top * top.log()).sum(-1) / 3) ** weighting["eaft"]
    rows = ce * factor.detach()
    if reduction == "none":
        return rows
    return rows.sum() / (num_items if num_items is not None else (labels != IGNORE).sum())


@pytest.mark.parametrize("reduction, num_items, chunk, weighting, softcap", [
    ("mean", None, 3, {"dft": True}, None), ("mean", 17, None, {"dft": True}, None),
    ("none", None, 4, {"dft": True}, None), ("mean", None, 3, {"eaft": 1.0}, None),
    ("mean", 17, None, {"eaft": 0.5}, 15.0), ("none", None, 4, {"eaft": 2.0}, None)])
def test_fused_token_weightings_weight_each_token_by_a_detached_factor(backend, reduction, num_items, chunk,
                                                                       weighting, softcap):
    hidden = torch.randn(19, 32).requires_grad_()
    # DFT: logits of a few units, probabilities far from 0 and 1; EAFT: wider, so that the top logits' entropy is
    # well below its largest value
    weight = (torch.randn(300, 32) / (3 if "dft" in weighting else 0.5)).requires_grad_()
    bias = torch.randn(300).requires_grad_()
    labels = _labels(19, 300)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, num_items_in_batch=num_items,
                                      chunk_size=chunk, softcap=softcap, **weighting)
    grad_out = torch.randn_like(loss) if loss.dim() else torch.tensor(0.6)
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    loss64, grads64 = oracle(lambda h, w, b: _weighted_reference(h, w, b, labels, reduction, num_items, weighting,
                                                                 softcap), (hidden, weight, bias), grad_out)
    plain = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, num_items_in_batch=num_items,
                                       softcap=softcap)
    assert (loss - plain).abs().max() > 0.1  # the weighting is not the plain loss
    assert_close(loss, loss64, torch.float32, "loss", min_scale=1.0)
    for name, g, g64 in zip("hwb", grads, grads64):
        assert_close(g, g64, torch.float32, f"grad {name}")


def _kl_reference(hidden, weight, bias, ref_hidden, ref_weight, labels, reduction, num_items, kl, dft, softcap):
    """ASFT written out as LLaMA-Factory 0.9.5 writes it (trainer_utils' _asft_cross_entropy): each token's
    cross-entropy (times its detached probability with dft) plus kl times torch's kl_div of the model's
    log-softmax against the reference's softmax, summed over the vocabulary, on label tokens only."""
    logits = hidden @ weight.T + bias
    ref_logits = ref_hidden @ ref_weight.T
    if softcap:
        logits, ref_logits = (softcap * torch.tanh(x / softcap) for x in (logits, ref_logits))
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    rows = ce * torch.exp(-ce).detach() if dft else ce
    divergence = F.kl_div(logits.log_softmax(-1), ref_logits.softmax(-1), reduction="none").sum(-1)
    rows = torch.where(labels != IGNORE, rows + kl * divergence, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (num_items if num_items is not None else (labels != IGNORE).sum())


@pytest.mark.parametrize("dtype, reduction, num_items, chunk, dft, softcap", [
    (torch.float32, "mean", None, 3, True, None), (torch.float32, "mean", 17, None, True, 15.0),
    (torch.float32, "none", None, 4, False, None), (torch.float32, "none", None, 5, True, 15.0),
    (torch.bfloat16, "mean", None, 4, True, None), (torch.bfloat16, "none", None, None, True, None)])
def test_fused_kl_from_a_reference_adds_its_divergence_and_gradient(backend, dtype, reduction, num_items, chunk,
                                                                    dft, softcap):
    """kl (ASFT's second term): the loss and the gradients of hidden, weight and bias equal the full-logits formula
    in float64; the reference's logits come from hidden states and a head of its own (wider here, as another
    model's may be), and get no gradient."""
    hidden = (torch.randn(19, 32) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(300, 32) / 3).to(dtype).requires_grad_()
    bias = torch.randn(300).to(dtype).requires_grad_()
    ref_hidden, ref_weight = torch.randn(19, 48).to(dtype), (torch.randn(300, 48) / 4).to(dtype)
    labels, kl = _labels(19, 300), 0.7
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, num_items_in_batch=num_items,
                                      chunk_size=chunk, softcap=softcap, dft=dft, kl=kl, ref_hidden=ref_hidden,
                                      ref_weight=ref_weight, ref_softcap=softcap)
    grad_out = torch.randn_like(loss) if loss.dim() else torch.tensor(0.6)
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    loss64, grads64 = oracle(lambda h, w, b: _kl_reference(h, w, b, ref_hidden.double(), ref_weight.double(), labels,
                                                           reduction, num_items, kl, dft, softcap),
                             (hidden, weight, bias), grad_out)
    without = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction,
                                         num_items_in_batch=num_items, softcap=softcap, dft=dft)
    assert (loss - without).abs().max() > 0.05  # the divergence is there
    assert_close(loss, loss64, dtype, "loss", min_scale=1.0)
    for name, g, g64 in zip("hwb", grads, grads64):
        assert_close(g, g64, dtype, f"grad {name}", 2.0)


def test_fused_kl_from_the_model_itself_is_zero():
    """A reference computing the model's own logits diverges by nothing: the loss is the plain one, and so are
    the gradients."""
    hidden, weight, labels = torch.randn(7, 16).requires_grad_(), torch.randn(50, 16), _labels(7, 50)
    loss = fused_linear_cross_entropy(hidden, weight, labels, kl=2.0, ref_hidden=hidden.detach(), ref_weight=weight)
    (grad,) = torch.autograd.grad(loss, hidden)
    plain = fused_linear_cross_entropy(hidden, weight, labels)
    assert_close(loss, plain, torch.float32, "loss", min_scale=1.0)
    assert_close(grad, torch.autograd.grad(plain, hidden)[0], torch.float32, "grad")


def test_fused_kl_needs_a_matching_reference():
    hidden, weight, labels = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3])
    with pytest.raises(KernelInputError, match="needs the reference model's"):
        fused_linear_cross_entropy(hidden, weight, labels, kl=0.1)
    with pytest.raises(KernelInputError, match="`weight`'s vocabulary 5"):
        fused_linear_cross_entropy(hidden, weight, labels, kl=0.1, ref_hidden=torch.randn(3, 4),
                                   ref_weight=torch.randn(6, 4))
    with pytest.raises(KernelInputError, match="but `kl` is 0"):
        fused_linear_cross_entropy(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight)


def test_dft_and_eaft_together_are_refused():
    with pytest.raises(KernelInputError, match="dft and eaft"):
        fused_linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), dft=True, eaft=1.0)


@pytest.mark.parametrize("onednn", [False, True])
def test_fused_fp32_logits_by_onednn_and_by_torch_mm(onednn, monkeypatch):
    """fp32 logits by oneDNN's inner product (fresh per chunk, as on an AMX CPU) and by torch.mm (into a reused
    buffer), whatever this CPU is: several chunks, a bias, the KL term's reference head (its own logits the same
    way): the float64 oracle's loss and gradients of hidden, weight and bias."""
    module = importlib.import_module("lf.kernels.fused_linear_cross_entropy")
    asked = []
    monkeypatch.setattr(module, "onednn_fp32_linear", lambda weight: asked.append(weight.dtype) or onednn)
    monkeypatch.setattr(_alloc, "POISON", float("nan"))
    hidden = (torch.randn(19, 32) / 2).requires_grad_()
    weight, bias = (torch.randn(300, 32) / 3).requires_grad_(), torch.randn(300).requires_grad_()
    ref_hidden, ref_weight = torch.randn(19, 48), torch.randn(300, 48) / 4
    labels, kl = _labels(19, 300), 0.7
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4, softcap=15.0, kl=kl,
                                      ref_hidden=ref_hidden, ref_weight=ref_weight, ref_softcap=15.0)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert asked == [torch.float32, torch.float32]  # the model's head and the reference's
    loss64, grads64 = oracle(lambda h, w, b: _kl_reference(h, w, b, ref_hidden.double(), ref_weight.double(), labels,
                                                           "mean", None, kl, False, 15.0),
                             (hidden, weight, bias), torch.tensor(1.0))
    assert_close(loss, loss64, torch.float32, "loss", min_scale=1.0)
    for name, g, g64 in zip("hwb", grads, grads64):
        assert_close(g, g64, torch.float32, f"grad {name}")
