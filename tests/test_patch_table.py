"""lf.kernels.patch's machinery: the table of patch kinds (a kind registered in one place runs through patch,
apply_to and unpatch), switches checked against it, RoPE patched per model, read-only registries, the report's
text and lf's error types."""
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.models.llama import modeling_llama

from lf.errors import KernelError, KernelInputError
from lf.kernels import LFGeGLUMLP, apply_to, patch, unpatch
from lf.kernels.lora_patch import LORA_OPS
from lf.kernels.packed_attention import packed_attention_cpu
from lf.kernels.patch import FAMILIES, PATCHERS, Patcher, bind, register_kind, unbind

patch_module = importlib.import_module("lf.kernels.patch")  # lf.kernels.patch is the function
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


def _llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**SIZES), attn_implementation="sdpa")


def _run(model):
    with torch.no_grad():
        model(input_ids=torch.arange(8)[None])


@pytest.fixture
def rope_calls(monkeypatch):
    calls, op = [], patch_module.rope
    monkeypatch.setattr(patch_module, "rope", lambda *a: calls.append(1) or op(*a))
    return calls


# ---- one entry in the table is a kind ----

def test_a_registered_kind_runs_through_patch_apply_to_and_unpatch():
    calls = []

    def toy_mlp(self, x):  # HF's MLP, counted
        calls.append(1)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def toy(call, kind):
        call.report.patched[kind] = call.bind(call.cls("MLP"), toy_mlp)

    with register_kind("toy", Patcher(toy, toy, lambda base, kind: unbind(base, (toy_mlp,)), default=False)):
        model = _llama()
        assert "toy" not in patch(model).patched  # off unless asked, and not reported as turned off
        unpatch(model)
        report = patch(model, toy=True, swiglu=False)
        assert report.patched["toy"] == 2 and list(report.patched)[-1] == "toy", str(report)  # reported last
        _run(model)
        assert len(calls) == 2
        unpatch(model)
        calls.clear()
        _run(model)
        assert not calls and not any("forward" in m.__dict__ for m in model.modules())

        assert apply_to("llama", toy=True, swiglu=False).patched["toy"] == 1
        try:
            _run(_llama())
            assert len(calls) == 2  # a model built afterwards runs the class's forward
        finally:
            unpatch("llama")
        calls.clear()
        _run(_llama())
        assert not calls
    assert "toy" not in PATCHERS
    with pytest.raises(KernelError, match="'toy' is not a patch kind"):
        patch(model, toy=True)


def test_a_registered_name_must_be_new():
    with pytest.raises(KernelError, match="'rope' is a patch kind already"):
        with register_kind("rope", PATCHERS["rope"]):
            pass
    assert PATCHERS["rope"].default  # lf's own entry is untouched


def test_unknown_switch_names_the_closest_kinds():
    with pytest.raises(KernelError, match=r"'ropee' is not a patch kind\. Did you mean: rope\? The kinds: rms_norm"):
        patch(_llama(), ropee=False)
    with pytest.raises(ValueError, match="'rms' is not a patch kind"):  # a KernelError is a ValueError
        apply_to("llama", rms=False)


# ---- RoPE: per model, nothing module-wide ----

def test_rope_is_patched_per_model(rope_calls):
    hf_rope = modeling_llama.apply_rotary_pos_emb
    a, b = _llama(), _llama()
    patch(a), patch(b)
    assert modeling_llama.apply_rotary_pos_emb is hf_rope  # nothing module-level changed
    _run(_llama())
    assert not rope_calls  # an unpatched model of the family runs HF's RoPE
    unpatch(a)
    _run(a)
    assert not rope_calls
    _run(b)
    assert len(rope_calls) == SIZES["num_hidden_layers"]  # b still runs lf's
    unpatch(b)
    rope_calls.clear()
    _run(b)
    assert not rope_calls and modeling_llama.apply_rotary_pos_emb is hf_rope
    assert all("forward" not in m.__dict__ for m in (*a.modules(), *b.modules()))


def test_rope_by_apply_to_until_unpatch(rope_calls):
    attention_forward = modeling_llama.LlamaAttention.forward
    apply_to("llama")
    try:
        model = _llama()
        patch(model), unpatch(model)  # the model's own patch comes and goes; the classes stay lf's
        _run(model)
        assert len(rope_calls) == SIZES["num_hidden_layers"]
    finally:
        unpatch("llama")
    assert modeling_llama.LlamaAttention.forward is attention_forward
    rope_calls.clear()
    _run(model)
    assert not rope_calls


# ---- registries ----

def test_registries_are_read_only():
    for table, key in ((FAMILIES, "llama"), (LORA_OPS, "lora_linear"), (PATCHERS, "rope")):
        with pytest.raises(TypeError):
            table[key] = table[key]
        with pytest.raises(dataclasses.FrozenInstanceError):
            table[key].default = None  # frozen records: no field can be set


# ---- the report's text ----

def test_report_text():
    model = _llama()
    assert str(patch(model, rope=False, cross_entropy=True)) == (
        "lf kernels in llama: rms_norm (5), swiglu (2), fused_linear_cross_entropy (1), packed_attention (1)\n"
        "  not rope: turned off by the caller\n"
        "  not cross_entropy: the loss already comes from fused_linear_cross_entropy, which needs no logits")
    unpatch(model)
    assert str(patch(model)) == ("lf kernels in llama: rms_norm (5), swiglu (2), rope (1), "
                                 "fused_linear_cross_entropy (1), packed_attention (1)")


def test_unsupported_family_report():
    report = patch(AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    # PEFT's LoRA layers would run lf's ops in any family: this model has none, so the report says nothing of them
    assert report.patched == {} and set(report.skipped) == set(PATCHERS) - {"cross_entropy", *LORA_OPS}, str(report)
    assert report.skipped["rope"].startswith("model_type 'gpt2' is not a family lf patches (supported: llama, ")
    classes = apply_to("gpt2")
    assert classes.patched == {} and set(classes.skipped) == set(PATCHERS) - {"cross_entropy"}, str(classes)
    assert classes.skipped["lora_linear"].startswith("chosen per layer")
    unpatch("gpt2")  # nothing was patched: nothing to do


def test_experts_and_kept_kinds_in_the_report():
    """A MoE family's experts are chosen per model (each model picks its experts implementation); a kind a family's
    entry keeps is reported with its reason and patched nowhere; a dense family says nothing of experts."""
    try:
        report = apply_to("mixtral")
        assert report.skipped["swiglu_experts"].startswith("chosen per model"), str(report)
        assert "swiglu" not in report.patched and "no dense MLP" in report.skipped["swiglu"]
    finally:
        unpatch("mixtral")
    try:
        report = apply_to("cohere")
        assert "rms_norm" not in report.patched and report.skipped["rms_norm"] == FAMILIES["cohere"].kept["rms_norm"]
    finally:
        unpatch("cohere")
    assert "swiglu_experts" not in str(patch(_llama()))


def test_experts_implementation_with_its_own_gate_is_left_alone(monkeypatch):
    """An experts implementation that never calls the experts' gate (e.g. sonicmoe's fused kernel) keeps HF's
    experts, and the report says why."""
    from transformers import MixtralConfig
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "own_gate", lambda self, x, index, weights: x)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2))
    model.config._experts_implementation = "own_gate"
    report = patch(model)
    assert report.skipped["swiglu_experts"] == ("experts_implementation 'own_gate' computes the experts' gate in its "
                                                "own kernel")
    assert not any("_apply_gate" in m.__dict__ for m in model.modules())


# ---- lf's error types ----

def test_kernel_errors():
    q = torch.randn(1, 2, 4, 8)
    cos = torch.ones(1, 4, 8)
    with pytest.raises(KernelInputError, match="unsqueeze_dim=2"):
        patch_module._rope(q, q, cos, cos, unsqueeze_dim=2)
    with pytest.raises(KernelInputError, match="runs CPU tensors, not meta"):
        packed_attention_cpu(q.to("meta"), q.to("meta"), q.to("meta"), [[(0, 4)]])
    with pytest.raises(KernelError, match="activation 'silu' is not a GELU.*LFSwiGLUMLP"):
        LFGeGLUMLP(LlamaConfig(**SIZES))
    model = _llama().train()
    patch(model)
    with pytest.raises(KernelInputError, match="skip_logits=True needs labels"):
        model(input_ids=torch.arange(8)[None], skip_logits=True)
