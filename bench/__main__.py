"""``python -m bench [ops]``: lf's kernels against HF eager, torch.compile of it and, on a GPU where it is installed,
Liger-Kernel, at Llama-3-8B, Qwen2.5-7B and Gemma-2-9B widths in fp32 and bf16: forward, backward and
forward+backward time, peak memory, and lf's bandwidth (and FLOP/s) as a share of the machine's own limits
measured in the same run. See bench/README.md ("lf CPU kernel benchmark").

``python -m bench lm-head-loss [...]``, ``python -m bench qlora-linear [...]``, ``python -m bench quant-linear [...]``,
``python -m bench dpo-step [...]``, ``python -m bench ppo-step [...]``, ``python -m bench serve [...]``,
``python -m bench triton-aot [...]`` and ``python -m bench oversubscription [...]`` run those benchmarks instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness, ops
from bench.harness import ratio_text
from bench.lm_head_loss import OTHERS_SHARE_WARN, _cpu_seconds, _git_dirty, _status_kib, _write_json
from bench.qlora_linear import _malloc_trim

REPO = Path(__file__).resolve().parent.parent
DTYPE_NAMES = tuple(ops.DTYPES)
BASELINES = {"eager": "HF eager", "compile": "torch.compile", "liger": "Liger"}
MEMORY_TIMEOUT_S = 900.0  # per memory child; the slowest full-size one takes about a minute on 2 cores


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=harness.names_parser(tuple(ops.MODELS)),
                   help=f"comma-separated (default: all; --quick: {ops.QUICK_MODEL})")
    p.add_argument("--ops", type=harness.names_parser(ops.OP_NAMES), default=list(ops.OP_NAMES),
                   help="comma-separated (default: all; swiglu runs for Llama and Qwen, geglu for Gemma)")
    p.add_argument("--dtypes", type=harness.names_parser(DTYPE_NAMES), default=list(DTYPE_NAMES),
                   help="comma-separated")
    p.add_argument("--allocator", choices=(*harness.ALLOCATORS, "both"),
                   help="glibc malloc setting of the timing process; 'both' (the default; --quick: 'default') times "
                        "under each, in its own process")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {ops.QUICK_MODEL} only, few tokens (ops.QUICK_TOKENS), fewer repeats")
    p.add_argument("--warmup", type=int, help="untimed rounds before the timed ones (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed rounds; the median is reported (default 9, quick 5)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory in child processes (default: yes)")
    p.add_argument("--check", nargs="*", metavar="RESULT_JSON",
                   help="exit 1 if a target is missed: after this run, or, given result files, in those only")
    # a child's side
    p.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("lf", *BASELINES), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = args.models or ([ops.QUICK_MODEL] if args.quick else list(ops.MODELS))
    args.allocator = args.allocator or ("default" if args.quick else "both")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 9)
    return args


def compute_device() -> str:
    return harness.bench_device()


def cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(model, dtype, op) for every selected op that the model has."""
    return [(m, d, op) for m in args.models for d in args.dtypes for op in ops.MODELS[m].ops if op in args.ops]


def impls(device: str) -> tuple[str, ...]:
    return ("lf", "eager", "compile") + (("liger",) if ops.liger_functional(device) else ())


# ---- the timing child: every case, under one allocator setting ----

def _row(key: dict, seconds: dict[str, float], work: tuple[int, int | None] | None, limits: dict) -> dict:
    """One table row: times in ms, lf's speed-ups, and lf's bandwidth (and FLOP/s) against the limits."""
    lf = seconds["lf"]
    row = {**key, **{f"{impl}_ms": s * 1e3 for impl, s in seconds.items()},
           **{f"vs_{impl}": s / lf for impl, s in seconds.items() if impl != "lf"}}
    if work:
        nbytes, flops = work
        row.update(min_bytes=nbytes, lf_gbps=nbytes / lf / harness.GB,
                   **{f"pct_{name}": 100 * nbytes / lf / (gbps * harness.GB)
                      for name, gbps in limits["copy_bandwidth_gbps"].items()})
        if flops:
            row.update(flops=flops, lf_tflops=flops / lf / 1e12,
                       pct_matmul=100 * flops / lf / (limits["matmul_tflops"][key["dtype"]] * 1e12))
    return row


def _timing_line(r: dict) -> str:
    share = f", {r['pct_copy_into_existing']:.0f}% of copy bandwidth" if "lf_gbps" in r else ""
    share += f", {r['pct_matmul']:.0f}% of matmul FLOP/s" if "pct_matmul" in r else ""
    return (f"{r['model']} {r['op']} {r['dtype']} fwd+bwd: lf {r['lf_ms']:.2f} ms, "
            + ", ".join(f"{BASELINES[b]} {r[b + '_ms']:.2f} ms ({r['vs_' + b]:.2f}x)" for b in BASELINES
                        if b + "_ms" in r) + share)


def timing_worker(args: argparse.Namespace) -> int:
    mallopt = harness.apply_allocator(args.allocator)  # first: before any large allocation
    device = compute_device()
    todo = cases(args)
    progress = harness.Progress(total=len(todo))
    limits = {"copy_bandwidth_gbps": {k: v / harness.GB for k, v in
                                      harness.copy_bandwidth(args.warmup, args.repeats, device=device).items()},
              # a median of 3 after 1 untimed: one call takes up to a second on 2 cores
              "matmul_tflops": {d: harness.matmul_flops(ops.DTYPES[d], 1, 3, device) / 1e12 for d in args.dtypes}}
    progress.note(f"allocator {args.allocator}: copy bandwidth " + ", ".join(
        f"{k} {v:.1f} GB/s" for k, v in limits["copy_bandwidth_gbps"].items()) + "; matmul " + ", ".join(
        f"{d} {v:.2f} TFLOP/s" for d, v in limits["matmul_tflops"].items()))
    rows, compile_seconds, busy = [], {}, {}
    for model, dtype, op in todo:
        tokens = ops.tokens_for(op, args.quick, device)
        case = ops.build(model, op, dtype, tokens, device)
        fns = dict(case.impls)
        fns["compile"], grads, compile_seconds[f"{model}/{op}/{dtype}"] = harness.compiled(fns["eager"], case.args,
                                                                                          device)
        fns = {impl: fns[impl] for impl in impls(device)}  # the tables' order
        busy0, own0 = _cpu_seconds()
        start = time.perf_counter()
        seconds = harness.time_directions(fns, case.args, case.leaves, grads, *ops.rounds(op, args.warmup,
                                                                                          args.repeats), device)
        wall = time.perf_counter() - start
        busy1, own1 = _cpu_seconds()
        busy[f"{model}/{op}/{dtype}"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * os.cpu_count())
        for direction in harness.DIRECTIONS:
            key = {"model": model, "op": op, "dtype": dtype, "direction": direction, "tokens": tokens}
            rows.append(_row(key, {impl: s[direction] for impl, s in seconds.items()}, case.work.get(direction),
                             limits))
        progress.case_done(_timing_line(rows[-1]))
        del case, grads, fns
        gc.collect()
    progress.close()
    _write_json(Path(args.result_file), {
        "allocator": args.allocator, "mallopt": mallopt,
        "allocator_described": harness.describe_allocator(args.allocator, mallopt),
        "limits": limits, "compile_seconds": compile_seconds, "others_cpu_share": busy, "rows": rows,
        "lf_commit": harness._git_head(), "lf_dirty": _git_dirty()})
    return 0


# ---- the memory child: every dtype and op of one (model, implementation) ----

def extra_peak_bytes(run, device: str) -> tuple[int, int]:
    """(peak memory while ``run()`` ran above what was in use just before it, that baseline).

    CPU: freed heap memory is first given back to the OS (malloc_trim), so that reusing it shows; then VmRSS is
    read and VmHWM reset (``5`` into /proc/self/clear_refs); the peak is VmHWM after ``run()``. CUDA: the
    caching allocator's counters, memory_allocated() and max_memory_allocated().
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, before
    _malloc_trim()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    if _status_kib("VmHWM") > before + 1024:
        raise RuntimeError("VmHWM did not restart from VmRSS: this kernel does not reset the peak")
    run()
    return (_status_kib("VmHWM") - before) * 1024, before * 1024


def _fwd_bwd(fn, args: tuple, grads: tuple) -> None:
    torch.autograd.backward(fn(*args), grads)


def memory_worker(args: argparse.Namespace) -> int:
    device = compute_device()
    unpinned = harness.allocator_unavailable("mmap")
    mallopt = {} if unpinned else harness.apply_allocator("mmap")  # first: before any large allocation
    path, entries = Path(args.result_file), []
    allocator = harness.describe_allocator("mmap", mallopt) if mallopt else f"default ({unpinned})"
    for model, dtype, op in cases(args):
        tokens = ops.tokens_for(op, args.quick, device)
        case = ops.build(model, op, dtype, tokens, device)
        if args.impl == "compile":  # compiling runs it once: the warm-up
            fn, grads, _ = harness.compiled(case.impls["eager"], case.args, device)
        else:  # once untimed: lazy initialisation, kernel compilation on a GPU
            fn = case.impls[args.impl]
            grads, _ = harness.first_call(fn, case.args, device)
        for t in case.leaves:
            t.grad = None
        extra, before = extra_peak_bytes(functools.partial(_fwd_bwd, fn, case.args, grads), device)
        entries.append({"model": model, "op": op, "dtype": dtype, "tokens": tokens,
                        "extra_peak_mib": extra / harness.MiB, "baseline_mib": before / harness.MiB})
        _write_json(path, {"allocator": allocator, "entries": entries})  # what is done survives a later failure
        del case, fn, grads
    return 0


# ---- the parent ----

def _child(args: argparse.Namespace, worker: list[str], timeout: float | None) -> tuple[dict | None, str]:
    """Run ``python -m bench ops --worker ...`` on the selected models, ops and dtypes; (its result, status)."""
    with tempfile.TemporaryDirectory(prefix="lf-bench-ops-") as tmp:
        path = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "bench", "ops", "--worker", *worker, "--models", ",".join(args.models),
                "--ops", ",".join(args.ops), "--dtypes", ",".join(args.dtypes), "--warmup", str(args.warmup),
                "--repeats", str(args.repeats), "--result-file", str(path)] + ["--quick"] * args.quick
        try:
            code = subprocess.run(argv, cwd=REPO, timeout=timeout).returncode
            status = "ok" if code == 0 else f"failed (exit code {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:g} s"
        return (json.loads(path.read_text()) if path.exists() else None), status


def measure_memory(args: argparse.Namespace, device: str) -> tuple[list[dict], list[str], str | None]:
    """Peak memory of one fwd+bwd per (model, op, dtype, implementation): one child per (model, implementation),
    each dtype and op in turn; (rows, warnings, the children's allocator setting)."""
    children = [(m, impl) for m in args.models for impl in impls(device)]
    progress, found, warnings, allocator = harness.Progress(total=len(children)), {}, [], None
    for model, impl in children:
        start = time.perf_counter()
        result, status = _child(argparse.Namespace(**{**vars(args), "models": [model]}), ["memory", "--impl", impl],
                                MEMORY_TIMEOUT_S)
        entries = (result or {}).get("entries", [])
        allocator = (result or {}).get("allocator", allocator)
        for e in entries:
            found.setdefault((model, e["op"], e["dtype"]), {"tokens": e["tokens"]})[impl] = e["extra_peak_mib"]
        if status != "ok":
            warnings.append(f"WARNING: memory of {model} {impl}: {status}")
        progress.case_done(f"memory {model} {impl} ({time.perf_counter() - start:.0f} s): " + ", ".join(
            f"{e['op']} {e['dtype']} {e['extra_peak_mib']:.0f} MiB" for e in entries)
            + ("" if status == "ok" else f"; {status}"))
    progress.close()
    rows = []
    for (model, op, dtype), mib in found.items():
        row = {"model": model, "op": op, "dtype": dtype, "tokens": mib.pop("tokens"),
               **{f"{impl}_mib": v for impl, v in mib.items()}}
        row.update({f"lf_vs_{b}": mib["lf"] / mib[b] for b in BASELINES if b in mib and "lf" in mib and mib[b] > 0})
        rows.append(row)
    return rows, warnings, allocator


def run(args: argparse.Namespace, command: str) -> int:
    import lf.kernels

    device = compute_device()
    backend = lf.kernels.default_backend(device)
    if lf.kernels.choose_backend(device) != backend:
        sys.exit(f"lf would not run its {backend} backend here: unset LF_KERNEL_BACKEND and check that it loads")
    if args.memory and device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("peak memory is read through /proc/self/clear_refs and VmHWM: Linux only (or --no-memory)")
    machine = {**harness.machine_facts(), "lf_dirty": _git_dirty()}
    # The glibc setting concerns host memory: on a GPU the ops' tensors are not in it.
    settings = ["default"] if device == "cuda" else list(harness.ALLOCATORS) if args.allocator == "both" \
        else [args.allocator]
    print(f"{harness.device_name(device)}: lf backend {backend} (ISA {machine['lf_isa']}); {len(cases(args))} cases "
          f"(models {', '.join(args.models)}; dtypes {', '.join(args.dtypes)}); timing under allocator "
          f"{' and '.join(settings)}" + ("; then peak memory" if args.memory else ""), flush=True)

    timing, warnings, failed = {}, [], False
    for setting in settings:
        reason = harness.allocator_unavailable(setting)
        if reason:
            warnings.append(f"WARNING: allocator '{setting}' skipped: {reason}")
            print(warnings[-1], flush=True)
            continue
        print(f"== timing, allocator {setting}", flush=True)
        result, status = _child(args, ["timing", "--allocator", setting], None)
        if status != "ok" or result is None:
            warnings.append(f"WARNING: timing under allocator {setting}: {status}")
            failed = True
            continue
        timing[setting] = result
        busy = {case: share for case, share in result["others_cpu_share"].items() if share > OTHERS_SHARE_WARN}
        if busy:
            warnings.append(f"WARNING: allocator {setting}: other processes took more than {OTHERS_SHARE_WARN:.0%} of "
                            f"the CPU while {len(busy)} of {len(result['others_cpu_share'])} cases were timed (up to "
                            f"{max(busy.values()):.0%}, in {max(busy, key=busy.get)}): their times are suspect; run "
                            f"the benchmark alone")
    memory, memory_allocator = [], None
    if args.memory:
        print("== peak memory, one process per model and implementation", flush=True)
        memory, more, memory_allocator = measure_memory(args, device)
        warnings += more
        failed = failed or bool(more)

    date = datetime.date.today().isoformat()
    full = (not args.quick and not failed and args.memory and set(args.models) == set(ops.MODELS)
            and set(args.ops) == set(ops.OP_NAMES) and set(args.dtypes) == set(DTYPE_NAMES) and timing)
    folder = harness.results_folder(not full, device)
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "date": harness.now(), "command": command, "machine": machine, "device": device,
        "accelerator": torch.cuda.get_device_name() if device == "cuda" else None,
        "settings": {"models": {m: dataclasses.asdict(ops.MODELS[m]) for m in args.models}, "ops": args.ops,
                     "dtypes": args.dtypes, "tokens": {op: ops.tokens_for(op, args.quick, device) for op in args.ops},
                     "rounds": {op: ops.rounds(op, args.warmup, args.repeats) for op in args.ops},
                     "allocators": list(timing), "memory_allocator": memory_allocator, "quick": args.quick,
                     "full": bool(full)},
        "timing": {s: {k: v for k, v in t.items() if k != "rows"} for s, t in timing.items()},
        "rows": [{"allocator": s, **r} for s, t in timing.items() for r in t["rows"]],
        "memory": memory,
        "warnings": warnings,
    }
    charts = [c for c in (plot_speedup(result, folder / f"{date}-ops-speedup.png"),
                          plot_memory(result, folder / f"{date}-ops-memory.png")) if c]
    result["charts"] = [str(c.relative_to(REPO)) for c in charts]
    result["summary_md"] = summary_md(result)
    md = harness.write_report("ops", markdown(result), result, not full, device)
    print("\n" + md.read_text())
    print("Wrote " + ", ".join(str(p.relative_to(REPO)) for p in (md, md.with_suffix(".json"), *charts)), flush=True)
    code = report_targets([result]) if args.check is not None else 0
    return 1 if failed else code


# ---- targets ----

def missed_targets(result: dict) -> list[str]:
    """Every target in bench.ops that this result misses, one line each."""
    misses = []
    for r in result["rows"]:
        # Results written before the ops benchmark covered several models hold Llama-3-8B rows of one allocator.
        model, allocator = r.get("model", "llama-3-8b"), r.get("allocator") or result["settings"]["allocator"]
        if model not in ops.TARGET_MODELS:
            continue
        where = f"{model} {r['op']} {r['dtype']} {r['direction']}, allocator {allocator}"
        need = ops.SPEEDUP_VS_EAGER.get(r["op"])
        if need and r["vs_eager"] < need:
            misses.append(f"{where}: {r['vs_eager']:.2f}x faster than HF eager, target {need}x")
        if r["op"] in ops.COMPILE_TARGET_OPS and r["lf_ms"] > ops.COMPILE_NOISE_MARGIN * r["compile_ms"]:
            misses.append(f"{where}: {r['lf_ms']:.2f} ms, slower than torch.compile's {r['compile_ms']:.2f} ms "
                          f"by more than the {ops.COMPILE_NOISE_MARGIN - 1:.0%} noise margin")
        if r["op"] == "rms_norm" and r["direction"] == "fwd" \
                and r["pct_copy_into_existing"] < 100 * ops.RMS_NORM_FWD_COPY_FRACTION:
            misses.append(f"{where}: {r['pct_copy_into_existing']:.0f}% of copy-into-existing bandwidth, "
                          f"target {ops.RMS_NORM_FWD_COPY_FRACTION:.0%}")
    return misses


def report_targets(results: list[dict]) -> int:
    misses = [line for result in results for line in missed_targets(result)]
    print("\n".join(["Targets missed:", *(f"- {m}" for m in misses)]) if misses else "All targets met.")
    return 1 if misses else 0


# ---- report ----

def _summary_allocator(result: dict) -> str | None:
    """The setting the summary and the charts show: glibc as it comes where it was timed."""
    found = list(result["timing"])
    return "default" if "default" in found else (found[0] if found else None)


def _fwd_bwd_rows(result: dict, allocator: str | None) -> dict[tuple[str, str, str], dict]:
    return {(r["model"], r["op"], r["dtype"]): r for r in result["rows"]
            if r["allocator"] == allocator and r["direction"] == "fwd+bwd"}


def _groups(result: dict) -> list[tuple[str, str]]:
    """(op, model) in the tables' order."""
    models = list(result["settings"]["models"])
    return [(op, m) for op in ops.OP_NAMES if op in result["settings"]["ops"]
            for m in models if op in ops.MODELS[m].ops]


def summary_md(result: dict) -> str:
    """A README-sized table: per op and model, lf's fwd+bwd speed-up over HF eager and torch.compile, and its
    peak memory over HF eager's, one column group per dtype."""
    allocator, dtypes = _summary_allocator(result), result["settings"]["dtypes"]
    times = _fwd_bwd_rows(result, allocator)
    memory = {(r["model"], r["op"], r["dtype"]): r for r in result["memory"]}
    lines = ["| op | model | tokens | " + " | ".join(f"{d} vs eager | {d} vs compile | {d} memory vs eager"
                                                     for d in dtypes) + " |",
             "|---|---|--:|" + "--:|--:|--:|" * len(dtypes)]
    for op, model in _groups(result):
        cells = []
        for d in dtypes:
            t, mem = times.get((model, op, d), {}), memory.get((model, op, d), {})
            cells += [ratio_text(v) for v in (t.get("vs_eager"), t.get("vs_compile"), mem.get("lf_vs_eager"))]
        lines.append(f"| {op} | {model} | {result['settings']['tokens'][op]} | " + " | ".join(cells) + " |")
    lines += ["", f"Speed-up: forward + backward time of HF eager (or torch.compile of it) / lf's, allocator "
                  f"{allocator}; above 1x lf is faster. Memory: lf's peak / HF eager's over one forward + backward "
                  f"(each in its own process); below 1x lf needs less."]
    return "\n".join(lines) + "\n"


def _machine_line(result: dict) -> str:
    m = result["machine"]
    where = (f"{result['accelerator']} (lf backend triton); host " if result["device"] == "cuda" else "")
    return (f"{where}{m['cpu_model']}, {m['cores']} cores ({m['torch_threads']} torch threads), lf ISA {m['lf_isa']} "
            f"at {(m['lf_commit'] or 'unknown commit')[:10]}{' (with uncommitted changes)' if m['lf_dirty'] else ''}, "
            f"torch {m['torch']}, transformers {m['transformers']}, {m['libc']}. {result['date']}. "
            f"`{result['command']}`")


def _shapes_line(result: dict) -> str:
    s = result["settings"]
    models = "; ".join(f"{name}: hidden {m['hidden']}, intermediate {m['intermediate']}, "
                       f"{m['q_heads']}/{m['kv_heads']} heads x {m['head_dim']}, vocab {m['vocab']}"
                       for name, m in s["models"].items())
    tokens = ", ".join(f"{op} {n} (median of {s['rounds'][op][1]} after {s['rounds'][op][0]} untimed)"
                       for op, n in s["tokens"].items())
    return f"Widths: {models}. Tokens per op: {tokens}."


def _num(v: float | None) -> str:
    return "–" if v is None else harness._num(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}%"


def markdown(result: dict) -> str:
    s, baselines = result["settings"], [b for b in BASELINES if any(f"{b}_ms" in r for r in result["rows"])]
    names = [BASELINES[b] for b in baselines]
    lines = [f"# lf kernels vs HF: {harness.device_name(result['device'])}", "", _machine_line(result), "",
             _shapes_line(result), "", "## Limits measured in this run", "",
             "| allocator | copy-into-existing GB/s | clone GB/s | " + " | ".join(
                 f"{d} matmul TFLOP/s" for d in s["dtypes"]) + " |", "|---|--:|--:|" + "--:|" * len(s["dtypes"])]
    for setting, t in result["timing"].items():
        bw, mm = t["limits"]["copy_bandwidth_gbps"], t["limits"]["matmul_tflops"]
        lines.append(f"| {setting} | {bw['copy_into_existing']:.1f} | {bw['clone']:.1f} | "
                     + " | ".join(f"{mm[d]:.2f}" for d in s["dtypes"]) + " |")
    m, k, n = harness.MATMUL_SHAPE
    lines += ["", f"Copy: 512 MiB, bytes read + written. Matmul: ({m}, {k}) @ ({k}, {n}) into an existing output, "
                  f"2*{m}*{k}*{n} FLOPs."]
    for setting, t in result["timing"].items():
        for dtype in s["dtypes"]:
            lines += ["", f"## Time, {dtype}, allocator {t['allocator_described']}", "",
                      "| model | op | tokens | direction | lf ms | " + " | ".join(f"{x} ms" for x in names) + " | "
                      + " | ".join(f"vs {x}" for x in names) + " | lf GB/s | % copy-into-existing | % clone "
                      "| lf TFLOP/s | % matmul |",
                      "|---|---|--:|---|--:|" + "--:|" * (2 * len(names)) + "--:|--:|--:|--:|--:|"]
            lines += [f"| {r['model']} | {r['op']} | {r['tokens']} | {r['direction']} | {_num(r['lf_ms'])} | "
                      + " | ".join(_num(r.get(f"{b}_ms")) for b in baselines) + " | "
                      + " | ".join(ratio_text(r.get(f"vs_{b}")) + ("" if "min_bytes" in r else "†")
                                   for b in baselines)
                      + f" | {_num(r.get('lf_gbps'))} | {_pct(r.get('pct_copy_into_existing'))} "
                      f"| {_pct(r.get('pct_clone'))} | {_num(r.get('lf_tflops'))} | {_pct(r.get('pct_matmul'))} |"
                      for r in result["rows"] if r["allocator"] == setting and r["dtype"] == dtype]
            compiles = ", ".join(f"{key.rsplit('/', 1)[0].replace('/', ' ')} {secs:.1f} s"
                                 for key, secs in t["compile_seconds"].items() if key.endswith("/" + dtype))
            lines += ["", f"torch.compile time (first forward + backward, not in the table): {compiles}."]
    if result["memory"]:
        impl_names = [("lf", "lf")] + [(b, BASELINES[b]) for b in baselines]
        for dtype in s["dtypes"]:
            how = ("torch.cuda.max_memory_allocated() - memory_allocated() before" if result["device"] == "cuda"
                   else f"peak RSS - VmRSS before, allocator {s['memory_allocator']}")
            lines += ["", f"## Peak memory, {dtype}: one forward + backward, each (model, implementation) in its "
                          f"own process; {how}", "",
                      "| model | op | tokens | " + " | ".join(f"{x} MiB" for _, x in impl_names) + " | "
                      + " | ".join(f"lf / {x}" for x in names) + " |",
                      "|---|---|--:|" + "--:|" * (len(impl_names) + len(names))]
            lines += [f"| {r['model']} | {r['op']} | {r['tokens']} | "
                      + " | ".join(f"{r[i + '_mib']:,.0f}" if i + "_mib" in r else "n/a" for i, _ in impl_names)
                      + " | " + " | ".join(ratio_text(r.get(f"lf_vs_{b}")) for b in baselines) + " |"
                      for r in result["memory"] if r["dtype"] == dtype]
    lines += ["", "Speed-up (vs X) = X's time / lf's: above 1x lf is faster. lf GB/s and TFLOP/s = the op's minimum "
                  "bytes and FLOPs (bench/ops.py) / lf's time; % = that share of the limits above, measured in the "
                  "same process. †: lf computes this op's gradient in its forward pass (its backward only scales "
                  "it), so its fwd and bwd split the work unlike HF's: compare fwd+bwd. Peak memory = the peak "
                  "above what the process held just before, outputs and gradients included (bench/README.md)."]
    lines += [f"\n![{c.rsplit('-', 1)[1][:-4]}]({Path(c).name})" for c in result["charts"]]
    lines += [f"\n**{w}**" for w in result["warnings"]]
    return "\n".join(lines) + "\n"


def _bars(path: Path, title: str, ylabel: str, panels: dict[str, tuple[list[str], dict[str, list[float | None]]]],
          reference: float | None) -> Path:
    """Grouped bars on a log scale, one panel per entry of ``panels`` ({panel: (group labels, {series: values})})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = max(len(labels) for labels, _ in panels.values())
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.9 * groups), 4.2 * len(panels)), squeeze=False)
    for ax, (panel, (labels, series)) in zip(axes[:, 0], panels.items()):
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(labels))]
            ax.bar([x for x, v in zip(xs, values) if v], [v for v in values if v], width, label=name)
        if reference:
            ax.axhline(reference, color="black", linewidth=0.8)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 20, not 2 x 10^1
            axis(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set(title=f"{title}: {panel}", ylabel=ylabel)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _label(op: str, model: str) -> str:
    return f"{op.replace('fused_linear_cross_entropy', 'fused_linear_ce')}\n{model}"


def plot_speedup(result: dict, path: Path) -> Path | None:
    allocator = _summary_allocator(result)
    times = _fwd_bwd_rows(result, allocator)
    if not times:
        return None
    groups = _groups(result)
    panels = {d: ([_label(op, m) for op, m in groups],
                  {f"vs {BASELINES[b]}": [times.get((m, op, d), {}).get(f"vs_{b}") for op, m in groups]
                   for b in BASELINES if any(f"vs_{b}" in r for r in times.values())})
              for d in result["settings"]["dtypes"]}
    return _bars(path, f"lf forward + backward speed-up (allocator {allocator})", "baseline time / lf time",
                 panels, 1.0)


def plot_memory(result: dict, path: Path) -> Path | None:
    if not result["memory"]:
        return None
    memory = {(r["model"], r["op"], r["dtype"]): r for r in result["memory"]}
    groups = _groups(result)
    panels = {d: ([_label(op, m) for op, m in groups],
                  {("lf" if impl == "lf" else BASELINES[impl]): [memory.get((m, op, d), {}).get(f"{impl}_mib")
                                                                 for op, m in groups]
                   for impl in ("lf", *BASELINES) if any(f"{impl}_mib" in r for r in memory.values())})
              for d in result["settings"]["dtypes"]}
    return _bars(path, "peak memory of one forward + backward", "MiB above the baseline", panels, None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-head-loss"]:
        from bench import lm_head_loss

        return lm_head_loss.main(argv[1:], prog="python -m bench lm-head-loss")
    if argv[:1] == ["qlora-linear"]:
        from bench import qlora_linear

        return qlora_linear.main(argv[1:], prog="python -m bench qlora-linear")
    if argv[:1] == ["quant-linear"]:
        from bench import quant_linear

        return quant_linear.main(argv[1:], prog="python -m bench quant-linear")
    if argv[:1] == ["dpo-step"]:
        from bench import dpo_step

        return dpo_step.main(argv[1:], prog="python -m bench dpo-step")
    if argv[:1] == ["ppo-step"]:
        from bench import ppo_step

        return ppo_step.main(argv[1:], prog="python -m bench ppo-step")
    if argv[:1] == ["serve"]:
        from bench import serve

        return serve.main(argv[1:], prog="python -m bench serve")
    if argv[:1] == ["triton-aot"]:
        from bench import triton_aot

        return triton_aot.main(argv[1:], prog="python -m bench triton-aot")
    if argv[:1] == ["oversubscription"]:
        from bench import oversubscription

        return oversubscription.main(argv[1:], prog="python -m bench oversubscription")
    ops_argv = argv[1:] if argv[:1] == ["ops"] else argv
    args = parse_args(ops_argv, "python -m bench ops")
    if args.worker == "timing":
        return timing_worker(args)
    if args.worker == "memory":
        return memory_worker(args)
    if args.check:  # result files given: check them, run nothing
        return report_targets([json.loads(Path(p).read_text()) for p in args.check])
    return run(args, shlex.join(["python", "-m", "bench", *argv]))


if __name__ == "__main__":
    sys.exit(main())
