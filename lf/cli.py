"""The `lf` command: argument parsing and dispatch to the commands, nothing else."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import sys
from collections.abc import Callable
from types import MappingProxyType

import lf

# distribution -> the name `lf env` prints (LLaMA-Factory's, plus lf's optional engines)
PACKAGES = MappingProxyType({"torch": "PyTorch", "transformers": "Transformers", "datasets": "Datasets",
                             "accelerate": "Accelerate", "peft": "PEFT", "trl": "TRL", "triton": "Triton",
                             "bitsandbytes": "Bitsandbytes", "deepspeed": "DeepSpeed", "vllm": "vLLM",
                             "torch_npu": "torch_npu"})


def _version(_args) -> int:
    print(f"lf {lf.__version__}")
    return 0


def _env(_args) -> int:
    """Versions, the device layer's view, and lf's kernels: the first thing to paste into a bug report. The fields
    of LLaMA-Factory's `llamafactory-cli env` (versions, the accelerator's type, number and memory, CANN, git commit,
    ./data) plus lf's own (distributed backend, visible-devices variable, bf16, attention, kernel backend, ISA)."""
    import subprocess

    import torch

    from lf import device

    info = {"lf version": lf.__version__, "Platform": platform.platform(),
            "Python version": platform.python_version()}
    for name in PACKAGES:
        try:
            info[f"{PACKAGES[name]} version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[f"{PACKAGES[name]} version"] = "not installed"
    try:
        acc = device.current()
        info["PyTorch version"] += f" ({acc.kind.upper()})"
        info.update(device.describe(acc))
    except device.DeviceError as exc:  # a broken torch_npu: the report still gets the versions, and why
        acc, info["accelerator"] = None, f"not usable: {exc}"
    try:
        from lf import _C

        info["CPU kernels"] = (f"{_C.isa()} variant (available: {_C.available_isas()}), "
                               f"{torch.get_num_threads()} threads")
    except ImportError as exc:
        info["CPU kernels"] = f"not built ({exc}); reinstall with `pip install -e .`"
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(lf.__file__)))
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        info["Git commit"] = commit.stdout.strip()
    info["Default data directory"] = "detected" if os.path.isdir("data") else "not detected"
    print("\n".join(f"- {key}: {value}" for key, value in info.items()))
    return 0 if acc else 1


TRAIN_USAGE = """usage: lf train cfg.yaml [key=value ...] [--key value ...]

Fine-tunes a model as cfg.yaml says (LLaMA-Factory's keys: model_name_or_path, stage, finetuning_type, dataset,
template, cutoff_len, output_dir, ...); key=value or --key value override the file. Start from
configs/quickstart.yaml (a tiny model on the CPU) or configs/examples/. Several processes: NPROC_PER_NODE=2 lf train
cfg.yaml."""


def _lf_log(level: int = logging.INFO) -> None:
    """lf's log lines on stderr as "[lf] ...", set up once however many commands run in this process."""
    logger = logging.getLogger("lf")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lf] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def _user_errors(command: str, body: Callable[[], int]) -> int:
    """body()'s exit code; a user's mistake (config, data, model, training) is one plain line, not a traceback:
    exit 2 for a config to fix, 1 otherwise."""
    from lf.errors import ConfigError, DataError, KernelError, ModelError, TrainError

    try:
        return body()
    except (ConfigError, DataError, KernelError, ModelError, TrainError) as exc:
        print(f"lf {command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _train(args) -> int:
    """`lf train cfg.yaml [key=value ...]`."""
    if not args.rest or args.rest[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if args.rest else 2
    _lf_log(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)  # one rank speaks
    return _user_errors("train", lambda: _train_and_report(args.rest))


def _train_and_report(argv: list[str]) -> int:
    from lf.config import parse_train_args
    from lf.train import launch, ray_launch, run

    if ray_launch.wanted():  # USE_RAY=1: each Ray worker runs this command again, as one rank
        return ray_launch.train(argv, parse_train_args(argv))
    torchrun = launch.command(argv)  # several accelerators, NPROC_PER_NODE, NNODES or FORCE_TORCHRUN
    if torchrun:
        return launch.launch(torchrun)

    outputs = run(parse_train_args(argv))
    if os.environ.get("RANK", "0") != "0":
        return 0
    saved = "Model/adapter and tokenizer" if "model" in outputs else "Outputs"  # predicting alone trains nothing
    print(f"\nlf train: done. {saved}: {outputs['output_dir']}")
    print(f"  log: {outputs['log']}")
    for path in outputs.get("plots", []):
        print(f"  loss plot: {path}")
    if "predictions" in outputs:
        print(f"  predictions: {outputs['predictions']} (scores: {outputs['predict_results']})")
    return 0


def _expand(args) -> int:
    """`lf expand --model_name_or_path PATH --output_dir DIR --num_expand E`: LLaMA Pro's block expansion."""
    from lf.model import llama_pro

    if not args.rest or args.rest[0] in ("-h", "--help"):
        print(llama_pro.USAGE)
        return 0 if args.rest else 2
    _lf_log()
    return _user_errors("expand", lambda: llama_pro.command(args.rest))


def _bench(args) -> int:
    """`lf bench [ops|train|serve|all] [--quick] [--device ...]`: bench/suite.py of the source checkout, in a child
    process."""
    import subprocess
    from pathlib import Path

    repo = Path(lf.__file__).resolve().parent.parent
    if not (repo / "bench" / "suite.py").is_file():
        print("lf bench: the benchmarks live in lf's source tree, not in the installed package: clone the "
              "repository, `pip install -e '.[test]'` in it, then run `lf bench` there", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, "-m", "bench.suite", *args.rest], cwd=repo).returncode


# the commands that use a trained model: `lf <name> cfg.yaml [key=value ...]` -> <module>.command(argv), after
# <module>.USAGE for -h/--help or no arguments; read-only
MODEL_COMMANDS = MappingProxyType({
    "chat": ("lf.serve.chat", "chat with a model in the terminal: lf chat cfg.yaml [key=value ...]"),
    "api": ("lf.serve.api", "an OpenAI-compatible API server: lf api cfg.yaml [key=value ...]"),
    "export": ("lf.export", "merge an adapter and save the model (safetensors, GGUF): lf export cfg.yaml"),
    "eval": ("lf.eval", "multiple-choice evaluation (MMLU style): lf eval cfg.yaml [key=value ...]"),
    "webchat": ("lf.serve.webchat", "chat with a model in the browser: lf webchat cfg.yaml [key=value ...] "
                                    "[--auth USER:PASSWORD]"),
    "webui": ("lf.serve.webui", "the web UI (train, chat, export): lf webui [--host HOST] [--port PORT] "
                                "[--auth USER:PASSWORD] [--root DIR]"),
})
NO_CONFIG = frozenset({"webui"})  # model commands that run without a config


def _model_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args) -> int:
        import importlib

        module = importlib.import_module(MODEL_COMMANDS[name][0])
        if args.rest[:1] in (["-h"], ["--help"]) or (not args.rest and name not in NO_CONFIG):
            print(module.USAGE)
            return 0 if args.rest else 2
        _lf_log()
        return _user_errors(name, lambda: module.command(args.rest))

    return run


def main(argv: list[str] | None = None) -> int:
    from lf import threads
    from lf.errors import ConfigError

    try:
        threads.policy()
    except ConfigError as exc:  # importing lf left it alone; every command refuses it
        print(f"lf: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="lf", description="lf: kernel-first fine-tuning of LLMs")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("version", help="print lf's version").set_defaults(run=_version)
    sub.add_parser("env", help="versions, devices and kernel backends").set_defaults(run=_env)
    train = sub.add_parser("train", help="fine-tune: lf train cfg.yaml [key=value ...] [--key value ...]",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train)
    bench = sub.add_parser("bench", help="benchmarks: lf bench [ops|train|serve|all] [--quick] [--device auto|cpu|cuda] "
                                         "(from a source checkout)",
                           add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    sub.add_parser("expand", help="LLaMA Pro block expansion: lf expand --model_name_or_path PATH --output_dir DIR "
                                  "--num_expand E", add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    for name, (_module, help_text) in MODEL_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("help", help="show this help").set_defaults(run=lambda _a: parser.print_help() or 0)
    argv = sys.argv[1:] if argv is None else argv
    # everything after these, options included, is theirs to parse (argparse's REMAINDER drops a leading option)
    commands = {"train": _train, "bench": _bench, "expand": _expand,
                **{name: _model_command(name) for name in MODEL_COMMANDS}}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
