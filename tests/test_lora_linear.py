"""lora_linear (LoRA over a frozen plain weight) against the float64 oracle and PEFT's LoRA over nn.Linear, and
lf.kernels.patch on PEFT models: which layers it takes, which it leaves to PEFT (and says why), and that a patched
tiny Llama trains as the unpatched one. Tolerances: support.TOL per dtype (the op rounds like the reference: W,
A and B once to x's dtype, each matmul once)."""

import copy
import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import lf.kernels
from lf.errors import KernelDTypeError, KernelInputError
from lf.kernels import lora_linear, lora_linear_reference
from tests.support import FLOOR, TOL, assert_close, oracle, saved_numels

FP32_EXACT = 1e-6  # the patched PEFT layer in fp32 against PEFT's own: the same matmuls, summed in another order
MODEL_FACTOR = 5.0  # a whole model: many ops in a row, each rounding in its own order (as tests/test_patch.py)

# (x's shape without in_features, in_features, out_features): one token, odd widths, a single input feature, 3-D x
SHAPES = [((1,), 33, 17), ((7,), 1, 5), ((2, 9), 33, 17), ((3, 5), 64, 48), ((13,), 130, 1)]


def _tensors(lead, in_f, out_f, rank, dtype, adapter_dtype, with_bias):
    """x (leading dims ``lead``) in ``dtype``, frozen W in ``dtype``, A/B/bias in ``adapter_dtype`` (PEFT keeps the
    adapters in fp32 under a bf16 base); every leaf but W requires grad."""
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5
    lora_A = (torch.randn(rank, in_f, dtype=adapter_dtype) / in_f**0.5).requires_grad_()
    lora_B = torch.randn(out_f, rank, dtype=adapter_dtype).requires_grad_()
    bias = torch.randn(out_f, dtype=adapter_dtype).requires_grad_() if with_bias else None
    return x, weight, lora_A, lora_B, bias


@pytest.mark.parametrize("adapter_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_oracle(with_bias, rank, dtype, adapter_dtype, backend):
    """Forward and the gradients of x, A, B and bias; each gradient in its own leaf's dtype (fp32 adapters with a
    bf16 x too). ``backend`` forces each of lf's backends in turn (the op is the same code on all of them) and
    poisons what lf allocates."""
    if adapter_dtype == "same":
        adapter_dtype = dtype
    for lead, in_f, out_f in SHAPES:
        scaling = 2 * 8 / rank
        x, weight, lora_A, lora_B, bias = _tensors(lead, in_f, out_f, rank, dtype, adapter_dtype, with_bias)
        leaves = [t for t in (x, lora_A, lora_B, bias) if t is not None]
        dy = torch.randn(*lead, out_f, dtype=dtype)
        what = f"{lead} {in_f}->{out_f} r={rank}"

        y = lora_linear(x, weight, lora_A, lora_B, scaling, bias)
        grads = torch.autograd.grad(y, leaves, dy)

        def ref(x, a, b, *bias, weight=weight.double()):
            return lora_linear_reference(x, weight, a, b, scaling, *bias)

        y_ref, grads_ref = oracle(ref, leaves, dy)
        # each element's sum of |terms|: the same sums over |inputs| (W too), for the rounding bound
        y_abs, grads_abs = oracle(lambda *t: ref(*t, weight=weight.double().abs()), [t.abs() for t in leaves],
                                  dy.abs())
        assert y.dtype == dtype and y.shape == (*lead, out_f), what
        _assert_within_rounding(y, y_ref, y_abs, dtype, f"y {what}")
        for name, g, g_ref, g_abs, leaf in zip(("dx", "dA", "dB", "dbias"), grads, grads_ref, grads_abs, leaves):
            assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name} {what}"
            _assert_within_rounding(g, g_ref, g_abs, dtype, f"{name} {what}")


def _assert_within_rounding(actual, expected, bound, dtype, what):
    """|actual - expected| <= TOL * (sum of |terms|) + FLOOR, element by element: the bound of a sum rounded in
    ``dtype``. support.assert_close scales by the largest result instead, which a sum of few terms that cancel
    (a single input feature, one token) can make far smaller than the terms it rounded (seen: dA of 7 tokens by
    1 feature in bf16, 0.29 off a result of 1.53 whose terms summed to ~30 in magnitude)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = (actual.detach().double() - expected.detach()).abs()
    allowed = TOL[dtype] * bound.detach() + FLOOR[dtype]
    worst = (err - allowed).argmax()
    assert (err <= allowed).all(), (f"{what} ({dtype}): off by {err.flatten()[worst]:.3g} where "
                                    f"{allowed.flatten()[worst]:.3g} is allowed, at flat index {worst}")


def test_weight_gets_no_gradient_and_inputs_are_untouched():
    """Only the leaves that ask get a gradient (x frozen, adapters training: the LoRA case); W stays frozen and
    no input is written in place (the op adds into fresh products only)."""
    x, weight, lora_A, lora_B, bias = _tensors((4, 3), 24, 10, 4, torch.float32, torch.float32, True)
    x.requires_grad_(False)
    before = [t.detach().clone() for t in (x, weight, lora_A, lora_B, bias)]
    lora_linear(x, weight, lora_A, lora_B, 0.5, bias).square().sum().backward()
    assert weight.grad is None and x.grad is None
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (lora_A, lora_B, bias))
    for t, saved in zip((x, weight, lora_A, lora_B, bias), before):
        assert torch.equal(t, saved)


def test_autocast_does_not_change_the_dtype():
    """The op computes in x's dtype: an fp32 x under bf16 autocast gives the fp32 result."""
    x, weight, lora_A, lora_B, _ = _tensors((3,), 64, 48, 4, torch.float32, torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, weight, lora_A, lora_B, 2.0)
    assert y.dtype == torch.float32
    assert_close(y, lora_linear_reference(x, weight, lora_A, lora_B, 2.0), torch.float32, "y")


def test_graph_saves_only_x_the_adapters_and_x_a():
    """Saved for backward: x, A, B and x A^T (tokens x r); neither W nor any tokens x out tensor."""
    tokens, in_f, out_f, rank = 64, 32, 256, 4
    x, weight, lora_A, lora_B, bias = _tensors((tokens,), in_f, out_f, rank, torch.float32, torch.float32, True)
    saved = saved_numels(lambda: lora_linear(x, weight, lora_A, lora_B, 2.0, bias))
    assert sorted(saved) == sorted([tokens * in_f, rank * in_f, out_f * rank, tokens * rank])
    # the hook sees what autograd keeps: the plain reference keeps W
    assert out_f * in_f in saved_numels(lambda: lora_linear_reference(x, weight, lora_A, lora_B, 2.0, bias))


def test_bad_inputs():
    x, w, a, b, bias = torch.randn(3, 64), torch.randn(16, 64), torch.randn(4, 64), torch.randn(16, 4), torch.randn(16)

    def call(**changes):
        return lora_linear(**(dict(x=x, weight=w, lora_A=a, lora_B=b, scaling=2.0, bias=bias) | changes))

    with pytest.raises(KernelInputError, match=r"`weight` requires grad, .* freeze it"):
        call(weight=w.clone().requires_grad_())
    with pytest.raises(KernelInputError, match=r"`weight` \(16, 64, 1\) must be 2-D"):
        call(weight=w[..., None])
    with pytest.raises(KernelDTypeError, match=r"`weight` has dtype torch.int8"):
        call(weight=w.to(torch.int8))
    with pytest.raises(KernelInputError, match=r"`x` \(3, 32\) must end in in_features=64 \(the weight is \(16, 64\)"):
        call(x=torch.randn(3, 32))
    with pytest.raises(KernelInputError, match=r"`x` \(\) must end in in_features=64"):
        call(x=torch.tensor(1.0))
    with pytest.raises(KernelDTypeError, match=r"`x` has dtype torch.int64"):
        call(x=torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(KernelInputError, match=r"`lora_A` \(4, 32\) must be \(r, 64\)"):
        call(lora_A=torch.randn(4, 32))
    with pytest.raises(KernelInputError, match=r"`lora_A` \(256,\) must be \(r, 64\)"):
        call(lora_A=torch.randn(256))
    with pytest.raises(KernelInputError, match=r"`lora_B` \(16, 5\) must be \(16, 4\)"):
        call(lora_B=torch.randn(16, 5))
    with pytest.raises(KernelInputError, match=r"`lora_B` \(4, 16\) must be \(16, 4\)"):
        call(lora_B=torch.randn(4, 16))
    with pytest.raises(KernelDTypeError, match=r"`lora_B` has dtype torch.int32"):
        call(lora_B=torch.ones(16, 4, dtype=torch.int32))
    with pytest.raises(KernelInputError, match=r"`bias` \(8,\) must be \(16,\)"):
        call(bias=torch.randn(8))
    with pytest.raises(KernelInputError, match=r"`scaling`=nan must be a finite number"):
        call(scaling=float("nan"))
    with pytest.raises(KernelInputError, match=r"`scaling`=True must be a finite number"):
        call(scaling=True)
    with pytest.raises(KernelInputError, match=r"`lora_A` must be a torch.Tensor, got list"):
        call(lora_A=a.tolist())
    # a device mismatch, on a CPU-only machine: PyTorch's "meta" device is another device
    with pytest.raises(KernelInputError, match=r"`weight` is on cpu but `x` is on meta"):
        call(x=torch.randn(3, 64, device="meta"))
    with pytest.raises(KernelInputError, match=r"`lora_B` is on meta but `x` is on cpu"):
        call(lora_B=torch.randn(16, 4, device="meta"))


# ---- PEFT's LoRA layers under lf.kernels.patch ----

class _Tiny(nn.Module):
    def __init__(self, in_f=33, out_f=17, dtype=torch.float32, base=nn.Linear):
        super().__init__()
        self.proj = base(in_f, out_f, dtype=dtype)
        self.other = nn.Linear(out_f, out_f, bias=False, dtype=dtype)

    def forward(self, x):
        return self.other(self.proj(x))


def _peft(tiny, **lora):
    """PEFT LoRA on both linears, lora_B nonzero (PEFT starts it at zero, which would leave dA zero)."""
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj", "other"]) | lora
    model = get_peft_model(tiny, LoraConfig(**config))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p.data)
    return model


def _lora_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]


def _out_and_grads(model, x, dy, autocast=False):
    """y, and the gradients of x and of every trained parameter, with autograd.grad (no .grad accumulates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    return y, torch.autograd.grad(y, [x, *params], dy.to(y.dtype))


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the calls of lora_linear made by patched layers."""
    patch_module = importlib.import_module("lf.kernels.lora_patch")  # where the patched forwards call the op
    calls = []
    op = patch_module.lora_linear
    monkeypatch.setattr(patch_module, "lora_linear", lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


@pytest.mark.parametrize("setting", ["fp32", "bf16 autocast", "bf16 model"])
def test_patched_peft_layer_matches_peft(setting, count_calls):
    """fp32; an fp32 model under bf16 autocast (HF's Trainer with bf16=True); a bf16 model without autocast, its
    adapters kept in fp32 by PEFT (PEFT then runs the LoRA path in fp32, lf in bf16)."""
    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    model = _peft(_Tiny(dtype=dtype if setting == "bf16 model" else torch.float32))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    x_dtype = torch.bfloat16 if setting == "bf16 model" else torch.float32
    x = torch.randn(2, 5, 33, dtype=x_dtype, requires_grad=True)
    dy = torch.randn(2, 5, 17)
    autocast = setting == "bf16 autocast"
    y_peft, grads_peft = _out_and_grads(model, x, dy, autocast)

    report = lf.kernels.patch(model)
    assert report.patched == {"lora_linear": 2} and "lora_linear" not in report.skipped, str(report)
    y, grads = _out_and_grads(model, x, dy, autocast)
    assert len(count_calls) == 2  # both layers ran lf's op
    assert y.dtype == y_peft.dtype, "the patched layer returns what PEFT's does"
    tol = dict(factor=FP32_EXACT / TOL[torch.float32]) if setting == "fp32" else {}
    assert_close(y, y_peft, dtype, "y", **tol)
    names = ["dx"] + [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(grads) == 1 + 4
    for name, g, g_peft in zip(names, grads, grads_peft):
        assert g.dtype == g_peft.dtype, name
        assert_close(g, g_peft, dtype, name, **tol)

    lf.kernels.unpatch(model)
    assert all("forward" not in layer.__dict__ for layer in _lora_layers(model))
    count_calls.clear()
    y_again, _ = _out_and_grads(model, x, dy, autocast)
    assert not count_calls and torch.equal(y_again, y_peft)  # PEFT's own forward again


def test_disabled_or_merged_adapters_run_peft(count_calls):
    model = _peft(_Tiny())
    lf.kernels.patch(model)
    tiny = model.base_model.model
    x = torch.randn(3, 33)
    with torch.no_grad():
        with model.disable_adapter():
            y = model(x)
        assert not count_calls
        assert torch.equal(y, tiny.other.base_layer(tiny.proj.base_layer(x)))  # the base linears alone
        y_lora = model(x)
        assert len(count_calls) == 2
        model.base_model.merge_adapter()
        count_calls.clear()
        y_merged = model(x)
        assert not count_calls  # PEFT's merged weight
        assert_close(y_merged, y_lora, torch.float32, "merged")
        model.base_model.unmerge_adapter()


class _Subclassed(nn.Linear):
    pass


@pytest.mark.parametrize("case", ["lora_dropout", "base weight trains", "DoRA", "lora_bias", "base subclass",
                                  "ZeRO-3"])
def test_layers_lf_cannot_take_are_left_to_peft_and_reported(case, count_calls):
    lora = {"lora_dropout": dict(lora_dropout=0.1), "DoRA": dict(use_dora=True),
            "lora_bias": dict(lora_bias=True)}.get(case, {})
    model = _peft(_Tiny(base=_Subclassed if case == "base subclass" else nn.Linear), **lora)
    if case == "base weight trains":
        model.base_model.model.proj.base_layer.weight.requires_grad_(True)
    if case == "ZeRO-3":  # how DeepSpeed marks a partitioned parameter
        model.base_model.model.proj.base_layer.weight.ds_id = 0
    model.eval()  # dropout off, so that PEFT's output can be compared
    x = torch.randn(4, 33)
    with torch.no_grad():
        y_peft = model(x)
        report = lf.kernels.patch(model)
        y = model(x)
    why = report.skipped["lora_linear"]
    expected = {"lora_dropout": "lora_dropout 0.1 > 0: lf's op has no dropout on the LoRA input (set lora_dropout: 0)",
                "base weight trains": "the base weight trains too",
                "DoRA": "DoRA", "lora_bias": "lora_bias: lf's op has no bias on lora_B",
                "base subclass": "the base layer is a _Subclassed, not a plain nn.Linear",
                "ZeRO-3": "DeepSpeed ZeRO-3 partitions the base weight"}[case]
    assert expected in why, why
    if case in ("base weight trains", "base subclass", "ZeRO-3"):  # only `proj`: `other` is taken
        assert report.patched == {"lora_linear": 1}, str(report)
        assert "1 of 2 LoRA linear layers (e.g. proj) left to PEFT" in why, why
        assert len(count_calls) == 1
        assert "forward" not in model.base_model.model.proj.__dict__
    else:
        assert "lora_linear" not in report.patched, str(report)
        assert "2 of 2 LoRA linear layers (e.g. proj) left to PEFT" in why, why
        assert not count_calls
        assert all("forward" not in layer.__dict__ for layer in _lora_layers(model))
    assert "lora_linear" in str(report)
    assert_close(y, y_peft, torch.float32, "y")


def test_turned_off_and_patching_twice(count_calls):
    model = _peft(_Tiny())
    report = lf.kernels.patch(model, lora_linear=False)
    assert "lora_linear" not in report.patched and not any("forward" in m.__dict__ for m in _lora_layers(model))
    first, second = lf.kernels.patch(model), lf.kernels.patch(model)
    assert first.patched == second.patched == {"lora_linear": 2}
    model(torch.randn(2, 33))
    assert len(count_calls) == 2  # bound once, not wrapped twice


# ---- a tiny Llama with LoRA on every linear layer ----

LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ONLY_LORA = dict(rms_norm=False, rope=False, swiglu=False, fused_linear_cross_entropy=False, packed_attention=False,
                 lora_nf4_linear=False)


@pytest.fixture
def lora_llama():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), dtype=torch.float32, attn_implementation="sdpa")
    model = _peft(base, target_modules="all-linear").train()
    return model


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("only_lora", [True, False])
def test_lora_llama_matches_unpatched(only_lora, lora_llama, count_calls):
    """Only lora_linear patched (logits kept, a tight tolerance), and every kernel (the loss from
    fused_linear_cross_entropy): the loss and every LoRA gradient as the unpatched model's."""
    model = lora_llama
    reference = copy.deepcopy(model)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels)
    report = lf.kernels.patch(model, **(ONLY_LORA if only_lora else {}))
    layers = 7 * LLAMA["num_hidden_layers"]
    assert report.patched["lora_linear"] == layers and "lora_linear" not in report.skipped, str(report)
    assert len(_lora_layers(model)) == layers
    out, grads = _loss_and_grads(model, ids, labels)
    assert len(count_calls) == layers
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * layers
    assert all("lora_" in name for name in grads)  # only the adapters train
    factor = 1.0 if only_lora else MODEL_FACTOR
    if only_lora:
        assert_close(out.logits, out_ref.logits, torch.float32, "logits")
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", factor)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], torch.float32, f"grad {name}", factor)
