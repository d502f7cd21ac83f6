"""Attention over neat-packed rows: lf's per-example causal SDPA against transformers' block-diagonal mask.

    python -m bench.packed_attention            # one row of 2048 tokens holding 8 examples, 8 heads x 64
    python -m bench.packed_attention --quick    # 512 tokens (smoke)

Forward + backward of the attention alone (q, k, v given), fp32 and bf16, median of several calls, in one
process: `lf_packed` (lf.kernels.packed_attention.packed_sdpa: causal SDPA per example), `sdpa_mask` (SDPA with
the L x L block-diagonal causal mask that transformers builds for packed rows, LLaMA-Factory's path on the CPU),
and `sdpa_causal` (one causal SDPA over the whole row: as fast as attention over a row gets, but the examples see
each other, so it is a speed reference, not an alternative). The outputs of lf_packed and sdpa_mask are compared.
Writes bench/results/<device>/<date>-packed_attention.{json,md} (scratch/ for --quick).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench import harness
from lf.kernels.packed_attention import packed_sdpa

HEADS, HEAD_DIM, ROW = 8, 64, 2048
EXAMPLES = (512, 400, 320, 256, 200, 160, 108, 92)  # 2048 tokens


def _bounds(lengths):
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [[(s, s + n) for s, n in zip(starts, lengths)]]


def _mask(bounds, length):
    mask = torch.zeros(1, 1, length, length, dtype=torch.bool)
    for s, e in bounds[0]:
        mask[0, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return mask


def case(dtype, scale_down: int):
    lengths = [n // scale_down for n in EXAMPLES]
    length = sum(lengths)
    bounds = _bounds(lengths)
    mask = _mask(bounds, length)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, HEADS, length, HEAD_DIM, dtype=dtype)
    variants = {
        "lf_packed": lambda: packed_sdpa(q, k, v, bounds),
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }

    def clear_grads() -> tuple:  # untimed
        q.grad = k.grad = v.grad = None
        return ()

    calls = {name: (lambda fn=fn: fn().backward(grad), clear_grads) for name, fn in variants.items()}
    seconds = harness.median_seconds(calls, warmup=2, repeats=7)
    diff = (variants["lf_packed"]().float() - variants["sdpa_mask"]().float()).abs().max().item()
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": length, "examples": len(lengths),
            "ms": {name: 1e3 * s for name, s in seconds.items()}, "max_abs_diff_vs_mask": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packed_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [case(dtype, 4 if args.quick else 1) for dtype in (torch.float32, torch.bfloat16)]
    command = "python -m bench.packed_attention" + (" --quick" if args.quick else "")
    md = [f"# Attention over a packed row: {harness.device_name()}", "", f"`{command}`", "",
          f"One row of {rows[0]['tokens']} tokens holding {rows[0]['examples']} examples, {HEADS} heads x "
          f"{HEAD_DIM}, forward + backward, median of 7 calls; {torch.get_num_threads()} threads.", "",
          "| dtype | lf_packed ms | sdpa_mask ms | sdpa_causal ms (examples mixed) | lf vs mask | max abs diff |",
          "|---|--:|--:|--:|--:|--:|"]
    md += [f"| {r['dtype']} | {r['ms']['lf_packed']:.1f} | {r['ms']['sdpa_mask']:.1f} | {r['ms']['sdpa_causal']:.1f} "
           f"| {r['ms']['sdpa_mask'] / r['ms']['lf_packed']:.2f}x | {r['max_abs_diff_vs_mask']:.1e} |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    harness.write_report("packed_attention", text, {"command": command, "machine": harness.machine_facts(),
                                                    "rows": rows}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
