"""The export group: where and how `lf export` writes the merged model (LLaMA-Factory's key names, plus GGUF)."""

from dataclasses import dataclass


@dataclass
class ExportArguments:
    export_dir: str | None = None  # the folder the merged model, its tokenizer (and GGUF, Modelfile) go to
    export_size: float = 5  # the largest weights shard, in GB (10^9 bytes; a fraction such as 0.5 works too)
    export_dtype: str = "auto"  # auto (the model's own) | float32 | bfloat16 | float16
    export_device: str = "cpu"  # where the merge runs: cpu | auto (the accelerator when there is one)
    export_legacy_format: bool = False  # true: PyTorch .bin files instead of safetensors (for tools that need them)
    export_gguf: str | None = None  # also a GGUF file (+ an Ollama Modelfile) of this type: f32 | f16 | bf16 | q8_0
