"""`lf export` with export_quantization_bit: the merged model GPTQ-quantized (2, 3, 4 or 8 bits), calibrated on
export_quantization_dataset, saved as a GPTQ checkpoint that transformers loads (through GPTQModel, lf[gptq]).

As LLaMA-Factory's export: the calibration data is the "text" column of a file (or a datasets folder or hub
name); export_quantization_nsamples windows of export_quantization_maxlen tokens are cut at random places of
randomly drawn texts that long (here from a fixed seed, so an export is repeatable); the quantizer is optimum's
GPTQQuantizer with GPTQ's defaults (symmetric, damping 0.1, no act-order), which runs GPTQModel's GPTQ on
whichever device the model is on, the CPU too.

Groups of 128 inputs share a scale, as GPTQ's default, unless a quantized layer's input size is not a multiple of
128: GPTQModel's CPU kernel needs whole groups, so the groups are then the largest of 64, 32 that fits them all
(GPTQModel packs a layer's codes in 32-bit words, 32 inputs and outputs at a time: every size is a multiple of 32).

GPTQ quantizes the linear layers of the decoder layers (optimum finds them: model.layers and the like); a
vision-language model's are its language model's (model.language_model.layers), calibrated on text alone, its vision
tower and projector kept as they are. A model GPTQ cannot take this way is refused from its config, before any
weight loads (check_model).
"""

from __future__ import annotations

import dataclasses
import os
import random

from lf.errors import ConfigError, ModelError

GROUP_SIZES = (128, 64, 32)  # GPTQ's default first; GPTQModel's CPU kernel takes these
PACK = 32  # GPTQModel packs codes in words of 32 inputs and 32 outputs: a quantized layer's sizes are multiples of it
SEED = 0
# GPTQ quantizes linear layers: above this share of the decoder layers' weights elsewhere (a mixture of experts' fused
# 3-D expert tensors), the export would not be the quantized model asked for
UNQUANTIZED_SHARE = 0.1
# families refused by model_type, before their skeleton is built (it would run the model's own code)
FAMILIES = {"chatglm": "ChatGLM's own code (trust_remote_code) keeps its decoder layers at transformer.encoder.layers, "
                       "where optimum's GPTQ quantizer does not look for them"}
_OTHER_WAY = ("export it without export_quantization_bit, then quantize that folder with GPTQModel itself "
              "(GPTQModel.load(folder, QuantizeConfig(bits=...)).quantize(texts)), which has definitions of its own "
              "for many families")


def check(args) -> None:
    """The export_quantization_* keys, refused before anything loads."""
    from lf.model.quantization import CHECKPOINTS, GPTQ_INSTALL, installed

    bits = args.export_quantization_bit
    if bits is None:
        for field in dataclasses.fields(args):  # the other export_quantization_* keys ask for nothing alone
            key = field.name
            if key.startswith("export_quantization_") and getattr(args, key) != field.default:
                raise ConfigError(f"{key}: {getattr(args, key)} sets up a GPTQ-quantized export, and "
                                  f"export_quantization_bit is not set: set it (2, 3, 4 or 8) or remove {key}")
        return
    if not args.export_quantization_dataset:
        raise ConfigError(f"export_quantization_bit: {bits} calibrates GPTQ on data, and export_quantization_dataset "
                          f"is missing: set it to a file (json, jsonl, csv, parquet, txt) with a \"text\" column")
    for key in ("export_quantization_nsamples", "export_quantization_maxlen"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"{key}: {getattr(args, key)} must be a positive number")
    if args.export_gguf is not None:
        raise ConfigError(f"export_gguf: {args.export_gguf} converts full-precision weights, and "
                          f"export_quantization_bit: {bits} GPTQ-quantizes them: keep one (export_gguf: q8_0 is an "
                          f"8-bit llama.cpp file)")
    missing = [module for module in CHECKPOINTS["gptq"].modules if not installed(module)]
    if missing:
        raise ModelError(f"export_quantization_bit: {bits} needs {', '.join(missing)} (GPTQModel, and optimum's "
                         f"GPTQ quantizer): {GPTQ_INSTALL}")


def calibration(tokenizer, args, cache_dir: str | None = None) -> list[dict]:
    """export_quantization_nsamples windows of export_quantization_maxlen tokens, cut from the dataset's texts
    that are at least that long, as tokenized samples (lists, as optimum takes them)."""
    texts = _texts(args.export_quantization_dataset, cache_dir)
    maxlen, count = args.export_quantization_maxlen, args.export_quantization_nsamples
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    long_enough = [row for row in ids if len(row) >= maxlen]
    if not long_enough:
        raise ConfigError(f"export_quantization_dataset: none of the {len(texts)} texts of "
                          f"{args.export_quantization_dataset} has export_quantization_maxlen: {maxlen} tokens (the "
                          f"longest has {max(map(len, ids), default=0)}): lower export_quantization_maxlen or give "
                          f"longer texts")
    rng = random.Random(SEED)
    samples = []
    for _ in range(count):
        row = rng.choice(long_enough)
        start = rng.randint(0, len(row) - maxlen)
        window = row[start:start + maxlen]
        samples.append({"input_ids": [window], "attention_mask": [[1] * maxlen]})
    return samples


def _texts(dataset: str, cache_dir: str | None) -> list[str]:
    """The "text" column of a local file or folder (lf's readers: json, jsonl, csv, parquet, arrow, txt) or of a
    datasets name (its train split)."""
    from lf.data.readers import read_raw
    from lf.data.registry import DatasetAttr
    from lf.errors import DataError

    source = "file" if os.path.exists(dataset) else "hf_hub"
    try:
        rows = read_raw(DatasetAttr(name=dataset, source=source, path=os.path.abspath(dataset)
                                    if source == "file" else dataset), "", cache_dir=cache_dir)
    except DataError as exc:
        raise ConfigError(f"export_quantization_dataset: {exc}") from exc
    except Exception as exc:  # the hub's many errors (offline, no such dataset, ...)
        raise ConfigError(f"export_quantization_dataset: {dataset} is neither a file nor a dataset datasets can "
                          f"load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): give a "
                          f"json, jsonl, csv, parquet or txt file") from exc
    if "text" not in rows.column_names:
        raise ConfigError(f"export_quantization_dataset: {dataset} has no \"text\" column (it has "
                          f"{', '.join(rows.column_names)}): GPTQ calibrates on plain text, one \"text\" per row")
    return [text for text in rows["text"] if text]


def check_model(config, model_args, bits: int) -> None:
    """What GPTQ export cannot take, refused from the config before any weight loads: a family of FAMILIES, or one
    whose decoder layers optimum's quantizer does not find, whose linear layers' sizes are not multiples of PACK,
    or whose decoder layers keep more than UNQUANTIZED_SHARE of their weights outside linear layers. The
    layers are looked at on a skeleton of the model (accelerate's empty weights: no memory for them). A
    vision-language model's decoder layers are its language model's (model.language_model.layers): its vision tower
    and projector keep their weights."""
    from accelerate import init_empty_weights
    from optimum.gptq.utils import get_layers
    from torch import nn

    from lf.model.loader import generating_class

    refused = (f"export_quantization_bit: {bits} cannot GPTQ-quantize {model_args.model_name_or_path}, a "
               f"{config.model_type} model")
    if config.model_type in FAMILIES:
        raise ModelError(f"{refused}: {FAMILIES[config.model_type]}: {_OTHER_WAY}")
    with init_empty_weights():
        skeleton = generating_class(config).from_config(config, trust_remote_code=model_args.trust_remote_code)
    try:
        blocks = _blocks(skeleton)
    except ValueError:
        raise ModelError(f"{refused}: optimum's GPTQ quantizer finds no decoder layers in it (it looks for "
                         f"model.layers, model.language_model.layers, transformer.h and a few more): "
                         f"{_OTHER_WAY}") from None
    quantized = {f"{path}.weight" for path in get_layers(blocks)}
    weights = {name: p.numel() for name, p in blocks.named_parameters() if p.dim() >= 2}
    elsewhere = {name: count for name, count in weights.items() if name not in quantized}
    share = sum(elsewhere.values()) / sum(weights.values())
    if share > UNQUANTIZED_SHARE:
        names = dict.fromkeys(name.split(".", 1)[1] for name in elsewhere)  # each layer's, without its index
        raise ModelError(f"{refused}: GPTQ quantizes linear layers, and {share:.0%} of its decoder layers' weights "
                         f"are not in one ({', '.join(list(names)[:3])}): they would stay unquantized; {_OTHER_WAY}")
    odd = sorted({n for m in blocks.modules() if isinstance(m, nn.Linear) for n in (m.in_features, m.out_features)
                  if n % PACK})
    if odd:
        raise ModelError(f"{refused}: its decoder layers' linear layers have {', '.join(map(str, odd))} inputs or "
                         f"outputs, and GPTQModel packs 32 inputs and 32 outputs at a time: only layers whose sizes "
                         f"are multiples of {PACK} can be GPTQ-quantized")


def group_size(blocks) -> int:
    """128, or the largest of GROUP_SIZES that divides every quantized layer's input size (module docstring;
    check_model has refused sizes that are not multiples of PACK, the smallest)."""
    from torch import nn

    sizes = {m.in_features for m in blocks.modules() if isinstance(m, nn.Linear)}
    return next(size for size in GROUP_SIZES if all(n % size == 0 for n in sizes))


def _blocks(model):
    """The decoder layers (what GPTQ quantizes: the embeddings and output head keep their weights)."""
    from optimum.gptq.utils import get_block_name_with_pattern

    return model.get_submodule(get_block_name_with_pattern(model))


def quantize(model, samples: list[dict], args):
    """The merged model GPTQ-quantized in place on `samples` (calibration's), its config saying how (GPTQ's v1
    format, which transformers, GPTQModel and vLLM load); returns it and the line saying how."""
    from gptqmodel.utils.model import hf_convert_gptq_v2_to_v1_format
    from optimum.gptq import GPTQQuantizer

    bits, groups = args.export_quantization_bit, group_size(_blocks(model))
    quantizer = GPTQQuantizer(bits=bits, dataset=samples, group_size=groups,
                              model_seqlen=args.export_quantization_maxlen)
    # optimum turns off the top config's cache alone; a vision-language model's language model reads its text
    # config's, and a cache kept across calibration passes grows past their attention masks
    text = model.config.get_text_config()
    use_cache, text.use_cache = text.use_cache, False
    model = quantizer.quantize_model(model)
    text.use_cache = use_cache
    # GPTQModel quantizes into its v2 format (zero points stored as they are); loaders read v1's (minus one)
    model, converted = hf_convert_gptq_v2_to_v1_format(model, quantizer.sym, bits, quantizer.quant_linear,
                                                       quantizer.format, quantizer.meta)
    if converted:
        quantizer.format = "gptq"
    # what quantize_model wrote there is the v2 format, and the calibration samples themselves
    model.config.quantization_config = {key: value for key, value in quantizer.to_dict().items() if key != "dataset"}
    return model, (f"GPTQ: {bits}-bit in groups of {groups} inputs (the linear layers of "
                   f"{quantizer.block_name_to_quantize}), calibrated on {len(samples)} windows of "
                   f"{args.export_quantization_maxlen} tokens of {args.export_quantization_dataset}")
