"""The ratio suite: lf's CPU kernels against the code they replace, measured in the same run, ratios asserted.

CI runs it as its own step (a plain ``pytest`` collects tests/ only, and those never judge timings)::

    pytest -q -s -p no:cacheprovider bench/test_ratios.py --benchmark-json bench.json  # -s prints the ratios

A shared 2-core machine's speed drifts by tens of percent within seconds, so nothing here asserts a time.
Each test times lf and its baseline on the same inputs in the same process, taking turns (baseline, lf,
baseline, lf, ...), so that a burst of load falls on both, and asserts the ratio of the two medians. lf's calls
run inside ``benchmark.pedantic`` (pytest-benchmark's table and JSON show them); each round's untimed setup
runs the baseline. Both sides are also timed with ``time.perf_counter`` around the call alone, and the ratio
comes from those. Every call is forward + backward, with the gradients set to None (untimed) before it.
Peak memory is measured in child processes, as ``python -m bench lm-head-loss`` does.

glibc's allocator is left at its defaults (bench/harness.py's "default"): both sides share it.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from bench import lm_head_loss
from bench.qlora_linear import build as qlora_layer
from lf.kernels import rms_norm, rope, swiglu
from lf.kernels._backend import matmul_in_fp32

REPO = Path(__file__).resolve().parent.parent
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM, EPS = 4096, 14336, 32, 8, 128, 1e-6  # Llama-3-8B

# lf's fused forward + backward against HF eager, as bench/ops.py times them at Llama-3-8B widths, over
# fewer tokens. Each bound sits well below the medians this suite measured on a 2-core Intel Xeon (AMX), also
# under heavy load from other processes (rms_norm 4.7-16.5x, rope 5.1-11x), with room for the other kind of
# machine CI has run on (an AVX2 AMD EPYC, where the full-size benchmark measured rope 5.1x): a fall below it
# is a regression, not noise. SwiGLU is compute-bound on the CPU (its exp), and HF eager's bf16 is fast whenever
# glibc hands its 29 MB temporaries back from the heap: on the Xeon, swiglu measured fp32 1.52-1.57x and bf16
# 1.26x in three runs (2026-12-05), and CI once measured bf16 1.18x before vexp lost its multiply and sign
# fix-up (csrc/common.h, ~12% off lf's kernels). Its bound says the fusion still wins, with room for that machine.
# On a 2-core AMD EPYC (AVX-512-BF16), idle, swiglu bf16 measured 1.27x, 1.03x, 0.98x and 1.21x in four runs on
# 2026-12-06, lf's own time 14-25 ms between runs: each of its fresh 28 MiB outputs came either from glibc's heap,
# resident, or as new pages to fault in, depending on what earlier frees had left (fp32's 56 MiB are always new
# pages). lf's elementwise outputs now come from recycled buffers (lf/kernels/_alloc.py: recycled_like), and
# swiglu bf16 measured 1.50x on that machine under heavy load (load average 13), so it has the common bound again.
OP_CASES = {  # op: (tokens, least speed-up over HF eager)
    "rms_norm": (2048, 1.5),
    "rope": (1024, 3.0),
    "swiglu": (1024, 1.1),
}
OP_DTYPE_LEAST: dict[tuple[str, str], float] = {}  # (op, dtype): a bound other than OP_CASES's
OP_WARMUP, OP_ROUNDS = 2, 25  # 25: a median that one allocator-state flip in a few rounds does not move

# Matmul cases run in bf16 where the CPU has native bf16 dot products, as lf decides (AVX512-BF16 or AMX).
# Elsewhere torch's bf16 matmul backward runs at ~0.5 GFLOP/s (bench/README.md): minutes at these sizes.
MATMUL_DTYPE = "fp32" if matmul_in_fp32(torch.empty(0, dtype=torch.bfloat16)) else "bf16"

# QLoRA linear: q_proj's width (4096 -> 4096, one of lf's dequantisation tiles) over 256 tokens, against PEFT +
# bitsandbytes as bench/qlora_linear.py builds them. Not the MLP widths (several tiles): under heavy load from
# other processes lf's tiled path slows down far more than the baseline (1.1x measured, ~2x on a quiet machine).
# Measured alone: 1.4-2.1x (fp32, as on CPUs without native bf16: 1.4x). Inside .ci/run, after the test suite,
# 1.13-1.15x (2026-11-29, here and on CI's machine; rounds 0.93-1.22x): bitsandbytes' step then took 23-27 ms
# against 40-62 ms alone, its fresh 32 MiB dequantised weight costing far less, so lf's lead is its fused LoRA
# path alone. The bar asks that lf is not slower; bench/qlora_linear.py measures the full comparison. Not 1.5x:
# on CPUs without native bf16 this case runs in fp32, where both sides spend most of their time in the same two
# torch GEMMs; on a 2-core Ice Lake Xeon (loaded, 2026-12-07) PEFT + bnb took only 1.56x the bare GEMMs' time at
# q_proj (bench/qlora_floor.py), so no kernel that multiplies with torch's GEMMs clears 1.5x there with margin.
QLORA_SHAPE, QLORA_SPEEDUP, QLORA_WARMUP, QLORA_ROUNDS = (256, 4096, 4096), 1.0, 2, 30

# lm_head + loss: lf_fused against hf (F.linear, then transformers' ForCausalLMLoss, which upcasts the logits to
# fp32). The logits must dominate the weight's gradient, which both keep; in fp32 they must also exceed lf's
# 512 MiB chunk floor, or lf holds them in one chunk too.
FLCE_SHAPES = {"bf16": (2048, 1024, 32000), "fp32": (6144, 256, 32000)}  # tokens, hidden, vocab
FLCE_MEMORY_FRACTION = 0.40  # lf's extra peak / hf's, at most (measured: 26% in bf16, 26-28% in fp32)
FLCE_SPEEDUP = 1.0  # lf at least as fast (measured: 1.55-2.1x in bf16, 1.35x in fp32)
FLCE_WARMUP, FLCE_ROUNDS = 1, 5
CHILD_TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    """lf's C++ backend, forced (an unusable one fails instead of falling back); a fixed seed."""
    monkeypatch.setenv("LF_KERNEL_BACKEND", "cpu")
    torch.manual_seed(SEED)
    yield
    gc.collect()  # the case's tensors go before the next test allocates its own


def interleaved(benchmark, lf_call: Callable[[], object], baseline_call: Callable[[], object],
                reset: Callable[[], None], warmup: int, rounds: int) -> dict:
    """Time lf and the baseline in turns; return their medians and baseline median / lf median."""
    assert benchmark.enabled, "the ratio suite times through pytest-benchmark: run it without --benchmark-disable"
    times: dict[str, list[float]] = {"baseline": [], "lf": []}

    def timed(name: str, call: Callable[[], object]) -> None:
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)

    def setup() -> None:  # untimed by pytest-benchmark
        reset()
        timed("baseline", baseline_call)
        reset()  # lf starts from no gradients too; its own are freed, untimed, in the next round's setup

    benchmark.pedantic(timed, args=("lf", lf_call), setup=setup, rounds=rounds, warmup_rounds=warmup)
    reset()
    assert all(len(t) == warmup + rounds for t in times.values()), {k: len(t) for k, t in times.items()}
    medians = {name: statistics.median(t[warmup:]) for name, t in times.items()}
    # Each round's own ratio too (its two calls ran seconds apart at most): shows how far the noise went.
    pairs = [b / f for b, f in zip(times["baseline"][warmup:], times["lf"][warmup:])]
    return {"baseline_ms": medians["baseline"] * 1e3, "lf_ms": medians["lf"] * 1e3,
            "speedup": medians["baseline"] / medians["lf"], "round_speedups": pairs,
            "baseline_round_ms": [t * 1e3 for t in times["baseline"][warmup:]], "warmup": warmup, "rounds": rounds}


def op_case(op: str, tokens: int, dtype: torch.dtype) -> tuple[tuple, tuple, Callable, Callable]:
    """(inputs, leaves that get a .grad, lf's op, HF's eager code), made as bench/ops.py makes them."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.requires_grad_()

    if op == "rms_norm":
        x = leaf(torch.randn(1, tokens, HIDDEN, dtype=dtype))
        hf = LlamaRMSNorm(HIDDEN, eps=EPS).to(dtype)  # weight of ones, as initialised
        w = leaf(hf.weight.detach().clone())
        return (x,), (x, w, hf.weight), lambda x: rms_norm(x, w, EPS), hf
    if op == "rope":  # q and k as HF's attention makes them: (batch, seq, heads, dim) viewed heads-first
        q = leaf(torch.randn(1, tokens, Q_HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2))
        k = leaf(torch.randn(1, tokens, KV_HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2))
        config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                             head_dim=HEAD_DIM, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        cos, sin = LlamaRotaryEmbedding(config)(q, torch.arange(tokens)[None])
        return (q, k, cos, sin), (q, k), rope, apply_rotary_pos_emb
    if op == "swiglu":  # HF's LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
        gate, up = (leaf(torch.randn(tokens, INTERMEDIATE, dtype=dtype)) for _ in range(2))
        return (gate, up), (gate, up), swiglu, lambda gate, up: F.silu(gate) * up
    raise ValueError(op)


def check_speedup(benchmark, what: str, result: dict, least: float) -> None:
    benchmark.extra_info.update(result, least_speedup=least)
    low, high = min(result["round_speedups"]), max(result["round_speedups"])
    print(f"\n{what}: lf {result['lf_ms']:.2f} ms, baseline {result['baseline_ms']:.2f} ms: "
          f"{result['speedup']:.2f}x (at least {least}x; single rounds {low:.2f}x to {high:.2f}x)")
    assert result["speedup"] >= least, (f"{what}: lf is {result['speedup']:.2f}x faster than its baseline, "
                                        f"below {least}x (medians of {result['rounds']} interleaved rounds)")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("op", list(OP_CASES))
def test_op_vs_hf_eager(benchmark, op, dtype):
    """lf's op vs HF eager: LlamaRMSNorm, apply_rotary_pos_emb, F.silu(gate) * up."""
    tokens, least = OP_CASES[op]
    least = OP_DTYPE_LEAST.get((op, dtype), least)
    args, leaves, lf_op, eager = op_case(op, tokens, DTYPES[dtype])
    out = lf_op(*args)
    grads = tuple(torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,)))
    del out

    def fwd_bwd(fn):
        return lambda: torch.autograd.backward(fn(*args), grads)

    def reset():
        for t in leaves:
            t.grad = None

    result = interleaved(benchmark, fwd_bwd(lf_op), fwd_bwd(eager), reset, OP_WARMUP, OP_ROUNDS)
    check_speedup(benchmark, f"{op} {dtype}, {tokens} tokens, fwd+bwd vs HF eager", result, least)


def test_lora_nf4_linear_vs_peft_bnb(benchmark):
    """QLoRA linear (NF4 weight + LoRA r 16), fwd+bwd, vs PEFT's LoRA over bitsandbytes' Linear4bit; in bf16
    the forwards run under CPU autocast, as HF Trainer runs them (bench/qlora_linear.py builds both)."""
    tokens, in_f, out_f = QLORA_SHAPE
    dtype = DTYPES[MATMUL_DTYPE]
    layers = {v: qlora_layer(v, in_f, out_f, tokens, dtype, SEED) for v in ("lf", "peft_bnb")}

    def fwd_bwd(variant):
        forward, _, _, dy, _ = layers[variant]
        return lambda: torch.autograd.backward(forward(), dy)

    def reset():
        for _, leaves, *_ in layers.values():
            for t in leaves:
                t.grad = None

    result = interleaved(benchmark, fwd_bwd("lf"), fwd_bwd("peft_bnb"), reset, QLORA_WARMUP, QLORA_ROUNDS)
    # bitsandbytes repacks a weight for its CPU inference path when not training: that is not QLoRA's baseline
    assert not getattr(layers["peft_bnb"][4], "packing_format_for_cpu", False), "bitsandbytes repacked the weight"
    check_speedup(benchmark, f"lora_nf4_linear {MATMUL_DTYPE}, {in_f} -> {out_f}, {tokens} tokens, fwd+bwd "
                             f"vs PEFT + bitsandbytes", result, QLORA_SPEEDUP)


def extra_peak_mib(variant: str, dtype: str, tokens: int, hidden: int, vocab: int) -> dict:
    """One fwd+bwd of an lm_head + loss variant in a fresh process (bench/lm_head_loss.py's worker): its peak
    RSS above the RSS just before it, gradients included; glibc's defaults give large buffers back on free."""
    with tempfile.TemporaryDirectory(prefix="lf-ratios-") as tmp:
        path = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", "bench.lm_head_loss", "--worker", "--dtype", dtype, "--variant", variant,
               "--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(vocab), "--result-file", str(path)]
        subprocess.run(cmd, cwd=REPO, check=True, timeout=CHILD_TIMEOUT_S)
        result = json.loads(path.read_text())
    assert result["stage"] == "done", result
    assert result["hwm_after_reset_kib"] <= result["rss_before_kib"] + 1024, "VmHWM did not reset: no peak to read"
    return result


def test_fused_linear_cross_entropy_vs_hf(benchmark):
    """lm_head + loss, fwd+bwd: lf's fused_linear_cross_entropy never holds all the logits, so its extra peak
    memory is at most 40% of HF's; and it is not slower."""
    dtype = MATMUL_DTYPE
    tokens, hidden, vocab = FLCE_SHAPES[dtype]
    peaks = {v: extra_peak_mib(v, dtype, tokens, hidden, vocab) for v in ("hf", "lf_fused")}
    fraction = peaks["lf_fused"]["extra_peak_mib"] / peaks["hf"]["extra_peak_mib"]
    loss_rel = abs(peaks["lf_fused"]["loss"] - peaks["hf"]["loss"]) / abs(peaks["hf"]["loss"])

    inputs = lm_head_loss.make_inputs(tokens, hidden, vocab, DTYPES[dtype])

    def fwd_bwd(variant):
        return lambda: lm_head_loss.forward(variant, *inputs).backward()

    def reset():
        inputs[0].grad = inputs[1].grad = None

    result = interleaved(benchmark, fwd_bwd("lf_fused"), fwd_bwd("hf"), reset, FLCE_WARMUP, FLCE_ROUNDS)
    del inputs
    benchmark.extra_info.update({f"{v}_extra_peak_mib": p["extra_peak_mib"] for v, p in peaks.items()},
                                memory_fraction=fraction, most_memory_fraction=FLCE_MEMORY_FRACTION)
    what = f"fused_linear_cross_entropy {dtype}, {tokens} tokens x hidden {hidden} x vocab {vocab}"
    print(f"\n{what}: extra peak lf {peaks['lf_fused']['extra_peak_mib']:.0f} MiB, "
          f"hf {peaks['hf']['extra_peak_mib']:.0f} MiB: {fraction:.0%} (at most {FLCE_MEMORY_FRACTION:.0%})")
    assert loss_rel <= lm_head_loss.LOSS_RTOL[dtype], f"{what}: losses differ by {loss_rel:.1e} relative"
    assert fraction <= FLCE_MEMORY_FRACTION, (f"{what}: lf's extra peak is {fraction:.0%} of HF's, above "
                                              f"{FLCE_MEMORY_FRACTION:.0%}")
    check_speedup(benchmark, f"{what}, fwd+bwd vs hf", result, FLCE_SPEEDUP)
