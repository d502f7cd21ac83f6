"""The model group: what to load, how (dtype, attention, quantization) and with which kernels (LLaMA-Factory's
key names)."""

from dataclasses import dataclass


@dataclass
class ModelArguments:
    model_name_or_path: str | None = None  # local path or hub id; "lf-tiny-llama": the quickstart model, built here
    adapter_name_or_path: str | None = None  # comma-separated LoRA adapters to load (merged unless trained further)
    cache_dir: str | None = None
    model_revision: str = "main"
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    split_special_tokens: bool = False
    add_tokens: str | None = None  # comma-separated plain tokens to add to the tokenizer
    add_special_tokens: str | None = None  # comma-separated special tokens to add
    new_special_tokens: str | None = None  # older LLaMA-Factory name of add_special_tokens
    resize_vocab: bool = False  # grow the embeddings to the tokenizer (and train them)
    low_cpu_mem_usage: bool = True
    infer_dtype: str = "auto"  # auto | float16 | bfloat16 | float32: the dtype weights are loaded in
    rope_scaling: str | None = None  # linear | dynamic | yarn | llama3: stretch RoPE to cutoff_len
    flash_attn: str = "auto"  # auto | disabled (eager) | sdpa | fa2
    use_lf_kernels: bool = True  # patch lf's fused kernels into the model (lf.kernels.patch)
    cpu_allocator: str = "tuned"  # tuned | default: glibc's malloc settings when training on the CPU (lf/allocator.py)
    enable_liger_kernel: bool = False  # LLaMA-Factory's switch: maps onto lf's kernels, and says so
    # None: off on the CPU when the activations it would save fit in a tenth of the available memory, else on
    disable_gradient_checkpointing: bool | None = None
    # checkpoint one decoder layer in k (1: every layer): more speed for more memory
    gradient_checkpointing_every: int = 1
    use_reentrant_gc: bool = True
    upcast_layernorm: bool = False
    upcast_lmhead_output: bool = False
    train_from_scratch: bool = False  # random weights from the model's config
    quantization_method: str = "bnb"  # bitsandbytes; others are not supported yet
    quantization_bit: int | None = None  # 4 | 8: QLoRA
    quantization_type: str = "nf4"  # nf4 | fp4
    double_quantization: bool = True
    quantization_device_map: str | None = None
    use_cache: bool = True  # KV cache at generation (training always runs without)
    print_param_status: bool = False
    hf_hub_token: str | None = None
