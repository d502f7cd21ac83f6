"""`lf train` on several processes: lf starts torchrun itself, as LLaMA-Factory's CLI does.

It launches when this process is not already one of torchrun's (no LOCAL_RANK) and either FORCE_TORCHRUN is set or
more than one process is wanted: NPROC_PER_NODE, by default the number of accelerators lf.device counts (every GPU
or NPU of the machine), or NNODES > 1. NNODES, NODE_RANK, MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default a
free port): as torchrun's options of the same names. Each process then runs `lf train` with the same arguments;
HF's Trainer (through accelerate) runs DDP, or DeepSpeed / FSDP when the YAML configures them, over the device
layer's backend (gloo on the CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from lf.errors import ConfigError

TRUE = ("1", "true", "y", "yes")


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None


def _enabled(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(argv: list[str]) -> list[str] | None:
    """The torchrun command that runs `lf train argv` on every process, or None when this process trains alone
    (or already is one of torchrun's)."""
    from lf import device

    if "LOCAL_RANK" in os.environ:
        return None
    nproc = _int("NPROC_PER_NODE", max(device.current().count, 1))
    nnodes = _int("NNODES", 1)
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"NPROC_PER_NODE={nproc}, NNODES={nnodes}: both must be at least 1")
    if nproc == 1 and nnodes == 1 and not _enabled("FORCE_TORCHRUN"):
        return None
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={_int('NODE_RANK', 0)}", f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master_port={_int('MASTER_PORT', 0) or _free_port()}", "-m", "lf.cli", "train", *argv]


def launch(command: list[str]) -> int:
    """Runs `command` (from command()); returns its exit code."""
    print(f"lf train: starting {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.call(command)
