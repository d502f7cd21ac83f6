"""``python -m bench lm-head-loss``: the lm_head + loss, forward and backward, in HF's way and lf's two ways;
time and peak memory, each case in a fresh process. See bench/README.md ("lm_head + loss").

Variants, on the same seeded inputs (hidden (1, N, H) and the lm_head weight (V, H), both requiring grad;
labels (1, N) whose first 10% are -100, a prompt):

- ``hf``: ``F.linear(hidden, weight)``, then transformers' ``ForCausalLMLoss(logits, labels, V)``;
- ``lf_cross_entropy``: ``F.linear``, then ``lf.kernels.cross_entropy(logits, shifted, overwrite_logits=True)``;
- ``lf_fused``: ``lf.kernels.fused_linear_cross_entropy(hidden, weight, shifted)``, never holding all logits;

then ``loss.backward()``. ``shifted`` is the labels shifted by one as ForCausalLMLoss shifts them.

Each case runs in a child process (``python -m bench.lm_head_loss --worker ...``) under glibc's default
allocator, which serves large buffers with mmap and gives them back on free, so the resident set follows live
memory. The worker builds the inputs, runs the variant once on tiny tensors (lazy imports and initialisation),
reads VmRSS, resets the kernel's peak-RSS counter (``5`` into /proc/self/clear_refs), runs one timed forward
and backward, and reads VmHWM: extra peak = VmHWM - VmRSS before. A first run under 20 s is followed by a
second, timed only. A case still running after its timeout is killed and recorded as timed out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("hf", "lf_cross_entropy", "lf_fused")
DTYPE_NAMES = ("fp32", "bf16")
FULL = {"hidden": 4096, "vocab": 128256, "tokens": 4096}  # Llama-3-8B's lm_head over 4096 tokens
# Small enough that bf16 F.linear's backward, ~0.5 GFLOP/s at some layouts on an AVX2-only CPU, stays ~1 s.
QUICK = {"hidden": 256, "vocab": 4096, "tokens": 256}
DEFAULT_TIMEOUT_S = 1800.0
SECOND_RUN_UNDER_S = 20.0  # a first forward+backward shorter than this is followed by a second, timed only
PROMPT_FRACTION = 0.1  # the first 10% of labels are -100
LOSS_RTOL = {"fp32": 1e-4, "bf16": 1e-2}
SEED = 0


# ---- the worker: one case, in its own process ----

def make_inputs(tokens: int, hidden: int, vocab: int, dtype, seed: int = SEED):
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, dtype=dtype, generator=gen) * hidden ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[:, : int(tokens * PROMPT_FRACTION)] = -100
    return h, w, labels


def forward(variant: str, hidden, weight, labels):
    """The loss of one variant; the label shift is part of the timed forward, as in ForCausalLMLoss."""
    import torch.nn.functional as F

    if variant == "hf":
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(F.linear(hidden, weight), labels, weight.shape[0])
    import lf.kernels

    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    if variant == "lf_cross_entropy":
        return lf.kernels.cross_entropy(F.linear(hidden, weight), shifted, overwrite_logits=True)
    if variant == "lf_fused":
        return lf.kernels.fused_linear_cross_entropy(hidden, weight, shifted)
    raise ValueError(variant)


def _status_kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise KeyError(field)


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine since boot, this process's CPU seconds): their difference over a
    run is what other processes (and the hypervisor, as steal) took while it ran."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system, irq softirq steal; not idle, iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # atomic: the parent never reads a half-written file


def worker(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.result_file)
    result = {"dtype": args.dtype, "variant": args.variant, "stage": "started", "torch_threads": torch.get_num_threads(),
              "lf_commit": harness._git_head(), "lf_dirty": _git_dirty()}  # lf as this child imported it
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def log(line: str) -> None:
        print(f"    {args.dtype} {args.variant}: {line}", file=sys.stderr, flush=True)

    hidden, weight, labels = make_inputs(args.tokens, args.hidden, args.vocab, dtype)
    warm = make_inputs(64, 32, 256, dtype)  # tiny: imports and one-time initialisation, untimed
    forward(args.variant, *warm).backward()
    del warm
    gc.collect()

    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    hwm_reset = _status_kib("VmHWM")
    result.update(stage="forward", rss_before_kib=rss_before, hwm_after_reset_kib=hwm_reset,
                  timed_start_unix=time.time())
    _write_json(out, result)

    runs = []
    while True:
        busy0, own0 = _cpu_seconds()
        start = time.perf_counter()
        loss = forward(args.variant, hidden, weight, labels)
        fwd = time.perf_counter() - start
        if not runs:
            result.update(stage="backward", fwd_s=fwd)
            _write_json(out, result)  # untimed, and tiny next to what the case allocates
            log(f"forward {fwd:.2f} s")
        start = time.perf_counter()
        loss.backward()
        bwd = time.perf_counter() - start
        busy1, own1 = _cpu_seconds()
        others = max(0.0, (busy1 - busy0) - (own1 - own0))
        runs.append({"fwd_s": fwd, "bwd_s": bwd, "total_s": fwd + bwd, "own_cpu_s": own1 - own0,
                     "others_cpu_s": others, "others_share": others / ((fwd + bwd) * os.cpu_count())})
        if len(runs) == 1:
            hwm, rss_after = _status_kib("VmHWM"), _status_kib("VmRSS")
            grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None)
            result.update(loss=loss.item(), peak_kib=hwm, rss_after_kib=rss_after,
                          extra_peak_mib=(hwm - rss_before) / 1024, retained_mib=(rss_after - rss_before) / 1024,
                          grads_mib=grads / harness.MiB)
            log(f"backward {bwd:.2f} s, extra peak {result['extra_peak_mib']:.0f} MiB, loss {result['loss']:.6f}")
        del loss
        hidden.grad = weight.grad = None
        gc.collect()
        if len(runs) == 2 or runs[0]["total_s"] >= SECOND_RUN_UNDER_S:
            break
    result.update(stage="done", runs=runs, time_s=min(r["total_s"] for r in runs))
    _write_json(out, result)
    return 0


# ---- the parent: one child per case ----

def _case_keys(dtype: str, variant: str) -> tuple[str, ...]:
    return f"{dtype}/{variant}", variant, dtype


def _timeouts(text: str) -> dict[str, float]:
    """``1800`` or ``1800,bf16/hf=600,lf_fused=900``: a default, then overrides by dtype/variant, variant or
    dtype (the most specific applies)."""
    keys = {k for d in DTYPE_NAMES for v in VARIANTS for k in _case_keys(d, v)}
    spec = {"": DEFAULT_TIMEOUT_S}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.rpartition("=")
        if key and key not in keys:
            raise argparse.ArgumentTypeError(f"{key!r}: name a dtype, a variant or dtype/variant")
        try:
            spec[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: seconds must be a number") from None
        if spec[key] <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: seconds must be positive")
    return spec


def timeout_for(spec: dict[str, float], dtype: str, variant: str) -> float:
    return next((spec[k] for k in _case_keys(dtype, variant) if k in spec), spec[""])


def _skips(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    allowed = {f"{d}/{v}" for d in DTYPE_NAMES for v in VARIANTS}
    bad = [c for c in cases if c not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{','.join(bad)}: write dtype/variant, e.g. bf16/lf_cross_entropy")
    return cases


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: hidden {QUICK['hidden']}, vocab {QUICK['vocab']}, {QUICK['tokens']} tokens")
    p.add_argument("--hidden", type=int, help=f"hidden size H (default {FULL['hidden']})")
    p.add_argument("--vocab", type=int, help=f"vocabulary size V (default {FULL['vocab']})")
    p.add_argument("--tokens", type=int, help=f"tokens N (default {FULL['tokens']})")
    p.add_argument("--dtypes", type=harness.names_parser(DTYPE_NAMES), default=list(DTYPE_NAMES),
                   help="comma-separated")
    p.add_argument("--variants", type=harness.names_parser(VARIANTS), default=list(VARIANTS),
                   help="comma-separated")
    p.add_argument("--skip", type=_skips, default=[], metavar="DTYPE/VARIANT,...",
                   help="cases left out of the dtype x variant grid (listed as skipped)")
    p.add_argument("--timeout", type=_timeouts, default=_timeouts(""), metavar="SECONDS[,KEY=SECONDS...]",
                   help=f"per case, child start to finish (default {DEFAULT_TIMEOUT_S:g}); overrides by dtype, "
                        "variant or dtype/variant, e.g. 1800,bf16/hf=600")
    # the child's side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, default in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    return args


def _child(args: argparse.Namespace, dtype: str, variant: str, timeout: float) -> dict:
    """Run one case in a child process and return its result, or what is known of it."""
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        path = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", "bench.lm_head_loss", "--worker", "--dtype", dtype, "--variant", variant,
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--tokens", str(args.tokens),
               "--result-file", str(path)]
        child = subprocess.Popen(cmd, cwd=REPO)
        started = time.perf_counter()
        hwm_at_kill = None
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                hwm_at_kill = _status_kib("VmHWM", child.pid)  # how much the unfinished run had reached
            except (OSError, KeyError):
                pass
            child.kill()
            child.wait()
            code = None
        wall = time.perf_counter() - started
        killed_unix = time.time()
        result = json.loads(path.read_text()) if path.exists() else {"dtype": dtype, "variant": variant}
    result.update(timeout_s=timeout, process_wall_s=wall)
    if code is None:
        result["status"] = f"timed out after {timeout:g} s"
        if "timed_start_unix" in result:  # the timed run had started: it would have taken longer than this
            result["time_s_at_least"] = killed_unix - result["timed_start_unix"]
            if hwm_at_kill is not None:
                result["extra_peak_mib_at_least"] = (hwm_at_kill - result["rss_before_kib"]) / 1024
    elif code != 0 or result.get("stage") != "done":
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        result["status"] = f"failed ({why}{', out of memory?' if code == -9 else ''}) during {result.get('stage', 'setup')}"
    else:
        result["status"] = "ok"
    return result


def _progress_line(r: dict) -> str:
    where = f"{r['dtype']} {r['variant']}"
    if r["status"] == "ok":
        runs = " / ".join(f"{x['total_s']:.2f}" for x in r["runs"])
        others = max(x["others_share"] for x in r["runs"])
        return (f"{where}: {r['time_s']:.2f} s (runs: {runs} s), extra peak {r['extra_peak_mib']:.0f} MiB, "
                f"loss {r['loss']:.6f}, other processes' CPU share {others:.1%}"
                + ("" if max(x["total_s"] for x in r["runs"]) >= MEANINGFUL_RUN_S else " (too short to judge)"))
    extra = ""
    if "time_s_at_least" in r:
        extra = f" (forward {r['fwd_s']:.1f} s" if "fwd_s" in r else " (forward unfinished"
        extra += f", timed run > {r['time_s_at_least']:.0f} s"
        extra += f", extra peak so far {r['extra_peak_mib_at_least']:.0f} MiB)" if "extra_peak_mib_at_least" in r else ")"
    return f"{where}: {r['status']}{extra}"


def check_losses(rows: list[dict]) -> list[str]:
    """A line for each variant whose loss differs from hf's (or, without hf, the first variant's) beyond the
    dtype's tolerance."""
    warnings = []
    for dtype in DTYPE_NAMES:
        done = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok"]
        if len(done) < 2:
            continue
        ref = next((r for r in done if r["variant"] == "hf"), done[0])
        for r in done:
            if r is ref:
                continue
            rel = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
            r["loss_rel_diff_vs_" + ref["variant"]] = rel
            if not rel <= LOSS_RTOL[dtype]:
                warnings.append(f"WARNING: {dtype} {r['variant']} loss {r['loss']:.8g} differs from {ref['variant']}'s "
                                f"{ref['loss']:.8g} by {rel:.2e} relative (tolerance {LOSS_RTOL[dtype]:g})")
    return warnings


# Other processes' CPU time during a timed run, as a share of all cores' time over it, above which the run is
# flagged; /proc/stat counts in 10 ms ticks, so runs shorter than MEANINGFUL_RUN_S are not judged.
OTHERS_SHARE_WARN = 0.05
MEANINGFUL_RUN_S = 2.0


def check_runs(rows: list[dict]) -> list[str]:
    """A line for each case whose measurement is suspect: the peak counter did not reset, other processes
    took CPU time during its timed run, or lf changed between cases."""
    warnings = []
    for r in rows:
        where = f"{r['dtype']} {r['variant']}"
        if "hwm_after_reset_kib" in r and r["hwm_after_reset_kib"] > r["rss_before_kib"] + 1024:
            warnings.append(f"WARNING: {where}: VmHWM did not restart from VmRSS ({r['hwm_after_reset_kib']} kB "
                            f"vs {r['rss_before_kib']} kB): its extra peak is wrong")
        busy = [x for x in r.get("runs", []) if x["others_share"] > OTHERS_SHARE_WARN
                and x["total_s"] >= MEANINGFUL_RUN_S]
        if busy:
            shares = ", ".join(f"{x['others_share']:.0%}" for x in busy)
            warnings.append(f"WARNING: {where}: other processes took {shares} of the CPU during its timed "
                            f"run{'s' if len(busy) > 1 else ''}: its time is suspect; run the benchmark alone")
    commits = {(r.get("lf_commit"), r.get("lf_dirty")) for r in rows if "lf_commit" in r}
    if len(commits) > 1:
        warnings.append("WARNING: lf changed between cases: " + "; ".join(
            f"{r['dtype']} {r['variant']} at {(r['lf_commit'] or '?')[:10]}{' (dirty)' if r['lf_dirty'] else ''}"
            for r in rows if "lf_commit" in r))
    return warnings


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_hf = hf time / variant time; memory_vs_hf = variant extra peak / hf extra peak. Where hf timed
    out after its timed run started, its time is a lower bound, and so is the speed-up."""
    for r in rows:
        hf = next((h for h in rows if h["dtype"] == r["dtype"] and h["variant"] == "hf"), None)
        if r["status"] != "ok" or hf is None or r is hf:
            continue
        if hf["status"] == "ok":
            r["speedup_vs_hf"] = hf["time_s"] / r["time_s"]
            r["memory_vs_hf"] = r["extra_peak_mib"] / hf["extra_peak_mib"] if hf["extra_peak_mib"] > 0 else None
        elif "time_s_at_least" in hf:
            r["speedup_vs_hf_at_least"] = hf["time_s_at_least"] / r["time_s"]
            if hf.get("extra_peak_mib_at_least", 0) > 0:
                r["memory_vs_hf_at_most"] = r["extra_peak_mib"] / hf["extra_peak_mib_at_least"]


def result_paths(result: dict) -> tuple[Path, Path]:
    """bench/results/<device>/<date>-lm_head_loss.{json,md} for a full-size run of every dtype and variant
    (--skip allowed, its cases are listed); anything else under scratch/ (git-ignored)."""
    folder = harness.RESULTS / result["machine"]["device"]
    if not result["settings"]["full"]:
        folder = folder / "scratch"
    stem = f"{result['date'][:10]}-lm_head_loss"
    return folder / f"{stem}.json", folder / f"{stem}.md"


def _mib(v: float) -> str:
    return f"{v:,.0f}"


def _ratio(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _cells(r: dict) -> list[str]:
    """time s, speed-up vs hf, extra peak MiB, memory vs hf, loss, fwd / bwd s."""
    if r["status"] == "skipped":
        return ["skipped (--skip)", "", "", "", "", ""]
    if r["status"] != "ok":
        time_cell = r["status"] + (f"; timed run > {r['time_s_at_least']:.0f} s" if "time_s_at_least" in r else "")
        peak = f">= {_mib(r['extra_peak_mib_at_least'])} (at kill)" if "extra_peak_mib_at_least" in r else "n/a"
        split = (f"{r['fwd_s']:.2f} / unfinished" if "fwd_s" in r else
                 "unfinished" if "time_s_at_least" in r else "n/a")
        return [time_cell, "n/a", peak, "n/a", "n/a", split]
    speed = (f"{_ratio(r['speedup_vs_hf'])}x" if "speedup_vs_hf" in r else
             f"> {_ratio(r['speedup_vs_hf_at_least'])}x" if "speedup_vs_hf_at_least" in r else
             "1.00x" if r["variant"] == "hf" else "n/a")
    memory = (f"{r['memory_vs_hf']:.2f}x" if r.get("memory_vs_hf") is not None else
              f"< {r['memory_vs_hf_at_most']:.2f}x" if "memory_vs_hf_at_most" in r else
              "1.00x" if r["variant"] == "hf" else "n/a")
    best = min(r["runs"], key=lambda x: x["total_s"])
    runs = "" if len(r["runs"]) == 1 else f" (best of {len(r['runs'])})"
    return [f"{r['time_s']:.2f}{runs}", speed, _mib(r["extra_peak_mib"]), memory, f"{r['loss']:.6f}",
            f"{best['fwd_s']:.2f} / {best['bwd_s']:.2f}"]


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    h, v, n = s["hidden"], s["vocab"], s["tokens"]
    grads = ", ".join(f"{_mib(g)} MiB in {d}" for d, g in s["grads_mib"].items())
    lines = [
        f"# lm_head + loss, HF vs lf: {m['device']}",
        "",
        f"`{result['command']}`",
        "",
        f"{m['cpu_model']}, {m['cores']} cores ({m['torch_threads']} torch threads), lf ISA {m['lf_isa']} "
        f"at {(m['lf_commit'] or 'unknown commit')[:10]}{' (with uncommitted changes)' if m.get('lf_dirty') else ''}, "
        f"torch {m['torch']}, transformers {m['transformers']}, {m['libc']}. {result['date']}.",
        "",
        f"hidden {h}, vocab {v}, {n} tokens ({s['prompt_tokens']} prompt tokens labelled -100), seed {s['seed']}; "
        f"{6 * n * h * v / 1e12:.3g} TFLOP of matmuls per forward + backward. Each case in its own process, "
        f"allocator {s['allocator_described']}. One forward + backward, timed with `time.perf_counter` "
        f"(followed by a second when the first took under {s['second_run_under_s']:g} s; then the best of the "
        f"two). Extra peak = VmHWM - VmRSS before that first run, with VmHWM reset through /proc/self/clear_refs; "
        f"it includes the gradients of hidden and weight that every variant returns ({grads}).",
    ]
    lines += [
        "",
        "| dtype | variant | time s | speed-up vs hf | extra peak MiB | memory vs hf | loss | fwd / bwd s |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [f"| {r['dtype']} | {r['variant']} | " + " | ".join(_cells(r)) + " |" for r in result["rows"]]
    shares = [x["others_share"] for r in result["rows"] for x in r.get("runs", []) if x["total_s"] >= MEANINGFUL_RUN_S]
    lines += ["", "Speed-up vs hf = hf time / variant time; memory vs hf = variant extra peak / hf extra peak. "
                  "Timeouts count from the child's start (imports and inputs included)."
              + (f" Other processes took at most {max(shares):.1%} of the machine's CPU time during a timed run "
                 f"(of those over {MEANINGFUL_RUN_S:g} s)."
                 if shares else "")]
    if result["warnings"]:
        lines += ["", *(f"**{w}**" for w in result["warnings"])]
    return "\n".join(lines) + "\n"


def _git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "lf", "csrc"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def run(args: argparse.Namespace, command: str) -> int:
    import lf.kernels

    if lf.kernels.choose_backend("cpu") != "cpu":
        sys.exit("lf would not run its cpu backend here: unset LF_KERNEL_BACKEND and check that lf._C loads")
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads peak RSS through /proc/self/clear_refs and VmHWM: Linux only")
    machine = {**harness.machine_facts(), "lf_dirty": _git_dirty()}
    described = harness.describe_allocator("default", {})
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    if malloc_env:
        described += " with " + ", ".join(f"{k}={v}" for k, v in malloc_env.items())
    cases = [(d, v) for d in args.dtypes for v in args.variants]
    todo = [c for c in cases if f"{c[0]}/{c[1]}" not in args.skip]
    print(f"{machine['device']}: lf ISA {machine['lf_isa']}, allocator {described}; lm_head + loss at hidden "
          f"{args.hidden}, vocab {args.vocab}, {args.tokens} tokens; {len(todo)} cases, one process each", flush=True)

    rows = []
    for dtype, variant in cases:
        if (dtype, variant) not in todo:
            rows.append({"dtype": dtype, "variant": variant, "status": "skipped"})
            continue
        timeout = timeout_for(args.timeout, dtype, variant)
        print(f"[{len(rows) + 1}/{len(cases)}] {dtype} {variant} (timeout {timeout:g} s) ...", flush=True)
        rows.append(_child(args, dtype, variant, timeout))
        print(f"[{len(rows)}/{len(cases)}] {_progress_line(rows[-1])}", flush=True)
    warnings = check_losses(rows) + check_runs(rows)
    add_ratios(rows)

    import torch

    sizes = {"hidden": args.hidden, "vocab": args.vocab, "tokens": args.tokens}
    grads = {d: (args.tokens + args.vocab) * args.hidden * {"fp32": 4, "bf16": 2}[d] / harness.MiB for d in args.dtypes}
    result = {
        "date": harness.now(),
        "command": command,
        "machine": machine,
        "settings": {
            **sizes, "prompt_tokens": int(args.tokens * PROMPT_FRACTION), "seed": SEED,
            "dtypes": args.dtypes, "variants": args.variants, "skip": args.skip,
            "timeouts_s": {f"{d}/{v}": timeout_for(args.timeout, d, v) for d, v in todo},
            "second_run_under_s": SECOND_RUN_UNDER_S, "loss_rtol": LOSS_RTOL, "grads_mib": grads,
            "allocator": "default", "allocator_described": described, "malloc_env": malloc_env,
            "quick": args.quick,
            "full": not args.quick and sizes == FULL and set(args.dtypes) == set(DTYPE_NAMES)
            and set(args.variants) == set(VARIANTS),
        },
        "torch_default_threads": torch.get_num_threads(),
        "rows": rows,
        "warnings": warnings,
    }
    json_path, md_path = result_paths(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    print("\n" + markdown(result))
    for w in warnings:
        print(w, flush=True)
    print("Wrote " + " and ".join(str(p.relative_to(REPO)) for p in (json_path, md_path)), flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m bench.lm_head_loss") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    if args.worker:
        if not (args.dtype and args.variant and args.result_file):
            sys.exit("--worker needs --dtype, --variant and --result-file")
        return worker(args)
    return run(args, shlex.join([*prog.split(), *argv]))


if __name__ == "__main__":
    sys.exit(main())
