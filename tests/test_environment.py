"""lf's install and start-up leave the Python environment as they found it: the repository's Triton folder
`kernels/` never passes for PyPI's `kernels` package (transformers and bitsandbytes import that one), wherever Python
runs, and no lf import prints bitsandbytes' hub-kernel warning."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


@pytest.fixture(scope="module")
def fake_pypi_kernels(tmp_path_factory) -> str:
    """A folder holding a stand-in for PyPI's `kernels` package (a regular package with get_kernel)."""
    root = tmp_path_factory.mktemp("site")
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text("def get_kernel(*args, **kwargs):\n    raise RuntimeError('offline')\n")
    return str(root)


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_pypi_kernels_wins_over_the_triton_folder(where, fake_pypi_kernels, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    # The stand-in sits last on sys.path, after the repository (the working directory comes first), as
    # site-packages does after "" when Python starts in the repository.
    code = ("import sys; sys.path.append(%r)\n"
            "import kernels, lf._triton.kernels.rms_norm as ours\n"
            "print(kernels.__file__, ours.__file__)") % fake_pypi_kernels
    run = python(code, cwd)
    assert run.returncode == 0, run.stderr
    theirs, ours = run.stdout.split()
    assert theirs == str(pathlib.Path(fake_pypi_kernels) / "kernels" / "__init__.py")
    assert pathlib.Path(ours).name == "rms_norm.py"


def test_without_pypi_kernels_transformers_sees_none(tmp_path):
    run = python("from transformers.utils.import_utils import is_kernels_available\n"
                 "import lf._triton.kernels.glu\n"
                 "print(is_kernels_available())", tmp_path)
    assert run.returncode == 0 and run.stdout.split()[-1] == "False", run.stdout + run.stderr


def test_no_lf_import_prints_bitsandbytes_hub_kernel_warning(tmp_path):
    pytest.importorskip("bitsandbytes")
    run = python("import lf.model, bitsandbytes, peft, logging\n"
                 "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other bitsandbytes warning')", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr and "pip install kernels" not in run.stderr
    assert "other bitsandbytes warning" in run.stderr  # only that one line is filtered
