"""The model layer of `lf train` and inference: load a tokenizer and a causal LM, quantize it (QLoRA), patch lf's
kernels in, attach adapters."""

from lf.model.loader import load_inference_model, load_model, load_tokenizer
from lf.model.processor import load_mm_processor

__all__ = ["load_inference_model", "load_mm_processor", "load_model", "load_tokenizer"]
