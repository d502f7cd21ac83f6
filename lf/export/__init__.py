"""`lf export cfg.yaml [key=value ...]`: merge LoRA adapters into the base weights and save a model that plain
transformers, vLLM (and, with export_gguf, llama.cpp and Ollama) load and prompt as lf trained it.

The steps, in order (every check runs before the weights load):
  1. check the export keys and the base model's config: a quantized base is refused (adapters merge into
     full-precision weights), and with export_quantization_bit a model GPTQ cannot quantize (lf.export.gptq);
  2. the tokenizer with the template's chat template, as `lf train` saves it; with export_gguf, a model family,
     rope scaling or tokenizer the GGUF writer cannot convert is refused;
  3. the base model in export_dtype on export_device, then the adapters merged into it in order;
  4. with export_quantization_bit: the merged model GPTQ-quantized, calibrated on export_quantization_dataset
     (lf.export.gptq);
  5. save: safetensors shards of at most export_size GB (or .bin with export_legacy_format), the tokenizer, a
     generation config whose eos ids are the template's stop tokens, and for a vision-language model its image
     processor (preprocessor_config.json, processor_config.json: what AutoImageProcessor/AutoProcessor load);
  6. with export_gguf: `<export_dir>/<name>-<type>.gguf` and an Ollama `Modelfile` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import get_args

from lf.config.export import ExportDevice, GgufType
from lf.config.model import Dtype
from lf.errors import ConfigError, ModelError

log = logging.getLogger("lf")

DTYPES = get_args(Dtype)
DEVICES = get_args(ExportDevice)
GB = 10**9  # transformers' "GB" in max_shard_size is 10^9 bytes

USAGE = f"""usage: lf export cfg.yaml [key=value ...]

Merges the LoRA adapter(s) of adapter_name_or_path (comma-separated, merged in order) into model_name_or_path and
saves the model, its tokenizer (with the template's chat template) and its generation config to export_dir.
Keys: export_dir, export_size (GB per shard), export_dtype ({' | '.join(DTYPES)}), export_device
({' | '.join(DEVICES)}), export_legacy_format (.bin files), export_gguf ({' | '.join(get_args(GgufType))}: also a GGUF
file and an Ollama Modelfile, for Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2/3 and Phi-3 models),
export_quantization_bit (2 | 3 | 4 | 8: a GPTQ-quantized model, needs lf[gptq]) with export_quantization_dataset (a
file with a "text" column to calibrate on), export_quantization_nsamples and export_quantization_maxlen (how many
windows of how many tokens). Set template: as in training. export_hub_model_id is refused with the reason."""


def command(argv: list[str]) -> int:
    """`lf export cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors)."""
    from lf.config.parser import parse_infer_args

    written = export(parse_infer_args(argv, "export"))
    print(f"\nlf export: done. Model, tokenizer and generation config: {written['export_dir']}")
    for key in ("gguf", "modelfile"):
        if key in written:
            print(f"  {key}: {written[key]}")
    return 0


def export(cfg) -> dict:
    """Runs the steps of the module docstring for an InferConfig; returns what was written where
    (export_dir, and gguf/modelfile with export_gguf)."""
    args = cfg.export
    base_config = _check(cfg)
    tokenizer, template = _tokenizer_with_template(cfg)
    if args.export_gguf is not None:
        from lf.export.to_gguf import check_gguf

        check_gguf(base_config, tokenizer, args.export_gguf, Path(args.export_dir).resolve().name)
    media = _image_side(cfg, base_config, tokenizer, template)
    if args.export_quantization_bit is not None:
        from lf.export.gptq import calibration, quantize

        samples = calibration(tokenizer, args, cfg.model.cache_dir)  # (its data refused before the weights load)
    model = _merged_model(cfg, tokenizer, _dtype_name(_export_dtype(cfg), base_config))
    if args.export_quantization_bit is not None:
        model, line = quantize(model, samples, args)
        log.info("%s", line)
    model.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    export_dir = Path(args.export_dir)
    try:
        export_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"export_dir: {export_dir} cannot be created ({exc}): choose a folder you can write to")
    save_model(model, export_dir, args.export_size, args.export_legacy_format)
    tokenizer.save_pretrained(export_dir)
    if media is not None:
        media.save_pretrained(export_dir)
    log.info("saved the model (%s), its tokenizer%s to %s", str(model.dtype).removeprefix("torch."),
             " and its image processor" if media is not None else "", export_dir)
    written = {"export_dir": str(export_dir)}
    if args.export_gguf is not None:
        from lf.export.ollama import write_modelfile
        from lf.export.to_gguf import write_gguf

        gguf_path = write_gguf(model, tokenizer, template, export_dir, args.export_gguf)
        written["gguf"] = str(gguf_path)
        written["modelfile"] = str(write_modelfile(gguf_path, tokenizer, template))
    return written


def _check(cfg):
    """The export keys and the base model's config (returned), refused before anything loads."""
    from transformers import AutoConfig

    from lf.export.gptq import check as check_gptq
    from lf.export.gptq import check_model as check_gptq_model
    from lf.model.adapters import split_names
    from lf.model.loader import _hub_kwargs
    from lf.model.paths import download_error, resolve_model_path

    args, model_args = cfg.export, cfg.model
    if not args.export_dir:
        raise ConfigError("export_dir is missing: set export_dir to the folder the merged model is written to "
                          "(e.g. export_dir: saves/merged)")
    for key, allowed in (("export_dtype", DTYPES), ("export_device", DEVICES)):
        if getattr(args, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(args, key)!r} is not one of {', '.join(allowed)}")
    if args.export_size <= 0:
        raise ConfigError(f"export_size: {args.export_size} must be a positive number of GB per shard")
    check_gptq(args)
    if model_args.quantization_bit is not None:
        raise ConfigError(f"quantization_bit: {model_args.quantization_bit} would quantize the base model, and lf "
                          f"export merges adapters into full-precision weights only: remove quantization_bit (an "
                          f"adapter trained with QLoRA merges into the unquantized base it was trained on)")
    path = resolve_model_path(model_args)
    sources = [path, *split_names(model_args.adapter_name_or_path)]
    if any(os.path.realpath(source) == os.path.realpath(args.export_dir) for source in sources):
        raise ConfigError(f"export_dir: {args.export_dir} is where the model or an adapter is read from: choose "
                          f"another folder (writing there would overwrite the weights being read)")
    try:
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(model_args))
    except (OSError, ValueError) as exc:
        raise download_error(model_args.model_name_or_path, exc) from exc
    if getattr(config, "quantization_config", None) is not None:
        from lf.model.quantization import method_name

        raise ModelError(f"{model_args.model_name_or_path} is quantized by "
                         f"{method_name(config.quantization_config)}, and lf export merges adapters into "
                         f"full-precision weights only: set model_name_or_path to the unquantized base model (the "
                         f"one this was quantized from; an adapter trained with QLoRA merges into it)")
    if args.export_quantization_bit is not None:
        check_gptq_model(config, model_args, args.export_quantization_bit)
    return config


def _export_dtype(cfg) -> str:
    """export_dtype, or LLaMA-Factory's way (its export is saved in infer_dtype) when only infer_dtype is set; both
    set and different is refused (one would be ignored)."""
    export_dtype, infer_dtype = cfg.export.export_dtype, cfg.model.infer_dtype
    if export_dtype == "auto" or export_dtype == infer_dtype:
        return infer_dtype
    if infer_dtype != "auto":
        raise ConfigError(f"infer_dtype: {infer_dtype} and export_dtype: {export_dtype} both set the export's dtype, "
                          f"differently: keep one")
    return export_dtype


def _dtype_name(export_dtype: str, config) -> str:
    """export_dtype, or with auto the dtype the checkpoint was saved in (float32 when its config says none)."""
    if export_dtype != "auto":
        return export_dtype
    saved = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return saved if saved in DTYPES else "float32"


def _tokenizer_with_template(cfg):
    """The tokenizer fitted to the template, carrying it as its chat template (as `lf train` saves it), and the
    template."""
    from lf.data import fit_template
    from lf.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, fit_template(tokenizer, cfg.data)


def _image_side(cfg, config, tokenizer, template):
    """A vision-language model's MMProcessor (its image processor, saved with the export), or None for a text model;
    a VL model whose family lf has a plugin for needs that plugin's template (else its export could not be prompted
    with images as it was trained)."""
    from lf.data.mm_plugins import plugin_for
    from lf.data.templates import image_templates
    from lf.model import load_mm_processor

    own = plugin_for(config.model_type)
    if own is not None and template.mm_plugin != own.name:
        column = next(iter(own.modalities))  # images, or the audio of an audio-language model
        name = next(name for name, plugin in image_templates(column).items() if plugin == own.name)
        kind = "vision-language" if column == "images" else "multimodal"
        raise ConfigError(f"template: {template.name} takes no {column} of {cfg.model.model_name_or_path}, a "
                          f"{config.model_type} {kind} model: set template: {name}, which the export carries with "
                          f"the model's processor")
    return load_mm_processor(cfg.model, cfg.data, tokenizer, template)


def _merged_model(cfg, tokenizer, dtype: str):
    """The base model in `dtype` on export_device, with every adapter merged in, in order."""
    import torch

    from lf.model import load_model
    from lf.model.adapters import attach

    # lf's kernels only speed up training: the export runs no forward pass
    base_args = dataclasses.replace(cfg.model, adapter_name_or_path=None, infer_dtype=dtype, use_lf_kernels=False,
                                    enable_liger_kernel=False)
    model, lines = load_model(tokenizer, base_args, cfg.finetuning, is_trainable=False)
    from lf import device as accelerator

    device = accelerator.current().device() if cfg.export.export_device == "auto" else "cpu"
    model.to(device)  # the merges' matmuls run there
    log.info("export_device: %s: the adapters merge on %s", cfg.export.export_device, device)
    model, adapter_lines = attach(model, cfg.model, cfg.finetuning, is_trainable=False)
    for line in lines + adapter_lines:
        log.info("%s", line)
    return model.to(getattr(torch, dtype))  # peft's merge may leave fp32 weights beside 16-bit ones


def save_model(model, export_dir, export_size: float, legacy_format: bool = False) -> None:
    """save_pretrained in shards of at most `export_size` GB; `legacy_format`: PyTorch .bin files instead of
    safetensors (transformers 5 writes only safetensors, so its shards are rewritten as .bin)."""
    model.save_pretrained(export_dir, max_shard_size=max(int(export_size * GB), 1))
    if legacy_format:
        _to_bin(Path(export_dir))


def _to_bin(export_dir: Path) -> None:
    """model*.safetensors -> pytorch_model*.bin, with the index renamed to match (transformers loads either)."""
    import torch
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME

    def bin_name(name: str) -> str:
        return "pytorch_" + name.removesuffix(".safetensors") + ".bin"

    for shard in sorted(export_dir.glob("model*.safetensors")):
        torch.save(load_file(shard), export_dir / bin_name(shard.name))
        shard.unlink()
    index = export_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        content = json.loads(index.read_text())
        content["weight_map"] = {key: bin_name(name) for key, name in content["weight_map"].items()}
        (export_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(content, indent=2) + "\n")
        index.unlink()
