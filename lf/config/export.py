"""The export group: where and how `lf export` writes the merged model (LLaMA-Factory's key names, plus GGUF).
Choices are Literals declared once (see lf/config/model.py)."""

from dataclasses import dataclass
from typing import Literal

from lf.config.model import Dtype

ExportDevice = Literal["cpu", "auto"]  # auto: the accelerator when there is one
GgufType = Literal["f32", "f16", "bf16", "q8_0"]
ExportQuantizationBit = Literal[2, 3, 4, 8]  # GPTQ's (lf.export.gptq)


@dataclass
class ExportArguments:
    export_dir: str | None = None  # the folder the merged model, its tokenizer (and GGUF, Modelfile) go to
    export_size: float = 5  # the largest weights shard, in GB (10^9 bytes; a fraction such as 0.5 works too)
    export_dtype: Dtype = "auto"  # auto: the model's own
    export_device: ExportDevice = "cpu"  # where the merge runs
    export_legacy_format: bool = False  # true: PyTorch .bin files instead of safetensors (for tools that need them)
    export_gguf: GgufType | None = None  # also a GGUF file (+ an Ollama Modelfile) of this type
    # a GPTQ-quantized export (lf.export.gptq; needs lf[gptq]), calibrated on export_quantization_dataset: a
    # json/jsonl/csv/parquet/txt file or a datasets folder or name, whose "text" column is read
    export_quantization_bit: ExportQuantizationBit | None = None
    export_quantization_dataset: str | None = None
    export_quantization_nsamples: int = 128  # calibration windows, each of export_quantization_maxlen tokens
    export_quantization_maxlen: int = 1024
