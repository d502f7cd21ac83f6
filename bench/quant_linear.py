"""``python -m bench quant-linear``: one LoRA linear layer of Llama-3-8B's MLP shape (gate_proj, 4096 -> 14336),
forward + backward, over each quantization method lf trains on, against the 16-bit layer, in one run; time and
peak memory, each method in a fresh process. See bench/README.md ("LoRA over each quantization method").

Each method runs what lf runs in training for it:

- ``dense``: the 16-bit weight, lf's ``lora_linear`` (the baseline);
- ``bnb_nf4``: bitsandbytes NF4 with double quantization, lf's fused ``lora_nf4_linear``;
- ``hqq4``: hqq 4-bit (groups of 64, lf.model.hqq), PEFT's HQQ LoRA layer over hqq's kernel;
- ``quanto4``, ``quanto8``: quanto int4 (groups of 128) / int8 (per channel) (lf.model.quanto), PEFT's LoRA
  layer over quanto's QLinear;
- ``gptq4``, ``awq4``: 4-bit GPTQ (symmetric, groups of 128, GPTQ's algorithm calibrated on seeded tokens) / AWQ
  (zero points, groups of 128), PEFT's GPTQ / AWQ LoRA layer over GPTQModel's CPU kernels (``TorchAtenLinear``,
  ``TorchAtenAwqLinear``: what transformers picks when lf trains over such a checkpoint). GPTQModel cannot share
  lf's venv (README, Quantized training): these two run in a child started with the GPTQ venv's python
  (``--gptq-python``; by default .ci/run's venv, $LF_CI_GPTQ_VENV or ~/.cache/lf-ci/venv-gptq), and are reported
  as not run, saying why, when there is none.

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
import os
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
METHODS = ("dense", "bnb_nf4", "hqq4", "quanto4", "quanto8", "gptq4", "awq4")
RUNS = {"dense": "lf `lora_linear`", "bnb_nf4": "lf `lora_nf4_linear`", "hqq4": "PEFT over hqq's `HQQLinear`",
        "quanto4": "PEFT over quanto's `QLinear`", "quanto8": "PEFT over quanto's `QLinear`",
        "gptq4": "PEFT over GPTQModel's `TorchAtenLinear`", "awq4": "PEFT over GPTQModel's `TorchAtenAwqLinear`"}
PACKAGES = {"bnb_nf4": "bitsandbytes", "hqq4": "hqq", "quanto4": "optimum-quanto",
            "quanto8": "optimum-quanto", "gptq4": "gptqmodel", "awq4": "gptqmodel"}
GPTQ_METHODS = ("gptq4", "awq4")  # run by the GPTQ venv's python
GPTQ_VENV = Path(os.environ.get("LF_CI_GPTQ_VENV", Path.home() / ".cache" / "lf-ci" / "venv-gptq"))  # .ci/run's
GROUP = 128  # GPTQ's and AWQ's default group of inputs sharing a scale
# GPTQModel in the child as tests_gptq/conftest.py sets it up: packing in Python (its C++ pack extension compiles for
# ~8 min on first use), its CPU pool of 2 workers (its default of 1 fails on a 2-core machine)
GPTQMODEL_ENV = {"GPTQMODEL_DISABLE_PACK_EXT": "1", "GPTQMODEL_CPU_WORKERS": "2"}
TOKENS, QUICK_TOKENS, QUICK_DIVISOR = 512, 64, 8
TIMEOUT_S = 1200.0


class _Host(nn.Module):
    """A model holding the base layer as ``proj``, for PEFT to wrap."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj
        # where PEFT puts the adapters: without it PEFT asks the first parameter, and GPTQModel's layers hold buffers
        self.hf_device_map = {"": "cpu"}


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

        host = _Host(quantized_layer(method, w, gen, tokens))
        del w
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


def quantized_layer(method: str, w: torch.Tensor, gen: torch.Generator, tokens: int) -> nn.Module:
    """The layer `method` makes of `w` (GPTQ calibrates on `tokens` fresh draws of `gen`, after every draw the
    other methods take)."""
    if method == "gptq4":
        return _gptq_layer(w, torch.randn(tokens, w.shape[1], generator=gen))
    if method == "awq4":
        return _awq_layer(w)
    host = _Host(nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    with torch.no_grad():
        host.proj.weight.copy_(w)
    if method == "hqq4":
        from lf.model.hqq import quantize_linears

        quantize_linears(host, 4, w.dtype, "cpu", kept=lambda path: False)
    else:
        from lf.model.quanto import quantize_linears

        quantize_linears(host, int(method.removeprefix("quanto")), kept=lambda path: False)
    return host.proj


def _gptq_layer(w: torch.Tensor, calibration: torch.Tensor):
    """`w` GPTQ-quantized to 4 bits as optimum's quantizer does it (GPTQModel's GPTQ on the layer's inputs, damping
    0.1, symmetric, no act-order), packed into GPTQModel's CPU kernel layer."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear
    from gptqmodel.quantization import GPTQ

    out_f, in_f = w.shape
    linear = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    gptq = GPTQ(linear, qcfg=QuantizeConfig(bits=4, group_size=GROUP, damp_percent=0.1, desc_act=False, sym=True,
                                            offload_to_disk=False))
    gptq.quantizer.configure(bits=4, sym=True, perchannel=True)
    with torch.no_grad():
        gptq.add_batch(calibration, linear(calibration))
    scale, zero, g_idx = gptq.fasterquant(percdamp=0.1, group_size=GROUP, actorder=False)[:3]
    gptq.free()
    layer = TorchAtenLinear(bits=4, group_size=GROUP, sym=True, desc_act=False, in_features=in_f, out_features=out_f)
    layer.pack(linear, scale, zero, g_idx)  # the scales and zero points as GPTQModel stores them (its v2 format)
    layer.post_init()
    return layer


def _awq_layer(w: torch.Tensor):
    """`w` quantized to 4 bits with a zero point per group, as AWQ stores it, packed into GPTQModel's CPU kernel
    layer. Round to nearest: AWQ's search scales each input channel and folds the inverse into the layer before,
    which a lone layer has not; it changes the codes, not the kernel's work."""
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq import TorchAtenAwqLinear
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq

    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scales = (high - low).clamp(min=1e-5) / 15
    zeros = (-torch.round(low / scales)).clamp(0, 15)
    codes = (torch.round(groups / scales) + zeros).clamp(0, 15).reshape(out_f, in_f)
    layer = TorchAtenAwqLinear(bits=4, group_size=GROUP, sym=False, desc_act=False, in_features=in_f,
                               out_features=out_f)
    # AWQ's layout: inputs x outputs, one row of scales and zero points per group
    layer.qweight, layer.qzeros = pack_awq(codes.T.int().contiguous(), zeros[..., 0].T.int().contiguous(), 4)
    layer.scales = scales[..., 0].T.to(torch.float16).contiguous()
    layer.post_init()
    return layer


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
    package = PACKAGES.get(args.method)  # dense's is torch, which the report names anyway
    Path(args.result_file).write_text(json.dumps({"fwd_bwd_ms": seconds["fwd+bwd"] * 1e3, "extra_peak_mib": extra_peak,
                                                  "torch_threads": torch.get_num_threads(),
                                                  "version": package and f"{package} {metadata.version(package)}"}))
    return 0


def _child(args: argparse.Namespace, method: str, tmp: Path) -> dict:
    result, tensor = tmp / f"{method}.json", tmp / f"{method}.pt"
    python = args.gptq_python if method in GPTQ_METHODS else sys.executable
    if python is None:
        return {"method": method, "status": f"not run: GPTQModel is in a venv of its own, and there is none at "
                                            f"{GPTQ_VENV} (.ci/run's): give its python with --gptq-python"}
    cmd = [python, "-m", "bench.quant_linear", "--worker", "--method", method, "--dtype", args.dtype,
           "--tokens", str(args.tokens), "--divisor", str(args.divisor), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--result-file", str(result), "--tensor-file", str(tensor)]
    started = time.perf_counter()
    try:
        env = {**GPTQMODEL_ENV, **os.environ} if method in GPTQ_METHODS else None
        code = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.timeout).returncode
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
    # each child's own (the GPTQ methods' come from their venv)
    versions = ", ".join(dict.fromkeys([f"peft {metadata.version('peft')}",
                                        *(r["version"] for r in rows if r.get("version"))]))
    result = {"date": harness.now(), "command": command, "machine": harness.machine_facts(), "rows": rows,
              "settings": {"in": IN // args.divisor, "out": OUT // args.divisor, "tokens": args.tokens,
                           "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats,
                           "versions": versions}}
    text = markdown(result)
    path = harness.write_report("quant_linear", text, result, quick=args.quick or args.methods != list(METHODS))
    print("\n" + text + f"\nWrote {path.relative_to(REPO)} and its .json", flush=True)
    return 1 if any(r["status"] != "ok" and not r["status"].startswith("not run") for r in rows) else 0


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
    p.add_argument("--gptq-python",
                   help=f"the python of a venv with lf[gptq], which runs {', '.join(GPTQ_METHODS)} (default "
                        f"{GPTQ_VENV}/bin/python: .ci/run's, or $LF_CI_GPTQ_VENV's)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--divisor", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--tensor-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.divisor = args.divisor or (QUICK_DIVISOR if args.quick else 1)
    if args.gptq_python is None:
        default = GPTQ_VENV / "bin" / "python"
        args.gptq_python = str(default) if default.is_file() else None
    elif not Path(args.gptq_python).is_file():
        p.error(f"--gptq-python {args.gptq_python}: no such file: give the python of a venv with lf[gptq]")
    return args


def main(argv: list[str] | None = None, prog: str = "python -m bench.quant_linear") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    if args.worker:
        return worker(args)
    return run(args, shlex.join([*prog.split(), *argv]))


if __name__ == "__main__":
    sys.exit(main())
