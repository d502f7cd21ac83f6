"""``python -m bench dpo-step``: time and peak memory of one dpo step (sigmoid loss, LoRA, the reference = the
adapter off) through three ways of getting the replies' log-probabilities, each in its own process:

- ``lf``: lf's ``fused_linear_preference_loss`` (what ``lf train`` runs with its kernels on): tokens through the LM
  head in chunks, the hidden gradient computed in the forward pass, no logits kept;
- ``trl``: TRL's fused LM head (``add_fused_lm_head``, TRL 1.16's default for its DPOTrainer and what ``lf train``
  runs with ``use_lf_kernels: false``): vocabulary tiles, logits recomputed in the backward pass;
- ``logits``: the model's full logits, log-softmax and gather (transformers' forward; LLaMA-Factory's dpo).

Model: a 2-layer Llama with hidden 1024 and Llama-3's vocabulary (128256), so that the LM head dominates; one pair,
1024 tokens per side, the first 128 of each a prompt; LoRA rank 8 on q/v. The step: the reference's
log-probabilities (no_grad, adapter off), the policy's loss, backward. In the child: one short warm-up step (lazy
imports, one-time setup), then VmRSS is read, VmHWM reset (``5`` into /proc/self/clear_refs), one full step
timed, VmHWM read (peak above the baseline of model and inputs), and a second step timed; time = the faster.
glibc's default allocator (mmap for large buffers, given back on free) keeps RSS close to live memory.

    python -m bench dpo-step            # fp32 and bf16, ~5 minutes on 2 cores
    python -m bench dpo-step --quick    # hidden 256, vocab 8192, 128 tokens per side (smoke)
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.lm_head_loss import _status_kib, _write_json

REPO = Path(__file__).resolve().parent.parent
NAME = "dpo_step"
VARIANTS = {"lf": "lf fused_linear_preference_loss", "trl": "TRL fused LM head", "logits": "full logits"}
DTYPES = ("fp32", "bf16")
FULL = dict(hidden=1024, vocab=128256, tokens=1024, prompt=128)
QUICK = dict(hidden=256, vocab=8192, tokens=128, prompt=16)
BETA = 0.1


def _model(hidden: int, vocab: int, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def _batch(tokens: int, prompt: int, vocab: int):
    import torch

    ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, torch.ones_like(ids), labels


def step(variant: str, model, ids, mask, labels) -> float:
    """One dpo step (reference, policy loss, backward); returns the loss."""
    import torch

    from lf.kernels.fused_linear_preference_loss import preference_loss
    from lf.model.logps import policy_loss, reply_logps
    from lf.train.reference import eval_mode

    def full_logits_logps():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        shifted = labels[:, 1:]
        per_token = logits.log_softmax(-1).gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
        return (per_token * (shifted != -100)).sum(-1)

    tokens = (labels[:, 1:] != -100).sum(-1)
    with torch.no_grad(), eval_mode(model), model.disable_adapter():
        reference = full_logits_logps() if variant == "logits" else reply_logps(model, ids, mask, labels,
                                                                                variant == "lf")
    if variant == "logits":
        out = preference_loss("sigmoid", full_logits_logps(), tokens, reference, beta=BETA)
    else:
        out = policy_loss(model, ids, mask, labels, "sigmoid", reference, variant == "lf", beta=BETA)
    out.loss.backward()
    return out.loss.item()


def worker(args) -> int:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sizes = QUICK if args.quick else FULL
    model = _model(sizes["hidden"], sizes["vocab"], dtype)
    if args.variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model())
    step(args.variant, model, *_batch(16, 4, sizes["vocab"]))  # warm-up: lazy imports, one-time setup
    batch = _batch(sizes["tokens"], sizes["prompt"], sizes["vocab"])
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times, losses, peak = [], [], None
    for _ in range(2):
        start = time.perf_counter()
        losses.append(step(args.variant, model, *batch))
        times.append(time.perf_counter() - start)
        if peak is None:
            peak = (_status_kib("VmHWM") - before) / 1024
        model.zero_grad(set_to_none=True)
        gc.collect()
    _write_json(Path(args.result), dict(dtype=args.dtype, variant=args.variant, time_s=min(times), times_s=times,
                                        extra_peak_mib=peak, loss=losses[0], **sizes))
    return 0


def run_case(dtype: str, variant: str, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "bench.dpo_step", "--worker", variant, "--dtype", dtype, "--result", str(result)]
        code = subprocess.run(argv + ["--quick"] * quick, cwd=REPO).returncode
        if code != 0 or not result.exists():
            return dict(dtype=dtype, variant=variant, error=f"exit code {code}")
        return json.loads(result.read_text())


def summary(rows: list[dict]) -> str:
    """The table: each variant's step time and peak memory, and their ratios to TRL's in the same dtype."""
    lines = ["| dtype | variant | step s | vs TRL | peak MiB above baseline | vs TRL | loss |",
             "|---|---|--:|--:|--:|--:|--:|"]
    by = {(r["dtype"], r["variant"]): r for r in rows}
    for (dtype, variant), r in by.items():
        if "error" in r:
            lines.append(f"| {dtype} | {VARIANTS[variant]} | {r['error']} | | | | |")
            continue
        base = by.get((dtype, "trl"), {})
        speed = f"{base['time_s'] / r['time_s']:.2f}x" if "time_s" in base else ""
        memory = f"{r['extra_peak_mib'] / base['extra_peak_mib']:.2f}x" if "extra_peak_mib" in base else ""
        lines.append(f"| {dtype} | {VARIANTS[variant]} | {r['time_s']:.2f} | {speed} | {r['extra_peak_mib']:.0f} "
                     f"| {memory} | {r['loss']:.6f} |")
    lines += ["", "vs TRL: speed-up (TRL's time / this one's) and memory (this one's peak / TRL's)."]
    return "\n".join(lines)


def report(rows: list[dict], quick: bool, command: str) -> str:
    sizes = QUICK if quick else FULL
    return "\n".join([
        f"# One dpo step: {harness.device_name()}", "", f"`{command}`", "",
        f"2-layer Llama, hidden {sizes['hidden']}, vocab {sizes['vocab']}, one pair of {sizes['tokens']} tokens per "
        f"side ({sizes['prompt']} prompt), LoRA r8 on q/v, sigmoid loss; reference = adapter off. Peak = the child's "
        f"peak RSS above its baseline (model and inputs built) during one step.", "", summary(rows)]) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m bench dpo-step") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--dtypes", default=",".join(DTYPES), type=harness.names_parser(DTYPES))
    p.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.variant = args.worker
        return worker(args)
    rows = []
    for dtype in args.dtypes:
        for variant in VARIANTS:
            rows.append(run_case(dtype, variant, args.quick))
            r = rows[-1]
            print(f"{dtype} {variant}: " + (r.get("error") or f"{r['time_s']:.2f} s, +{r['extra_peak_mib']:.0f} MiB, "
                                                               f"loss {r['loss']:.6f}"), flush=True)
    command = "python -m bench dpo-step" + " --quick" * args.quick
    text = report(rows, args.quick, command)
    return harness.finish(NAME, text, command, rows, summary(rows), args.quick)


if __name__ == "__main__":
    sys.exit(main())
