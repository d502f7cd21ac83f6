"""The GPTQ tests, run in a venv of their own (.ci/run: `pip install -e ".[gptq,gptq-test]"`; GPTQModel pins numpy
2.2.6 and protobuf>=7.34, which lf[test]'s swanlab refuses), not collected by the main `pytest` (pyproject's
testpaths). They run GPTQModel for real on the CPU, on the tiny Llama and tiny vision-language models."""

import os

# Set before GPTQModel is imported: no hub; its pool of CPU workers sized for a 2-core machine (its default of 1
# fails there: "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"); and its packing in
# Python (the tiny layers pack in a moment) rather than through the C++ extension it compiles on first use (~8 min).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # lf's tiny vision-language models


@pytest.fixture(scope="session", autouse=True)
def lf_home(tmp_path_factory):
    """The tiny model is built once, in a temporary LF_HOME."""
    os.environ["LF_HOME"] = str(tmp_path_factory.mktemp("lf_home"))
    return os.environ["LF_HOME"]
