"""Timing, the machine's limits (copy bandwidth, a large matmul), the glibc allocator setting, machine facts and
result files."""

from __future__ import annotations

import argparse
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
from typing import Callable

import torch

from lf import allocator

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


# ---- allocator: lf's own (lf/allocator.py), under the harness's names ----

ALLOCATORS = ("default", "tuned")  # the timing process's choices
MALLOPT = allocator.MALLOPT
_glibc = allocator.glibc
allocator_unavailable = allocator.unavailable
apply_allocator = allocator.apply


def describe_allocator(setting: str, mallopt: dict[str, int]) -> str:
    return allocator.describe(setting, mallopt)


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


def synchronize(device: str) -> None:
    """Wait for the device's queued work: a CUDA call returns before its kernels have run."""
    if device == "cuda":
        torch.cuda.synchronize()


def _synced(fn: Callable, device: str) -> Callable:
    def call(*args):
        fn(*args)
        synchronize(device)
    return call


def copy_bandwidth(warmup: int, repeats: int, nbytes: int = 512 * MiB, device: str = "cpu") -> dict[str, float]:
    """Bytes/s (read + written) of copying ``nbytes`` into an existing buffer and of ``clone()`` into fresh
    memory: the ceilings for an op that writes into reused memory and for one that allocates its output."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src).fill_(0)  # touched now, so the copy pays no page faults
    calls = {"copy_into_existing": (_synced(lambda: dst.copy_(src), device), tuple),
             "clone": (_synced(src.clone, device), tuple)}
    return {name: 2 * nbytes / s for name, s in median_seconds(calls, warmup, repeats).items()}


MATMUL_SHAPE = (2048, 4096, 4096)  # (m, k, n): a (m, k) @ (k, n) product, large enough to reach a core's peak


def matmul_flops(dtype: torch.dtype, warmup: int, repeats: int, device: str = "cpu") -> float:
    """FLOP/s of one large matmul in ``dtype`` (written into an existing output): the ceiling for a matmul-bound
    op on this machine, in that dtype."""
    m, k, n = MATMUL_SHAPE
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    seconds = median_seconds({"mm": (_synced(lambda: torch.mm(a, b, out=out), device), tuple)}, warmup, repeats)
    return 2 * m * k * n / seconds["mm"]


def _output_grads(out) -> tuple[torch.Tensor, ...]:
    """The gradients a backward starts from: 1 for a scalar loss, as in training; random for other outputs."""
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs)


def first_call(fn: Callable, args: tuple, device: str = "cpu") -> tuple[tuple[torch.Tensor, ...], float]:
    """One forward and backward of ``fn`` (warm-up: lazy initialisation, compilation): the gradients its backward
    started from, to be reused by every later call, and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args)
    grads = _output_grads(out)
    torch.autograd.backward(out, grads)
    synchronize(device)
    return grads, time.perf_counter() - start


def compiled(fn: Callable, args: tuple, device: str = "cpu") -> tuple[Callable, tuple[torch.Tensor, ...], float]:
    """``torch.compile`` of ``fn`` and its :func:`first_call`, which compiles it (the backward graph on first use),
    so that no compile is timed or measured later."""
    torch._dynamo.reset()  # each case compiles from scratch (the on-disk Inductor cache still applies)
    fn = torch.compile(fn, dynamic=False)
    return (fn, *first_call(fn, args, device))


def time_directions(fns: dict[str, Callable], args: tuple, leaves: tuple, grads: tuple, warmup: int, repeats: int,
                    device: str = "cpu") -> dict[str, dict[str, float]]:
    """``{implementation: {direction: median seconds}}`` over ``repeats`` rounds after ``warmup`` untimed ones.

    Each round calls each implementation once: its forward (building the autograd graph, as in training) is
    timed, then ``torch.autograd.backward(out, grads)`` on it; fwd+bwd is the two back to back. A fresh forward
    per backward: torch.compile's backward donates its saved buffers, so it cannot run twice on one graph
    (``retain_graph=True``), and disabling that would slow it. The leaves' ``.grad`` are set to None, untimed,
    before each call, so each backward writes fresh gradients, as activations' gradients are written in
    training. The implementations take turns, so that drift in the machine's state falls on all of them alike.
    """
    times: dict[str, dict[str, list[float]]] = {name: {d: [] for d in DIRECTIONS} for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            for t in leaves:
                t.grad = None
            synchronize(device)
            start = time.perf_counter()
            out = fn(*args)
            synchronize(device)
            middle = time.perf_counter()
            torch.autograd.backward(out, grads)
            del out  # freed inside the timed region, as its allocation was
            synchronize(device)
            end = time.perf_counter()
            if i >= warmup:
                for direction, s in zip(DIRECTIONS, (middle - start, end - middle, end - start)):
                    times[name][direction].append(s)
    for t in leaves:
        t.grad = None
    return {name: {d: statistics.median(ts) for d, ts in by_direction.items()} for name, by_direction in times.items()}


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


def cpu_features() -> str:
    """The widest matrix/vector extension lf's kernels can use here (amx, avx512bf16, avx512, avx2, base): two
    machines with one model name (a 'Intel Xeon Processor' with AMX and one without) get different results folders."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "base"
    for tag, flag in (("amx", "amx_tile"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return tag
    return "base"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)|\bcpu\b|@.*", " ", text.lower())).strip("-")


DEVICE_ENV = "LF_BENCH_DEVICE"  # cpu | cuda: set by `lf bench --device` for its children


def bench_device() -> str:
    """The device the benchmarks measure: LF_BENCH_DEVICE, else CUDA where there is one, else the CPU."""
    return os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: str | None = None) -> str:
    """e.g. ``cpu-amd-epyc-avx512bf16-2cores`` or ``cuda-nvidia-h100-80gb-hbm3``: names the results folder (of
    bench_device() by default)."""
    if (device or bench_device()) == "cuda":
        return f"cuda-{_slug(torch.cuda.get_device_name())}"
    return f"cpu-{_slug(cpu_model())}-{cpu_features()}-{os.cpu_count()}cores"


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

def results_folder(quick: bool, device: str | None = None) -> Path:
    """bench/results/<device>/, or its scratch/ (git-ignored) for quick and partial runs."""
    return RESULTS / device_name(device) / ("scratch" if quick else "")


def write_report(name: str, text: str, data: dict, quick: bool, device: str | None = None) -> Path:
    """bench/results/<device>/<date>-<name>.{md,json} (scratch/, git-ignored, for --quick runs); returns the .md."""
    folder = results_folder(quick, device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{name}"
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(text)
    return folder / f"{stem}.md"


def finish(name: str, text: str, command: str, rows: list[dict], summary_md: str, quick: bool) -> int:
    """Prints a benchmark's report and writes it (write_report, with its rows and the machine's facts); its exit
    code: 1 when a row holds an error."""
    print(text)
    write_report(name, text, {"command": command, "date": now(), "rows": rows, "machine": machine_facts(),
                              "summary_md": summary_md}, quick)
    return 0 if all("error" not in r for r in rows) else 1


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _num(v: float) -> str:
    """Three significant digits without an exponent."""
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}" if v else "0"


def ms_text(v: float | None) -> str:
    """A time for a table; "n/a" where it was not measured (a failed run)."""
    return "n/a" if v is None else _num(v)


def ratio_text(v: float | None) -> str:
    """A ratio for a table; "n/a" where one side was not measured (a failed run)."""
    return "n/a" if v is None else f"{v:.2f}x"
