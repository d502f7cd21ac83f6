"""`lf train` on several processes: lf starts torchrun itself when the environment asks for it.

NPROC_PER_NODE (processes on this machine), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: as torchrun's options of
the same names. Each process then runs `lf train` with the same arguments; HF's Trainer (through accelerate) runs
DDP, or DeepSpeed / FSDP when the YAML configures them. On the CPU the processes talk over gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"lf train: {name}={value!r} is not a whole number") from None


def wanted() -> bool:
    """True in the first, unlaunched process when more than one process is asked for."""
    return "LOCAL_RANK" not in os.environ and (_int("NPROC_PER_NODE", 1) > 1 or _int("NNODES", 1) > 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str]) -> int:
    """Runs `lf train argv` under torchrun; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run",
               f"--nproc_per_node={_int('NPROC_PER_NODE', 1)}", f"--nnodes={_int('NNODES', 1)}",
               f"--node_rank={_int('NODE_RANK', 0)}", f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
               f"--master_port={_int('MASTER_PORT', 0) or _free_port()}", "-m", "lf.cli", "train", *argv]
    print(f"lf train: starting {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.call(command)
