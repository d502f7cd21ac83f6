"""``python -m bench ppo-step``: one ppo step of lf's loop (lf.train.ppo) at the quickstart's size, its time split by
phase, with lf's kernels on and off (``use_lf_kernels``), each in its own process:

- rollout: the policy answers the step's prompts (transformers' generate, sampling);
- score:   the reward (here a rule computed in-process, so that the step's own work is what is timed);
- evaluate: the policy's log-probabilities, values and entropy and the reference's (adapter off), without
           gradient, then rewards, GAE and whitening;
- update:  ppo_epochs passes of the clipped losses with backward and optimizer steps.

Setup: lf-tiny-llama (the quickstart's model), LoRA (lf's defaults), template qwen, lf_demo_en's prompts,
per_device_train_batch_size 4 x ppo_buffer_size 2 = 8 rollouts of up to 128 new tokens, ppo_epochs 4, fp32. One
warm-up step, then the mean of three steps per phase.

    python -m bench ppo-step            # ~2 minutes on 2 cores
    python -m bench ppo-step --quick    # 32 new tokens, one timed step (smoke)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parent.parent
NAME = "ppo_step"
PHASES = ("rollout", "score", "evaluate", "update")
VARIANTS = {"kernels": True, "no_kernels": False}


def _config(output_dir: str, kernels: bool, quick: bool) -> dict:
    return {"model_name_or_path": "lf-tiny-llama", "stage": "ppo", "dataset": "lf_demo_en",
            "dataset_dir": str(REPO / "data"), "template": "qwen", "cutoff_len": 512, "output_dir": output_dir,
            "reward_model_type": "api", "reward_model": "in-process", "per_device_train_batch_size": 4,
            "ppo_buffer_size": 2, "ppo_epochs": 4, "max_new_tokens": 32 if quick else 128, "infer_dtype": "float32",
            "use_lf_kernels": kernels, "seed": 0}


def rule(sequences: list[list[int]]):
    """A reward computed from the tokens: the share of even ids (cheap, and varied)."""
    import torch

    return torch.tensor([sum(t % 2 == 0 for t in s) / len(s) for s in sequences])


def worker(variant: str, quick: bool, result: Path) -> int:
    import torch

    from lf.config import parse_train_args
    from lf.train.ppo import PPO
    from lf.train.recipe import prepare

    with tempfile.TemporaryDirectory() as out:
        cfg = parse_train_args(_config(out, VARIANTS[variant], quick))
        parts = prepare(cfg)
        ppo = PPO(cfg, parts, rule, None)
        prompts = [row["input_ids"] for row in parts.data.train_dataset][:ppo.rollouts]
        torch.manual_seed(0)
        timed = []
        for _ in range(2 if quick else 4):  # the first: warm-up
            times = {}
            start = time.perf_counter()
            answers = ppo.answer(prompts)
            times["rollout"] = time.perf_counter() - start
            start = time.perf_counter()
            scores = ppo.scorer([p + a for p, a in zip(prompts, answers)])
            times["score"] = time.perf_counter() - start
            start = time.perf_counter()
            rollout, stats = ppo.evaluate(prompts, answers, scores)
            times["evaluate"] = time.perf_counter() - start
            start = time.perf_counter()
            ppo.update(rollout)
            times["update"] = time.perf_counter() - start
            timed.append({**times, "tokens": sum(map(len, answers))})
        steps = timed[1:]
        row = {phase: sum(t[phase] for t in steps) / len(steps) for phase in PHASES}
        row.update(variant=variant, answer_tokens=sum(t["tokens"] for t in steps) / len(steps),
                   step_s=sum(row[p] for p in PHASES))
    result.write_text(json.dumps(row))
    return 0


def run_case(variant: str, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "bench.ppo_step", "--worker", variant, "--result", str(result)]
        code = subprocess.run(argv + ["--quick"] * quick, cwd=REPO).returncode
        if code != 0 or not result.exists():
            return {"variant": variant, "error": f"exit code {code}"}
        return json.loads(result.read_text())


def summary(rows: list[dict]) -> str:
    lines = ["| variant | rollout s | score s | evaluate s | update s | step s | answer tokens |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES)
                     + f" | {r['step_s']:.2f} | {r['answer_tokens']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m bench ppo-step") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 new tokens, one timed step (smoke run)")
    p.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.quick, Path(args.result))
    rows = [run_case(variant, args.quick) for variant in VARIANTS]
    command = "python -m bench ppo-step" + " --quick" * args.quick
    text = "\n".join([f"# One ppo step by phase: {harness.device_name()}", "", f"`{command}`", "",
                      "lf-tiny-llama, LoRA, 8 rollouts, ppo_epochs 4, fp32; kernels = use_lf_kernels true (lf's "
                      "patched model, fused log-probabilities) or false. Mean seconds per step after a warm-up.", "",
                      summary(rows)]) + "\n"
    return harness.finish(NAME, text, command, rows, summary(rows), args.quick)


if __name__ == "__main__":
    sys.exit(main())
