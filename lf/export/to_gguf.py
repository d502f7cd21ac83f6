"""A merged Llama-family model as one GGUF file for llama.cpp and Ollama: llama.cpp's tensor names and metadata, a
byte-level BPE ("gpt2") vocabulary, the template as the chat template, weights in f32, f16, bf16 or q8_0.

What follows llama.cpp's own converter (convert_hf_to_gguf.py; the facts, not its code):
  - HF Llama/Mistral checkpoints order the rows of each q_proj/k_proj head for transformers' rotate-half RoPE;
    llama.cpp's llama architecture rotates adjacent pairs, so those rows are permuted (`permute_qk`). Its qwen2
    architecture rotates halves (NEOX) and keeps the rows as they are;
  - 1-D tensors (norms, biases) stay float32 whatever the file type; a q8_0 tensor needs rows that are whole
    32-value blocks, others are written f16;
  - a tied output head is not written (llama.cpp reuses token_embd);
  - Llama 3.1's rope scaling is a `rope_freqs` tensor of per-frequency divisors (`llama3_rope_factors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import get_args

import numpy as np

from lf.config.export import GgufType
from lf.errors import ConfigError, ModelError

GGUF_TYPES = get_args(GgufType)
# file type -> (gguf's GGMLQuantizationType member, LlamaFileType member)
_TYPES = MappingProxyType({"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                           "q8_0": ("Q8_0", "MOSTLY_Q8_0")})
# HF architecture -> (gguf's MODEL_ARCH member, whether q/k rows are permuted)
ARCHITECTURES = MappingProxyType({"LlamaForCausalLM": ("LLAMA", True), "MistralForCausalLM": ("LLAMA", True),
                                  "Qwen2ForCausalLM": ("QWEN2", False)})
ROPE_TYPES = ("default", "linear", "llama3")


def check_gguf(config, tokenizer, gguf_type: str) -> None:
    """Refuses, before any weight loads, a GGUF type, model family, rope scaling or tokenizer this module cannot
    write."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"export_gguf: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("export_gguf needs the gguf package: pip install gguf") from None
    if hasattr(config, "vision_config"):
        raise _unsupported(f"{config.model_type} is a vision-language model, and lf writes no projector file "
                           f"(mmproj) for its vision tower, without which llama.cpp and Ollama read no images")
    _architecture(config)
    _rope(config)
    _vocab_spec(tokenizer)


def _unsupported(what: str) -> ModelError:
    return ModelError(f"export_gguf: {what}; export without export_gguf and convert the exported folder with "
                      f"llama.cpp's convert_hf_to_gguf.py")


def _architecture(config) -> tuple[str, bool]:
    names = config.architectures or [config.model_type]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise _unsupported(f"lf writes GGUF for {', '.join(ARCHITECTURES)} models, not {', '.join(names)}")


def _rope(config) -> dict:
    """The RoPE parameters (transformers 5 keeps them in rope_parameters, 4 in rope_theta and rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ROPE_TYPES:
        raise _unsupported(f"rope scaling {params['rope_type']!r} is not converted (lf converts "
                           f"{', '.join(ROPE_TYPES)})")
    return params


def _vocab_spec(tokenizer) -> dict:
    """The tokenizer's tokenizer.json, when it is byte-level BPE (what GGUF's "gpt2" model is)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        kind = "SentencePiece-style" if model.get("byte_fallback") else model.get("type", "unknown")
        raise _unsupported(f"lf writes byte-level BPE vocabularies (GPT-2 style, as Llama 3 and Qwen2 have); this "
                           f"tokenizer is {kind}")
    return spec


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (first half of the head's dimensions, then the second) to the
    interleaved pairs llama.cpp rotates; a bias (1-D) is permuted like the rows."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's divisor of each RoPE frequency: 1 for short wavelengths, `factor` for long ones, a smooth
    blend between (what transformers' llama3 rope type divides the default frequencies by)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    wavelength = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (context / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, blended))
    return factors.astype(np.float32)


def _head_dims(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, dimensions per head)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def write_gguf(model, tokenizer, template, export_dir, gguf_type: str) -> Path:
    """Writes `<export_dir>/<name>-<gguf_type>.gguf` (name: export_dir's) for the model and its tokenizer (with
    the template's stop word as end-of-turn token); returns its path."""
    import gguf

    config = model.config
    arch_name, permute = _architecture(config)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]]
    qtype_name, file_type = _TYPES[gguf_type]
    export_dir = Path(export_dir)
    path = export_dir / f"{export_dir.resolve().name}-{gguf_type}.gguf"
    rows = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(export_dir.resolve().name)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    rope = _add_hyperparameters(writer, config, rows)
    _add_vocab(writer, tokenizer, template, rows, arch)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name], config.num_hidden_layers)
    heads, kv_heads, head_dim = _head_dims(config)
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise _unsupported(f"tensor {name} has no llama.cpp name")
        data = tensor.detach().float().cpu().numpy()
        if permute and gguf_name.startswith("blk.") and gguf_name.split(".")[2] in ("attn_q", "attn_k"):
            data = permute_qk(data, heads if gguf_name.split(".")[2] == "attn_q" else kv_heads)
        array, array_type = _encode(data, qtype)
        writer.add_tensor(gguf_name, array, raw_dtype=array_type)
    if rope["rope_type"] == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(name, llama3_rope_factors(rope, head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _encode(data: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """(the array to write, its GGML type): 1-D tensors in f32; q8_0 rows must be whole blocks, else f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = GGMLQuantizationType.F16
    return quants.quantize(data, qtype), qtype


def _add_hyperparameters(writer, config, rows: int) -> dict:
    """The architecture's keys (llama.context_length, ...); returns the RoPE parameters."""
    import gguf

    heads, kv_heads, head_dim = _head_dims(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(rows)
    rope = _rope(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    return rope


def _pre_tokenizer(spec: dict, arch: str, vocab: dict) -> str:
    """llama.cpp's name for the split before BPE (llama.cpp recognises tokenizers by it)."""
    if arch == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab:  # Llama 3's
        return "llama-bpe"
    pre = spec.get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"


def _add_vocab(writer, tokenizer, template, rows: int, arch: str) -> None:
    """Tokens (embedding rows past the tokenizer's are unused placeholders), their types, the merges, the special
    ids and the chat template."""
    from gguf import TokenType

    spec = _vocab_spec(tokenizer)
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(TokenType.NORMAL if i in by_id else TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, arch, vocab))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    end_of_turn = [i for i in template.stop_token_ids(tokenizer) if i != tokenizer.eos_token_id]
    if end_of_turn:  # llama.cpp stops on eos and on this one
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_chat_template(tokenizer.chat_template)


def adds_bos(tokenizer) -> bool:
    """Whether encoding a text starts it with bos (then llama.cpp and Ollama add it too, and templates don't)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
