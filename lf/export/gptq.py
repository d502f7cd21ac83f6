"""`lf export` with export_quantization_bit: the merged model GPTQ-quantized (2, 3, 4 or 8 bits), calibrated on
export_quantization_dataset, saved as a GPTQ checkpoint that transformers loads (through GPTQModel, lf[gptq]).

As LLaMA-Factory's export: the calibration data is the "text" column of a file (or a datasets folder or hub
name); export_quantization_nsamples windows of export_quantization_maxlen tokens are cut at random places of
randomly drawn texts that long (here from a fixed seed, so an export is repeatable); the quantizer is optimum's
GPTQQuantizer with GPTQ's defaults (symmetric, damping 0.1, no act-order), which runs GPTQModel's GPTQ on
whichever device the model is on, the CPU too.

Groups of 128 inputs share a scale, as GPTQ's default, unless a quantized layer's input size is not a multiple of
128: GPTQModel's CPU kernel needs whole groups, so the groups are then the largest of 64, 32, 16 that fits them all.
"""

from __future__ import annotations

import dataclasses
import os
import random

from lf.errors import ConfigError, ModelError

GROUP_SIZES = (128, 64, 32, 16)  # GPTQ's default first; GPTQModel's CPU kernel takes these
SEED = 0


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


def group_size(model) -> int:
    """128, or the largest of GROUP_SIZES that divides every quantized layer's input size (module docstring)."""
    from torch import nn

    sizes = {m.in_features for m in _blocks(model).modules() if isinstance(m, nn.Linear)}
    for size in GROUP_SIZES:
        if all(n % size == 0 for n in sizes):
            return size
    raise ModelError(f"export_quantization_bit: the model's linear layers take {', '.join(map(str, sorted(sizes)))} "
                     f"inputs, and GPTQModel's CPU kernel needs groups of 16 inputs or more that divide each: this "
                     f"model cannot be GPTQ-quantized")


def _blocks(model):
    """The decoder layers (what GPTQ quantizes: the embeddings and output head keep their weights)."""
    from optimum.gptq.utils import get_block_name_with_pattern

    return model.get_submodule(get_block_name_with_pattern(model))


def quantize(model, samples: list[dict], args):
    """The merged model GPTQ-quantized in place on `samples` (calibration's), its config saying how (GPTQ's v1
    format, which transformers, GPTQModel and vLLM load); returns it and the line saying how."""
    from gptqmodel.utils.model import hf_convert_gptq_v2_to_v1_format
    from optimum.gptq import GPTQQuantizer

    bits, groups = args.export_quantization_bit, group_size(model)
    quantizer = GPTQQuantizer(bits=bits, dataset=samples, group_size=groups,
                              model_seqlen=args.export_quantization_maxlen)
    model = quantizer.quantize_model(model)
    # GPTQModel quantizes into its v2 format (zero points stored as they are); loaders read v1's (minus one)
    model, converted = hf_convert_gptq_v2_to_v1_format(model, quantizer.sym, bits, quantizer.quant_linear,
                                                       quantizer.format, quantizer.meta)
    if converted:
        quantizer.format = "gptq"
    # what quantize_model wrote there is the v2 format, and the calibration samples themselves
    model.config.quantization_config = {key: value for key, value in quantizer.to_dict().items() if key != "dataset"}
    return model, (f"GPTQ: {bits}-bit in groups of {groups} inputs, calibrated on {len(samples)} windows of "
                   f"{args.export_quantization_maxlen} tokens of {args.export_quantization_dataset}")
