"""``python -m bench quant-linear``: one LoRA linear layer of Llama-3-8B's MLP shape (gate_proj, 4096 -> 14336),
forward + backward, over each quantization method lf trains on, against the 16-bit layer, in one run; time and
peak memory, each method in a fresh process. See bench/README.md ("LoRA over each quantization method").

Each method runs what lf runs in training for it:

- ``dense``: the 16-bit weight, lf's ``lora_linear`` (the baseline);
- ``bnb_nf4``: bitsandbytes NF4 with double quantization, lf's fused ``lora_nf4_linear``;
- ``hqq4``: hqq 4-bit (groups of 64, lf.model.hqq), PEFT's HQQ LoRA layer over hqq's kernel;
- ``quanto4``, ``quanto8``: quanto int4 (groups of 128) / int8 (per channel) (lf.model.quanto), PEFT's LoRA
  layer over quanto's QLinear.

The weight is ``randn * in**-0.5`` in the compute dtype, LoRA rank 16, alpha 32, dropout 0, adapters fp32 as
PEFT keeps them (B not zero, so the LoRA path is real), x (1, N, in) requiring grad, a seeded dy; the same
values for every method. In bf16 the forward runs under CPU autocast, as HF Trainer's bf16=True does, the
backward outside it. Per method: one measured forward + backward (extra peak = VmHWM - VmRSS before it, after
malloc_trim and a VmHWM reset), then the median of ``--repeats`` forward + backwards. y error = max |y -
dense's y| / max |dense's y|: the method's quantization error at this layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from bench import harness
from bench.harness import ms_text, ratio_text
from bench.lm_head_loss import _status_kib
from bench.qlora_linear import ALPHA, RANK, SEED, _malloc_trim
from bench.qlora_linear import build as build_nf4

REPO = Path(__file__).resolve().parent.parent
IN, OUT = 4096, 14336  # Llama-3-8B's gate_proj / up_proj
METHODS = ("dense", "bnb_nf4", "hqq4", "quanto4", "quanto8")
RUNS = {"dense": "lf `lora_linear`", "bnb_nf4": "lf `lora_nf4_linear`", "hqq4": "PEFT over hqq's `HQQLinear`",
        "quanto4": "PEFT over quanto's `QLinear`", "quanto8": "PEFT over quanto's `QLinear`"}
PACKAGES = {"bnb_nf4": "bitsandbytes", "hqq4": "hqq", "quanto4": "optimum-quanto", "quanto8": "optimum-quanto"}
TOKENS, QUICK_TOKENS, QUICK_DIVISOR = 512, 64, 8
TIMEOUT_S = 1200.0


class _Host(nn.Module):
    """A model holding the base layer as ``proj``, for PEFT to wrap."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def build(method: str, in_f: int, out_f: int, tokens: int, dtype: torch.dtype):
    """(forward, leaves, dy): forward() computes y through `method`'s LoRA layer, on seeded values."""
    if method == "bnb_nf4":
        forward, leaves, _, dy, _ = build_nf4("lf", in_f, out_f, tokens, dtype, SEED)
        return forward, leaves, dy
    gen = torch.Generator().manual_seed(SEED)  # the same draws, in the same order, as qlora_linear.build
    w = (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(dtype)
    lora_a = torch.randn(RANK, in_f, generator=gen) * in_f ** -0.5
    lora_b = torch.randn(out_f, RANK, generator=gen) * RANK ** -0.5
    x = torch.randn(1, tokens, in_f, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(1, tokens, out_f, generator=gen).to(dtype)
    if method == "dense":
        import lf.kernels

        a, b = lora_a.requires_grad_(), lora_b.requires_grad_()
        fn = lambda: lf.kernels.lora_linear(x, w, a, b, ALPHA / RANK, None)  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model

        host = _Host(nn.Linear(in_f, out_f, bias=False, dtype=dtype))
        with torch.no_grad():
            host.proj.weight.copy_(w)
        del w
        if method == "hqq4":
            from lf.model.hqq import quantize_linears

            quantize_linears(host, 4, dtype, "cpu", kept=lambda path: False)
        else:
            from lf.model.quanto import quantize_linears

            quantize_linears(host, int(method.removeprefix("quanto")), kept=lambda path: False)
        model = get_peft_model(host, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]))
        lora = model.base_model.model.proj
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(lora_a)
            b.copy_(lora_b)
        fn = lambda: lora(x)  # noqa: E731

    def forward():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        with ctx:
            return fn()

    return forward, (x, a, b), dy


def worker(args: argparse.Namespace) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    forward, leaves, dy = build(args.method, 256, 128, 8, dtype)  # imports, one-time initialisation (extensions)
    torch.autograd.backward(forward(), dy)
    forward, leaves, dy = build(args.method, IN // args.divisor, OUT // args.divisor, args.tokens, dtype)
    _malloc_trim()
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    y = forward()
    torch.autograd.backward(y, dy)
    extra_peak = (_status_kib("VmHWM") - rss_before) / 1024
    torch.save(y.detach(), args.tensor_file)
    del y

    def clear_grads() -> tuple:
        for t in leaves:
            t.grad = None
        return ()

    clear_grads()
    seconds = harness.median_seconds({"fwd+bwd": (lambda: torch.autograd.backward(forward(), dy), clear_grads)},
                                     args.warmup, args.repeats)
    Path(args.result_file).write_text(json.dumps({"fwd_bwd_ms": seconds["fwd+bwd"] * 1e3, "extra_peak_mib": extra_peak,
                                                  "torch_threads": torch.get_num_threads()}))
    return 0


def _child(args: argparse.Namespace, method: str, tmp: Path) -> dict:
    result, tensor = tmp / f"{method}.json", tmp / f"{method}.pt"
    cmd = [sys.executable, "-m", "bench.quant_linear", "--worker", "--method", method, "--dtype", args.dtype,
           "--tokens", str(args.tokens), "--divisor", str(args.divisor), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--result-file", str(result), "--tensor-file", str(tensor)]
    started = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=REPO, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        return {"method": method, "status": f"timed out after {args.timeout:g} s"}
    if code != 0 or not result.exists():
        return {"method": method, "status": f"failed (exit code {code})"}
    return {"method": method, "status": "ok", "process_wall_s": time.perf_counter() - started,
            **json.loads(result.read_text())}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# LoRA over each quantization method, one {s['in']} -> {s['out']} layer: {m['device']}", "",
             f"`{result['command']}`", "",
             f"{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, {s['versions']}. {result['date']}.", "",
             f"{s['tokens']} tokens, {s['dtype']}, LoRA r {RANK}, alpha {ALPHA}; median of {s['repeats']} forward + "
             f"backwards after {s['warmup']} untimed; each method in its own process. Speed-up = dense's time / the "
             f"method's; extra peak = VmHWM - VmRSS before one forward + backward; y error = max |y - dense's y| / "
             f"max |dense's y|.", "",
             "| method | lf runs | fwd+bwd ms | speed-up vs dense | extra peak MiB | memory vs dense | y error |",
             "|---|---|--:|--:|--:|--:|--:|"]
    base = next((r for r in result["rows"] if r["method"] == "dense" and r["status"] == "ok"), None)
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {RUNS[r['method']]} | {r['status']} | | | | |")
            continue
        speed = base and base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        memory = base and base["extra_peak_mib"] and r["extra_peak_mib"] / base["extra_peak_mib"]
        error = "n/a" if r.get("y_error") is None else f"{r['y_error']:.1e}"
        lines.append(f"| {r['method']} | {RUNS[r['method']]} | {ms_text(r['fwd_bwd_ms'])} | {ratio_text(speed)} "
                     f"| {r['extra_peak_mib']:,.0f} | {ratio_text(memory)} | {error} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: str) -> int:
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads peak RSS through /proc/self/clear_refs and VmHWM: Linux only")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-quant-") as tmp:
        for i, method in enumerate(args.methods):
            print(f"[{i + 1}/{len(args.methods)}] {method} ...", flush=True)
            rows.append(_child(args, method, Path(tmp)))
            print(f"    {rows[-1]}", flush=True)
        dense = Path(tmp) / "dense.pt"
        for r in rows:
            mine = Path(tmp) / f"{r['method']}.pt"
            if r["status"] == "ok" and dense.exists() and r["method"] != "dense":
                want = torch.load(dense).float()
                r["y_error"] = ((torch.load(mine).float() - want).abs().max() / want.abs().max()).item()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("peft", *dict.fromkeys(PACKAGES.values())))
    result = {"date": harness.now(), "command": command, "machine": harness.machine_facts(), "rows": rows,
              "settings": {"in": IN // args.divisor, "out": OUT // args.divisor, "tokens": args.tokens,
                           "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats,
                           "versions": versions}}
    text = markdown(result)
    path = harness.write_report("quant_linear", text, result, quick=args.quick or args.methods != list(METHODS))
    print("\n" + text + f"\nWrote {path.relative_to(REPO)} and its .json", flush=True)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TOKENS} tokens, both widths / {QUICK_DIVISOR}, 3 repeats")
    p.add_argument("--methods", type=harness.names_parser(METHODS), default=list(METHODS),
                   help="comma-separated (default all)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--tokens", type=int)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed calls; the median is reported (default 5, quick 3)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per child process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--divisor", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--tensor-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.divisor = args.divisor or (QUICK_DIVISOR if args.quick else 1)
    return args


def main(argv: list[str] | None = None, prog: str = "python -m bench.quant_linear") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    if args.worker:
        return worker(args)
    return run(args, shlex.join([*prog.split(), *argv]))


if __name__ == "__main__":
    sys.exit(main())
