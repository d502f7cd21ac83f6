"""``python -m bench``: time lf's CPU kernels against HF eager and torch.compile; see bench/README.md.

``python -m bench lm-head-loss [...]`` runs the lm_head + loss benchmark instead (bench/lm_head_loss.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parent.parent
OP_NAMES = ("rms_norm", "rope", "swiglu", "geglu")
DTYPE_NAMES = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                epilog="python -m bench lm-head-loss --help: the lm_head + loss benchmark")
    p.add_argument("--ops", type=harness.names_parser(OP_NAMES), default=list(OP_NAMES),
                   help="comma-separated (default: all)")
    p.add_argument("--dtypes", type=harness.names_parser(DTYPE_NAMES), default=list(DTYPE_NAMES),
                   help="comma-separated")
    p.add_argument("--allocator", choices=(*harness.ALLOCATORS, "both"), default="both",
                   help="glibc malloc setting shared by every case; 'both' runs each in its own process")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 tokens instead of 4096, fewer repeats")
    p.add_argument("--warmup", type=int, help="untimed calls before the timed ones (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed calls; the median is reported (default 9, quick 5)")
    p.add_argument("--check", nargs="*", metavar="RESULT_JSON",
                   help="exit 1 if a target is missed: after this run, or, given result files, in those only")
    args = p.parse_args(argv)
    args.tokens = 512 if args.quick else 4096
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 9)
    return args


def missed_targets(result: dict) -> list[str]:
    """Every target in bench.ops that this result misses, one line each."""
    from bench import ops

    misses = []
    for r in result["rows"]:
        where = f"{r['op']} {r['dtype']} {r['direction']}, allocator {result['settings']['allocator']}"
        need = ops.SPEEDUP_VS_EAGER.get(r["op"])
        if need and r["vs_eager"] < need:
            misses.append(f"{where}: {r['vs_eager']:.2f}x faster than HF eager, target {need}x")
        if r["lf_ms"] > ops.COMPILE_NOISE_MARGIN * r["compile_ms"]:
            misses.append(f"{where}: {r['lf_ms']:.2f} ms, slower than torch.compile's {r['compile_ms']:.2f} ms "
                          f"by more than the {ops.COMPILE_NOISE_MARGIN - 1:.0%} noise margin")
        if r["op"] == "rms_norm" and r["direction"] == "fwd" \
                and r["pct_copy_into_existing"] < 100 * ops.RMS_NORM_FWD_COPY_FRACTION:
            misses.append(f"{where}: {r['pct_copy_into_existing']:.0f}% of copy-into-existing bandwidth, "
                          f"target {ops.RMS_NORM_FWD_COPY_FRACTION:.0%}")
    return misses


def report_targets(results: list[dict]) -> int:
    misses = [line for result in results for line in missed_targets(result)]
    print("\n".join(["Targets missed:", *(f"- {m}" for m in misses)]) if misses else "All targets met.")
    return 1 if misses else 0


def _progress_line(row: dict) -> str:
    return (f"{row['op']} {row['dtype']} {row['direction']}: lf {row['lf_ms']:.2f} ms, "
            f"HF eager {row['eager_ms']:.2f} ms ({row['vs_eager']:.2f}x), "
            f"torch.compile {row['compile_ms']:.2f} ms ({row['vs_compile']:.2f}x), "
            f"{row['pct_copy_into_existing']:.0f}% of copy bandwidth")


def run(args: argparse.Namespace) -> int:
    """Every selected case under one allocator setting, in this process."""
    reason = harness.allocator_unavailable(args.allocator)
    if reason:
        print(f"Skipping allocator '{args.allocator}': {reason}")
        return 0
    mallopt = harness.apply_allocator(args.allocator)  # first: before any large allocation

    import lf.kernels
    from bench import ops

    if lf.kernels.choose_backend("cpu") != "cpu":
        sys.exit("lf would not run its cpu backend here: unset LF_KERNEL_BACKEND and check that lf._C loads")
    machine = harness.machine_facts()
    described = harness.describe_allocator(args.allocator, mallopt)
    print(f"{machine['device']}: lf ISA {machine['lf_isa']}, allocator {described}, {args.tokens} tokens", flush=True)

    progress = harness.Progress(total=len(args.dtypes) * len(args.ops) * len(harness.DIRECTIONS))
    bandwidth = harness.copy_bandwidth(args.warmup, args.repeats)
    progress.note("copy bandwidth: " + ", ".join(f"{k} {v / harness.GB:.1f} GB/s" for k, v in bandwidth.items()))
    rows, compile_seconds = [], {}
    for dtype in args.dtypes:
        for op in args.ops:
            case = ops.OPS[op](args.tokens, ops.DTYPES[dtype])
            compile_s, directions = harness.time_case(case, args.warmup, args.repeats)
            compile_seconds[f"{op}/{dtype}"] = compile_s
            progress.note(f"{op} {dtype}: torch.compile took {compile_s:.1f} s (not timed)")
            for direction, seconds in directions:
                rows.append(harness.row(op, dtype, direction, seconds, ops.direction_bytes(case, direction),
                                        bandwidth))
                progress.case_done(_progress_line(rows[-1]))
    progress.close()

    result = {
        "date": harness.now(),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "machine": machine,
        "settings": {
            "allocator": args.allocator, "mallopt": mallopt, "allocator_described": described,
            "tokens": args.tokens, "ops": args.ops, "dtypes": args.dtypes, "warmup": args.warmup,
            "repeats": args.repeats, "quick": args.quick,
            "full": not args.quick and set(args.ops) == set(OP_NAMES) and set(args.dtypes) == set(DTYPE_NAMES),
        },
        "copy_bandwidth_gbps": {k: v / harness.GB for k, v in bandwidth.items()},
        "compile_seconds": compile_seconds,
        "rows": rows,
    }
    paths = harness.write_results(result)
    print("\n" + harness.markdown(result))
    print("Wrote " + " and ".join(str(p.relative_to(REPO)) for p in paths), flush=True)
    return report_targets([result]) if args.check is not None else 0


def run_each_allocator(args: argparse.Namespace) -> int:
    """One child process per allocator setting, since a setting must be applied before any allocation."""
    codes = []
    for setting in harness.ALLOCATORS:
        argv = ["--allocator", setting, "--ops", ",".join(args.ops), "--dtypes", ",".join(args.dtypes),
                "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        argv += ["--quick"] * args.quick + ["--check"] * (args.check is not None)
        print(f"== python -m bench {shlex.join(argv)}", flush=True)
        codes.append(subprocess.run([sys.executable, "-m", "bench", *argv], cwd=REPO).returncode)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-head-loss"]:
        from bench import lm_head_loss

        return lm_head_loss.main(argv[1:], prog="python -m bench lm-head-loss")
    if argv[:1] == ["qlora-linear"]:
        from bench import qlora_linear

        return qlora_linear.main(argv[1:], prog="python -m bench qlora-linear")
    args = parse_args(argv)
    if args.check:  # result files given: check them, run nothing
        return report_targets([json.loads(Path(p).read_text()) for p in args.check])
    return run_each_allocator(args) if args.allocator == "both" else run(args)


if __name__ == "__main__":
    sys.exit(main())
