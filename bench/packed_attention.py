"""Attention over neat-packed rows: lf's fused causal kernel and per-example paths against transformers' mask.

    python -m bench.packed_attention            # the three shapes below, 8 heads x 64
    python -m bench.packed_attention --quick    # each example 4x shorter (smoke)

Three shapes: `long_row`, one row of 2048 tokens holding 8 examples of 92 to 512 tokens; `short_rows`, a batch of
4 rows of 512 tokens holding 21 examples of 32 to 200 (the e2e training benchmark's batch of packed rows, cutoff
512, batch 4, with shorter examples than its alpaca_en_demo: ~2.4 of ~215 tokens a row); `tiny_rows`, 4 rows of
128 tokens holding 5 examples of 8 to 48 each (where lf_cpu loses to the mask). Forward + backward of the
attention alone (q, k, v given), fp32 and bf16, median of several calls taking turns, in one process:
`lf_flash` (flash_attention_cpu: lf's fused causal kernel, csrc/flash_attention.cpp, over each example's 64 x 64
tiles on and below the diagonal), `lf_packed` (packed_sdpa: causal SDPA per example), `sdpa_mask` (SDPA with the
L x L block-diagonal causal mask that transformers builds for packed rows, LLaMA-Factory's path on the CPU, in one
call over the batch), `lf_cpu` (packed_attention_cpu: SDPA's flash forward, by segments when `segments_pay`, else
masked, and lf's backward over each example's causal block: BLAS products and two C++ elementwise passes) and
`sdpa_causal` (one causal SDPA over each whole row: as fast as attention over a row gets, but the examples see
each other, so it is a speed reference, not an alternative). `lf_chosen` is the time of the variant that
packed_attention.choose, the one place lf decides, picks for that batch (not timed again). The outputs of
lf_packed, lf_cpu and lf_flash are compared with sdpa_mask's.
Writes bench/results/<device>/<date>-packed_attention.{json,md} (scratch/ for --quick).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench import harness
from lf.kernels.packed_attention import (block_mask, choose, flash_attention_cpu, packed_attention_cpu, packed_sdpa,
                                         segment_block)

HEADS, HEAD_DIM, REPEATS = 8, 64, 7
# name -> each row's example lengths (every row of a shape sums to the same length)
SHAPES = {
    "long_row": ((512, 400, 320, 256, 200, 160, 108, 92),),  # 2048 tokens
    "short_rows": ((200, 148, 92, 72), (180, 120, 100, 64, 48), (160, 112, 96, 80, 32, 32),
                   (140, 128, 88, 68, 56, 32)),  # 4 x 512 tokens
    "tiny_rows": ((48, 32, 24, 16, 8), (40, 40, 24, 16, 8), (48, 40, 16, 16, 8), (32, 32, 32, 16, 16)),  # 4 x 128
}


def _bounds(rows):
    bounds = []
    for lengths in rows:
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        bounds.append([(s, s + n) for s, n in zip(starts, lengths)])
    return bounds


def case(shape: str, dtype, scale_down: int):
    rows = [[n // scale_down for n in lengths] for lengths in SHAPES[shape]]
    length = sum(rows[0])
    assert all(sum(lengths) == length for lengths in rows), rows
    bounds = _bounds(rows)
    mask = block_mask(bounds, length, dtype)
    chosen = choose(bounds, length, dtype, "cpu")
    q, k, v = (torch.randn(len(rows), HEADS, length, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(len(rows), HEADS, length, HEAD_DIM, dtype=dtype)
    variants = {
        "lf_packed": lambda: packed_sdpa(q, k, v, bounds),
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "lf_cpu": lambda: packed_attention_cpu(q, k, v, bounds),
        "lf_flash": lambda: flash_attention_cpu(q, k, v, bounds),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }

    def clear_grads() -> tuple:  # untimed
        q.grad = k.grad = v.grad = None
        return ()

    calls = {name: (lambda fn=fn: fn().backward(grad), clear_grads) for name, fn in variants.items()}
    seconds = harness.median_seconds(calls, warmup=1, repeats=REPEATS)
    seconds["lf_chosen"] = seconds[chosen]
    diff = max((variants[name]().float() - variants["sdpa_mask"]().float()).abs().max().item()
               for name in ("lf_packed", "lf_cpu", "lf_flash"))
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "batch": len(rows), "tokens": length,
            "examples": sum(map(len, rows)), "example_tokens": [min(map(min, rows)), max(map(max, rows))],
            "lf_chose": chosen, "ms": {name: 1e3 * s for name, s in seconds.items()},
            "max_abs_diff_vs_mask": diff}


def _best_other(r) -> float:
    """The fastest time of the paths lf could run instead of lf_flash (sdpa_causal mixes examples: not one)."""
    return min(r["ms"][name] for name in ("lf_cpu", "lf_packed", "sdpa_mask"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packed_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [case(shape, dtype, 4 if args.quick else 1) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)]
    command = "python -m bench.packed_attention" + (" --quick" if args.quick else "")
    shapes = {r["shape"]: r for r in rows}
    md = [f"# Attention over packed rows: {harness.device_name()}", "", f"`{command}`", "",
          "; ".join(f"{name}: {r['batch']} row(s) of {r['tokens']} tokens holding {r['examples']} examples of "
                    f"{r['example_tokens'][0]} to {r['example_tokens'][1]}" for name, r in shapes.items())
          + f". {HEADS} heads x {HEAD_DIM}, forward + backward, median of {REPEATS} calls, "
          f"the variants taking turns; {torch.get_num_threads()} threads. lf_chosen is what lf's attention runs "
          f"(packed_attention.choose): lf_flash in packed_attention.FLASH's dtypes; else lf_cpu in 16-bit dtypes when "
          f"own_backward_pays; else lf_packed (segments) when segments_pay, i.e. 1.25 * sum(n * max(n, block)) < "
          f"rows * length^2 (block {segment_block(torch.float32)} in fp32), else sdpa_mask.", "",
          "| shape | dtype | lf chose | lf_chosen ms | lf_flash ms | lf_cpu ms | lf_packed ms | sdpa_mask ms "
          "| sdpa_causal ms (examples mixed) | lf_flash vs best other | lf_chosen vs mask | max abs diff |",
          "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    md += [f"| {r['shape']} | {r['dtype']} | {r['lf_chose']} | {r['ms']['lf_chosen']:.1f} | {r['ms']['lf_flash']:.1f} "
           f"| {r['ms']['lf_cpu']:.1f} | {r['ms']['lf_packed']:.1f} | {r['ms']['sdpa_mask']:.1f} "
           f"| {r['ms']['sdpa_causal']:.1f} | {_best_other(r) / r['ms']['lf_flash']:.2f}x "
           f"| {r['ms']['sdpa_mask'] / r['ms']['lf_chosen']:.2f}x | {r['max_abs_diff_vs_mask']:.1e} |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    harness.write_report("packed_attention", text, {"command": command, "machine": harness.machine_facts(),
                                                    "rows": rows}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
