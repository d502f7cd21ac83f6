"""lf.kernels.patch on tiny models of each family, built from configs (no hub): the patched model's loss and
every parameter's gradient against the same model unpatched."""
import copy
import importlib

import pytest
import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, CLIPVisionConfig, Gemma3Config,
                          GPT2Config, InternVLConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig,
                          Qwen2_5OmniThinkerConfig, Qwen2Config, Qwen2VLConfig, Qwen3VLConfig, SiglipVisionConfig)

from lf.kernels import apply_to, patch, unpatch
from lf.kernels.patch import FAMILIES, VISION_LANGUAGE
from support import assert_close

SIZES = dict(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
ROUTED = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_group=1, topk_group=1)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16)  # multi-head latent attention: as many key/value heads as query heads
HYBRID = ["linear_attention", "full_attention"]  # one layer of each


def _config(name, **fields):
    """``transformers.<name>`` at SIZES, with ``fields`` on top (tiny experts, a family's own settings)."""
    return lambda: getattr(transformers, name)(**{**SIZES, **fields})


CONFIGS = {  # model_type -> its tiny config; head_dim 16 where a family's default would not follow from SIZES
    "llama": _config("LlamaConfig"),
    "mistral": _config("MistralConfig"),
    "ministral": _config("MinistralConfig", head_dim=16),
    "qwen2": _config("Qwen2Config"),
    "qwen3": _config("Qwen3Config", head_dim=16),
    # a pad token inside the tiny vocabulary; half the head rotated (Phi-3's partial rotary embeddings)
    "phi3": _config("Phi3Config", pad_token_id=0, partial_rotary_factor=0.5),
    "gemma": _config("GemmaConfig", head_dim=16, hidden_act="gelu_pytorch_tanh"),
    "gemma2": _config("Gemma2Config", head_dim=16, final_logit_softcapping=30.0),  # GELU tanh, softcaps
    "gemma3_text": _config("Gemma3TextConfig", head_dim=16, hidden_activation="gelu"),  # exact GELU, q/k norms
    "granite": _config("GraniteConfig", logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5),
    "olmo2": _config("Olmo2Config"),
    "olmo3": _config("Olmo3Config"),
    "glm": _config("GlmConfig", head_dim=16, pad_token_id=0),
    "glm4": _config("Glm4Config", head_dim=16, pad_token_id=0),
    "smollm3": _config("SmolLM3Config", pad_token_id=0),
    "exaone4": _config("Exaone4Config"),
    "hunyuan_v1_dense": _config("HunYuanDenseV1Config", head_dim=16),
    "helium": _config("HeliumConfig", head_dim=16),
    "ernie4_5": _config("Ernie4_5Config", head_dim=16),
    "vaultgemma": _config("VaultGemmaConfig", head_dim=16),
    # dropout on the MLP's output and the residual (both runs draw the same masks), none in attention (lf's packed
    # attention and SDPA's mask would draw theirs differently)
    "seed_oss": _config("SeedOssConfig", head_dim=16, attention_dropout=0.0),
    "arcee": _config("ArceeConfig"),
    "apertus": _config("ApertusConfig"),
    "bitnet": _config("BitNetConfig"),
    "olmo": _config("OlmoConfig"),
    "stablelm": _config("StableLmConfig"),  # a quarter of the head rotated
    "phi": _config("PhiConfig"),
    "starcoder2": _config("Starcoder2Config"),
    "cohere": _config("CohereConfig", logit_scale=0.5, use_qk_norm=True),
    "cohere2": _config("Cohere2Config", logit_scale=0.5),
    "falcon_h1": _config("FalconH1Config", head_dim=16, lm_head_multiplier=0.5, mlp_multipliers=[0.5, 2.0],
                         mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8),
    "llama4_text": _config("Llama4TextConfig", head_dim=16, intermediate_size_mlp=112, num_local_experts=4,
                           interleave_moe_layer_step=2),
    "gpt_oss": _config("GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "mixtral": _config("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _config("Qwen2MoeConfig", shared_expert_intermediate_size=96, **MOE),
    "qwen3_moe": _config("Qwen3MoeConfig", head_dim=16, **MOE),
    "qwen3_next": _config("Qwen3NextConfig", head_dim=16, layer_types=HYBRID, linear_key_head_dim=16,
                          linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                          shared_expert_intermediate_size=96, **MOE),
    "olmoe": _config("OlmoeConfig", num_experts=4, num_experts_per_tok=2),
    "granitemoe": _config("GraniteMoeConfig", logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": _config("GraniteMoeSharedConfig", logits_scaling=4.0, num_local_experts=4,
                                num_experts_per_tok=2, shared_intermediate_size=96),
    "glm4_moe": _config("Glm4MoeConfig", head_dim=16, first_k_dense_replace=1, n_shared_experts=1, **ROUTED),
    "dots1": _config("Dots1Config", head_dim=16, first_k_dense_replace=1, n_shared_experts=1, **ROUTED),
    "hunyuan_v1_moe": _config("HunYuanMoEV1Config", head_dim=16, num_experts=4, moe_topk=2),
    "exaone_moe": _config("ExaoneMoeConfig", first_k_dense_replace=1, num_shared_experts=1, **MOE),
    "solar_open": _config("SolarOpenConfig", head_dim=16, n_shared_experts=1, **ROUTED),
    "phimoe": _config("PhimoeConfig", num_local_experts=4, num_experts_per_tok=2),
    "minimax": _config("MiniMaxConfig", head_dim=16, layer_types=HYBRID, num_local_experts=4, num_experts_per_tok=2,
                       block_size=4),
    "ernie4_5_moe": _config("Ernie4_5_MoeConfig", moe_num_experts=4, moe_k=2, moe_intermediate_size=48,
                            moe_num_shared_experts=1, moe_layer_start_index=1),
    "deepseek_v2": _config("DeepseekV2Config", first_k_dense_replace=1, n_shared_experts=1, **ROUTED, **MLA),
    "deepseek_v3": _config("DeepseekV3Config", first_k_dense_replace=1, n_shared_experts=1, **ROUTED, **MLA),
}
# transformers 5.23: Gemma-2's and VaultGemma's attention softcapping and GPT-OSS's attention sinks need eager
ATTENTION = {"gemma2": "eager", "vaultgemma": "eager", "gpt_oss": "eager"}
DENSE = {"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "packed_attention"}
EXPERTS = {"llama4_text", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "granitemoe", "granitemoeshared",
           "glm4_moe", "dots1", "hunyuan_v1_moe", "exaone_moe", "solar_open", "phimoe", "minimax", "ernie4_5_moe",
           "deepseek_v2", "deepseek_v3"}
INTERLEAVED_ROPE = {"glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe", "cohere", "cohere2", "deepseek_v3"}
KEPT = {  # model_type -> the kinds its report leaves to HF (besides interleaved RoPE)
    "gemma2": {"packed_attention"}, "vaultgemma": {"packed_attention"},  # eager attention
    "mixtral": {"swiglu"}, "qwen3_moe": {"swiglu"}, "olmoe": {"swiglu"}, "granitemoe": {"swiglu"},  # experts only
    "minimax": {"swiglu"}, "phimoe": {"swiglu", "rms_norm"},  # and LayerNorms
    "cohere": {"rms_norm"}, "cohere2": {"rms_norm"}, "olmo": {"rms_norm"}, "stablelm": {"rms_norm"},  # LayerNorms
    "phi": {"rms_norm", "swiglu"}, "starcoder2": {"rms_norm", "swiglu"},  # and fc1/act/fc2 MLPs
    "arcee": {"swiglu"}, "apertus": {"swiglu"}, "bitnet": {"swiglu"},  # their MLPs
    "llama4_text": {"rope", "packed_attention"},  # complex RoPE, chunked attention
    "deepseek_v2": {"rope"},  # complex RoPE
    "gpt_oss": {"swiglu", "rope", "packed_attention"},  # clamped experts, half-width cos/sin, sinks (eager)
}
GEGLU = {"gemma", "gemma2", "gemma3_text", "vaultgemma"}  # their MLPs' GELU: reported as geglu
ROPE_LAYERS = {"qwen3_next": 1, "minimax": 1}  # hybrids: one attention layer of two


def expected_kinds(family):
    kinds = DENSE | ({"swiglu_experts"} if family in EXPERTS else set())
    kinds -= KEPT.get(family, set()) | ({"rope"} if family in INTERLEAVED_ROPE else set())
    return kinds - {"swiglu"} | {"geglu"} if family in GEGLU else kinds


def _model(family, dtype):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=dtype,
                                            attn_implementation=ATTENTION.get(family, "sdpa"))


def _batch(vocab, batch=2, seq=11):
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    return ids, labels


def _packed(vocab):
    """Two rows of three and two examples (position_ids restart at each); no label across a boundary."""
    ids, labels = _batch(vocab, seq=12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    labels[position_ids.roll(-1, dims=1) == 0] = -100
    return ids, labels, {"position_ids": position_ids, "use_cache": False}  # packed positions need no KV cache


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    torch.manual_seed(1)  # training-time sampling (PhiMoE's router) draws the same in the runs compared
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _counter(monkeypatch, name):
    """Counts the calls of lf.kernels.patch's ``name`` (a kernel the patched modules call)."""
    patch_module = importlib.import_module("lf.kernels.patch")
    calls, op = [], getattr(patch_module, name)
    monkeypatch.setattr(patch_module, name, lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


@pytest.fixture
def rope_calls(monkeypatch):
    return _counter(monkeypatch, "rope")


def test_every_family_is_tested():
    text_of_vl = {towers.text for towers in VISION_LANGUAGE.values()} - {None}
    assert set(FAMILIES) - text_of_vl == set(CONFIGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_patched_matches_unpatched(family, dtype, rope_calls, monkeypatch):
    """Packed rows (positions restarting inside a row): the loss and every parameter's gradient, and lf's RoPE
    and GLU ran where the report says they were patched."""
    glu_calls = _counter(monkeypatch, "swiglu")
    model = _model(family, dtype).train()
    reference = copy.deepcopy(model)
    ids, labels, kwargs = _packed(model.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels, **kwargs)
    report = patch(model)
    assert set(report.patched) == expected_kinds(family), str(report)
    assert set(KEPT.get(family, ())) <= set(report.skipped), str(report)  # each says why
    out, grads = _loss_and_grads(model, ids, labels, **kwargs)
    rope_layers = ROPE_LAYERS.get(family, SIZES["num_hidden_layers"]) if "rope" in report.patched else 0
    assert len(rope_calls) == rope_layers  # lf's RoPE ran in every attention module it was patched in
    # each dense MLP runs twice: in the forward pass and again in the backward pass, where the down projection's
    # gradient recomputes act(gate) * up instead of keeping it; experts' gates run on top
    dense = 2 * report.patched.get("swiglu", 0)
    assert len(glu_calls) > dense if "swiglu_experts" in report.patched else len(glu_calls) == dense
    assert out.logits is None  # training with labels: the logits never existed
    factor = 5.0  # many ops in a row, each rounding in its own order
    assert_close(out.loss, out_ref.loss, dtype, "loss", factor)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"grad {name}", factor)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_experts_implementations(implementation, monkeypatch):
    """The experts under each of transformers' implementations (the tests above run its default, grouped_mm): eager
    runs lf's loop, the others call the experts' gate, lf's in both; a shared expert beside them."""
    glu_calls = _counter(monkeypatch, "swiglu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"](), experts_implementation=implementation).train()
    reference = copy.deepcopy(model)
    ids, labels, kwargs = _packed(model.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels, **kwargs)
    assert patch(model).patched["swiglu_experts"] == SIZES["num_hidden_layers"]
    out, grads = _loss_and_grads(model, ids, labels, **kwargs)
    assert len(glu_calls) > SIZES["num_hidden_layers"]  # the shared experts' MLPs, then the experts
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], torch.float32, f"grad {name}", 5.0)
    unpatch(model)
    glu_calls.clear()
    _loss_and_grads(model, ids, labels, **kwargs)
    assert not glu_calls and not any("_apply_gate" in m.__dict__ for m in model.modules())


def test_eval_and_generation_keep_logits():
    model = _model("llama", torch.float32).eval()
    reference = copy.deepcopy(model)
    ids, labels = _batch(model.config.vocab_size)
    patch(model)
    with torch.no_grad():
        out, out_ref = model(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
        assert_close(out.logits, out_ref.logits, torch.float32, "logits", 5.0)
        assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
        tokens = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        unpatch(model)
        tokens_ref = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, tokens_ref)


def test_patch_twice_is_harmless_and_unpatch_restores():
    model = _model("qwen3", torch.float32).train()
    ids, labels = _batch(model.config.vocab_size)
    before = _loss_and_grads(model, ids, labels)[0].loss
    first, second = patch(model), patch(model)
    assert first.patched == second.patched
    assert model.config._attn_implementation == "lf_packed"
    assert first.patched["rms_norm"] == 2 * (2 + 2) + 1  # per layer two norms and the q/k norms; the final norm
    patched = _loss_and_grads(model, ids, labels)[0]
    assert patched.logits is None
    unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    restored = _loss_and_grads(model, ids, labels)[0]
    assert restored.logits is not None
    assert torch.equal(restored.loss, before)


def test_unsupported_family_patches_nothing_and_says_why():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    report = patch(model)
    assert report.patched == {}
    assert "model_type 'gpt2' is not a family lf patches" in report.skipped["rms_norm"]
    assert "gpt2" in str(report)


@pytest.mark.parametrize("setting", ["gradient_checkpointing", "packed", "autocast"])
def test_training_settings(setting):
    """Gradient checkpointing (each layer's forward runs again in backward), packed rows (position_ids
    restarting inside a row, so cos/sin differ per token) and bf16 autocast (q/k bf16, cos/sin fp32)."""
    model = _model("llama", torch.float32).train()
    if setting == "gradient_checkpointing":
        model.activation_checkpointing_enable({"use_reentrant": False})
    reference = copy.deepcopy(model)
    ids, labels = _batch(model.config.vocab_size, batch=1, seq=12)
    kwargs = {}
    if setting == "packed":  # three examples in one row
        kwargs["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
        kwargs["use_cache"] = False  # transformers reads packed position_ids only without a KV cache
        labels[0, [5, 8]] = -100  # no prediction across an example boundary
    dtype = torch.bfloat16 if setting == "autocast" else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"):
        out_ref, grads_ref = _loss_and_grads(reference, ids, labels, **kwargs)
        patch(model)
        out, grads = _loss_and_grads(model, ids, labels, **kwargs)
    assert_close(out.loss, out_ref.loss, dtype, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"grad {name}", 5.0)


def test_patched_model_compiles_in_one_graph():
    model = _model("llama", torch.float32).train()
    reference = copy.deepcopy(model)
    ids, labels = _batch(model.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels)
    patch(model)
    out, grads = _loss_and_grads(torch.compile(model, fullgraph=True), ids, labels)
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name.removeprefix("_orig_mod.")], torch.float32, f"grad {name}", 5.0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "granite", "olmo2", "granitemoeshared"])
def test_apply_to_patches_classes_before_models_exist(family):
    """For users who build models themselves: apply_to(model_type), then create the model."""
    reference = _model(family, torch.float32).train()
    ids, labels = _batch(reference.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels)
    report = apply_to(family)
    try:
        # the MLP's activation is read when it runs; attention is chosen per model
        assert set(report.patched) == DENSE - {"packed_attention"}, str(report)
        assert "lf_packed" in report.skipped["packed_attention"]
        model = _model(family, torch.float32).train()
        mlp = next(m for m in model.modules() if type(m).__name__.endswith("MLP"))
        act = next(getattr(mlp, n) for n in ("act_fn", "activation_fn", "activation") if hasattr(mlp, n))
        assert type(act).__name__ in importlib.import_module("lf.kernels.patch")._ACT_MODULES  # fused, not HF's
        model.load_state_dict(reference.state_dict())
        out, grads = _loss_and_grads(model, ids, labels)
    finally:
        unpatch(family)
    assert out.logits is None
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], torch.float32, f"grad {name}", 5.0)
    assert _loss_and_grads(_model(family, torch.float32).train(), ids, labels)[0].logits is not None  # restored


def test_peft_lora_model():
    """A PEFT LoRA model on every linear layer but the head: patched through the wrapper, the adapter's
    gradients match the unpatched model's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(_model("llama", torch.float32), lora).train()
    reference = copy.deepcopy(model)
    ids, labels = _batch(model.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels)
    report = patch(model)
    assert set(report.patched) == DENSE | {"lora_linear"}, str(report)
    assert report.patched["lora_linear"] == 7 * SIZES["num_hidden_layers"], str(report)
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.logits is None and grads.keys() == grads_ref.keys()
    assert all("lora_" in name for name in grads)  # only the adapters train
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], torch.float32, f"grad {name}", 5.0)


def test_hf_trainer_steps_match_unpatched(tmp_path):
    """Two optimizer steps of HF's Trainer, patched vs unpatched: the same losses (what `import lf.kernels`
    promises other trainers)."""
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, SIZES["vocab_size"], (8, 12))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    losses = []
    for patched in (False, True):
        model = _model("llama", torch.float32)
        if patched:
            patch(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                 seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-4)


def test_cross_entropy_switch_is_reported_not_silently_ignored():
    model = _model("llama", torch.float32)
    report = patch(model, fused_linear_cross_entropy=False, cross_entropy=True)
    assert "fused_linear_cross_entropy" not in report.patched
    assert "not available yet" in report.skipped["cross_entropy"]


def _qlora_llama(path, compute_dtype, **lora):
    """The tiny Llama saved and loaded back in 4 bits as users load it (NF4, double quantisation), with PEFT
    LoRA on every projection and LoRA B nonzero (PEFT starts it at zero, which would leave dA zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    # intermediate 128, not SIZES' 112: bitsandbytes' AVX-512 CPU kernel misreads 4-bit rows whose width is not a
    # multiple of its 64-value block (see test_lora_nf4_linear), which would fail PEFT's side, not lf's
    config = LlamaConfig(**{**SIZES, "intermediate_size": 128})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute_dtype,
                                                attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **lora)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p.data, std=0.05)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_layers_run_lora_nf4_linear(tmp_path, dtype, monkeypatch):
    """Every 4-bit LoRA projection (attention and MLP) is taken, runs lf's op, and gives PEFT's loss and adapter
    gradients; bf16 under autocast, as HF's Trainer runs it (PEFT's LoRA path is then bf16 too)."""
    lora_patch = importlib.import_module("lf.kernels.lora_patch")
    calls = []
    op = lora_patch.lora_nf4_linear
    monkeypatch.setattr(lora_patch, "lora_nf4_linear", lambda *a, **k: calls.append(1) or op(*a, **k))
    model = _qlora_llama(tmp_path, dtype, lora_dropout=0.0)
    ids, labels = _batch(model.config.vocab_size)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return _loss_and_grads(model, ids, labels)

    out_ref, grads_ref = run()
    report = patch(model)
    layers = 7 * SIZES["num_hidden_layers"]
    assert report.patched["lora_nf4_linear"] == layers and "lora_nf4_linear" not in report.skipped, str(report)
    out, grads = run()
    assert len(calls) == layers and grads.keys() == grads_ref.keys()
    assert all("lora_" in name for name in grads)
    assert_close(out.loss, out_ref.loss, dtype, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"grad {name}", 5.0)
    unpatch(model)
    calls.clear()
    run()
    assert not calls  # PEFT's own forward again


def test_qlora_layers_lf_cannot_take_are_reported(tmp_path):
    model = _qlora_llama(tmp_path, torch.float32, lora_dropout=0.1)
    report = patch(model)
    assert "lora_nf4_linear" not in report.patched
    why = report.skipped["lora_nf4_linear"]
    assert "14 of 14 4-bit LoRA layers" in why and "lora_dropout 0.1 > 0" in why and "set lora_dropout: 0" in why
    assert "lora_nf4_linear" in str(report)


# Vision-language models: tiny towers; the image is a 4 x 4 grid of patches, merged 2 x 2 into 4 image tokens
# (LLaVA: 2 x 2 patches of an 8 x 8 picture; LLaVA-NeXT: those, then its one 8 x 8 grid tile's with a newline per row).
IMAGE_TOKEN = 250
IMAGE_TOKENS = {"llava_next": 4 + 4 + 2}
QWEN_VL_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)


def _vl_text(mrope_section, **extra):
    return dict(**SIZES, **extra, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": mrope_section})


VL_CONFIGS = {  # head_dim 16: 8 frequencies, split as Qwen2-VL's [16, 24, 24] and Qwen3-VL's [24, 20, 20] split 64
    "qwen2_vl": lambda: Qwen2VLConfig(text_config=_vl_text([2, 3, 3]), **QWEN_VL_TOKENS, vision_config=dict(
        depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, mlp_ratio=2)),
    "qwen2_5_vl": lambda: Qwen2_5_VLConfig(text_config=_vl_text([2, 3, 3]), **QWEN_VL_TOKENS, vision_config=dict(
        depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=2, window_size=8,
        fullatt_block_indexes=[1])),
    "qwen3_vl": lambda: Qwen3VLConfig(text_config=_vl_text([4, 2, 2], head_dim=16), **QWEN_VL_TOKENS, vision_config=dict(
        depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=2,
        num_position_embeddings=16, deepstack_visual_indexes=[0])),
    # Qwen2.5-Omni's thinker: Qwen2.5-VL's vision tower beside an audio tower (idle here)
    "qwen2_5_omni_thinker": lambda: Qwen2_5OmniThinkerConfig(
        text_config=_vl_text([2, 3, 3]), image_token_index=IMAGE_TOKEN, video_token_index=251,
        vision_start_token_id=252, vision_end_token_id=253, audio_token_index=254, audio_start_token_id=255,
        audio_end_token_id=256, vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48,
                                                   num_heads=2, patch_size=2, window_size=8, fullatt_block_indexes=[1]),
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=48, output_dim=64)),
    "llava": lambda: LlavaConfig(text_config=LlamaConfig(**SIZES), image_token_id=IMAGE_TOKEN, vision_config=_clip()),
    "llava_next": lambda: LlavaNextConfig(text_config=LlamaConfig(**SIZES), image_token_id=IMAGE_TOKEN,
                                          vision_config=_clip(), image_grid_pinpoints=[[8, 8]]),
    # SigLIP's 2 x 2 patches of an 8 x 8 picture, pooled to 4 soft tokens
    "gemma3": lambda: Gemma3Config(
        text_config=CONFIGS["gemma3_text"](), image_token_index=IMAGE_TOKEN, boi_token_index=251, eoi_token_index=252,
        mm_tokens_per_image=4, vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=48,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                image_size=8, patch_size=4)),
    # InternViT's 4 x 4 patches of an 8 x 8 picture, pixel-shuffled to 4 tokens
    "internvl": lambda: InternVLConfig(
        text_config=Qwen2Config(**SIZES), image_token_id=IMAGE_TOKEN, downsample_ratio=0.5,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[8, 8], patch_size=[2, 2])),
}


def _clip():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                            image_size=8, patch_size=4)


def _vl_model(family, dtype):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(VL_CONFIGS[family](), dtype=dtype, attn_implementation="sdpa")


def _vl_batch(family, dtype, image):
    """Two rows of 16 tokens; with ``image``, tokens from the third on of each row are one image's tokens and the
    pixels come as the family's processor gives them (Qwen-VL: flattened patches and their grid; LLaVA: the
    picture; LLaVA-NeXT: the picture and its grid tile, and its size; Gemma 3: the picture and the image tokens'
    mask)."""
    ids, labels = _batch(SIZES["vocab_size"] - 10, seq=16)
    if not image:
        return ids, labels, {}
    ids[:, 2:2 + IMAGE_TOKENS.get(family, 4)] = IMAGE_TOKEN
    labels[ids == IMAGE_TOKEN] = -100
    if family in ("llava", "internvl"):
        return ids, labels, {"pixel_values": torch.randn(2, 3, 8, 8, dtype=dtype)}
    if family == "gemma3":  # its forward attends within an image's tokens both ways, as token_type_ids mark them
        return ids, labels, {"pixel_values": torch.randn(2, 3, 8, 8, dtype=dtype),
                             "token_type_ids": (ids == IMAGE_TOKEN).long()}
    if family == "llava_next":
        return ids, labels, {"pixel_values": torch.randn(2, 2, 3, 8, 8, dtype=dtype),
                             "image_sizes": torch.tensor([[8, 8]] * 2)}
    # 16 patches per image of channels x temporal patch (2) x 2 x 2 pixels; the grid (t, h, w) in patches
    pixels = {"pixel_values": torch.randn(2 * 16, 3 * 2 * 2 * 2, dtype=dtype),
              "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)}
    if family == "qwen2_5_omni_thinker":  # its get_rope_index finds an image by the vision start token before it
        ids[:, 1], ids[:, 6] = 252, 253
        return ids, labels, {**pixels, "attention_mask": torch.ones_like(ids)}
    return ids, labels, {**pixels, "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}


# the classes of lf's kinds in the tower
VISION_PATCHED = {"qwen2_5_vl": {"Qwen2_5_VLRMSNorm", "Qwen2_5_VLMLP"},
                  "qwen2_5_omni_thinker": {"Qwen2_5OmniRMSNorm", "Qwen2_5OmniMLP"}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen2_5_vl_vision_tower_runs_lfs_norms_and_mlps_as_hf(dtype, monkeypatch):
    """Qwen2.5-VL's vision blocks are Llama-style (RMSNorm computed in fp32, gated SiLU MLP with biases): lf's
    rms_norm and swiglu kernels patched there give the tower's own outputs and gradients (pixels and weights), and
    the report counts them; swiglu=False leaves the MLPs to HF and says so."""
    patch_module = importlib.import_module("lf.kernels.patch")
    model = _vl_model("qwen2_5_vl", dtype).train()
    reference = copy.deepcopy(model)
    _, _, media = _vl_batch("qwen2_5_vl", dtype, image=True)
    grad_out = torch.randn(8, 64, dtype=dtype)  # 2 images x 4 merged tokens, out_hidden_size 64

    def run(net):
        net.zero_grad()
        pixels = media["pixel_values"].clone().requires_grad_()
        out = net.model.visual(pixels, grid_thw=media["image_grid_thw"]).pooler_output
        out.backward(grad_out)
        grads = {n: p.grad.clone() for n, p in net.model.visual.named_parameters()}
        return out, pixels.grad, grads

    out_ref, pixels_ref, grads_ref = run(reference)
    calls = []
    for name in ("rms_norm", "swiglu"):
        op = getattr(patch_module, name)
        monkeypatch.setattr(patch_module, name, lambda *a, _op=op, _name=name, **k: calls.append(_name) or _op(*a, **k))
    report = patch(model)
    blocks = len(model.model.visual.blocks)
    assert report.towers["vision tower"].startswith(f"model.visual: rms_norm ({2 * blocks + 1}), swiglu ({blocks}); "
                                                    f"the rest keeps HF's modules: "), str(report)
    out, pixels_grad, grads = run(model)
    # swiglu twice a block: again in the backward pass, where down_proj's gradient recomputes act(gate) * up
    assert calls.count("swiglu") == 2 * blocks and calls.count("rms_norm") >= 2 * blocks + 1  # + the language model's
    assert_close(out, out_ref, dtype, "vision output", 5.0)
    assert_close(pixels_grad, pixels_ref, dtype, "grad pixel_values", 5.0)
    assert grads.keys() == grads_ref.keys() and any(".mlp.gate_proj.bias" in n for n in grads)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"grad {name}", 5.0)
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    report = patch(model, swiglu=False)
    assert report.towers["vision tower"].startswith(f"model.visual: rms_norm ({2 * blocks + 1}); "), str(report)
    assert not any("forward" in m.__dict__ for m in model.model.visual.modules() if type(m).__name__.endswith("MLP"))


def test_qwen2_5_vl_apply_to_patches_the_vision_towers_classes_too():
    """apply_to("qwen2_5_vl"): the vision blocks' MLP class runs lf's swiglu as well (their RMSNorm is the language
    model's class), the loss and gradients stay HF's, and unpatch gives HF's classes back."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    reference = _vl_model("qwen2_5_vl", torch.float32).train()
    ids, labels, media = _vl_batch("qwen2_5_vl", torch.float32, image=True)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels, **media)
    hf_mlp = hf.Qwen2_5_VLMLP.forward
    report = apply_to("qwen2_5_vl")
    try:
        assert report.towers["vision tower"].startswith("model.visual: rms_norm (1), swiglu (1); "), str(report)
        assert hf.Qwen2_5_VLMLP.forward is not hf_mlp
        model = _vl_model("qwen2_5_vl", torch.float32).train()
        model.load_state_dict(reference.state_dict())
        out, grads = _loss_and_grads(model, ids, labels, **media)
    finally:
        unpatch("qwen2_5_vl")
    assert hf.Qwen2_5_VLMLP.forward is hf_mlp
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    assert any(name.startswith("model.visual") for name in grads)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], torch.float32, f"grad {name}", 5.0)


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(VL_CONFIGS))
def test_vision_language_patched_matches_unpatched(family, dtype, image, rope_calls):
    """The language model runs lf's kernels (with Qwen-VL's multimodal RoPE: 3-D positions the model computes from
    the image's grid), the vision tower HF's modules but where a kernel fits exactly (Qwen2.5-VL's RMSNorms and
    MLPs); loss and every gradient, vision tower's included, match."""
    model = _vl_model(family, dtype).train()
    reference = copy.deepcopy(model)
    ids, labels, media = _vl_batch(family, dtype, image)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels, **media)
    report = patch(model)
    text = VL_CONFIGS[family]().text_config.model_type
    assert set(report.patched) == expected_kinds(text), str(report)
    assert f"patched as {text!r}" in report.towers["language model"], str(report)
    assert "keeps HF's modules" in report.towers["vision tower"], str(report)
    vision = model.model.visual if family.startswith("qwen") else model.model.vision_tower
    lf_modules = {type(m).__name__ for m in vision.modules() if "forward" in m.__dict__}
    assert lf_modules == VISION_PATCHED.get(family, set())  # lf's kernels in the vision tower only where they fit
    assert vision.config._attn_implementation == "sdpa"  # lf's packed attention is the language model's only
    out, grads = _loss_and_grads(model, ids, labels, **media)
    assert len(rope_calls) == SIZES["num_hidden_layers"]
    if image and family.startswith("qwen"):  # the image's tokens got 3-D positions: their streams differ from text's
        assert model.model.rope_deltas.ne(0).all()
    assert out.logits is None
    assert_close(out.loss, out_ref.loss, dtype, "loss", 5.0)
    assert grads.keys() == grads_ref.keys()
    assert image == any(name.startswith(("model.visual", "model.vision_tower")) for name in grads)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"grad {name}", 5.0)
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_vision_language_apply_to_and_unpatch():
    """apply_to("qwen2_vl") patches the language model's classes and the VL model's head; LLaVA's language model
    family is its config's, so apply_to("llava") says which to name instead."""
    reference = _vl_model("qwen2_vl", torch.float32).train()
    ids, labels, media = _vl_batch("qwen2_vl", torch.float32, image=True)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels, **media)
    report = apply_to("qwen2_vl")
    try:
        assert set(report.patched) == DENSE - {"packed_attention"}, str(report)
        model = _vl_model("qwen2_vl", torch.float32).train()
        model.load_state_dict(reference.state_dict())
        out, grads = _loss_and_grads(model, ids, labels, **media)
    finally:
        unpatch("qwen2_vl")
    assert out.logits is None
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], torch.float32, f"grad {name}", 5.0)
    assert _loss_and_grads(model, ids, labels, **media)[0].logits is not None  # HF's classes again
    report = apply_to("llava")
    assert report.patched == {} and "apply_to that one (e.g. 'llama')" in report.skipped["rms_norm"], str(report)


def test_vision_language_positional_arguments_keep_their_meaning():
    """LLaVA's forward takes pixel_values second: the patched forward names positional arguments as HF does."""
    model = _vl_model("llava", torch.float32).train()
    ids, labels, media = _vl_batch("llava", torch.float32, image=True)
    expected = model(input_ids=ids, pixel_values=media["pixel_values"], labels=labels).loss
    patch(model)
    assert_close(model(ids, media["pixel_values"], labels=labels).loss, expected, torch.float32, "loss", 5.0)
    text = _model("llama", torch.float32).train()  # a text model's second is attention_mask
    mask = torch.ones_like(ids)
    expected = text(input_ids=ids, attention_mask=mask, labels=labels).loss
    patch(text)
    assert_close(text(ids, mask, labels=labels).loss, expected, torch.float32, "loss", 5.0)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_mlp_product_is_recomputed_not_kept(checkpointed, monkeypatch):
    """act(gate) * up is not kept for the backward pass (gate and up are, by the product's own backward): the
    down projection's LoRA gradient recomputes it, and every gradient still matches the unpatched model's. Under
    gradient checkpointing the layer's own recomputation is left as it is."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model

    patch_module = importlib.import_module("lf.kernels.patch")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(_model("llama", torch.float32), lora).train()
    if checkpointed:
        model.activation_checkpointing_enable({"use_reentrant": False})
    reference = copy.deepcopy(model)
    ids, labels = _batch(model.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, ids, labels)
    patch(model)
    products, act = [], patch_module._act
    monkeypatch.setattr(patch_module, "_act", lambda *a: products.append(weakref.ref(r := act(*a))) or r)
    out = model(input_ids=ids, labels=labels)
    gc.collect()
    layers = SIZES["num_hidden_layers"]
    assert len(products) == layers
    if not checkpointed:  # nothing holds a product once the forward pass is over
        assert all(ref() is None for ref in products)
    out.loss.backward()
    assert len(products) == 2 * layers  # each once more in the backward pass (checkpointing: its rerun forward)
    assert_close(out.loss, out_ref.loss, torch.float32, "loss", 5.0)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(p.grad, grads_ref[name], torch.float32, f"grad {name}", 5.0)
