"""``python -m bench triton-aot``: every Triton kernel lf ships (kernels/*.py) compiled ahead of time for the A100
(sm_80) and the H100 (sm_90), with no GPU and no CUDA driver, at the specialisations lf's own launchers pick for
Llama-3-8B shapes in fp32 and bf16; per kernel and target: registers, spills, stack, shared memory, PTX and cubin
size, and whether they fit the hardware (:func:`problems`). See bench/README.md ("Triton kernels compiled ahead of
time"); tests/test_triton_aot.py runs the same compiles and checks.

How: each launcher in kernels/*.py (``forward``, ``apply``, ...) is called on meta tensors (shapes and dtypes, no
data) while its kernels' ``run`` records the launch instead, so the block sizes, num_warps and constexprs are the
ones the launcher itself computes. Triton's own argument binder turns a recorded launch into the signature,
constexprs and alignment attributes a real launch compiles (meta tensors sit at address 0: 16-byte aligned, as the
CUDA caching allocator's blocks are), and ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
compiles it through ptxas (Triton's bundled one), whose ``-v`` log gives registers and spills.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

PACKAGE = "lf._triton.kernels"  # kernels/, as lf ships it
ARCHS = (80, 90)
# Per-block limits from the CUDA programming guide's table of compute capabilities: registers per thread, the
# register file a block's threads share (allocated per warp in units of 256), and the shared memory a block can
# opt into (of the SM's 164 KiB on sm_80, 228 KiB on sm_90).
MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536
REG_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}

# Llama-3-8B. The token count sets grids only, which do not change the compiled code.
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 128256, 32, 8, 128
WIDE_HIDDEN = 16384  # Llama-3.1-405B's: the widest norm of a supported model
TOKENS = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Case = tuple[str, Callable[[], None]]  # (label, a call of the module's launcher)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _rms_norm_cases(m, dtype: torch.dtype) -> Iterator[Case]:
    """The decoder's norms: Llama's casting and the others' (Gemma's, none), backward with a trained weight and
    with a frozen one (LoRA); and Llama's at Llama-3.1-405B's width, whose backward goes in column chunks."""
    for cols, castings in ((HIDDEN, ("llama", "gemma")), (WIDE_HIDDEN, ("llama",))):
        x, w, rstd = _meta(TOKENS, cols, dtype=dtype), _meta(cols, dtype=dtype), _meta(TOKENS, dtype=torch.float32)
        width = "" if cols == HIDDEN else f", {cols} columns"
        for casting in castings:
            yield (f"forward {casting}{width}",
                   functools.partial(m.forward, x, w, torch.empty_like(x), rstd, 1e-5, 0.0, casting))
            for dw, name in ((torch.empty_like(w), "trained"), (None, "frozen")):
                yield (f"backward {casting}, {name} weight{width}",
                       functools.partial(m.backward, x, x, w, rstd, torch.empty_like(x), dw, 0.0, casting))


def _cross_entropy_cases(m, dtype: torch.dtype) -> Iterator[Case]:
    """A chunk of the LM head's logits: training, evaluation (no gradient), and the heaviest variant (label
    smoothing and Gemma-2's logit softcap)."""
    logits, labels, loss = _meta(TOKENS, VOCAB, dtype=dtype), _meta(TOKENS, dtype=torch.int64), \
        _meta(TOKENS, dtype=torch.float32)
    for name, grad, smoothing, softcap in (("training", logits, 0.0, 0.0), ("evaluation", None, 0.0, 0.0),
                                           ("smoothing + softcap", logits, 0.1, 30.0)):
        yield name, functools.partial(m.forward, logits, labels, grad, loss, -100, smoothing, softcap, 0.0,
                                      1.0 / TOKENS)


def _glu_cases(m, dtype: torch.dtype) -> Iterator[Case]:
    """The MLP's gated activation: every kind lf implements (Llama's is swiglu), forward and backward."""
    gate = _meta(TOKENS, INTERMEDIATE, dtype=dtype)
    for kind in m._KIND:
        yield f"forward {kind}", functools.partial(m.forward, gate, gate, torch.empty_like(gate), kind)
        yield (f"backward {kind}",
               functools.partial(m.backward, gate, gate, gate, torch.empty_like(gate), torch.empty_like(gate), kind))


def _rope_cases(m, dtype: torch.dtype) -> Iterator[Case]:
    """q and k as HF's attention hands them over: (batch, heads, seq, dim) views of (batch, seq, heads, dim)."""
    q = _meta(1, TOKENS, HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2)
    k = _meta(1, TOKENS, KV_HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2)
    cos = _meta(1, TOKENS, HEAD_DIM, dtype=dtype)
    for backward in (False, True):
        yield ("backward" if backward else "forward",
               functools.partial(m.apply, q, k, cos, cos, torch.empty_like(q), torch.empty_like(k), backward))


def _lora_nf4_linear_cases(m, dtype: torch.dtype) -> Iterator[Case]:
    """QLoRA's dequantisation of a whole MLP weight (14336 x 4096, bitsandbytes blocksize 64), with fp32 absmax
    and with double-quantised (nested, uint8) absmax; ``dtype`` is the compute dtype it dequantises to."""
    n = INTERMEDIATE * HIDDEN
    qweight, code = _meta(n // 2, 1, dtype=torch.uint8), _meta(16, dtype=torch.float32)
    nested = (_meta(n // 64 // 256, dtype=torch.float32), _meta(256, dtype=torch.float32), 256, 0.0)
    for name, absmax, inner in (("absmax fp32", _meta(n // 64, dtype=torch.float32), None),
                                ("absmax nested", _meta(n // 64, dtype=torch.uint8), nested)):
        yield name, functools.partial(m.dequantize, qweight, absmax, code, inner, 64, HIDDEN,
                                      _meta(INTERMEDIATE, HIDDEN, dtype=dtype))


# kernels/<module>.py -> the launches lf makes through it. A module or kernel missing here fails
# tests/test_triton_aot.py (uncovered()).
CASES: dict[str, Callable[..., Iterator[Case]]] = {
    "rms_norm": _rms_norm_cases,
    "cross_entropy": _cross_entropy_cases,
    "glu": _glu_cases,
    "rope": _rope_cases,
    "lora_nf4_linear": _lora_nf4_linear_cases,
}


def kernel_modules() -> dict[str, object]:
    """{name: module} of every module in kernels/."""
    pkg = importlib.import_module(PACKAGE)
    return {m.name: importlib.import_module(f"{PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)}


def _jit_functions(module) -> dict[str, object]:
    """The module's @triton.jit functions: JITFunctions, or InterpretedFunctions under TRITON_INTERPRET=1 (which
    record launches alike, but do not compile)."""
    from triton.runtime.jit import KernelInterface

    return {name: v for name, v in vars(module).items() if isinstance(v, KernelInterface)}


@dataclasses.dataclass
class Launch:
    """One kernel launch a launcher made: the kernel and its arguments as the launcher passed them."""
    module: str
    kernel: str
    dtype: str
    case: str
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _recording(module, record: Callable[..., None]) -> Iterator[None]:
    """Within: ``kernel[grid](*args, **kwargs)`` of the module's kernels calls ``record(kernel_name, args, kwargs)``
    and launches nothing (an instance attribute ``run`` shadows JITFunction.run, which __getitem__ calls)."""
    kernels = _jit_functions(module)
    for name, fn in kernels.items():
        fn.run = lambda *args, grid, warmup, _name=name, **kwargs: record(_name, args, kwargs)
    try:
        yield
    finally:
        for fn in kernels.values():
            del fn.run


def launches(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[Launch]:
    """Every launch of every CASES entry, in every dtype."""
    out: list[Launch] = []
    modules = kernel_modules()
    for module_name, cases in CASES.items():
        module = modules[module_name]
        for dtype in dtypes:
            for label, call in cases(module, DTYPES[dtype]):
                with _recording(module, lambda kernel, args, kwargs: out.append(
                        Launch(module_name, kernel, dtype, label, args, kwargs))):
                    call()
    return out


def _called_names(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def uncovered(launched: set[tuple[str, str]]) -> list[str]:
    """The ``module.function`` of every @triton.jit function in kernels/ that no launch compiles: neither
    launched (``launched`` holds (module, kernel)) nor called, directly or not, from a launched kernel."""
    missing = []
    for module_name, module in kernel_modules().items():
        jit = _jit_functions(module)
        todo = [k for m, k in launched if m == module_name]
        reached = set(todo)
        while todo:
            for name in _called_names(jit[todo.pop()]) & jit.keys() - reached:
                reached.add(name)
                todo.append(name)
        missing += [f"{module_name}.{name}" for name in sorted(jit.keys() - reached)]
    return missing


@dataclasses.dataclass
class Job:
    """One compile: a specialisation of a kernel for one target, and the launches that asked for it."""
    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    dtype: str
    cases: list[str]


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specialise(launch: Launch, kernel, arch: int) -> Job:
    """What a real launch of ``kernel`` (a JITFunction) with these arguments would compile on ``arch``: Triton's
    binder and _pack_args, as JITFunction.run calls them, with the backend of ``arch`` instead of the driver's."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                              options)
    return Job(launch.module, launch.kernel, arch, signature, constexprs, attrs, dict(options.__dict__),
               launch.dtype, [launch.case])


def jobs(all_launches: list[Launch], archs: tuple[int, ...] = ARCHS) -> list[Job]:
    """One job per distinct (kernel, target, specialisation): launches that compile alike share it."""
    found: dict[str, Job] = {}
    modules = kernel_modules()
    for launch in all_launches:
        kernel = _jit_functions(modules[launch.module])[launch.kernel]
        for arch in archs:
            job = specialise(launch, kernel, arch)
            key = repr((job.module, job.kernel, arch, job.signature, sorted(job.constexprs.items()),
                        sorted(job.attrs.items()), sorted(job.options.items())))
            if key in found:
                found[key].cases.append(launch.case)
            else:
                found[key] = job
    return list(found.values())


_PTXAS = {"n_regs": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


def compile_job(job: Job) -> dict:
    """Compiles ``job`` in a fresh cache (so ptxas runs and prints its -v log) and returns its row."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kernel = _jit_functions(kernel_modules()[job.module])[job.kernel]
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="lf-triton-aot-") as cache, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v log to stdout
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                                      target=_target(job.arch), options=job.options)
        seconds = time.perf_counter() - start
    text = log.getvalue()
    usage = {}
    for key, pattern in _PTXAS.items():
        match = re.search(pattern, text)
        if match is None:
            raise RuntimeError(f"{job.module}.{job.kernel} sm_{job.arch}: no '{pattern}' in the ptxas log:\n{text}")
        usage[key] = int(match.group(1))
    names = [n for n, kind in job.signature.items() if kind == "constexpr"]
    meta = compiled.metadata
    return {"module": job.module, "kernel": job.kernel, "target": f"sm_{job.arch}",
            "ptxas_arch": re.search(r"for '(sm_\w+)'", text).group(1), "dtype": job.dtype, "cases": job.cases,
            "constexprs": {n: job.constexprs[(list(job.signature).index(n),)] for n in names},
            "num_warps": meta.num_warps, "num_stages": meta.num_stages, **usage, "shared": meta.shared,
            "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(compiled.asm["cubin"]),
            "compile_s": round(seconds, 2)}


def block_registers(row: dict) -> int:
    """Registers a block of this kernel takes from the SM's file: per warp, rounded up to the allocation unit."""
    per_warp = -(-row["n_regs"] * 32 // REG_UNIT) * REG_UNIT
    return per_warp * row["num_warps"]


def resident_warps(row: dict) -> int:
    """Warps of this kernel an SM can hold at once, as registers allow (shared memory is not limiting here)."""
    return min(MAX_WARPS_PER_SM, REGS_PER_SM // block_registers(row) * row["num_warps"])


def problems(row: dict) -> list[str]:
    """Why this compiled kernel would fail or run badly on its target: empty when it fits."""
    arch = int(row["target"].removeprefix("sm_"))
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills ({row['spill_stores']} B stored, {row['spill_loads']} B loaded per thread)")
    if row["n_regs"] > MAX_REGS_PER_THREAD:
        out.append(f"{row['n_regs']} registers a thread > {MAX_REGS_PER_THREAD}")
    if block_registers(row) > REGS_PER_SM:
        out.append(f"a block of {row['num_warps']} warps x {row['n_regs']} registers needs {block_registers(row)} "
                   f"> the SM's {REGS_PER_SM}: the launch would fail")
    if row["shared"] > MAX_SHARED[arch]:
        out.append(f"{row['shared']} B shared memory > {MAX_SHARED[arch]} B, the most a block gets on sm_{arch}")
    return out


def compile_all(all_jobs: list[Job], workers: int | None = None) -> list[dict]:
    """Rows of every job, compiled in ``workers`` processes (default: one per core)."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_job(j) for j in all_jobs]
    # fork: the workers inherit the imported modules instead of importing torch and triton again
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_job, all_jobs))


def _tool_versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    return {"triton": triton.__version__,
            **{f"ptxas_sm_{arch}": f"{get_ptxas(arch).path} (release {get_ptxas(arch).version})" for arch in ARCHS}}


def report(rows: list[dict], command: str, seconds: float, workers: int) -> str:
    from bench import harness

    tools = _tool_versions()
    lines = ["# lf's Triton kernels compiled ahead of time for sm_80 and sm_90 (no GPU)", "",
             f"`{command}` on {harness.device_name('cpu')} (load average {os.getloadavg()[0]:.1f} at the end); "
             f"{len(rows)} compiles in {seconds:.0f} s on {workers} worker processes. Triton {tools['triton']}; "
             + "; ".join(f"{k.removeprefix('ptxas_')}: ptxas {v.rsplit('(', 1)[1][:-1]}" for k, v in tools.items()
                         if k.startswith("ptxas")) + ".", "",
             f"Llama-3-8B shapes (hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}, {HEADS} q / {KV_HEADS} "
             f"kv heads of {HEAD_DIM}); launch parameters from lf's launchers (bench/triton_aot.py). regs = registers "
             f"a thread (ptxas -v); spills = bytes stored + loaded a thread; shared = bytes a block; warps/SM = "
             f"resident warps that registers allow (of {MAX_WARPS_PER_SM}); OK = none of the problems "
             f"bench.triton_aot.problems() checks (spills, > {MAX_REGS_PER_THREAD} registers, a block's registers "
             f"over {REGS_PER_SM}, shared memory over the block limit).", "",
             "| kernel | target | dtype | constexprs | warps | regs | spills | stack | shared | warps/SM | PTX KiB "
             "| cubin KiB | compile s | OK | launched for |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in rows:
        constexprs = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(f"| {r['module']}.{r['kernel']} | {r['target']} ({r['ptxas_arch']}) | {r['dtype']} "
                     f"| {constexprs} | {r['num_warps']} | {r['n_regs']} | {r['spill_stores'] + r['spill_loads']} "
                     f"| {r['stack']} | {r['shared']} | {resident_warps(r)} | {r['ptx_bytes'] / 1024:.1f} "
                     f"| {r['cubin_bytes'] / 1024:.1f} | {r['compile_s']:.1f} | "
                     f"{'; '.join(problems(r)) or 'yes'} | {'; '.join(r['cases'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m bench.triton_aot") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="compile processes (default: one per core)")
    p.add_argument("--quick", action="store_true", help="bf16 and sm_90 only; the report goes to scratch/")
    p.add_argument("--json", metavar="PATH", help="write the result there only, no report (for the tests)")
    args = p.parse_args(argv)
    from triton import knobs

    from bench import harness

    if knobs.runtime.interpret:
        sys.exit("TRITON_INTERPRET=1 replaces the kernels by interpreted ones, which do not compile: unset it")
    start = time.perf_counter()
    found = launches(("bf16",) if args.quick else tuple(DTYPES))
    missing = uncovered({(launch.module, launch.kernel) for launch in found})
    if missing:
        sys.exit(f"no launch compiles {', '.join(missing)}: add the module's launches to CASES in bench/triton_aot.py")
    rows = compile_all(jobs(found, (90,) if args.quick else ARCHS), args.workers)
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["target"], r["dtype"]))
    seconds = time.perf_counter() - start
    command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
    data = {"command": command, "date": harness.now(), "seconds": seconds, "workers": args.workers,
            "tools": _tool_versions(), "limits": {
                "max_regs_per_thread": MAX_REGS_PER_THREAD, "regs_per_sm": REGS_PER_SM,
                "max_shared": {f"sm_{a}": v for a, v in MAX_SHARED.items()}},
            "rows": [{**r, "problems": problems(r), "resident_warps": resident_warps(r)} for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    else:
        text = report(rows, command, seconds, args.workers)
        print(text)
        harness.write_report("triton_aot", text, {**data, "machine": harness.machine_facts()}, args.quick,
                             device="cpu")
    return 1 if any(r["problems"] for r in data["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
