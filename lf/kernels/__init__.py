"""lf's fused kernels for any trainer: ``import lf.kernels``.

Each op has one entry point with a fused forward and backward, run by the backend chosen for its tensors'
device (see :mod:`lf.kernels._backend`; ``LF_KERNEL_BACKEND=triton|cpu|torch`` forces one).
"""

from lf.kernels._backend import BACKENDS, choose_backend, default_backend
from lf.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from lf.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from lf.kernels.fused_linear_preference_loss import fused_linear_preference_loss, sequence_logps
from lf.kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference
from lf.kernels.lora_linear import lora_linear, lora_linear_reference
from lf.kernels.lora_nf4_linear import dequantize_4bit, lora_nf4_linear, lora_nf4_linear_reference
from lf.kernels.patch import PatchReport, apply_to, patch, unpatch
from lf.kernels.modules import LFGeGLUMLP, LFRMSNorm, LFSwiGLUMLP
from lf.kernels.rms_norm import rms_norm, rms_norm_reference
from lf.kernels.rope import rope, rope_reference

__all__ = [
    "BACKENDS", "choose_backend", "default_backend",
    "rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy",
    "rms_norm_reference", "rope_reference", "swiglu_reference", "geglu_reference", "cross_entropy_reference",
    "fused_linear_cross_entropy_reference", "fused_linear_preference_loss", "sequence_logps", "lora_nf4_linear",
    "lora_nf4_linear_reference", "dequantize_4bit", "lora_linear", "lora_linear_reference",
    "LFRMSNorm", "LFSwiGLUMLP", "LFGeGLUMLP", "patch", "apply_to", "unpatch", "PatchReport",
]
