"""A merged model as one GGUF file for llama.cpp and Ollama: llama.cpp's tensor names and metadata for its family
(lf.export.gguf_families), the tokenizer's vocabulary (lf.export.gguf_vocab), the template as the chat template,
weights in f32, f16, bf16 or q8_0.

What follows llama.cpp's own converter (convert_hf_to_gguf.py; the facts, not its code):
  - 1-D tensors (norms, biases) and MoE routers stay float32 whatever the file type; a q8_0 tensor needs rows that
    are whole 32-value blocks, others are written f16;
  - a tied output head is not written (llama.cpp reuses token_embd);
  - Llama 3.1's rope scaling is a `rope_freqs` tensor of per-frequency divisors (`llama3_rope_factors`).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import get_args

import numpy as np

from lf.config.export import GgufType
from lf.errors import ConfigError, ModelError
from lf.export.gguf_families import FAMILIES, Family, permute_qk, split_experts
from lf.export.gguf_vocab import add_vocab, vocab_spec

GGUF_TYPES = get_args(GgufType)
# file type -> (gguf's GGMLQuantizationType member, LlamaFileType member)
_TYPES = MappingProxyType({"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                           "q8_0": ("Q8_0", "MOSTLY_Q8_0")})
ROPE_TYPES = ("default", "linear", "llama3")


def check_gguf(config, tokenizer, gguf_type: str, name: str = "") -> None:
    """Refuses, before any weight loads, a GGUF type, model family, rope scaling or tokenizer this module cannot
    write, and a file name (export_dir's) llama.cpp would not load with this tokenizer."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"export_gguf: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("export_gguf needs the gguf package: pip install gguf") from None
    if hasattr(config, "vision_config"):
        raise _unsupported(f"{config.model_type} is a vision-language model, and lf writes no projector file "
                           f"(mmproj) for its vision tower, without which llama.cpp and Ollama read no images")
    family = family_of(config)
    problem = family.check(config)
    if problem:
        raise _unsupported(f"this {config.model_type} model has {problem}")
    _rope(config)
    vocab_spec(tokenizer, _unsupported)
    _check_name(name, tokenizer)


# llama.cpp gives a model whose general.name holds one of these Phi-3's token attributes, looking up these tokens by
# text: a vocabulary that lacks one fails to load
_PHI3_NAMES = ("phi3", "phi-3")
_PHI3_TOKENS = ("<s>", "</s>", "<unk>", "<|endoftext|>")


def _check_name(name: str, tokenizer) -> None:
    if any(phi3 in name.lower() for phi3 in _PHI3_NAMES):
        missing = [token for token in _PHI3_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            raise ConfigError(f"export_dir: llama.cpp reads a GGUF named {name!r} as Phi-3's and then needs the "
                              f"tokens {', '.join(missing)}, which this tokenizer lacks: choose an export_dir "
                              f"whose name holds neither {' nor '.join(_PHI3_NAMES)}")


def _unsupported(what: str) -> ModelError:
    return ModelError(f"export_gguf: {what}; export without export_gguf and convert the exported folder with "
                      f"llama.cpp's convert_hf_to_gguf.py")


def family_of(config) -> Family:
    names = config.architectures or [config.model_type]
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise _unsupported(f"lf writes GGUF for {', '.join(FAMILIES)} models, not {', '.join(names)}")


def _rope(config) -> dict:
    """The RoPE parameters of the full-attention layers (transformers 5 keeps them in rope_parameters, per layer
    type for Gemma 3; 4 in rope_theta and rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ROPE_TYPES:
        raise _unsupported(f"rope scaling {params['rope_type']!r} is not converted (lf converts "
                           f"{', '.join(ROPE_TYPES)})")
    return params


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
    family = family_of(config)
    arch = gguf.MODEL_ARCH[family.arch]
    qtype_name, file_type = _TYPES[gguf_type]
    export_dir = Path(export_dir)
    path = export_dir / f"{export_dir.resolve().name}-{gguf_type}.gguf"
    rows = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(export_dir.resolve().name)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    rope = _add_hyperparameters(writer, config, rows)
    family.keys(writer, config)
    add_vocab(writer, tokenizer, template, rows, family.pre_tokenizer, _unsupported)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    for name, data in gguf_tensors(model, family):
        array, array_type = _encode(data, qtype, keep_f32=".ffn_gate_inp." in name)
        writer.add_tensor(name, array, raw_dtype=array_type)
    if rope["rope_type"] == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(name, llama3_rope_factors(rope, _head_dims(config)[2]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(model, family: Family):
    """(llama.cpp's name, float32 array) for every weight llama.cpp reads, in its layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.num_hidden_layers)
    heads, kv_heads, _ = _head_dims(config)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and (config.tie_word_embeddings or not family.untied_head):
            continue
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            yield from split_experts(name, data)
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise _unsupported(f"tensor {name} has no llama.cpp name")
        if not gguf_name.endswith((".weight", ".bias")):  # a weight stored without the suffix (MoE experts)
            gguf_name += ".weight"
        if family.norm_shift and name.endswith("norm.weight"):
            data = data + family.norm_shift
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if family.permute_qk and kind in ("attn_q", "attn_k"):
            data = permute_qk(data, heads if kind == "attn_q" else kv_heads)
        yield gguf_name, data


def _encode(data: np.ndarray, qtype, keep_f32: bool = False) -> tuple[np.ndarray, object]:
    """(the array to write, its GGML type): 1-D tensors (and `keep_f32` ones) in f32; q8_0 rows must be whole
    blocks, else f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1 or keep_f32 or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = GGMLQuantizationType.F16
    return quants.quantize(data, qtype), qtype


def _add_hyperparameters(writer, config, rows: int) -> dict:
    """The keys every family has (llama.context_length, ...); returns the RoPE parameters."""
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
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    return rope
