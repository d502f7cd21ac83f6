"""The model group: what to load, how (dtype, attention, quantization) and with which kernels (LLaMA-Factory's
key names). A key that takes one of a few values is typed with its Literal, declared here once: lf.config's rules
refuse other values and the code that reads the key imports the Literal (typing.get_args)."""

from dataclasses import dataclass
from typing import Literal

Dtype = Literal["auto", "float16", "bfloat16", "float32"]  # weights' dtype; auto: per device (lf.model.options)
FlashAttn = Literal["auto", "disabled", "sdpa", "fa2"]  # disabled: eager attention
RopeScaling = Literal["linear", "dynamic", "yarn", "llama3"]
CpuAllocator = Literal["tuned", "default"]  # glibc's malloc settings (lf/allocator.py)
InitSpecialTokens = Literal["noise_init", "desc_init", "desc_init_w_noise"]  # lf.model.special_tokens
# LLaMA-Factory's quantization_method names; lf.model.quantization builds bnb, hqq and quanto and refuses the others,
# saying why
QuantizationMethod = Literal["bnb", "bitsandbytes", "hqq", "eetq", "gptq", "awq", "aqlm", "quanto"]
QuantizationBit = Literal[4, 8]  # bitsandbytes' (and the reward model's, which loads with it)
AnyQuantizationBit = Literal[1, 2, 3, 4, 5, 6, 8]  # every method's together; QUANTIZATION_BITS has each one's
QuantizationType = Literal["nf4", "fp4"]
# the bits each method lf builds takes (LLaMA-Factory's), and why lf refuses the other methods (checked with torch
# 2.13 CPU, transformers 5.23 on an AMD EPYC; GPTQModel 7.6 in a venv of its own on a Xeon: README's table)
QUANTIZATION_BITS = {"bnb": (4, 8), "bitsandbytes": (4, 8), "hqq": (1, 2, 3, 4, 5, 6, 8), "quanto": (2, 4, 8)}
QUANTIZATION_REFUSED = {
    "eetq": "the eetq package has no distribution on the package index, and its kernels are CUDA-only",
    "gptq": "GPTQ quantizes offline, calibrated on data; lf trains LoRA on a GPTQ checkpoint given as "
            "model_name_or_path, without quantization_bit (lf export's export_quantization_bit makes one)",
    "awq": "AWQ quantizes offline, calibrated on data; lf trains LoRA on an AWQ checkpoint given as "
           "model_name_or_path, without quantization_bit (GPTQModel makes one, on the CPU too: README)",
    "aqlm": "AQLM quantizes offline; lf trains LoRA on an AQLM checkpoint given as model_name_or_path, without "
            "quantization_bit",
}
InferBackend = Literal["huggingface", "vllm", "sglang"]  # the engine of lf chat/api/webchat and do_predict
MixtureOfDepths = Literal["convert", "load"]  # lf.model.mixture_of_depths


@dataclass
class ModelArguments:
    model_name_or_path: str | None = None  # local path or hub id; "lf-tiny-llama": the quickstart model, built here
    adapter_name_or_path: str | None = None  # comma-separated LoRA adapters to load (merged unless trained further)
    adapter_folder: str | None = None  # a subfolder of each of them holding the adapter (joined on by the parser)
    offload_folder: str | None = None  # inference: weights beyond free memory wait on disk here (device_map auto)
    cache_dir: str | None = None
    model_revision: str = "main"
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    split_special_tokens: bool = False
    add_tokens: str | None = None  # comma-separated plain tokens to add to the tokenizer
    add_special_tokens: str | None = None  # comma-separated special tokens to add
    new_special_tokens: str | None = None  # older LLaMA-Factory name of add_special_tokens
    new_special_tokens_config: str | None = None  # a YAML {token: description} of special tokens to add
    init_special_tokens: InitSpecialTokens = "noise_init"  # desc_*: new rows from their descriptions' embeddings
    resize_vocab: bool = False  # grow the embeddings to the tokenizer (and train them)
    low_cpu_mem_usage: bool = True
    infer_dtype: Dtype = "auto"  # the dtype weights are loaded in
    rope_scaling: RopeScaling | None = None  # stretch RoPE to cutoff_len
    moe_aux_loss_coef: float | None = None  # MoE: the router's load-balancing loss, this times, in training
    shift_attn: bool = False  # LongLoRA's shifted sparse attention in training (lf.model.longlora)
    # routers on every other decoder layer: convert a plain model, or load one a convert run saved
    mixture_of_depths: MixtureOfDepths | None = None
    flash_attn: FlashAttn = "auto"
    use_lf_kernels: bool = True  # patch lf's fused kernels into the model (lf.kernels.patch)
    cpu_allocator: CpuAllocator = "tuned"  # glibc's malloc settings when training on the CPU
    enable_liger_kernel: bool = False  # LLaMA-Factory's switch: maps onto lf's kernels, and says so
    use_unsloth: bool = False  # LLaMA-Factory's switch for Unsloth's patched training: maps onto lf's kernels too
    use_unsloth_gc: bool = False  # offloaded gradient checkpointing: layer inputs wait in CPU memory (on accelerators)
    # None: off on the CPU when the activations it would save fit in a tenth of the available memory, else on
    disable_gradient_checkpointing: bool | None = None
    # checkpoint one decoder layer in k (1: every layer): more speed for more memory
    gradient_checkpointing_every: int = 1
    use_reentrant_gc: bool = True
    upcast_layernorm: bool = False
    upcast_lmhead_output: bool = False
    train_from_scratch: bool = False  # random weights from the model's config
    quantization_method: QuantizationMethod = "bnb"
    quantization_bit: AnyQuantizationBit | None = None  # QLoRA
    quantization_type: QuantizationType = "nf4"
    double_quantization: bool = True
    quantization_device_map: str | None = None
    use_cache: bool = True  # KV cache at generation (training always runs without)
    print_param_status: bool = False
    hf_hub_token: str | None = None
    # the inference engine (lf.serve.backends): transformers, or vLLM (lf[vllm]; its keys as LLaMA-Factory's)
    infer_backend: InferBackend = "huggingface"
    vllm_maxlen: int = 4096  # the longest prompt + reply vLLM schedules (its max_model_len)
    vllm_gpu_util: float = 0.7  # share of GPU memory vLLM takes (ignored by its CPU build)
    vllm_enforce_eager: bool = False  # no CUDA graphs / torch.compile
    vllm_max_lora_rank: int = 32  # the largest LoRA rank vLLM serves
    vllm_config: dict | str | None = None  # more vLLM engine arguments (a mapping, or its JSON text)
