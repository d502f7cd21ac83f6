"""``python -m bench serve`` (or ``lf bench serve``): `lf api` under concurrent clients, the HF engine batched
(lf.serve.batch, API_MAX_BATCH 16) against the same engine locked (API_MAX_BATCH 1: one request at a time, each by
transformers' generate), and with `--vllm` the vLLM backend (infer_backend: vllm, max_num_seqs 16, eager), all
served in this process by lf's own app and uvicorn on loopback.

Per round, 16 greedy chat completions of `--tokens` new tokens (16 different prompts) are sent by 1, 4 or 16
concurrent clients (closed loop: each sends its share one after another), over HTTP with httpx. The rounds take
turns, locked, batched (then vllm), for each client count, `--rounds` times, so that load from other processes falls
on all. Reported per variant and client count: completion tokens per second (all rounds' tokens / their wall time),
each request's latency p50 and p95 (from sending it to its last byte), and whether the replies equal the locked
ones (greedy decoding: the HF engine's must; vLLM's kernels may round differently). lf-tiny-llama, fp32, one torch
thread (`--threads`; vLLM's CPU worker gets as many OpenMP threads, VLLM_CPU_OMP_THREADS_BIND).

    python -m bench serve            # ~5 minutes on 2 shared cores at load ~12
    python -m bench serve --quick    # 1 round, 16 tokens (smoke; results in scratch/)
    python -m bench serve --vllm     # from the vLLM venv (README, command 3): vLLM beside the HF engine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time

from bench import harness

NAME = "serve"
CLIENTS = (1, 4, 16)
REQUESTS = 16  # per round, whatever the client count
VARIANTS = {"locked": ("huggingface", 1), "batched": ("huggingface", 16), "vllm": ("vllm", 16)}  # API_MAX_BATCH
MODEL = {"model_name_or_path": "lf-tiny-llama", "template": "qwen", "infer_dtype": "float32"}
VLLM = {"vllm_enforce_eager": True, "vllm_maxlen": 2048}  # eager: the CPU build compiles no graphs worth the wait
PROMPTS = [[{"role": "user", "content": f"Question {i}: " + "tell me more about it. " * (i % 6)}]
           for i in range(REQUESTS)]


@contextlib.contextmanager
def served(engine):
    """`engine` behind lf's API on a free loopback port, in a thread; yields the base URL."""
    from lf.serve.app import create_app, server

    running = server(create_app(engine), "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{running.servers[0].sockets[0].getsockname()[1]}"
    finally:
        running.should_exit = True
        thread.join(timeout=60)


async def one_round(base: str, clients: int, tokens: int) -> tuple[float, list[float], list[str], int]:
    """(wall seconds, each request's latency, the replies in prompt order, completion tokens) of one round."""
    import httpx

    replies, latencies, counts = [None] * REQUESTS, [], []
    limits = httpx.Limits(max_connections=clients)

    async def client(http, share: list[int]) -> None:
        for i in share:
            start = time.perf_counter()
            response = await http.post("/v1/chat/completions", json={"messages": PROMPTS[i], "temperature": 0,
                                                                      "max_tokens": tokens})
            latencies.append(time.perf_counter() - start)
            body = response.json()
            replies[i] = body["choices"][0]["message"]["content"]
            counts.append(body["usage"]["completion_tokens"])

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, list(range(c, REQUESTS, clients))) for c in range(clients)))
        wall = time.perf_counter() - start
    return wall, latencies, replies, sum(counts)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None, prog: str = "python -m bench serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round of 16 new tokens a request (smoke run)")
    p.add_argument("--rounds", type=int, help="rounds per variant and client count (default 3, quick 1)")
    p.add_argument("--tokens", type=int, help="new tokens a request asks for (default 32, quick 16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the tiny model's matrices are too small to share, and on a busy "
                        "2-core machine OpenMP threads that wait for each other cost far more than they give)")
    p.add_argument("--vllm", action="store_true",
                   help="also the vLLM backend (run from the vLLM venv: README, command 3)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rounds, tokens = args.rounds or (1 if args.quick else 3), args.tokens or (16 if args.quick else 32)
    variants = [v for v in VARIANTS if args.vllm or VARIANTS[v][0] != "vllm"]
    if args.vllm:  # before vLLM is imported: a small KV cache (GiB), and its worker's threads as torch's here
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")

    from lf.config import parse_infer_args
    from lf.errors import ConfigError
    from lf.serve.backends import open_engine

    def engine(variant: str):
        backend, size = VARIANTS[variant]
        options = {**MODEL, "infer_backend": backend, **(VLLM if backend == "vllm" else {})}
        return open_engine(parse_infer_args(options, "api"), max_batch=size)

    try:
        engines = {variant: engine(variant) for variant in variants}
    except ConfigError as exc:  # vLLM not installed here
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    cells = {(v, c): {"wall": 0.0, "latencies": [], "tokens": 0, "replies": []} for v in variants for c in CLIENTS}
    with contextlib.ExitStack() as stack:
        bases = {variant: stack.enter_context(served(engines[variant])) for variant in variants}
        for variant in variants:  # warm-up: a round of 2 tokens a request, untimed
            asyncio.run(one_round(bases[variant], REQUESTS, 2))
        for clients in CLIENTS:
            for _ in range(rounds):
                for variant in variants:  # taking turns
                    wall, latencies, replies, count = asyncio.run(one_round(bases[variant], clients, tokens))
                    cell = cells[variant, clients]
                    cell["wall"] += wall
                    cell["latencies"] += latencies
                    cell["tokens"] += count
                    cell["replies"].append(replies)
                print(f"{clients} clients: round done", flush=True)
    rows = []
    for (variant, clients), cell in cells.items():
        locked_cell = cells["locked", clients]
        rows.append({"variant": variant, "backend": VARIANTS[variant][0], "max_batch": VARIANTS[variant][1],
                     "clients": clients, "requests": len(cell["latencies"]), "completion_tokens": cell["tokens"],
                     "wall_s": cell["wall"],
                     "tokens_per_s": cell["tokens"] / cell["wall"],
                     "latency_p50_s": percentile(cell["latencies"], 50),
                     "latency_p95_s": percentile(cell["latencies"], 95),
                     "vs_locked": (cell["tokens"] / cell["wall"]) / (locked_cell["tokens"] / locked_cell["wall"]),
                     "same_replies_as_locked": cell["replies"] == locked_cell["replies"]})
    rows.sort(key=lambda r: (r["clients"], variants.index(r["variant"])))
    command = ("python -m bench serve" + " --quick" * args.quick + " --vllm" * args.vllm
               + (f" --rounds {args.rounds}" if args.rounds else ""))
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    text = "\n".join([f"# `lf api` under concurrent clients: {harness.device_name()}", "", f"`{command}`", "",
                      f"lf-tiny-llama, fp32, {harness.machine_facts()['torch_threads']} torch threads; {REQUESTS} "
                      f"greedy requests of {tokens} new tokens a round, {rounds} round(s) per cell, "
                      f"{', '.join(variants)} taking turns; {load}.", "", summary(rows)]) + "\n"
    return harness.finish(NAME, text, command, rows, summary(rows), args.quick)


def summary(rows: list[dict]) -> str:
    lines = ["| clients | engine | tokens/s | vs locked | latency p50 s | latency p95 s | replies = locked |",
             "|--:|---|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['variant']} (max_batch {r['max_batch']}) | {r['tokens_per_s']:.0f} | "
                     f"{r['vs_locked']:.2f}x | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                     f"{'yes' if r['same_replies_as_locked'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
