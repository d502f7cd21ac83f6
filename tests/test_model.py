"""lf.model: tokenizer and model loading from local directories (tiny Llama/Qwen2 saved here, no hub), the
quickstart model, dtype/attention/RoPE choices, QLoRA on the CPU, lf's kernels, and full/freeze/LoRA training."""

import logging
import os

import pytest
import torch

from lf import device
from lf.config.finetuning import FinetuningArguments
from lf.config.model import ModelArguments
from lf.errors import ModelError
from lf.kernels import unpatch
from lf.model import load_model, load_tokenizer
from lf.model import options
from lf.tiny import CHATML_TOKENS, train_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. A model learns to predict the next token.",
          "Hello! How can I help you today? Fine-tuning adapts a model to new data."] * 10
LAYERS = 4


def _save_model(path, tokenizer, family: str, vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                  max_position_embeddings=256, tie_word_embeddings=False,
                                  pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300, extra_special_tokens=CHATML_TOKENS)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    return _save_model(tmp_path_factory.mktemp("llama"), tokenizer, "llama", len(tokenizer))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tokenizer):
    # transformers gives a qwen2 directory Qwen2's tokenizer class, which adds <|endoftext|>: room for it
    return _save_model(tmp_path_factory.mktemp("qwen2"), tokenizer, "qwen2", 320)


@pytest.fixture(autouse=True)
def restore_kernels():
    """lf's RoPE patch is module-wide: undo it so later tests see transformers' own code."""
    yield
    for family in ("llama", "qwen2"):
        unpatch(family)


def _load(path, *, is_trainable=True, cutoff_len=None, tokenizer=None, tokens_per_step=None, **kwargs):
    # float32 unless a test says otherwise: "auto" is bf16 on CPUs with AVX512-BF16/AMX, and these tests compare
    # runs to fp32 rounding
    kwargs.setdefault("infer_dtype", "float32")
    fields = ModelArguments.__dataclass_fields__
    model_args = ModelArguments(model_name_or_path=path, **{k: v for k, v in kwargs.items() if k in fields})
    finetuning_args = FinetuningArguments(**{k: v for k, v in kwargs.items() if k not in fields})
    tokenizer = tokenizer or load_tokenizer(model_args)
    return load_model(tokenizer, model_args, finetuning_args, is_trainable=is_trainable, cutoff_len=cutoff_len,
                      tokens_per_step=tokens_per_step)


def _batch(vocab=250, rows=2, length=24):
    ids = torch.randint(3, vocab, (rows, length))
    return {"input_ids": ids, "labels": ids}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- tokenizer and paths ----

def test_tokenizer_loads_with_added_tokens(llama, caplog):
    caplog.set_level(logging.INFO, logger="lf")
    base = load_tokenizer(ModelArguments(model_name_or_path=llama))
    tok = load_tokenizer(ModelArguments(model_name_or_path=llama, add_tokens="zebra_word, quokka",
                                        add_special_tokens="<|tool|>", new_special_tokens="<|obs|>"))
    assert len(tok) == len(base) + 4
    for word in ("zebra_word", "<|tool|>", "<|obs|>", "<|im_end|>"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert "<|tool|>" in tok.decode(tok("a <|tool|>")["input_ids"])
    assert "<|tool|>" not in tok.decode(tok("a <|tool|>")["input_ids"], skip_special_tokens=True)
    assert "added 2 of the tokens zebra_word, quokka" in caplog.text
    split = load_tokenizer(ModelArguments(model_name_or_path=llama, split_special_tokens=True))
    assert len(split("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1


def test_missing_local_path_is_named(tmp_path):
    missing = str(tmp_path / "no" / "model")
    with pytest.raises(ModelError, match=f"{missing}: no such directory"):
        load_tokenizer(ModelArguments(model_name_or_path=missing))
    with pytest.raises(ModelError, match="model_name_or_path is not set"):
        load_tokenizer(ModelArguments())


def test_hub_id_offline_says_download_first(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="must be downloaded first.*hf download lf-test/absent-model"):
        load_tokenizer(ModelArguments(model_name_or_path="lf-test/absent-model"))


def test_local_dir_without_model_files(tmp_path):
    with pytest.raises(ModelError, match=f"{tmp_path} cannot be loaded"):
        _load(str(tmp_path), tokenizer=object())


# ---- the quickstart model ----

def test_tiny_model_is_built_atomically_once_and_loads(tmp_path, monkeypatch):
    import lf.tiny

    monkeypatch.setenv("LF_HOME", str(tmp_path))
    path = lf.tiny.tiny_path("lf-tiny-llama")
    assert path == tmp_path / "tiny" / "lf-tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert os.listdir(path.parent) == ["lf-tiny-llama"]  # no temporary directory left beside it

    monkeypatch.setattr(lf.tiny, "build_tiny", lambda *a: pytest.fail("rebuilt a cached tiny model"))
    assert lf.tiny.tiny_path("lf-tiny-llama") == path
    tok = load_tokenizer(ModelArguments(model_name_or_path="lf-tiny-llama"))
    for marker in CHATML_TOKENS:
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    model, lines = load_model(tok, ModelArguments(model_name_or_path="lf-tiny-llama"), FinetuningArguments(),
                              is_trainable=True)
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 4
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert lines[0].startswith(f"loaded lf-tiny-llama (llama, LlamaForCausalLM) from {path}")


def test_tiny_build_crash_leaves_nothing(tmp_path, monkeypatch):
    import lf.tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("stopped after the weights were written")

    def crashing_tokenizer(*args, **kwargs):
        tok = train_tokenizer(*args, **kwargs)
        tok.save_pretrained = interrupted
        return tok

    monkeypatch.setattr(lf.tiny, "train_tokenizer", crashing_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        lf.tiny.build_tiny("lf-tiny-llama", tmp_path / "dest")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ModelError, match="Did you mean: lf-tiny-llama"):
        lf.tiny.tiny_path("lf-tiny-lama")


def test_tiny_corpus_without_the_data_folder(tmp_path, monkeypatch):
    import lf.tiny

    assert len(lf.tiny._corpus()) > 100  # the repository's demo data
    monkeypatch.setattr(lf.tiny, "DATA_DIR", tmp_path)
    assert lf.tiny._corpus() == [lf.tiny.ROLE_TEXT, lf.tiny.FALLBACK_TEXT]


# ---- dtype, attention, RoPE ----

def test_dtype_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert options.choose_dtype("auto")[0] == torch.float32
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert options.choose_dtype("auto")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert options.choose_dtype("auto") == (torch.float16, "dtype float16 (infer_dtype auto: the cuda device has no bf16)")
    assert options.choose_dtype("bfloat16")[0] == torch.bfloat16
    with pytest.raises(ModelError, match="infer_dtype: 'fp8' is not one of auto, float32"):
        options.choose_dtype("fp8")


def test_dtype_auto_on_this_machine_and_explicit(llama):
    model, lines = _load(llama, infer_dtype="auto")
    if not torch.cuda.is_available():  # bf16 where the CPU has AVX512-BF16/AMX
        expected = torch.bfloat16 if device.cpu_has_bf16() else torch.float32
        assert model.dtype == expected and f"dtype {str(expected)[6:]} (infer_dtype auto: no GPU" in lines[1]
    model, lines = _load(llama, infer_dtype="bfloat16", finetuning_type="full")
    assert model.dtype == torch.bfloat16 and "dtype bfloat16 (infer_dtype: bfloat16)" in lines


def test_attention_choice(llama, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lf")
    model, lines = _load(llama, flash_attn="disabled")
    assert model.config._attn_implementation == "eager" and "attention: eager (flash_attn: disabled)" in lines
    assert "not packed_attention: attention is 'eager'" in caplog.text
    model, lines = _load(llama, flash_attn="sdpa")
    assert model.config._attn_implementation == "lf_packed"  # SDPA, taken over by lf's packed attention
    monkeypatch.setattr(options.importlib.util, "find_spec", lambda name: None)
    assert options.choose_attention("auto", torch.bfloat16)[0] == "sdpa"
    with pytest.raises(ModelError, match="pip install flash-attn"):
        options.choose_attention("fa2", torch.bfloat16)
    with pytest.raises(ModelError, match="flash_attn: 'fast' is not one of auto, disabled, sdpa, fa2"):
        options.choose_attention("fast", torch.float32)


@pytest.mark.parametrize("rope_type", options.ROPE_TYPES)
def test_rope_scaling_from_cutoff_len(llama, rope_type):
    model, lines = _load(llama, rope_scaling=rope_type, cutoff_len=600)
    params = model.config.rope_parameters
    assert params["rope_type"] == rope_type and params["factor"] == 3.0  # 600 / 256 rounded up
    assert f"rope_scaling {rope_type}, factor 3 (cutoff_len 600 / 256, rounded up)" in " ".join(lines)
    assert model.config.max_position_embeddings == (256 if rope_type == "dynamic" else 768)
    batch = _batch(length=300)
    assert torch.isfinite(model(**batch).loss)


def test_rope_scaling_factor_without_cutoff_len_or_when_it_fits(llama):
    model, lines = _load(llama, rope_scaling="linear", cutoff_len=200)
    assert model.config.rope_parameters["rope_type"] == "default"
    assert "rope_scaling linear not applied: cutoff_len 200 fits" in " ".join(lines)
    model, _ = _load(llama, rope_scaling="linear", is_trainable=False)
    assert model.config.rope_parameters["factor"] == options.DEFAULT_ROPE_FACTOR
    config = model.config  # already scaled: inference keeps it rather than stretching it twice
    assert "kept the model config's own RoPE scaling (linear, factor 2)" in options.apply_rope_scaling(
        config, "yarn", None)
    assert config.max_position_embeddings == 512 and config.rope_parameters["rope_type"] == "linear"
    with pytest.raises(ModelError, match="rope_scaling: 'ntk' is not one of linear, dynamic, yarn, llama3"):
        _load(llama, rope_scaling="ntk")


# ---- training setup and kernels ----

def test_training_setup_and_inference(llama):
    model, lines = _load(llama)
    assert model.is_activation_checkpointing and model.config.use_cache is False and model.training
    assert "gradient checkpointing on (use_reentrant=True)" in lines
    model, lines = _load(llama, disable_gradient_checkpointing=True)
    assert not model.is_activation_checkpointing and "gradient checkpointing off" in " ".join(lines)
    model, lines = _load(llama, is_trainable=False)
    assert not model.training and model.config.use_cache is True and not _trainable(model)
    assert lines[-1].startswith("trainable parameters: 0 of ")


def test_cpu_training_leaves_checkpointing_off_where_the_activations_fit(llama, monkeypatch):
    from lf import allocator

    # the tiny model: LAYERS layers of hidden 64, intermediate 128, fp32: bytes its activations take a token
    per_token = (6 * 64 + 3 * 128) * LAYERS * 4
    monkeypatch.setattr(allocator, "available_bytes", lambda: 10 * per_token * 1000)
    model, lines = _load(llama, tokens_per_step=1000)  # exactly a tenth of the available memory: off
    said = " ".join(lines)
    assert not model.is_activation_checkpointing
    assert f"the ~{per_token * 1000 / 2**20:,.0f} MiB of activations it would save for 1000 tokens" in said
    assert "disable_gradient_checkpointing: false turns it on" in said
    for kwargs in ({"tokens_per_step": 1001},  # more than a tenth
                   {"tokens_per_step": 1000, "disable_gradient_checkpointing": False},  # asked for
                   {"tokens_per_step": 1000, "gradient_checkpointing_every": 2},  # asked for in some layers
                   {}):  # no step size known (inference, other callers): LLaMA-Factory's default
        model, lines = _load(llama, **kwargs)
        assert model.is_activation_checkpointing, kwargs
    monkeypatch.setattr(device, "current", lambda: device.Accelerator("cuda", 1, True, "nccl"))  # a GPU keeps it on
    assert _load(llama, tokens_per_step=10)[0].is_activation_checkpointing


def test_gradient_checkpointing_every_k_layers_trains_the_same(llama):
    """One decoder layer in k keeps checkpointing: the others save their activations; losses and gradients are
    those of checkpointing everywhere."""
    grads = {}
    for every in (1, 2, 3):
        torch.manual_seed(0)
        model, lines = _load(llama, gradient_checkpointing_every=every)
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [i % every == 0 for i in range(LAYERS)]
        said = " ".join(lines)
        if every == 1:
            assert "gradient checkpointing on (use_reentrant=True)" in lines
        else:
            kept = len(range(0, LAYERS, every))
            assert f"in {kept} of {LAYERS} decoder layers (gradient_checkpointing_every: {every})" in said
        with torch.random.fork_rng():
            torch.manual_seed(1)
            batch = _batch()
        for p in model.parameters():  # LoRA's B starts at zero: give the adapters something to pass on
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
        model(**batch).loss.backward()
        grads[every] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for every in (2, 3):
        assert grads[every].keys() == grads[1].keys()
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[every][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_kernels_patched_by_default_and_off_on_request(llama, caplog):
    caplog.set_level(logging.INFO, logger="lf")
    model, lines = _load(llama)
    assert "lf kernels in llama: rms_norm (9), swiglu (4), rope (1)" in caplog.text  # patch's own report
    norm = model.get_base_model().model.norm
    assert "forward" in norm.__dict__  # lf's rms_norm bound on the instance
    loss = model(**_batch()).loss  # fused_linear_cross_entropy through the LoRA wrapper
    assert torch.isfinite(loss)

    model, lines = _load(llama, use_lf_kernels=False)
    assert "lf kernels off (use_lf_kernels: false): the model runs transformers' own code" in lines
    assert "forward" not in model.get_base_model().model.norm.__dict__

    caplog.clear()
    model, lines = _load(llama, use_lf_kernels=False, enable_liger_kernel=True)
    assert "enable_liger_kernel: lf's own fused kernels take Liger's place" in lines
    assert "lf kernels in llama" in caplog.text


def test_upcasts(llama):
    model, lines = _load(llama, infer_dtype="bfloat16", upcast_layernorm=True, upcast_lmhead_output=True)
    base = model.get_base_model()
    assert base.model.norm.weight.dtype == torch.float32 and base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "rms_norm left to transformers: upcast_layernorm keeps float32 norms" in " ".join(lines)
    base.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 norms in a bf16 model need mixed precision
        assert base(input_ids=_batch()["input_ids"]).logits.dtype == torch.float32


# ---- full, freeze ----

def test_full_trains_everything_fp16_in_fp32(llama):
    model, lines = _load(llama, finetuning_type="full", infer_dtype="float16")
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "trainable float16 weights upcast to float32" in " ".join(lines)
    model, _ = _load(llama, finetuning_type="full", infer_dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # pure bf16, as the Trainer expects


def test_freeze_layer_and_module_selection(llama):
    model, lines = _load(llama, finetuning_type="freeze", freeze_trainable_layers=2)
    layers = {n.split(".")[2] for n in _trainable(model)}
    assert layers == {"2", "3"} and "freeze: the last 2 decoder layers (all) train" in lines
    model(**_batch()).loss.backward()  # reentrant checkpointing behind frozen layers still reaches layer 2
    assert model.model.layers[2].mlp.up_proj.weight.grad.abs().sum() > 0
    model, _ = _load(llama, finetuning_type="freeze", freeze_trainable_layers=-1, freeze_trainable_modules="mlp,q_proj",
                     freeze_extra_modules="embed_tokens")
    trainable = _trainable(model)
    assert "model.embed_tokens.weight" in trainable
    layer_params = trainable - {"model.embed_tokens.weight"}
    assert {n.split(".")[2] for n in layer_params} == {"0"}
    assert all(".mlp." in n or ".q_proj." in n for n in layer_params) and len(layer_params) == 4


def test_freeze_errors(llama):
    with pytest.raises(ModelError, match=r"no module named attn in a decoder layer; the names there are: "
                                         r"act_fn, down_proj, .*mlp, .*self_attn"):
        _load(llama, finetuning_type="freeze", freeze_trainable_modules="attn")
    with pytest.raises(ModelError, match="freeze_extra_modules: no module named embed in the model outside "
                                         "its decoder layers; the names there are: embed_tokens, lm_head, norm"):
        _load(llama, finetuning_type="freeze", freeze_extra_modules="embed")
    with pytest.raises(ModelError, match=f"freeze_trainable_layers: 9, but the model has {LAYERS} decoder layers"):
        _load(llama, finetuning_type="freeze", freeze_trainable_layers=9)
    with pytest.raises(ModelError, match="finetuning_type: 'partial' is not one of full, freeze, lora"):
        _load(llama, finetuning_type="partial")


# ---- LoRA ----

def test_lora_targets(llama, qwen2):
    from peft import PeftModel

    for path in (llama, qwen2):
        model, lines = _load(path, lora_rank=4)
        assert isinstance(model, PeftModel)
        assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"}
        assert all("lora_" in n for n in _trainable(model)) and "lm_head" not in " ".join(_trainable(model))
        assert model.peft_config["default"].lora_alpha == 8
    model, lines = _load(llama, lora_target="q_proj, v_proj", use_rslora=True, use_dora=True,
                         additional_target="norm")
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.use_rslora and config.use_dora
    assert config.modules_to_save == ["norm"]
    assert "LoRA rsLoRA DoRA r=8 alpha=16 dropout=0 on q_proj, v_proj; fully trained beside it: norm" in lines
    with pytest.raises(ModelError, match="lora_target: no linear layer named qproj; the model's linear layers are: "
                                         "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        _load(llama, lora_target="qproj")


def test_bf16_model_with_lora_trains(llama):
    model, _ = _load(llama, infer_dtype="bfloat16", lora_target="all")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in _trainable(model))
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _perturbed_adapter(model, path):
    """Saves the LoRA adapter of `model` with non-zero B matrices (a fresh one computes nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(path)


def test_adapter_continue_merge_and_create_new(llama, tmp_path):
    from peft import PeftModel

    first, second = str(tmp_path / "a1"), str(tmp_path / "a2")
    model, _ = _load(llama, use_lf_kernels=False)
    _perturbed_adapter(model, first)
    ids = _batch()["input_ids"]
    model.eval()
    expected = model(input_ids=ids).logits

    model, lines = _load(llama, adapter_name_or_path=first)  # continue training it
    assert isinstance(model, PeftModel) and _trainable(model) and all("lora_" in n for n in _trainable(model))
    assert f"adapter {first} loaded to train further (its own LoRA settings apply)" in lines
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    _perturbed_adapter(model, second)  # a second adapter: merging both adds both deltas to the weights

    model, lines = _load(llama, adapter_name_or_path=f"{first},{second}", is_trainable=False)
    assert not isinstance(model, PeftModel) and f"merged adapter(s) into the weights: {first}, {second}" in lines
    merged = model(input_ids=ids).logits

    model, lines = _load(llama, adapter_name_or_path=f"{first},{second}", create_new_adapter=True)
    assert isinstance(model, PeftModel) and any(line.startswith("LoRA r=8") for line in lines)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, expected)
    model, lines = _load(llama, adapter_name_or_path=f"{first},{second}")
    assert f"merged adapter(s) into the weights: {first}" in lines
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-4)

    with pytest.raises(ModelError, match="has no adapter_config.json"):
        _load(llama, adapter_name_or_path=str(tmp_path))
    with pytest.raises(ModelError, match=r"needs finetuning_type: lora \(or oft\), not full"):
        _load(llama, adapter_name_or_path=first, finetuning_type="full")


def test_adapter_folder_loads_the_subfolder_of_each_adapter(llama, tmp_path):
    """adapter_folder (LLaMA-Factory's subfolder of every adapter): an lf chat config naming the adapters' parent
    folders and adapter_folder loads what naming the subfolders does."""
    from lf.config import parse_infer_args

    model, _ = _load(llama, use_lf_kernels=False)
    for name in ("a1", "a2"):
        _perturbed_adapter(model, tmp_path / name / "run" / "checkpoint-2")
    ids = _batch()["input_ids"]
    cfg = parse_infer_args({"model_name_or_path": llama, "adapter_name_or_path": f"{tmp_path / 'a1'},{tmp_path / 'a2'}",
                            "adapter_folder": "run/checkpoint-2", "template": "qwen", "infer_dtype": "float32"},
                           "chat")
    loaded, lines = load_model(load_tokenizer(cfg.model), cfg.model, cfg.finetuning, is_trainable=False)
    named, _ = _load(llama, is_trainable=False, adapter_name_or_path=",".join(
        str(tmp_path / name / "run" / "checkpoint-2") for name in ("a1", "a2")))
    base, _ = _load(llama, is_trainable=False)
    assert any(line.startswith("merged adapter(s) into the weights") for line in lines)
    torch.testing.assert_close(loaded(input_ids=ids).logits, named(input_ids=ids).logits)
    assert not torch.allclose(loaded(input_ids=ids).logits, base(input_ids=ids).logits)


def test_offload_folder_runs_a_model_larger_than_free_memory_from_disk(llama, tmp_path, monkeypatch):
    """offload_folder (lf chat, api, webchat, eval): with free memory (faked here) below the model's size, what
    does not fit stays on disk and is read around each forward; the logits and the greedy answer are the
    in-memory model's."""
    import transformers.integrations.accelerate as hf_accelerate

    from lf.config import parse_infer_args, parse_train_args
    from lf.errors import ConfigError
    from lf.model import load_inference_model

    config = {"model_name_or_path": llama, "template": "qwen", "infer_dtype": "float32",
              "offload_folder": str(tmp_path / "offload")}
    cfg = parse_infer_args(config, "chat")
    in_memory, _ = _load(llama, is_trainable=False)
    size = sum(p.numel() * p.element_size() for p in in_memory.parameters())
    monkeypatch.setattr(hf_accelerate, "get_max_memory", lambda max_memory=None: {"cpu": size // 3})
    model = load_inference_model(load_tokenizer(cfg.model), cfg.model, cfg.finetuning)
    assert "disk" in model.hf_device_map.values()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, in_memory(input_ids=ids).logits)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False),
                       in_memory.generate(ids[:1], max_new_tokens=5, do_sample=False))

    with pytest.raises(ConfigError, match="offload_folder: .* asks for weights beyond free memory offloaded to disk, "
                                          "which lf chat, api, webchat, eval do and lf train does not"):
        parse_train_args({**config, "dataset": "demo", "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="lf export does not"):
        parse_infer_args({**config, "export_dir": str(tmp_path / "export")}, "export")
    adapted = parse_infer_args({**config, "adapter_name_or_path": str(tmp_path)}, "chat")
    with pytest.raises(ModelError, match="offload_folder and adapter_name_or_path together"):
        load_inference_model(load_tokenizer(adapted.model), adapted.model, adapted.finetuning)


# ---- QLoRA ----

@pytest.mark.parametrize("bits,quant_type", [(4, "nf4"), (4, "fp4"), (8, "nf4")])
def test_qlora_on_cpu(llama, bits, quant_type):
    import bitsandbytes as bnb

    model, lines = _load(llama, quantization_bit=bits, quantization_type=quant_type)
    linear = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, linear) and "default" in q_proj.lora_A
    assert any(line.startswith(f"quantization: {bits}-bit") for line in lines)
    loss = model(**_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    total = int(lines[-1].split(" of ")[1].split(" ")[0].replace(",", ""))
    lora = sum(p.numel() for p in grads.values())
    assert total == lora + sum(p.numel() for p in _plain(llama).parameters())  # packed 4-bit counted as values


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_quantization_errors(llama, monkeypatch):
    with pytest.raises(ModelError, match="quantization_bit needs finetuning_type: lora"):
        _load(llama, quantization_bit=4, finetuning_type="full")
    with pytest.raises(ModelError, match=r"quantization_method: 'eetq' is not supported \(the eetq package has no"):
        _load(llama, quantization_bit=8, quantization_method="eetq")
    with pytest.raises(ModelError, match=r"quantization_bit: 3 is not supported by quantization_method: bnb \(it "
                                         r"takes 4, 8 bits\)"):
        _load(llama, quantization_bit=3)
    from lf.model import quantization

    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"quantization_method: bnb needs bitsandbytes: pip install 'lf\[qlora\]'"):
        _load(llama, quantization_bit=4)
    with pytest.raises(ModelError, match=r"quantization_method: hqq needs hqq: pip install 'lf\[hqq\]'"):
        _load(llama, quantization_bit=4, quantization_method="hqq")


# ---- vocabulary ----

def test_resize_vocab(llama):
    args = ModelArguments(model_name_or_path=llama, add_special_tokens="<|a|>,<|b|>")
    tok = load_tokenizer(args)
    with pytest.raises(ModelError, match=f"the tokenizer has {len(tok)} tokens but the model's embeddings only "
                                         f"{len(tok) - 2} rows.*set resize_vocab: true"):
        _load(llama, tokenizer=tok)
    model, lines = _load(llama, tokenizer=tok, resize_vocab=True)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tok)
    assert model.peft_config["default"].modules_to_save == ["embed_tokens", "lm_head"]
    assert any("embed_tokens" in n for n in _trainable(model)) and any("lm_head" in n for n in _trainable(model))
    assert torch.isfinite(model(**_batch(vocab=len(tok))).loss)
    model, lines = _load(llama, tokenizer=tok, resize_vocab=True, finetuning_type="freeze")
    assert "model.embed_tokens.weight" in _trainable(model) and "lm_head.weight" in _trainable(model)


def test_train_from_scratch_and_param_status(llama):
    model, lines = _load(llama, train_from_scratch=True, finetuning_type="full", print_param_status=True)
    assert "with random weights (train_from_scratch)" in lines[0]
    assert "  model.embed_tokens.weight: torch.float32, trainable" in lines
    assert not torch.equal(model.model.embed_tokens.weight, _plain(llama).model.embed_tokens.weight)
