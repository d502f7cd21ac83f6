"""`lf train` end to end: lf as it runs by default (kernels and packing on) against lf with both off.

    python -m bench.train_e2e            # the quickstart model, lf's demo data, cutoff 512, batch 4, 30 steps
    python -m bench.train_e2e --quick    # 6 steps (smoke)

Each variant is `lf train configs/quickstart.yaml` with the same overrides, in a fresh process (so each has its own
allocator state and memory peak). Tokens/s counts real (non-padding) tokens, from the run's trainer_log.jsonl;
peak memory is the child's maximum resident set (ru_maxrss). Packing puts more examples in each step, so the loss
curves are drawn against tokens trained on, not steps. Writes bench/results/<device>/<date>-train_e2e.{json,md}
and the overlaid loss curves as a PNG (scratch/ for --quick).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parent.parent
COMMON = ["cutoff_len=512", "per_device_train_batch_size=4", "logging_steps=1", "save_steps=1000",
          "plot_loss=false", "overwrite_output_dir=true", "learning_rate=2e-3"]
# `lf ...` in this process, then its own peak resident set
CHILD = ("import resource, sys; from lf.cli import main; code = main(sys.argv[1:]); "
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
VARIANTS = {"lf (kernels + packing)": [], "lf, kernels and packing off": ["use_lf_kernels=false", "packing=false"]}


def run_variant(name: str, extra: list[str], steps: int, folder: Path) -> dict:
    out = folder / name.split()[0].strip(",") / ("off" if extra else "on")
    child = subprocess.run([sys.executable, "-c", CHILD, "train", "configs/quickstart.yaml", f"output_dir={out}",
                            f"max_steps={steps}", *COMMON, *extra], cwd=REPO, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{child.stderr[-3000:]}")
    peak_kib = int(child.stdout.rsplit("PEAK_KIB", 1)[1].split()[0])
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    results = json.loads((out / "all_results.json").read_text())
    last = records[-1]
    return {"variant": name, "overrides": extra, "steps": last["current_steps"], "tokens": last["total_tokens"],
            "tokens_per_s": last["total_tokens"] / results["train_runtime"], "train_seconds": results["train_runtime"],
            "peak_rss_mib": peak_kib / 1024,
            "curve": [(r["total_tokens"], r["loss"]) for r in records if "loss" in r]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    for row in rows:
        tokens, loss = zip(*row["curve"])
        plt.plot(tokens, loss, label=row["variant"])
    plt.xlabel("tokens trained on")
    plt.ylabel("training loss")
    plt.title("lf train: the quickstart model, lf's demo data")
    plt.legend()
    plt.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    steps = 6 if args.quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, extra in VARIANTS.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(run_variant(name, extra, steps, Path(tmp)))
    lf_row, off = rows
    command = "python -m bench.train_e2e" + (" --quick" if args.quick else "")
    md = [f"# lf train end to end: {harness.device_name()}", "", f"`{command}`", "",
          f"`lf train configs/quickstart.yaml` ({' '.join(COMMON)}, max_steps={steps}), each variant in a fresh "
          f"process. Tokens are real (non-padding) tokens; peak = the child's maximum resident set.", "",
          "| variant | steps | tokens | tokens/s | speed-up | peak RSS MiB | memory |", "|---|--:|--:|--:|--:|--:|--:|"]
    md += [f"| {r['variant']} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
           f"{r['tokens_per_s'] / off['tokens_per_s']:.2f}x | {r['peak_rss_mib']:,.0f} | "
           f"{r['peak_rss_mib'] / off['peak_rss_mib']:.2f}x |" for r in rows]
    md += ["", "Loss curves (against tokens): see the PNG beside this file."]
    text = "\n".join(md) + "\n"
    print(text)
    report = harness.write_report("train_e2e", text, {"command": command, "machine": harness.machine_facts(),
                                                      "rows": rows}, args.quick)
    plot(rows, report.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
