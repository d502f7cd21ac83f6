"""The export group: where and how `lf export` writes the merged model (LLaMA-Factory's key names, plus GGUF).
Choices are Literals declared once (see lf/config/model.py)."""

from dataclasses import dataclass
from typing import Literal

from lf.config.model import Dtype

ExportDevice = Literal["cpu", "auto"]  # auto: the accelerator when there is one
GgufType = Literal["f32", "f16", "bf16", "q8_0"]

# Why LLaMA-Factory's export_quantization_* keys are refused (parser.UNSUPPORTED) rather than ignored: a 4-bit request
# must not quietly yield a 16-bit model. GPTQModel's pins, read from its PyPI metadata (2026-12); GPTQModel 7.7 with
# torch 2.14.1 quantized a tiny Llama on a 2-core Ice Lake Xeon in a venv of its own (README, Quantized training).
GPTQ_FIX = ("remove it: a GPTQ export needs GPTQModel, which cannot install beside lf's torch 2.13 (7.7 requires "
            "torch>=2.14.1; 7.3.6 pins numpy 2.2.6 and builds from source); quantize the exported model with "
            "GPTQModel 7.7 in a venv of its own (torch 2.14.1; it runs on the CPU too, GPTQMODEL_CPU_WORKERS=2 on a "
            "2-core machine), or set export_gguf: q8_0 for an 8-bit llama.cpp file")


@dataclass
class ExportArguments:
    export_dir: str | None = None  # the folder the merged model, its tokenizer (and GGUF, Modelfile) go to
    export_size: float = 5  # the largest weights shard, in GB (10^9 bytes; a fraction such as 0.5 works too)
    export_dtype: Dtype = "auto"  # auto: the model's own
    export_device: ExportDevice = "cpu"  # where the merge runs
    export_legacy_format: bool = False  # true: PyTorch .bin files instead of safetensors (for tools that need them)
    export_gguf: GgufType | None = None  # also a GGUF file (+ an Ollama Modelfile) of this type
