"""Every Triton kernel lf ships compiles ahead of time for sm_80 (A100) and sm_90 (H100) with no GPU, through the
ptxas that the triton wheel bundles, at the specialisations lf's launchers pick (bench/triton_aot.py): no spills,
registers and shared memory within the hardware's limits, and no kernel in kernels/ left out. A missing ptxas
fails the compile, and so the test: nothing here skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import triton_aot

REPO = Path(__file__).resolve().parent.parent
COMPILE_TIMEOUT_S = 900  # 88 compiles: about a minute on 2 loaded cores


@pytest.fixture(scope="module")
def launches():
    """Recorded under TRITON_INTERPRET=1 (conftest): interpreted kernels record launches as compiled ones do."""
    return triton_aot.launches()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """bench.triton_aot's result, run in a child without TRITON_INTERPRET, whose kernels are compilable
    JITFunctions."""
    path = tmp_path_factory.mktemp("triton_aot") / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.triton_aot", "--json", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert path.exists(), f"bench.triton_aot failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}" \
                          f"{proc.stderr[-6000:]}"
    return json.loads(path.read_text())


def test_every_kernel_in_kernels_is_launched_or_called(launches):
    assert set(triton_aot.CASES) == set(triton_aot.kernel_modules())
    assert triton_aot.uncovered({(x.module, x.kernel) for x in launches}) == []


def test_a_kernel_without_launches_is_reported(launches):
    launched = {(x.module, x.kernel) for x in launches} - {("rms_norm", "_bwd_kernel")}
    # _load_chunk is called by the backward kernel only; _xhat by the forward one too
    assert triton_aot.uncovered(launched) == ["rms_norm._bwd_kernel", "rms_norm._load_chunk"]


def test_launch_parameters_are_the_launchers_own(launches):
    """The recorded block sizes and warps are what the launchers' helpers compute for Llama-3-8B's shapes."""
    from lf._triton.kernels import cross_entropy, rms_norm

    ce = [x for x in launches if x.module == "cross_entropy"]
    assert {(x.kwargs["BLOCK"], x.kwargs["num_warps"]) for x in ce} == {cross_entropy._block(triton_aot.VOCAB)}
    norm = [x for x in launches if x.module == "rms_norm"]
    assert {(x.kernel, x.kwargs["BLOCK"], x.kwargs["ONE_BLOCK"], x.kwargs["num_warps"]) for x in norm} == {
        (kernel, *rms_norm._block(cols, limit)) for cols in (triton_aot.HIDDEN, triton_aot.WIDE_HIDDEN)
        for kernel, limit in (("_fwd_kernel", rms_norm.FWD_MAX_BLOCK), ("_bwd_kernel", rms_norm.BWD_MAX_BLOCK))}
    assert {x.kwargs["ONE_BLOCK"] for x in norm if x.kernel == "_bwd_kernel"} == {True, False}  # both paths
    assert {x.kwargs["HAS_DW"] for x in norm if x.kernel == "_bwd_kernel"} == {True, False}
    rot = [x for x in launches if x.module == "rope"]
    assert {(x.kwargs["BLOCK_HQ"], x.kwargs["BLOCK_HK"], x.kwargs["BLOCK_D"]) for x in rot} == {
        (triton_aot.HEADS, triton_aot.KV_HEADS, triton_aot.HEAD_DIM // 2)}
    assert {x.dtype for x in launches} == {"fp32", "bf16"}
    assert all(x.args[0].device.type == "meta" for x in launches)


def test_compiles_for_sm80_and_sm90_within_limits(result, launches):
    rows = result["rows"]
    launched = {(x.module, x.kernel) for x in launches}
    assert {(r["module"], r["kernel"], r["target"]) for r in rows} == {
        (m, k, t) for m, k in launched for t in ("sm_80", "sm_90")}
    # every recorded launch compiled on both targets (launches that specialise alike share a row)
    assert sum(len(r["cases"]) for r in rows) == 2 * len(launches)
    assert {r["ptxas_arch"] for r in rows} == {"sm_80", "sm_90a"}  # Triton builds sm_90a code for capability 90
    for r in rows:
        assert r["n_regs"] > 0 and r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, r
    bad = {f"{r['module']}.{r['kernel']} {r['target']} {r['dtype']} {r['constexprs']}": triton_aot.problems(r)
           for r in rows if triton_aot.problems(r)}
    assert bad == {}


def test_problems_flags_each_limit():
    fits = {"target": "sm_80", "n_regs": 64, "num_warps": 8, "spill_stores": 0, "spill_loads": 0, "shared": 1024}
    assert triton_aot.problems(fits) == []
    assert triton_aot.problems({**fits, "spill_loads": 8}) == ["spills (0 B stored, 8 B loaded per thread)"]
    assert "256 registers a thread > 255" in triton_aot.problems({**fits, "n_regs": 256})
    # 32 warps x 72 registers: 73728 of the SM's 65536, though 72 a thread is allowed; 64 fit exactly
    assert "the launch would fail" in triton_aot.problems({**fits, "num_warps": 32, "n_regs": 72})[0]
    assert triton_aot.problems({**fits, "num_warps": 32, "n_regs": 64}) == []
    assert triton_aot.problems({**fits, "shared": 164 * 1024}) == [
        f"{164 * 1024} B shared memory > {163 * 1024} B, the most a block gets on sm_80"]
    assert triton_aot.problems({**fits, "target": "sm_90", "shared": 164 * 1024}) == []
    assert triton_aot.resident_warps(fits) == 32  # 64 registers x 8 warps: 4 blocks of 16384 registers
