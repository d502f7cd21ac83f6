"""``python -m bench qlora-linear``: one QLoRA linear layer, forward + backward, lf against PEFT over
bitsandbytes, at Llama-3-8B's projections; time and peak memory, each (dtype, group, variant) in a fresh process.
See bench/README.md ("QLoRA linear").

Every projection has a frozen NF4 weight with double quantisation (bitsandbytes ``Linear4bit``, quantised from
``randn * in**-0.5`` in the compute dtype), LoRA rank 16, alpha 32, dropout 0, adapters in fp32 as PEFT keeps
them (A = ``randn * in**-0.5``, B = ``randn * r**-0.5``, so the LoRA path is not zero), x (1, N, in) requiring
grad and a seeded dy. Variants, on the same seeded values:

- ``peft_bnb``: PEFT's LoRA layer over ``bnb.nn.Linear4bit`` (``get_peft_model``), the baseline;
- ``lf``: ``lf.kernels.lora_nf4_linear(x, weight, weight.quant_state, A, B, alpha / r)``;
- ``lf_dequant_all``: the same with ``lora_nf4_linear.TILE_ELEMENTS`` set past any weight (dequantise all of W,
  then one matmul); only where the module has that attribute.

In bf16 every forward runs under ``torch.autocast("cpu", torch.bfloat16)``, as HF Trainer runs one with
bf16=True; the backward runs outside it. Each child warms up on tiny tensors, then per projection: one measured
forward + backward (extra peak = VmHWM - VmRSS before it, after ``malloc_trim`` and a VmHWM reset through
/proc/self/clear_refs), then the median of ``--repeats`` timed forwards and forward + backwards, taking turns.
The parent compares y and dx of each lf variant with peft_bnb's (max |difference| / max |peft_bnb's|).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from bench import harness
from bench.harness import ms_text, ratio_text
from bench.lm_head_loss import OTHERS_SHARE_WARN, _cpu_seconds, _git_dirty, _status_kib, _write_json

REPO = Path(__file__).resolve().parent.parent
# Llama-3-8B: name -> (group, in_features, out_features)
PROJECTIONS = {
    "gate_proj": ("mlp", 4096, 14336), "up_proj": ("mlp", 4096, 14336), "down_proj": ("mlp", 14336, 4096),
    "q_proj": ("attention", 4096, 4096), "k_proj": ("attention", 4096, 1024),
    "v_proj": ("attention", 4096, 1024), "o_proj": ("attention", 4096, 4096),
}
GROUPS = ("mlp", "attention")
VARIANTS = ("peft_bnb", "lf", "lf_dequant_all")
DTYPE_NAMES = ("bf16", "fp32")
RANK, ALPHA = 16, 32
TOKENS, QUICK_TOKENS, QUICK_DIVISOR = 512, 64, 8  # --quick: 64 tokens, every width / 8
DEFAULT_TIMEOUT_S, QUICK_TIMEOUT_S = 1800.0, 120.0  # per child, start to finish
TOLERANCE = {"bf16": 5e-2, "fp32": 1e-4}  # max |lf - peft_bnb| / max |peft_bnb|, for y and for dx
SEED = 0
# /proc/stat counts 10 ms ticks: other processes' CPU time below this is not told apart from rounding
OTHERS_CPU_MIN_S = 0.05


# ---- the worker: one (dtype, group, variant), in its own process ----

class _Host(torch.nn.Module):
    """A model holding the Linear4bit as ``proj``, for PEFT to wrap."""

    is_loaded_in_4bit = True  # what PEFT checks before wrapping bnb.nn.Linear4bit with its 4-bit LoRA layer

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build(variant: str, in_f: int, out_f: int, tokens: int, dtype, seed: int):
    """(forward, leaves, x, dy, quant_state): forward() computes y, in the variant's way, on seeded values."""
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(dtype)
    lora_A = torch.randn(RANK, in_f, generator=gen) * in_f ** -0.5
    lora_B = torch.randn(out_f, RANK, generator=gen) * RANK ** -0.5
    x = torch.randn(1, tokens, in_f, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(1, tokens, out_f, generator=gen).to(dtype)

    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(data=w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu")  # a Params4bit quantises itself on its first move to a device
    if layer.weight.quant_state is None or layer.weight.dtype != torch.uint8:
        raise RuntimeError("bitsandbytes did not quantise the weight on .to('cpu')")
    del w

    if variant == "peft_bnb":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
        model = get_peft_model(_Host(layer), config)
        lora = model.base_model.model.proj
        if type(lora).__module__ != "peft.tuners.lora.bnb" or lora.scaling["default"] != ALPHA / RANK:
            raise RuntimeError(f"PEFT wrapped the layer as {type(lora).__module__}.{type(lora).__name__}, "
                               f"scaling {lora.scaling}: not its 4-bit LoRA layer")
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(lora_A)  # PEFT's own dtype (fp32) is kept
            b.copy_(lora_B)
        fn = lambda: model(x)  # noqa: E731
    else:
        import lf.kernels

        a, b = lora_A.requires_grad_(), lora_B.requires_grad_()
        qweight, state = layer.weight, layer.weight.quant_state
        fn = lambda: lf.kernels.lora_nf4_linear(x, qweight, state, a, b, ALPHA / RANK, None)  # noqa: E731

    def forward():
        # as HF Trainer with bf16=True: the forward under CPU autocast, the backward outside it
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        with ctx:
            return fn()

    return forward, (x, a, b), x, dy, layer.weight.quant_state


def _describe(fn) -> str:
    """A function's name; a functools.partial's as name(arguments)."""
    if isinstance(fn, functools.partial):
        args = [_describe(a) if callable(a) else repr(a) for a in fn.args]
        return f"{_describe(fn.func)}({', '.join(args + [f'{k}={v!r}' for k, v in fn.keywords.items()])})"
    return getattr(fn, "__qualname__", repr(fn))


def _lf_implementation() -> dict:
    """What lf's op runs on CPU tensors here: the backend lf picks, and the functions its backend tables
    (if the op has any) give for the CPU."""
    import lf.kernels
    from lf.kernels._backend import Implementations

    module = importlib.import_module("lf.kernels.lora_nf4_linear")  # the package's attribute is the function
    tables = {name: t for name, t in vars(module).items() if isinstance(t, Implementations)}
    picked = {name: _describe(t.for_device(torch.device("cpu"))) for name, t in tables.items()}
    return {"backend_for_cpu": lf.kernels.choose_backend("cpu"),
            "op_tables": picked or "none: lf.kernels.lora_nf4_linear has no backend table (its torch code runs)",
            "tile_elements": getattr(module, "TILE_ELEMENTS", None)}


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS, so that the next measured run's peak starts from live memory only
    (several projections run one after another in a child)."""
    libc, _ = harness._glibc()
    if libc is not None:
        libc.malloc_trim(0)


def worker(args: argparse.Namespace) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.variant == "lf_dequant_all":
        module = importlib.import_module("lf.kernels.lora_nf4_linear")
        if not hasattr(module, "TILE_ELEMENTS"):
            sys.exit("lf.kernels.lora_nf4_linear has no TILE_ELEMENTS: no tiled path to turn off")
        module.TILE_ELEMENTS = 1 << 62  # one tile holds any weight: dequantise all of W, then one matmul
    out = Path(args.result_file)
    result = {"dtype": args.dtype, "group": args.group, "variant": args.variant, "stage": "started",
              "torch_threads": torch.get_num_threads(), "lf_commit": harness._git_head(), "lf_dirty": _git_dirty(),
              "lf_implementation": _lf_implementation(), "projections": []}

    def log(line: str) -> None:
        print(f"    {args.dtype} {args.group} {args.variant}: {line}", file=sys.stderr, flush=True)

    forward, leaves, _, dy, _ = build(args.variant, 128, 64, 8, dtype, SEED)  # imports, one-time initialisation
    torch.autograd.backward(forward(), dy)
    del forward, leaves, dy
    for i, name in enumerate(args.shapes):
        _, in_f, out_f = PROJECTIONS[name]
        in_f, out_f = in_f // args.divisor, out_f // args.divisor
        forward, leaves, x, dy, state = build(args.variant, in_f, out_f, args.tokens, dtype, SEED + 1 + i)
        gc.collect()
        _malloc_trim()
        rss_before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
        hwm_reset = _status_kib("VmHWM")
        result.update(stage=f"{name}: measured run")
        _write_json(out, result)

        start = time.perf_counter()
        y = forward()
        torch.autograd.backward(y, dy)
        first = time.perf_counter() - start
        hwm = _status_kib("VmHWM")
        if getattr(state, "packing_format_for_cpu", False):  # bnb's inference-only repacking: not QLoRA training
            raise RuntimeError("bitsandbytes repacked the weight for CPU inference; the layer must be training")
        torch.save({"y": y.detach(), "dx": x.grad}, Path(args.tensor_dir) / f"{args.dtype}-{args.variant}-{name}.pt")
        del y

        def clear_grads() -> tuple:  # untimed: each backward writes fresh gradients
            for t in leaves:
                t.grad = None
            return ()

        clear_grads()
        result.update(stage=f"{name}: timing")
        _write_json(out, result)
        calls = {"fwd": (forward, clear_grads),
                 "fwd+bwd": (lambda: torch.autograd.backward(forward(), dy), clear_grads)}
        busy0, own0 = _cpu_seconds()
        start = time.perf_counter()
        seconds = harness.median_seconds(calls, args.warmup, args.repeats)
        wall = time.perf_counter() - start
        busy1, own1 = _cpu_seconds()
        others = max(0.0, (busy1 - busy0) - (own1 - own0))
        result["projections"].append({
            "projection": name, "in": in_f, "out": out_f, "fwd_ms": seconds["fwd"] * 1e3,
            "fwd_bwd_ms": seconds["fwd+bwd"] * 1e3, "first_call_ms": first * 1e3,
            "extra_peak_mib": (hwm - rss_before) / 1024, "rss_before_kib": rss_before, "hwm_after_reset_kib": hwm_reset,
            "timing_wall_s": wall, "others_cpu_s": others, "others_share": others / (wall * os.cpu_count()),
        })
        _write_json(out, result)
        r = result["projections"][-1]
        log(f"{name} ({in_f} -> {out_f}): fwd {r['fwd_ms']:.1f} ms, fwd+bwd {r['fwd_bwd_ms']:.1f} ms, "
            f"extra peak {r['extra_peak_mib']:.0f} MiB, other processes' CPU share {r['others_share']:.0%}")
        del forward, leaves, x, dy, state, calls, clear_grads  # before the next projection is measured
    result.update(stage="done")
    _write_json(out, result)
    return 0


# ---- the parent: one child per (dtype, group, variant) ----

def _shapes(text: str) -> list[str]:
    """Projection names, or a group name standing for its projections; kept in PROJECTIONS' order."""
    names = set()
    for item in harness.names_parser((*PROJECTIONS, *GROUPS))(text):
        names |= {p for p, (g, *_) in PROJECTIONS.items() if g == item} if item in GROUPS else {item}
    return [p for p in PROJECTIONS if p in names]


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TOKENS} tokens, every width / {QUICK_DIVISOR}, 3 repeats")
    p.add_argument("--dtypes", type=harness.names_parser(DTYPE_NAMES), default=["bf16"],
                   help="comma-separated (default bf16)")
    p.add_argument("--shapes", type=_shapes, default=list(PROJECTIONS),
                   help=f"comma-separated projections or groups (default all): {','.join((*PROJECTIONS, *GROUPS))}")
    p.add_argument("--tokens", type=int, help=f"tokens N (default {TOKENS}, quick {QUICK_TOKENS})")
    p.add_argument("--warmup", type=int, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--repeats", type=int, help="timed calls; the median is reported (default 5, quick 3)")
    p.add_argument("--timeout", type=float, help=f"seconds per child process (default {DEFAULT_TIMEOUT_S:g}, "
                                                 f"quick {QUICK_TIMEOUT_S:g})")
    # the child's side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--group", choices=GROUPS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--divisor", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--tensor-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {"tokens": QUICK_TOKENS if args.quick else TOKENS, "divisor": QUICK_DIVISOR if args.quick else 1,
                "warmup": 1, "repeats": 3 if args.quick else 5,
                "timeout": QUICK_TIMEOUT_S if args.quick else DEFAULT_TIMEOUT_S}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.tokens, args.repeats, args.timeout) <= 0 or args.warmup < 0:
        p.error("--tokens, --repeats and --timeout must be positive, --warmup not negative")
    return args


def _child(args: argparse.Namespace, dtype: str, group: str, variant: str, tensor_dir: str) -> dict:
    """Run one (dtype, group, variant) in a child process and return its result, or what it reached."""
    shapes = [s for s in args.shapes if PROJECTIONS[s][0] == group]
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        path = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", "bench.qlora_linear", "--worker", "--dtype", dtype, "--group", group,
               "--variant", variant, "--shapes", ",".join(shapes), "--tokens", str(args.tokens),
               "--divisor", str(args.divisor), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--result-file", str(path), "--tensor-dir", tensor_dir]
        child = subprocess.Popen(cmd, cwd=REPO)
        started = time.perf_counter()
        try:
            code = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            code = None
        result = json.loads(path.read_text()) if path.exists() else {"projections": []}
    result.update(dtype=dtype, group=group, variant=variant, process_wall_s=time.perf_counter() - started)
    if code is None:
        result["status"] = f"timed out after {args.timeout:g} s during {result.get('stage', 'setup')}"
    elif code != 0 or result.get("stage") != "done":
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        result["status"] = f"failed ({why}) during {result.get('stage', 'setup')}"
    else:
        result["status"] = "ok"
    return result


def compare(rows: list[dict], tensor_dir: str) -> list[str]:
    """Add each lf variant's y and dx difference from peft_bnb's to its rows; a line for each beyond tolerance."""
    failures = []
    for r in rows:
        if r["variant"] == "peft_bnb":
            continue
        for name in r["shapes"]:
            mine = Path(tensor_dir) / f"{r['dtype']}-{r['variant']}-{name}.pt"
            ref = Path(tensor_dir) / f"{r['dtype']}-peft_bnb-{name}.pt"
            if not (mine.exists() and ref.exists()):
                continue
            got, want = torch.load(mine), torch.load(ref)
            diffs = {}
            for key in ("y", "dx"):
                scale = want[key].float().abs().max().item()
                diffs[key] = (got[key].float() - want[key].float()).abs().max().item() / max(scale, 1e-30)
            r["diffs"][name] = diffs
            bad = [k for k, d in diffs.items() if not d <= TOLERANCE[r["dtype"]]]
            if bad:
                failures.append(f"FAILED: {r['dtype']} {name} {r['variant']}: "
                                + ", ".join(f"{k} differs from peft_bnb's by {diffs[k]:.2e} of max |{k}|" for k in bad)
                                + f" (tolerance {TOLERANCE[r['dtype']]:g})")
    return failures


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def totals(rows: list[dict]) -> list[dict]:
    """Per (dtype, group, variant) and per (dtype, variant) over all groups: summed times (the layers run one
    after another) and the largest extra peak; None where a projection is missing."""
    out = []
    for r in rows:
        done = {p["projection"]: p for p in r["projections"]}
        complete = all(s in done for s in r["shapes"])
        out.append({"dtype": r["dtype"], "group": r["group"], "variant": r["variant"],
                    "fwd_ms": sum(p["fwd_ms"] for p in done.values()) if complete else None,
                    "fwd_bwd_ms": sum(p["fwd_bwd_ms"] for p in done.values()) if complete else None,
                    "extra_peak_mib": max(p["extra_peak_mib"] for p in done.values()) if complete else None})
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            parts = [t for t in out if t["dtype"] == dtype and t["variant"] == variant and t["group"] != "all"]
            ok = all(t["fwd_ms"] is not None for t in parts)
            out.append({"dtype": dtype, "group": "all", "variant": variant,
                        "fwd_ms": sum(t["fwd_ms"] for t in parts) if ok else None,
                        "fwd_bwd_ms": sum(t["fwd_bwd_ms"] for t in parts) if ok else None,
                        "extra_peak_mib": max(t["extra_peak_mib"] for t in parts) if ok else None})
    for t in out:
        base = next(b for b in out if (b["dtype"], b["group"], b["variant"]) == (t["dtype"], t["group"], "peft_bnb"))
        t["speedup_vs_peft_bnb"] = _ratio(base["fwd_bwd_ms"], t["fwd_bwd_ms"])
        t["memory_vs_peft_bnb"] = _ratio(t["extra_peak_mib"], base["extra_peak_mib"])
    return out


def check_runs(rows: list[dict]) -> list[str]:
    """A line for each suspect measurement: VmHWM did not reset, or other processes took CPU time while timing."""
    warnings = []
    for r in rows:
        for p in r["projections"]:
            where = f"{r['dtype']} {p['projection']} {r['variant']}"
            if p["hwm_after_reset_kib"] > p["rss_before_kib"] + 1024:
                warnings.append(f"WARNING: {where}: VmHWM did not restart from VmRSS: its extra peak is wrong")
            if p["others_share"] > OTHERS_SHARE_WARN and p["others_cpu_s"] >= OTHERS_CPU_MIN_S:
                warnings.append(f"WARNING: {where}: other processes took {p['others_share']:.0%} of the CPU while "
                                f"it was timed: its times are suspect; run the benchmark alone")
    if len({(r.get("lf_commit"), r.get("lf_dirty")) for r in rows if "lf_commit" in r}) > 1:
        warnings.append("WARNING: lf changed between child processes")
    return warnings


def _total_row(label: str, t: dict) -> str:
    peak = "n/a" if t["extra_peak_mib"] is None else f"{t['extra_peak_mib']:,.0f} (max)"
    return (f"| {label} | **total** | | {t['variant']} | {ms_text(t['fwd_ms'])} | {ms_text(t['fwd_bwd_ms'])} "
            f"| {ratio_text(t['speedup_vs_peft_bnb'])} | {peak} | {ratio_text(t['memory_vs_peft_bnb'])} | | |")


def summary_md(result: dict) -> str:
    """The README-sized table: lf's totals against PEFT + bitsandbytes per group and dtype ("n/a" where either
    failed), then the runs that failed."""
    lines = ["| group | dtype | lf fwd+bwd ms | PEFT + bnb ms | speed-up | peak memory vs PEFT + bnb |",
             "|---|---|--:|--:|--:|--:|"]
    totals = {(t["group"], t["dtype"], t["variant"]): t for t in result["totals"]}
    for (group, dtype, variant), t in totals.items():
        base = totals.get((group, dtype, "peft_bnb"))
        if variant == "lf" and base:
            lines.append(f"| {group} | {dtype} | {ms_text(t['fwd_bwd_ms'])} | {ms_text(base['fwd_bwd_ms'])} "
                         f"| {ratio_text(t['speedup_vs_peft_bnb'])} | {ratio_text(t['memory_vs_peft_bnb'])} |")
    failed = [f"{r['variant']} ({r['dtype']}, {r['group']}): {r['status']}" for r in result["rows"]
              if r.get("status", "ok") != "ok"]
    return "\n".join(lines + ([""] + [f"Failed: {'; '.join(failed)}."] if failed else []))


def _diff(r: dict, name: str, key: str) -> str:
    if r["variant"] == "peft_bnb":
        return "(reference)"
    d = r["diffs"].get(name, {}).get(key)
    return "n/a" if d is None else f"{d:.1e}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    widths = "full widths" if s["divisor"] == 1 else f"widths / {s['divisor']}"
    lines = [
        f"# QLoRA linear (NF4 + LoRA), PEFT + bitsandbytes vs lf: {m['device']}",
        "",
        f"`{result['command']}`",
        "",
        f"{m['cpu_model']}, {m['cores']} cores ({s['torch_threads']} torch threads in the children), "
        f"lf ISA {m['lf_isa']} at {(m['lf_commit'] or 'unknown commit')[:10]}"
        f"{' (with uncommitted changes)' if m.get('lf_dirty') else ''}, torch {m['torch']}, "
        f"bitsandbytes {s['bitsandbytes']}, peft {s['peft']}, {m['libc']}. {result['date']}.",
        "",
        f"{s['tokens']} tokens, {widths}, LoRA r {RANK}, alpha {ALPHA}, dropout 0, adapters fp32; "
        f"NF4 with double quantisation. bf16 forwards under `torch.autocast('cpu', torch.bfloat16)`. "
        f"lf's op: {s['lf_implementation']}. Median of {s['repeats']} calls after {s['warmup']} untimed, "
        f"forward alone and forward + backward taking turns. Each (dtype, group, variant) in its own process, "
        f"allocator {s['allocator_described']}; extra peak = VmHWM - VmRSS before one forward + backward "
        f"(after malloc_trim and a VmHWM reset), outputs and gradients included. y diff, dx diff = max |variant - "
        f"peft_bnb| / max |peft_bnb| (tolerance {', '.join(f'{d} {t:g}' for d, t in TOLERANCE.items())}).",
    ]
    if s["skipped"]:
        lines += ["", s["skipped"]]
    for dtype in s["dtypes"]:
        lines += ["", f"## {dtype}", "",
                  "| group | projection | in -> out | variant | fwd ms | fwd+bwd ms | speed-up vs peft_bnb "
                  "| extra peak MiB | memory vs peft_bnb | y diff | dx diff |",
                  "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        rows = [r for r in result["rows"] if r["dtype"] == dtype]
        for group in [g for g in GROUPS if any(r["group"] == g for r in rows)]:
            for name in [p for p in s["shapes"] if PROJECTIONS[p][0] == group]:
                base = next((p for r in rows if (r["group"], r["variant"]) == (group, "peft_bnb")
                             for p in r["projections"] if p["projection"] == name), None)
                for r in [r for r in rows if r["group"] == group]:
                    p = next((p for p in r["projections"] if p["projection"] == name), None)
                    if p is None:
                        lines.append(f"| {group} | {name} | | {r['variant']} | {r['status']} | | | | | | |")
                        continue
                    speed = _ratio(base and base["fwd_bwd_ms"], p["fwd_bwd_ms"])
                    memory = _ratio(p["extra_peak_mib"], base and base["extra_peak_mib"])
                    lines.append(f"| {group} | {name} | {p['in']} -> {p['out']} | {r['variant']} "
                                 f"| {ms_text(p['fwd_ms'])} | {ms_text(p['fwd_bwd_ms'])} | {ratio_text(speed)} "
                                 f"| {p['extra_peak_mib']:,.0f} | {ratio_text(memory)} "
                                 f"| {_diff(r, name, 'y')} | {_diff(r, name, 'dx')} |")
            lines += [_total_row(group, t) for t in result["totals"] if (t["dtype"], t["group"]) == (dtype, group)]
        lines += [_total_row("**all**", t) for t in result["totals"] if (t["dtype"], t["group"]) == (dtype, "all")]
    lines += ["", "Speed-up = peft_bnb fwd+bwd time / variant's; memory = variant's extra peak / peft_bnb's. Totals "
                  "sum the projections' times (one layer after another) and take their largest extra peak."]
    if result["problems"]:
        lines += ["", *(f"**{w}**" for w in result["problems"])]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: str) -> int:
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads peak RSS through /proc/self/clear_refs and VmHWM: Linux only")
    implementation = _lf_implementation()
    variants = list(VARIANTS)
    skipped = ""
    if implementation["tile_elements"] is None:
        variants.remove("lf_dequant_all")
        skipped = ("lf_dequant_all skipped: lf.kernels.lora_nf4_linear has no TILE_ELEMENTS (no tiled path to "
                   "compare whole-weight dequantisation against).")
    machine = {**harness.machine_facts(), "lf_dirty": _git_dirty()}
    described = harness.describe_allocator("default", {})
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    if malloc_env:
        described += " with " + ", ".join(f"{k}={v}" for k, v in malloc_env.items())
    impl = implementation["op_tables"]
    impl_text = (f"backend picked for CPU tensors {implementation['backend_for_cpu']}; "
                 + (impl if isinstance(impl, str) else ", ".join(f"{k} -> {v}" for k, v in impl.items()))
                 + f"; TILE_ELEMENTS {implementation['tile_elements']}")
    groups = [g for g in GROUPS if any(PROJECTIONS[s][0] == g for s in args.shapes)]
    cases = [(d, g, v) for d in args.dtypes for g in groups for v in variants]
    print(f"{machine['device']}: QLoRA linear, {args.tokens} tokens, widths / {args.divisor}, "
          f"{', '.join(args.shapes)}; {len(cases)} child processes; lf: {impl_text}", flush=True)
    if skipped:
        print(skipped, flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-qlora-") as tensor_dir:
        for dtype, group, variant in cases:
            print(f"[{len(rows) + 1}/{len(cases)}] {dtype} {group} {variant} ...", flush=True)
            r = _child(args, dtype, group, variant, tensor_dir)
            r.update(shapes=[s for s in args.shapes if PROJECTIONS[s][0] == group], diffs={})
            rows.append(r)
            if r["status"] != "ok":
                print(f"[{len(rows)}/{len(cases)}] {dtype} {group} {variant}: {r['status']}", flush=True)
        failures = compare(rows, tensor_dir)
    failures += [f"FAILED: {r['dtype']} {r['group']} {r['variant']}: {r['status']}"
                 for r in rows if r["status"] != "ok"]
    problems = failures + check_runs(rows)
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    full = (not args.quick and args.tokens == TOKENS and args.divisor == 1 and args.shapes == list(PROJECTIONS)
            and "bf16" in args.dtypes)
    result = {
        "date": harness.now(),
        "command": command,
        "machine": machine,
        "settings": {
            "tokens": args.tokens, "divisor": args.divisor, "shapes": args.shapes, "dtypes": args.dtypes,
            "variants": variants, "skipped": skipped, "rank": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
            "quant_type": "nf4", "double_quant": True, "seed": SEED, "warmup": args.warmup, "repeats": args.repeats,
            "timeout_s": args.timeout, "tolerance": TOLERANCE, "autocast_bf16": True,
            "torch_threads": ", ".join(map(str, threads)) or "unknown",
            "torch_default_threads": torch.get_num_threads(), "lf_implementation": impl_text,
            "bitsandbytes": metadata.version("bitsandbytes"), "peft": metadata.version("peft"),
            "allocator": "default", "allocator_described": described, "malloc_env": malloc_env,
            "quick": args.quick, "full": full,
        },
        "rows": rows,
        "totals": totals(rows),
        "problems": problems,
    }
    text = markdown(result)
    md_path = harness.write_report("qlora_linear", text, result, quick=not full)
    print("\n" + text)
    for line in problems:
        print(line, flush=True)
    print(f"Wrote {md_path.relative_to(REPO)} and its .json", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None, prog: str = "python -m bench.qlora_linear") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    if args.worker:
        if not (args.dtype and args.group and args.variant and args.result_file and args.tensor_dir):
            sys.exit("--worker needs --dtype, --group, --variant, --result-file and --tensor-dir")
        return worker(args)
    return run(args, shlex.join([*prog.split(), *argv]))


if __name__ == "__main__":
    sys.exit(main())
