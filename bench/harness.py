"""Timing, the copy-bandwidth reference, the glibc allocator setting, machine facts and result files."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

MiB = 1 << 20
GB = 1e9  # bandwidths are in decimal GB/s
RESULTS = Path(__file__).resolve().parent / "results"
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")

def names_parser(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated list of names from ``allowed``."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return names
    return parse


# ---- allocator ----

ALLOCATORS = ("default", "tuned")
# glibc <malloc.h> parameter numbers, and the "tuned" values. mallopt takes a C int, so "never trim" is
# written -1 (documented in mallopt(3) as disabling trimming) rather than a 64 GiB threshold, which overflows.
TUNED_MALLOPT = {
    "M_MMAP_THRESHOLD": (-3, 1 << 30),  # tensors come from the heap, not from fresh mmaps that page-fault
    "M_TRIM_THRESHOLD": (-1, -1),  # freed heap is kept, never returned to the OS
    "M_TOP_PAD": (-2, 256 * MiB),  # the heap grows in big steps
}


def _glibc() -> tuple[ctypes.CDLL | None, str | None]:
    """glibc, or None and why its mallopt cannot be used here."""
    name, _ = platform.libc_ver()
    if name != "glibc":
        return None, f"the C library is {name or 'unknown'}, not glibc, whose mallopt parameters 'tuned' sets"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        return None, "this glibc has no mallopt"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc, None


def allocator_unavailable(setting: str) -> str | None:
    """None if ``setting`` can be applied in this process, else why not."""
    return None if setting == "default" else _glibc()[1]


def apply_allocator(setting: str) -> dict[str, int]:
    """Apply ``setting`` to this process and return the mallopt values set ({} for "default").

    Call it before any large allocation; every later allocation (lf's and the baselines') shares it.
    """
    if setting == "default":
        return {}
    libc, reason = _glibc()
    if reason:
        raise RuntimeError(reason)
    for name, (param, value) in TUNED_MALLOPT.items():
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({name}, {value}) was refused")
    return {name: value for name, (_, value) in TUNED_MALLOPT.items()}


def describe_allocator(setting: str, mallopt: dict[str, int]) -> str:
    if not mallopt:
        return f"{setting} (glibc defaults)"
    values = ", ".join(f"{k}={_bytes(v) if v >= 0 else f'{v} (never)'}" for k, v in mallopt.items())
    return f"{setting} (mallopt {values})"


def _bytes(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB"


# ---- timing ----

Call = tuple[Callable[..., object], Callable[[], tuple]]  # (fn, setup): time fn(*setup()); setup is untimed


def median_seconds(calls: dict[str, Call], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each named call over ``repeats`` runs after ``warmup`` untimed ones.

    The calls take turns, so that drift in the machine's state (another process on a core, glibc's adaptive
    mmap threshold) falls on all of them alike. CPU ops are synchronous, and fn's result is dropped inside
    the timed region, so freeing it is timed too, as allocating it is.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, (fn, setup) in calls.items():
            args = setup()
            start = time.perf_counter()
            fn(*args)
            elapsed = time.perf_counter() - start
            del args  # before the next call's setup, so that calls do not hold each other's memory
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(warmup: int, repeats: int, nbytes: int = 512 * MiB) -> dict[str, float]:
    """Bytes/s (read + written) of copying ``nbytes`` into an existing buffer and of ``clone()`` into fresh
    memory: the ceilings for an op that writes into reused memory and for one that allocates its output."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)  # touched now, so the copy pays no page faults
    seconds = median_seconds({"copy_into_existing": (lambda: dst.copy_(src), tuple), "clone": (src.clone, tuple)},
                             warmup, repeats)
    return {name: 2 * nbytes / s for name, s in seconds.items()}


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _call(direction: str, fn: Callable, case, grads) -> Call:
    """One ``direction`` of ``fn`` on the case's inputs, for median_seconds."""
    def clear_grads() -> tuple:
        # Untimed: each backward starts from .grad = None, as activations' gradients do in training, so no
        # pass accumulating into an old gradient is timed, nor the freeing of the last one.
        for t in case.leaves:
            t.grad = None
        return ()

    def forward() -> tuple:
        # A fresh, untimed forward before each timed backward: torch.compile's backward donates its saved
        # buffers, so it cannot run twice on one graph (retain_graph=True), and disabling that would slow it.
        clear_grads()
        return (fn(*case.args),)

    if direction == "fwd":
        return lambda: fn(*case.args), tuple
    if direction == "bwd":
        return lambda out: torch.autograd.backward(out, grads), forward
    return lambda: torch.autograd.backward(fn(*case.args), grads), clear_grads


def compile_eager(case, grads) -> tuple[Callable, float]:
    """``torch.compile`` of the case's HF code and the seconds its first forward and backward took (the
    backward graph is compiled on first use), so that no compile is timed later."""
    torch._dynamo.reset()  # each case compiles from scratch (the on-disk Inductor cache still applies)
    compiled = torch.compile(case.eager, dynamic=False)
    start = time.perf_counter()
    torch.autograd.backward(compiled(*case.args), grads)
    return compiled, time.perf_counter() - start


def time_case(case, warmup: int, repeats: int) -> tuple[float, Iterator[tuple[str, dict[str, float]]]]:
    """Compile the case's HF code, then return the compile seconds and an iterator of
    ``(direction, {impl: seconds})`` for lf, HF eager and torch.compile of HF, one direction at a time."""
    grads = tuple(torch.randn_like(o) for o in _as_tuple(case.lf(*case.args)))
    compiled, compile_s = compile_eager(case, grads)
    fns = {"lf": case.lf, "eager": case.eager, "compile": compiled}

    def directions():
        for direction in DIRECTIONS:
            yield direction, median_seconds({name: _call(direction, fn, case, grads) for name, fn in fns.items()},
                                            warmup, repeats)
        for t in case.leaves:
            t.grad = None

    return compile_s, directions()


def row(op: str, dtype: str, direction: str, seconds: dict[str, float], min_bytes: int,
        bandwidth: dict[str, float]) -> dict:
    """One table row: times in ms, lf's speed-ups, and lf's bandwidth (min_bytes / time) against the
    copy-bandwidth references."""
    lf = seconds["lf"]
    return {
        "op": op, "dtype": dtype, "direction": direction,
        **{f"{name}_ms": s * 1e3 for name, s in seconds.items()},
        "vs_eager": seconds["eager"] / lf, "vs_compile": seconds["compile"] / lf,
        "min_bytes": min_bytes, "lf_gbps": min_bytes / lf / GB,
        **{f"pct_{name}": 100 * min_bytes / lf / bw for name, bw in bandwidth.items()},
    }


# ---- progress ----

class Progress:
    """A tqdm bar on a terminal when tqdm is installed, else one printed line per finished case."""

    def __init__(self, total: int):
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="case", file=sys.stderr)
            except ImportError:
                pass
        self._done, self._total = 0, total

    def note(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def case_done(self, line: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(line, refresh=False)
            self._bar.update()
        else:
            print(f"[{self._done}/{self._total}] {line}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---- machine facts ----

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """e.g. ``cpu-amd-epyc-2cores``: names the results folder."""
    model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*", " ", cpu_model().lower())
    return f"cpu-{re.sub(r'[^a-z0-9]+', '-', model).strip('-')}-{os.cpu_count()}cores"


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_facts() -> dict:
    import transformers
    from lf import _C

    return {
        "device": device_name(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lf_isa": _C.isa(),
        "lf_commit": _git_head(),
        "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
    }


# ---- results ----

def result_paths(result: dict) -> tuple[Path, Path]:
    """bench/results/<device>/<date>-<allocator>.{json,md}; runs that are not a full run of every op and
    dtype go under scratch/ (git-ignored), so they never overwrite a full run's files."""
    folder = RESULTS / result["machine"]["device"]
    if not result["settings"]["full"]:
        folder = folder / "scratch"
    stem = f"{result['date'][:10]}-{result['settings']['allocator']}"
    return folder / f"{stem}.json", folder / f"{stem}.md"


def write_results(result: dict) -> tuple[Path, Path]:
    json_path, md_path = result_paths(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def write_report(name: str, text: str, data: dict, quick: bool) -> Path:
    """bench/results/<device>/<date>-<name>.{md,json} (scratch/, git-ignored, for --quick runs); returns the .md."""
    folder = RESULTS / device_name() / ("scratch" if quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{name}"
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(text)
    return folder / f"{stem}.md"


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _num(v: float) -> str:
    """Three significant digits without an exponent."""
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}" if v else "0"


def markdown(result: dict) -> str:
    m, s, bw = result["machine"], result["settings"], result["copy_bandwidth_gbps"]
    lines = [
        f"# lf CPU kernels vs HF: {m['device']}, allocator {s['allocator_described']}",
        "",
        f"{m['cpu_model']}, {m['cores']} cores ({m['torch_threads']} torch threads), lf ISA {m['lf_isa']} "
        f"at {(m['lf_commit'] or 'unknown commit')[:10]}, "
        f"torch {m['torch']}, transformers {m['transformers']}, {m['libc']}. {result['date']}. "
        f"{s['tokens']} tokens, median of {s['repeats']} calls after {s['warmup']} untimed. `{result['command']}`",
        "",
        f"Copy bandwidth (read + write, 512 MiB): into an existing buffer {bw['copy_into_existing']:.1f} GB/s, "
        f"clone() into fresh memory {bw['clone']:.1f} GB/s.",
    ]
    for dtype in s["dtypes"]:
        compiles = ", ".join(f"{op} {t:.1f} s" for key, t in result["compile_seconds"].items()
                             for op, dt in [key.split("/")] if dt == dtype)
        lines += [
            "", f"## {dtype}, allocator {s['allocator']}", "",
            "| op | direction | lf ms | HF eager ms | torch.compile ms | vs eager | vs compile | lf GB/s "
            "| % copy-into-existing | % clone |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {r['op']} | {r['direction']} | {_num(r['lf_ms'])} | {_num(r['eager_ms'])} | {_num(r['compile_ms'])} "
            f"| {r['vs_eager']:.2f}x | {r['vs_compile']:.2f}x | {r['lf_gbps']:.1f} "
            f"| {r['pct_copy_into_existing']:.0f}% | {r['pct_clone']:.0f}% |"
            for r in result["rows"] if r["dtype"] == dtype
        ]
        lines += ["", f"torch.compile time (first forward + backward, not in the table): {compiles}."]
    return "\n".join(lines) + "\n"
