"""Vision-language models on infer_backend: vllm: vLLM's CPU build cannot load them here (its code for them imports
torchvision, and PyPI's torchvision is a CUDA build, removed from this venv as .ci/run does), so lf refuses such a
model in one line before vLLM starts; the API refuses images on the vLLM backend (test_vllm_api.py)."""

import pytest
from test_multimodal import llava  # noqa: F401 (the tiny LLaVA-1.5's fixture)

from lf.config import parse_infer_args
from lf.errors import ConfigError
from lf.serve.backends import open_engine


def test_vllm_cannot_import_its_llava_code_here():
    # the reason for the refusal below: once vLLM's CPU build loads vision models, lift it (and pass images on)
    with pytest.raises(ModuleNotFoundError, match="No module named 'torchvision'"):
        import vllm.model_executor.models.llava  # noqa: F401


def test_a_vision_model_is_refused_in_one_line_before_vllm_starts(llava, monkeypatch):  # noqa: F811
    import vllm

    monkeypatch.setattr(vllm.LLMEngine, "from_engine_args", lambda *a, **k: pytest.fail("vLLM was started"))
    cfg = parse_infer_args({"model_name_or_path": str(llava), "template": "llava", "infer_backend": "vllm",
                            "vllm_enforce_eager": True, "vllm_maxlen": 512}, "api")
    with pytest.raises(ConfigError) as caught:
        open_engine(cfg)
    assert str(caught.value) == (
        "infer_backend: vllm cannot load this llava model here: vLLM's code for vision models imports torchvision, "
        "which does not import (ModuleNotFoundError: No module named 'torchvision'; PyPI's torchvision is a CUDA "
        "build); serve it with infer_backend: huggingface, which takes its images too")
