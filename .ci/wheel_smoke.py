"""Run from a fresh venv holding only the built wheel (and its dependencies), outside the repository:
the installed package imports, carries its C++ extension and Triton sources, and computes correctly."""

import importlib.util
import pathlib
import subprocess
import sys

import torch

import lf
from lf import _C
from lf.kernels import (choose_backend, fused_linear_cross_entropy, fused_linear_cross_entropy_reference, rms_norm,
                        rms_norm_reference, rope, rope_reference, swiglu, swiglu_reference)

repo = pathlib.Path(sys.argv[1]).resolve()
installed = pathlib.Path(lf.__file__).resolve()
assert repo not in installed.parents, f"lf was imported from the repository ({installed}), not from the wheel"
for module in ("lf._triton.kernels.rms_norm", "lf._triton.kernels.rope", "lf._triton.kernels.glu",
               "lf._triton.kernels.cross_entropy", "lf._triton.kernels.lora_nf4_linear"):
    assert importlib.util.find_spec(module) is not None, f"{module} is missing from the wheel"
assert choose_backend("cpu") == "cpu"
# The Triton sources ship inside lf only: a top-level `kernels` would shadow PyPI's (transformers imports that one).
assert importlib.util.find_spec("kernels") is None, "the wheel installs a top-level kernels package"

x, w = torch.randn(3, 65), torch.randn(65)
torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
q, k, cos, sin = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
for got, want in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
    torch.testing.assert_close(got, want)
g, u = torch.randn(4, 33), torch.randn(4, 33)
torch.testing.assert_close(swiglu(g, u), swiglu_reference(g, u))
h, w, y = torch.randn(5, 16), torch.randn(40, 16), torch.tensor([3, -100, 0, 39, 7])
torch.testing.assert_close(fused_linear_cross_entropy(h, w, y), fused_linear_cross_entropy_reference(h, w, y))

cli = subprocess.run([str(pathlib.Path(sys.executable).parent / "lf"), "env"], capture_output=True, text=True, check=True)
assert "cpu backend" in cli.stdout, cli.stdout
bench = subprocess.run([str(pathlib.Path(sys.executable).parent / "lf"), "bench"], capture_output=True, text=True)
assert bench.returncode == 2 and "source tree" in bench.stderr, bench.stderr  # benchmarks are not in the wheel
from lf.resources import shipped  # noqa: E402

for name, probe in (("data", "dataset_info.json"), ("evaluation", "lf_mc_demo/mapping.json"),
                    ("evaluation", "lf_mmlu_demo/lf_mmlu_demo.zip"), ("evaluation", "lf_ceval_demo/mapping.json")):
    assert (shipped(name) / probe).is_file() and installed.parent in shipped(name).parents, f"{name}/ not in the wheel"
print(f"wheel OK: lf {lf.__version__} from {installed.parent}, CPU kernels {_C.isa()}")
