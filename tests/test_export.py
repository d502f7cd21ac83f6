"""`lf export` on the tiny Llama (test_train's temporary LF_HOME) with a LoRA adapter trained here: the merged model
computes the base+adapter logits, shards and dtypes, refusals, the tokenizer's chat template and stop tokens, and
the GGUF file read back by gguf's own reader (names, shapes, values, metadata) with its Ollama Modelfile."""

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_train import lf_home, options  # noqa: F401 (lf_home: the module's tiny model)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lf import cli
from lf.config import parse_train_args
from lf.config.parser import parse_infer_args
from lf.config.rules import show
from lf.data import get_template
from lf.errors import ConfigError, ModelError
from lf.export import export
from lf.export.ollama import modelfile
from lf.export.to_gguf import check_gguf, llama3_rope_factors, write_gguf
from lf.tiny import tiny_path
from lf.train import run

SYSTEM = "You are a helpful assistant."
CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No jokes today."}]
# the tiny Llama's HF names -> llama.cpp's, written out here (not taken from gguf's map, which the code uses)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def export_options(export_dir, **overrides) -> dict:
    return {"model_name_or_path": "lf-tiny-llama", "template": "qwen", "export_dir": str(export_dir),
            "export_dtype": "float32", **overrides}


def lf_export(export_dir, **overrides) -> dict:
    return export(parse_infer_args(export_options(export_dir, **overrides), "export"))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_model():
    return AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter(lf_home, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("adapter")
    run(parse_train_args(options(out, save_steps=10)))
    return out


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    """The adapter merged in float32, with an f32 GGUF file."""
    return lf_export(tmp_path_factory.mktemp("export") / "tiny-chat", adapter_name_or_path=str(adapter),
                     export_gguf="f32")


def test_merged_model_computes_base_plus_adapter(adapter, exported, tmp_path):
    from peft import PeftModel

    ids = torch.randint(0, 3000, (2, 24))
    merged = AutoModelForCausalLM.from_pretrained(exported["export_dir"])
    unmerged = PeftModel.from_pretrained(base_model(), adapter)
    expected = logits(unmerged, ids)
    assert not torch.allclose(expected, logits(base_model(), ids), atol=1e-3)  # the adapter changes something
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)

    # several adapters merge in order: the adapter, then its negation (B -> -B) give the base model back
    negated = tmp_path / "negated"
    shutil.copytree(adapter, negated)
    from safetensors.torch import load_file, save_file

    weights = load_file(negated / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, negated / "adapter_model.safetensors")
    both = lf_export(tmp_path / "both", adapter_name_or_path=f"{adapter},{negated}")
    restored = AutoModelForCausalLM.from_pretrained(both["export_dir"])
    torch.testing.assert_close(logits(restored, ids), logits(base_model(), ids), rtol=1e-5, atol=1e-5)


def test_shards_legacy_format_and_dtype(tmp_path):
    base = base_model().state_dict()
    for legacy, index_name in ((False, "model.safetensors.index.json"), (True, "pytorch_model.bin.index.json")):
        out = lf_export(tmp_path / f"legacy-{legacy}", export_size=0.004, export_legacy_format=legacy)["export_dir"]
        index = json.loads((tmp_path / f"legacy-{legacy}" / index_name).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 3 and all((tmp_path / f"legacy-{legacy}" / s).is_file() for s in shards)
        assert all(s.endswith(".bin" if legacy else ".safetensors") for s in shards)
        loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert loaded.keys() == base.keys() and all(torch.equal(loaded[k], base[k]) for k in base)

    out = tmp_path / "bf16"
    lf_export(out, export_dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), base["model.embed_tokens.weight"].bfloat16())


def test_refusals(tmp_path, capsys):
    def lf_export_cli(**overrides) -> int:
        config = tmp_path / "export.json"
        config.write_text(json.dumps({**export_options(tmp_path / "out"), **overrides}))
        return cli.main(["export", str(config)])

    assert lf_export_cli(quantization_bit=4) == 2
    assert "lf export: quantization_bit: 4" in capsys.readouterr().err
    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_path("lf-tiny-llama"), quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    assert lf_export_cli(model_name_or_path=str(quantized)) == 1
    err = capsys.readouterr().err
    assert "is quantized by bitsandbytes" in err and "set model_name_or_path to the unquantized base model" in err
    assert lf_export_cli(export_dir=None) == 2
    assert "lf export: export_dir is missing: set export_dir" in capsys.readouterr().err
    assert lf_export_cli(export_gguf="q4_k") == 2
    assert "export_gguf: 'q4_k' is not one of f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    gpt2 = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama"))
    with pytest.raises(ModelError, match="for LlamaForCausalLM, .*Phi3ForCausalLM models, not GPT2LMHeadModel"):
        check_gguf(gpt2, tokenizer, "f16")


def test_tokenizer_prompts_as_lf_trained(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported["export_dir"])
    template = get_template("qwen")
    chat = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == template.render(CONVERSATION, SYSTEM,
                                                                                  tokenizer=tokenizer)
    prompt_ids = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert prompt_ids == template.encode_oneturn(tokenizer, CONVERSATION, SYSTEM)[0]
    generation = json.loads((Path(exported["export_dir"]) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary pairs back to HF's rotate-half rows."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def expected_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, in HF's row order."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name in GGUF_NAMES:
            out[GGUF_NAMES[name]] = tensor.float().numpy()
            continue
        _, _, layer, *rest = name.split(".")
        out[f"blk.{layer}.{LAYER_NAMES['.'.join(rest[:-1])]}.weight"] = tensor.float().numpy()
    return out


def gguf_values(tensor, heads: int, kv_heads: int) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(list(reversed(tensor.shape)))
    if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
        return unpermute(values, heads if "attn_q" in tensor.name else kv_heads)
    return values


def test_gguf_tensors_and_metadata(exported, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(exported["export_dir"])
    tokenizer = AutoTokenizer.from_pretrained(exported["export_dir"])
    config, expected = model.config, expected_tensors(model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert exported["gguf"].endswith("/tiny-chat/tiny-chat-f32.gguf")
    fields, tensors = read_gguf(exported["gguf"])
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        assert list(reversed(tensor.shape.tolist())) == list(expected[name].shape), name
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(gguf_values(tensor, heads, kv_heads), expected[name]), name
    # the permutation is llama.cpp's: within a head, HF's row j (first half) and j + d/2 become rows 2j and 2j + 1
    q = tensors["blk.0.attn_q.weight"].data.reshape(heads, -1, config.hidden_size)
    hf_q = expected["blk.0.attn_q.weight"].reshape(heads, -1, config.hidden_size)
    half = hf_q.shape[1] // 2
    assert np.array_equal(q[:, 0::2], hf_q[:, :half]) and np.array_equal(q[:, 1::2], hf_q[:, half:])

    vocab_rows = model.get_input_embeddings().weight.shape[0]
    assert {k: fields[k] for k in ("general.architecture", "llama.context_length", "llama.embedding_length",
                                   "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
                                   "llama.attention.head_count_kv", "llama.rope.dimension_count",
                                   "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                   "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.add_bos_token")} == {
        "general.architecture": "llama", "llama.context_length": 2048, "llama.embedding_length": 256,
        "llama.block_count": 4, "llama.feed_forward_length": 704, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 64, "llama.vocab_size": vocab_rows,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.eot_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False}
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == vocab_rows and tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(
        list(range(len(tokenizer))))
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]

    # the other file types, written from the same model: 16-bit close, q8_0 within its blocks' rounding
    for gguf_type, qtype, tolerance in (("f16", "F16", 1e-3), ("bf16", "BF16", 8e-3), ("q8_0", "Q8_0", 1e-2)):
        path = write_gguf(model, tokenizer, get_template("qwen"), tmp_path, gguf_type)
        fields, tensors = read_gguf(path)
        assert fields["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
        for name, tensor in tensors.items():
            want = gguf.GGMLQuantizationType[qtype if len(tensor.shape) == 2 else "F32"]
            assert tensor.tensor_type == want, name
            scale = np.abs(expected[name]).max()
            np.testing.assert_allclose(gguf_values(tensor, heads, kv_heads), expected[name], rtol=tolerance,
                                       atol=tolerance * scale, err_msg=name)


def test_gguf_of_qwen2_keeps_rows_biases_and_the_tied_head(tmp_path):
    from lf.tiny import CHATML_TOKENS, ROLE_TEXT, build_model

    config = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    path = build_model(tmp_path / "qwen2", [ROLE_TEXT, "a tiny corpus for a tiny tokenizer"], 300, CHATML_TOKENS,
                       config, seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    qwen = get_template("qwen")
    tokenizer.chat_template = qwen.to_jinja()
    fields, tensors = read_gguf(write_gguf(model, tokenizer, qwen, tmp_path, "f32"))
    assert (fields["general.architecture"], fields["qwen2.block_count"], fields["tokenizer.ggml.pre"]) == (
        "qwen2", 2, "qwen2")
    assert "output.weight" not in tensors  # llama.cpp reuses token_embd for a tied head
    weights = model.state_dict()
    for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k")):  # qwen2 rotates halves in llama.cpp too
        for kind in ("weight", "bias"):
            assert np.array_equal(tensors[f"blk.1.{name}.{kind}"].data,
                                  weights[f"model.layers.1.self_attn.{proj}.{kind}"].numpy())


def test_modelfile(exported):
    text = (Path(exported["export_dir"]) / "Modelfile").read_text()
    assert text == (
        "# written by lf export; to use it: ollama create NAME -f Modelfile\n"
        "FROM ./tiny-chat-f32.gguf\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
        '{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}{{ end }}"""\n'
        'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "</s>"\n')
    tokenizer = AutoTokenizer.from_pretrained(exported["export_dir"])
    # llama2: the system prompt opens the first user message; bos is written (this tokenizer does not add it)
    llama2 = modelfile("m.gguf", tokenizer, get_template("llama2"))
    assert ('{{ if eq .Role "user" }}<s>[INST] {{ if and $.System $first }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n'
            '{{ end }}{{ .Content }} [/INST]{{ $first = false }}') in llama2
    assert "{{ $first := true }}" in llama2 and "SYSTEM" not in llama2
    # qwen3_nothink: the generation prompt closes an empty reasoning block
    nothink = modelfile("m.gguf", tokenizer, get_template("qwen3_nothink"))
    assert "<|im_start|>assistant\n{{ if $last }}<think>\n\n</think>\n\n{{ end }}" in nothink


def test_llama3_rope_factors_match_transformers():
    """llama.cpp divides each default RoPE frequency by rope_freqs; transformers' llama3 frequencies are the same."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = AutoConfig.for_model("llama", hidden_size=2048, num_attention_heads=16, rope_parameters=rope,
                                  max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    default = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    np.testing.assert_allclose(llama3_rope_factors(rope, 128), (default / scaled.double()).numpy(), rtol=1e-5)


# Every export key: LLaMA-Factory 0.9.5's (its ExportArguments) and lf's own, each with a value that asks for
# something and what that value must do: ("refused", a fragment of the one-line reason), or a check of the export.
LLAMA_FACTORY_EXPORT_KEYS = {"export_dir", "export_size", "export_device", "export_quantization_bit",
                             "export_quantization_dataset", "export_quantization_nsamples",
                             "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id"}
ALONE = "sets up a GPTQ-quantized export, and export_quantization_bit is not set: set it (2, 3, 4 or 8) or remove"
EXPORT_KEYS = {
    "export_dir": ("sub/dir", lambda out, logs: (out / "sub/dir/config.json").is_file()),
    "export_size": (0.004, lambda out, logs: len(set(json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 3),
    "export_device": ("auto", lambda out, logs: "export_device: auto: the adapters merge on cpu" in logs),
    "export_legacy_format": (True, lambda out, logs: (out / "pytorch_model.bin").is_file()
                             and not list(out.glob("*.safetensors"))),
    "export_dtype": ("bfloat16", lambda out, logs: json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"),
    "export_gguf": ("f16", lambda out, logs: (out / "out-f16.gguf").is_file() and (out / "Modelfile").is_file()),
    # (the GPTQ export itself: tests_gptq/, in GPTQModel's venv; here, without it: test_gptq_export_needs_its_extra)
    "export_quantization_bit": (4, ("export refuses", "calibrates GPTQ on data, and export_quantization_dataset is "
                                                      "missing")),
    "export_quantization_dataset": ("c4_demo", ("export refuses", ALONE)),
    "export_quantization_nsamples": (64, ("export refuses", ALONE)),
    "export_quantization_maxlen": (512, ("export refuses", ALONE)),
    "export_hub_model_id": ("me/tiny", ("refused", "asks for uploading the export to the Hugging Face hub")),
}


def test_export_keys_are_all_walked():
    from lf.config.export import ExportArguments

    fields = {field.name for field in dataclasses.fields(ExportArguments)}
    assert EXPORT_KEYS.keys() == LLAMA_FACTORY_EXPORT_KEYS | fields


@pytest.mark.parametrize("key", sorted(EXPORT_KEYS))
def test_every_export_key_works_or_is_refused(key, tmp_path, caplog):
    value, expect = EXPORT_KEYS[key]
    out = tmp_path / "out"
    options = {**export_options(out), key: str(out / value) if key == "export_dir" else value}
    train = {"model_name_or_path": "lf-tiny-llama", "dataset": "demo", "output_dir": str(tmp_path / "t"), key: value}
    if isinstance(expect, tuple) and expect[0] == "export refuses":  # lf export's own check; lf train's below
        with pytest.raises(ConfigError) as error:
            export(parse_infer_args(options, "export"))
        assert str(error.value).startswith(f"{key}: {show(value)} {expect[1]}") and not out.exists()
    elif isinstance(expect, tuple):
        for refuse in (lambda: export(parse_infer_args(options, "export")), lambda: parse_train_args(train)):
            with pytest.raises(ConfigError) as error:
                refuse()
            assert str(error.value).startswith(f"{key}: {show(value)} (in the config) {expect[1]}")
            assert "\n" not in str(error.value) and not out.exists()
        return
    else:
        with caplog.at_level(logging.INFO, logger="lf"):
            export(parse_infer_args(options, "export"))
        assert expect(out, caplog.text)
    with pytest.raises(ConfigError, match=f"^{key}: .* is a key of lf export, and lf train saves the model to "
                                          f"output_dir and exports nothing: remove it"):
        parse_train_args(train)


def test_infer_dtype_is_the_export_dtype_as_in_llama_factory(tmp_path):
    out = tmp_path / "out"
    lf_export(out, export_dtype="auto", infer_dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="^infer_dtype: float16 and export_dtype: bfloat16 both set"):
        lf_export(tmp_path / "other", export_dtype="bfloat16", infer_dtype="float16")


def test_other_commands_ignore_export_keys_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="lf"):
        cfg = parse_infer_args(export_options("saves/out", export_size=2, export_gguf="f16",
                                              export_quantization_bit=4), "chat")
    assert cfg.export.export_dir is None and cfg.export.export_gguf is None and cfg.export.export_quantization_bit is None
    for key in ("export_dir", "export_size", "export_dtype", "export_gguf", "export_quantization_bit"):
        assert f"{key} is ignored: lf chat exports nothing (lf export reads it)" in caplog.text


def test_gptq_export_needs_its_extra(tmp_path):
    """lf's main venv has no GPTQModel (lf[gptq] lives in a venv of its own: README): the export says how to get
    it, before anything loads."""
    import importlib.util

    assert importlib.util.find_spec("gptqmodel") is None
    with pytest.raises(ModelError, match=r"^export_quantization_bit: 4 needs gptqmodel, optimum.gptq \(GPTQModel, "
                                         r"and optimum's GPTQ quantizer\): pip install 'lf\[gptq\]'"):
        lf_export(tmp_path / "out", export_quantization_bit=4, export_quantization_dataset="data/lf_demo_en.json")
    assert not (tmp_path / "out").exists()
