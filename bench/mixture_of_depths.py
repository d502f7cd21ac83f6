"""Mixture-of-Depths' saving: a routed decoder layer (12.5% of the tokens through it) against the plain layer.

    python -m bench.mixture_of_depths            # 1 row of 2048 tokens
    python -m bench.mixture_of_depths --quick    # 512 tokens (smoke)

A Llama of hidden size 1024 (16 heads x 64, MLP 2816, 4 decoder layers, vocabulary 1000) with random weights,
fp32 and bf16, forward + backward, median of a few calls taking turns, in one process: `layer`, decoder layer 1
alone, plain and routed (lf.model.mixture_of_depths, the top 12.5% of the row through it), and the plain layer over
a row as long as the routed tokens (`layer_floor`: what routing could at best cost); `model`, the whole
model's loss, plain and converted (layers 1 and 3 routed, as `mixture_of_depths: convert` does). The routed
numbers include the router, its top-k and the gathers. What they compute is tested in
tests/test_mixture_of_depths.py, not here. Writes bench/results/<device>/<date>-mixture_of_depths.{json,md}
(scratch/ for --quick).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench import harness
from lf.model import mixture_of_depths

HIDDEN, LAYERS, VOCAB = 1024, 4, 1000
REPEATS = 5


def models(dtype: torch.dtype, length: int):
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2816,
                                  num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=16,
                                  max_position_embeddings=length)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).train()
    routed = copy.deepcopy(plain)
    mixture_of_depths.convert(routed)
    return plain, routed


def case(dtype: torch.dtype, length: int) -> dict:
    plain, routed = models(dtype, length)
    x = torch.randn(1, length, HIDDEN, dtype=dtype)
    positions = torch.arange(length)[None]
    embeddings = plain.model.rotary_emb(x, positions)
    ids = torch.randint(0, VOCAB, (1, length))

    k = math.ceil(mixture_of_depths.CAPACITY * length)

    def layer(model, tokens=length):
        h = x[:, :tokens].clone().requires_grad_(True)
        model.model.layers[1](h, attention_mask=None, position_ids=positions[:, :tokens],
                              position_embeddings=tuple(e[:, :tokens] for e in embeddings)).float().sum().backward()

    def whole(model):
        model(input_ids=ids, labels=ids).loss.backward()

    def clear() -> tuple:  # untimed
        plain.zero_grad(set_to_none=True)
        routed.zero_grad(set_to_none=True)
        return ()

    calls = {f"{what}_{name}": (lambda fn=fn, m=m: fn(m), clear) for what, fn in (("layer", layer), ("model", whole))
             for name, m in (("plain", plain), ("routed", routed))}
    calls["layer_floor"] = (lambda: layer(plain, k), clear)  # the plain layer over as many tokens as route
    seconds = harness.median_seconds(calls, warmup=1, repeats=REPEATS)
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": length,
            "ms": {name: 1e3 * s for name, s in seconds.items()}}


def summary(rows: list[dict]) -> str:
    """The table: each dtype's times and the routed speed-ups."""
    lines = ["| dtype | layer plain ms | layer routed ms | layer floor ms | layer speed-up | model plain ms "
             "| model routed ms | model speed-up |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['dtype']} | {ms['layer_plain']:.0f} | {ms['layer_routed']:.0f} | {ms['layer_floor']:.0f} "
                     f"| {harness.ratio_text(ms['layer_plain'] / ms['layer_routed'])} | {ms['model_plain']:.0f} "
                     f"| {ms['model_routed']:.0f} | {harness.ratio_text(ms['model_plain'] / ms['model_routed'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mixture_of_depths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    length = 512 if args.quick else 2048
    rows = [case(dtype, length) for dtype in (torch.float32, torch.bfloat16)]
    command = "python -m bench.mixture_of_depths" + (" --quick" if args.quick else "")
    md = [f"# Mixture-of-Depths: {harness.device_name()}", "", f"`{command}`", "",
          f"A Llama of hidden size {HIDDEN}, {LAYERS} decoder layers, 1 row of {length} tokens, forward + backward, "
          f"median of {REPEATS} calls taking turns; {torch.get_num_threads()} threads. Routed: "
          f"{mixture_of_depths.CAPACITY:.1%} of the tokens through the layer (the model: layers 1 and 3 routed).", "",
          f"Layer floor: the plain layer over a row of {math.ceil(mixture_of_depths.CAPACITY * length)} tokens "
          f"(as many as route), what routing could at best cost.", "", summary(rows)]
    return harness.finish("mixture_of_depths", "\n".join(md) + "\n", command, rows, summary(rows), args.quick)


if __name__ == "__main__":
    sys.exit(main())
