"""``python3 -m bench.gpu_check``: the first thing to run when a CUDA GPU is lent (bench/README.md). In under 8
minutes on an H100 it builds lf for the machine's Python, runs the Triton kernels' correctness tests on the GPU
(compiled by Triton there, not interpreted) and a quick ops bench there; each step's log goes to ``--logs``, a
summary to stdout; exit 1 if a step failed or ran out of time.

The tests are CI's own (``TESTS``, the ``triton`` cases): this module is also the pytest plugin (``-p
bench.gpu_check``) that makes torch create the tests' tensors on the GPU, with TRITON_INTERPRET=0 so that
tests/conftest.py leaves Triton's interpreter off.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The tests that run lf's Triton kernels; `-k triton` keeps their Triton cases (the backend fixture's "triton"
# parameter and the tests named for Triton). tests/test_lora_nf4_triton.py needs bitsandbytes.
TESTS = ("tests/test_rms_norm.py", "tests/test_rope.py", "tests/test_glu.py", "tests/test_cross_entropy.py",
         "tests/test_fused_linear_preference_loss.py", "tests/test_lora_nf4_linear.py",
         "tests/test_lora_nf4_triton.py")
# Seconds per step: together under 8 minutes, the machine's start and the copies aside.
BUILD_S, TESTS_S, OPS_S = 120, 210, 120


def pytest_configure(config) -> None:
    """As a pytest plugin: the tests' tensors made without a device go to the GPU."""
    import torch

    torch.set_default_device("cuda")


def _step(name: str, argv: list[str], timeout: int, logs: Path, env: dict[str, str]) -> str:
    """Runs one step, its output into logs/<name>.log; its status line."""
    start = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
            status = "ok" if code == 0 else f"FAILED (exit code {code})"
        except subprocess.TimeoutExpired:
            status = f"TIMED OUT after {timeout} s"
    tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return f"{name}: {status} in {time.perf_counter() - start:.0f} s; last line: {tail[0]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", type=Path, default=REPO / "bench" / "results" / "gpu-check" / "scratch",
                   help="folder for the steps' logs (default: bench/results/gpu-check/scratch/, git-ignored)")
    p.add_argument("--no-build", action="store_true", help="lf is already installed for this Python")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device for torch {torch.__version__}: run this where a GPU is lent")
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, python {sys.version.split()[0]}", flush=True)
    lines = []
    if not args.no_build:
        lines.append(_step("build", [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                     "--no-build-isolation", "-e", str(REPO)], BUILD_S, args.logs,
                           {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}))
        print(lines[-1], flush=True)
    tests = [t for t in TESTS if "nf4_triton" not in t or importlib.util.find_spec("bitsandbytes")]
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    lines.append(_step("tests", [sys.executable, "-m", "pytest", "-q", "-p", "bench.gpu_check", "-p",
                                 "no:cacheprovider", "-k", "triton", *workers, *tests], TESTS_S, args.logs,
                       {"TRITON_INTERPRET": "0"}))
    print(lines[-1], flush=True)
    lines.append(_step("ops", [sys.executable, "-m", "bench", "ops", "--quick", "--no-memory"], OPS_S, args.logs,
                       {"LF_BENCH_DEVICE": "cuda"}))
    print(lines[-1], flush=True)
    if len(tests) < len(TESTS):
        print("not run: tests/test_lora_nf4_triton.py (bitsandbytes is not installed)")
    return 0 if all(": ok in" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
