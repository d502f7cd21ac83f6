"""`lf train` on a Ray cluster (USE_RAY=1, LLaMA-Factory's switch): ray_num_workers Ray actors, each running `lf
train` with the same arguments and torch.distributed's variables set as torchrun sets them (lf.train.launch), so
that HF's Trainer runs DDP (or DeepSpeed / FSDP) over them exactly as under torchrun.

The actors sit in one placement group of ray_num_workers bundles (resources_per_worker, default one CPU, plus one GPU
where lf.device finds accelerators; placement_strategy, default PACK). Ranks go by node, the driver's node first:
LOCAL_RANK counts the workers of a node. MASTER_ADDR is rank 0's node (master_addr overrides), MASTER_PORT a free
port (master_port overrides). ray_init_kwargs go to ray.init (e.g. {"address": "auto"} to join a running cluster;
by default a local one starts and stops with the run, without the dashboard, whose HTTP jobs API runs code, and
with Ray's token authentication on (RAY_AUTH_MODE=token unless set: Ray 2.60 leaves it off, and its ports, open on
the node's address, would run anyone's tasks). `pip install lf[ray]`.
"""

from __future__ import annotations

import json
import os
import socket

from lf.errors import ConfigError, TrainError


def wanted() -> bool:
    """USE_RAY is on and this process is not already one of the workers (they have RANK)."""
    from lf.train.launch import _enabled

    return _enabled("USE_RAY") and "RANK" not in os.environ


class _Worker:
    """One rank: `lf train argv` in this actor's process (Ray set its torch.distributed variables)."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def train(self, argv: list[str], env: dict[str, str]) -> int:
        os.environ.update(env)
        from lf import cli

        return cli.main(["train", *argv])


def _bundle(fin) -> dict:
    from lf import device

    if fin.resources_per_worker:
        return {str(k): float(v) for k, v in fin.resources_per_worker.items()}
    return {"CPU": 1.0, **({"GPU": 1.0} if device.current().kind == "cuda" else {})}


def _check_resources(ray, bundle: dict, workers: int) -> None:
    """A placement group the cluster cannot hold would wait forever: refused in one line instead."""
    total = ray.cluster_resources()
    short = {name: amount * workers for name, amount in bundle.items() if amount * workers > total.get(name, 0)}
    if short:
        have = ", ".join(f"{total.get(name, 0):g} {name}" for name in short)
        need = ", ".join(f"{amount:g} {name}" for name, amount in short.items())
        raise ConfigError(f"ray_num_workers: {workers} workers of {bundle} need {need}, but the Ray cluster has {have}: "
                          f"lower ray_num_workers or resources_per_worker, or add nodes")


def train(argv: list[str], cfg) -> int:
    """Runs `lf train argv` on cfg's ray_num_workers Ray actors; the exit code is the worst of theirs."""
    fin = cfg.finetuning
    init = fin.ray_init_kwargs
    init = json.loads(init) if isinstance(init, str) else dict(init or {})
    if "address" not in init:  # a local cluster: without the dashboard's HTTP server (its jobs API runs code)
        init.setdefault("include_dashboard", False)
        # before `import ray`, which reads it; Ray makes the cluster's token, and its processes read it
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        raise ConfigError("USE_RAY=1 trains on Ray, which is not installed: pip install lf[ray] (or unset USE_RAY "
                          "and launch with torchrun's variables, NPROC_PER_NODE, NNODES, ...)") from None
    started = not ray.is_initialized()
    if started:
        ray.init(**init)
    try:
        workers, bundle = fin.ray_num_workers, _bundle(fin)
        _check_resources(ray, bundle, workers)
        group = placement_group([bundle] * workers, strategy=fin.placement_strategy)
        ray.get(group.ready())
        remote = ray.remote(_Worker)
        options = dict(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                       resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")})
        if options["num_gpus"]:  # every GPU of a node stays visible: LOCAL_RANK picks one, as under torchrun
            options["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        actors = [remote.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=i)).remote() for i in range(workers)]
        ips = ray.get([actor.node_ip.remote() for actor in actors])
        here = ray.util.get_node_ip_address()
        order = sorted(range(workers), key=lambda i: (ips[i] != here, ips[i], i))  # by node, the driver's first
        master = fin.master_addr or ips[order[0]]
        port = fin.master_port or ray.get(actors[order[0]].free_port.remote())
        envs = {}
        for rank, i in enumerate(order):
            same_node = [j for j in order if ips[j] == ips[i]]
            envs[i] = {"RANK": str(rank), "WORLD_SIZE": str(workers), "LOCAL_RANK": str(same_node.index(i)),
                       "LOCAL_WORLD_SIZE": str(len(same_node)), "MASTER_ADDR": master, "MASTER_PORT": str(port)}
        codes = ray.get([actors[i].train.remote(argv, envs[i]) for i in range(workers)])
        remove_placement_group(group)
        if not max(codes):  # the workers' own output reaches here through Ray's log forwarding, not always by now
            print(f"\nlf train: done on {workers} Ray workers. Outputs: {cfg.training.output_dir}", flush=True)
    except ray.exceptions.RayError as exc:
        raise TrainError(f"a Ray worker failed: {exc}") from exc
    finally:
        if started:
            ray.shutdown()
    return max(codes)
