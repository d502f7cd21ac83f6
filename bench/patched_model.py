"""A patched vs an unpatched model slice, forward + backward: time and peak memory, each in a fresh process.

    python -m bench.patched_model            # 4 Llama-3-8B layers (hidden 4096), 2048 tokens, fp32
    python -m bench.patched_model --quick    # 2 layers at hidden 256, 256 tokens (smoke)

The slice: Llama-3-8B's widths (hidden 4096, intermediate 14336, 32 q / 8 kv heads, vocab 128256) with 4
layers and tied embeddings (so the fp32 weights and their gradients fit this machine), labels = inputs (all
tokens count). Memory as in bench/lm_head_loss.py: VmHWM - VmRSS before the step, after resetting VmHWM
through /proc/self/clear_refs, glibc's default allocator; it includes the parameters' gradients.
Writes bench/results/<device>/<date>-patched_model.{json,md} (scratch/ for --quick).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import harness
from bench.lm_head_loss import _status_kib

FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=128256, num_hidden_layers=4, tokens=2048)
QUICK = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=8000, num_hidden_layers=2, tokens=256)
VARIANTS = ("unpatched", "patched")


def worker(variant: str, sizes: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lf.kernels

    torch.manual_seed(0)
    sizes = dict(sizes)
    tokens = sizes.pop("tokens")
    config = LlamaConfig(**sizes, tie_word_embeddings=True,
                         head_dim=sizes["hidden_size"] // sizes["num_attention_heads"])
    model = LlamaForCausalLM(config).train()
    if variant == "patched":
        lf.kernels.patch(model)
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()  # warm-up: imports, one-time initialisation
    model.zero_grad(set_to_none=True)
    rss = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "extra_peak_mib": (_status_kib("VmHWM") - rss) / 1024,
            "loss": float(loss), "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.patched_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.worker:
        print(json.dumps(worker(args.worker, sizes)))
        return 0
    rows = []
    for variant in VARIANTS:
        print(f"{variant} ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, "-m", "bench.patched_model", "--worker", variant]
                               + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parent.parent)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]['seconds']:.1f} s, extra peak {rows[-1]['extra_peak_mib']:,.0f} MiB, "
              f"loss {rows[-1]['loss']:.6f}", file=sys.stderr, flush=True)
    base, lf_row = rows
    machine, device = harness.machine_facts(), harness.device_name()
    command = "python -m bench.patched_model" + (" --quick" if args.quick else "")
    md = [f"# Patched vs unpatched Llama slice: {device}", "", f"`{command}`", "",
          f"{sizes}, fp32, tied embeddings, {base['parameters']:,} parameters; one forward + backward per fresh "
          f"process; extra peak = VmHWM - VmRSS before the step (glibc default allocator), gradients included.", "",
          "| variant | time s | speed-up | extra peak MiB | memory | loss |", "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f}x | "
                  f"{r['extra_peak_mib']:,.0f} | {r['extra_peak_mib'] / base['extra_peak_mib']:.2f}x | "
                  f"{r['loss']:.6f} |")
    text = "\n".join(md) + "\n"
    print(text)
    harness.write_report("patched_model", text, {"command": command, "sizes": sizes, "machine": machine,
                                                    "rows": rows}, args.quick)
    if abs(lf_row["loss"] - base["loss"]) > 1e-4 * abs(base["loss"]):
        print("WARNING: the patched loss differs from the unpatched one", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
