"""``python -m bench.qlora_floor``: how far lora_nf4_linear can lead PEFT + bitsandbytes while both multiply with
torch's GEMMs. In one process, taking turns (so that a loaded machine's drift falls on all alike), per projection
of Llama-3-8B: PEFT + bitsandbytes and lf fwd+bwd (as bench/qlora_linear.py builds them), and the two fp32 GEMMs
that lf's CPU path runs and cannot avoid (``x W^T`` forward, ``dy W`` backward, W frozen: no dW), with W already
dequantised. PEFT's time over the GEMMs' is lf's ceiling. Where the CPU has no native bf16 dot products lf widens
bf16 to fp32 (lf.kernels._backend.matmul_in_fp32), so the fp32 GEMMs are its floor in both dtypes.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from bench import harness
from bench.harness import ms_text, ratio_text
from bench.qlora_linear import DTYPE_NAMES, PROJECTIONS, SEED, TOKENS, build


def _fwd_bwd(forward, leaves, dy):
    def setup():
        for t in leaves:
            t.grad = None
        return ()

    return lambda: torch.autograd.backward(forward(), dy), setup


def measure(name: str, dtype: torch.dtype, tokens: int, warmup: int, repeats: int) -> dict:
    _, in_f, out_f = PROJECTIONS[name]
    calls = {}
    for variant in ("peft_bnb", "lf"):
        forward, leaves, _, dy, _ = build(variant, in_f, out_f, tokens, dtype, SEED)
        calls[variant] = _fwd_bwd(forward, leaves, dy)
    gen = torch.Generator().manual_seed(SEED)
    w, x, dy = (torch.randn(s, generator=gen) for s in ((out_f, in_f), (tokens, in_f), (tokens, out_f)))
    calls["fp32_gemms"] = (lambda: (x @ w.t(), dy @ w)), tuple
    ms = {k: v * 1e3 for k, v in harness.median_seconds(calls, warmup, repeats).items()}
    return {"projection": name, "in": in_f, "out": out_f, **{f"{k}_ms": v for k, v in ms.items()},
            "lf_speedup": ms["peft_bnb"] / ms["lf"], "ceiling": ms["peft_bnb"] / ms["fp32_gemms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.qlora_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", type=harness.names_parser(DTYPE_NAMES), default=["fp32"])
    p.add_argument("--shapes", type=harness.names_parser(tuple(PROJECTIONS)), default=list(PROJECTIONS))
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    m = harness.machine_facts()
    lines = [f"# QLoRA linear: lf's ceiling over PEFT + bitsandbytes with torch's GEMMs: {m['device']}", "",
             f"`{shlex.join(['python', '-m', 'bench.qlora_floor', *(sys.argv[1:] if argv is None else argv)])}`",
             "", f"{m['cpu_model']}, {m['cores']} cores, lf ISA {m['lf_isa']}, torch {m['torch']}. {harness.now()}. "
             f"{args.tokens} tokens; fwd+bwd, median of {args.repeats} after {args.warmup} untimed, the three taking "
             f"turns in one process.", "",
             "| dtype | projection | in -> out | PEFT + bnb ms | lf ms | fp32 GEMMs ms | lf speed-up | ceiling |",
             "|---|---|---|--:|--:|--:|--:|--:|"]
    rows = []
    for dtype in args.dtypes:
        for name in args.shapes:
            r = {"dtype": dtype, **measure(name, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                                           args.tokens, args.warmup, args.repeats)}
            rows.append(r)
            lines.append(f"| {dtype} | {name} | {r['in']} -> {r['out']} | {ms_text(r['peft_bnb_ms'])} "
                         f"| {ms_text(r['lf_ms'])} | {ms_text(r['fp32_gemms_ms'])} | {ratio_text(r['lf_speedup'])} "
                         f"| {ratio_text(r['ceiling'])} |")
            print(lines[-1], flush=True)
    lines += ["", "lf speed-up = PEFT + bnb time / lf's; ceiling = PEFT + bnb time / the two fp32 GEMMs' (lf's "
                  "speed-up were its dequantisation and LoRA terms free)."]
    text = "\n".join(lines) + "\n"
    full = args.tokens == TOKENS and args.shapes == list(PROJECTIONS)
    path = harness.write_report("qlora_floor", text, {"date": harness.now(), "machine": m, "args": vars(args),
                                                      "rows": rows}, quick=not full)
    print(text + f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
