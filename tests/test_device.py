"""lf.device's decisions per accelerator, and `lf train`'s launch decisions.

The accelerators here are fakes: torch.cuda / torch.xpu / torch.backends.mps probes replaced, torch.version.hip set,
a stand-in torch.npu module. These tests check the selection logic only (which kind, count, backend, variable, bf16,
attention, kernel backend, device string, launch command); no kernel or collective runs on a GPU or NPU here. The
real multi-process paths (gloo on the CPU) are in test_train.py."""

import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from lf import cli, device
from lf.config import parse_train_args, parser
from lf.errors import ConfigError
from lf.model import options, quantization
from lf.train import launch

LAUNCH_VARS = ("LOCAL_RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
               "FORCE_TORCHRUN", "USE_RAY")


@pytest.fixture
def machine(monkeypatch):
    """A CPU-only machine without bf16 to start from; `machine(kind, count, bf16)` turns it into another."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(device, "_npu_installed", lambda: False)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def named(module):  # what `lf env` asks of a device
        monkeypatch.setattr(module, "get_device_name", lambda: "Fake 9000", raising=False)
        monkeypatch.setattr(module, "mem_get_info", lambda: (0, 64 * 1024 ** 3), raising=False)

    def become(kind: str, count: int = 1, bf16: bool = True):
        if kind in ("cuda", "rocm"):
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
            monkeypatch.setattr(torch.version, "hip", "6.2.0" if kind == "rocm" else None)
            named(torch.cuda)
        elif kind == "npu":
            fake = types.SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count,
                                         is_bf16_supported=lambda: bf16)
            named(fake)
            monkeypatch.setattr(torch.version, "cann", "8.0.0", raising=False)
            monkeypatch.setattr(torch, "npu", fake, raising=False)
            monkeypatch.setattr(device, "_npu_installed", lambda: True)
            monkeypatch.setattr(device, "_load_torch_npu", lambda: None)
        elif kind == "xpu":
            monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
            monkeypatch.setattr(torch.xpu, "device_count", lambda: count)
            monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda: bf16)
            named(torch.xpu)
        elif kind == "mps":
            monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
            monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *_: bf16, raising=False)
        return device.current()

    return become


# kind -> (torch device type, distributed backend, visible-devices variable, flash-attention applies, kernels)
EXPECTED = {
    "cuda": ("cuda", "nccl", "CUDA_VISIBLE_DEVICES", True, "triton"),
    "rocm": ("cuda", "nccl", "HIP_VISIBLE_DEVICES", True, "triton"),
    "npu": ("npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES", False, "torch"),
    "xpu": ("xpu", None, "ZE_AFFINITY_MASK", False, "torch"),
    "mps": ("mps", "gloo", None, False, "torch"),
}


@pytest.mark.parametrize("kind", EXPECTED)
def test_each_accelerator_is_told_apart_with_what_follows_from_it(machine, kind, monkeypatch):
    monkeypatch.delenv("LF_KERNEL_BACKEND", raising=False)
    acc = machine(kind, count=4)
    device_type, backend, variable, flash, kernels = EXPECTED[kind]
    assert acc.kind == kind and acc.device_type == device_type and acc.visible_devices_var == variable
    assert acc.count == (1 if kind == "mps" else 4) and acc.bf16
    assert acc.dist_backend == (backend or "ccl")  # this torch has no xccl: Intel's oneCCL bindings' name
    assert ("flash_attention_2" in acc.attention) == flash and acc.attention[-2:] == ("sdpa", "eager")
    assert acc.kernel_backend() == kernels  # asked of lf.kernels: triton on CUDA and ROCm, the reference elsewhere
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert acc.device() == f"{device_type}:3" and acc.device(local_rank=1) == f"{device_type}:1"
    assert quantization._device_map(None) == {"": f"{device_type}:3"}  # bitsandbytes loads on this rank's device
    described = device.describe(acc)
    assert described["distributed backend"] == acc.dist_backend + (" (RCCL)" if kind == "rocm" else "")
    assert described[f"lf kernels on {device_type}"] == f"{kernels} backend"
    assert described["lf kernels on cpu"] == "cpu backend"
    if kind != "mps":  # LLaMA-Factory's fields: the device's name and memory (and CANN on an NPU)
        assert (described["type"], described["memory"]) == ("Fake 9000", "64.00 GiB")
    assert ("CANN version" in described) == (kind == "npu")


def test_xpu_uses_torchs_own_xccl_where_built_in(machine, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_xccl_available", lambda: True, raising=False)
    assert machine("xpu", count=2).dist_backend == "xccl"


def test_the_cpu_and_its_bf16(machine, monkeypatch):
    acc = machine("cpu")
    assert (acc.kind, acc.count, acc.bf16, acc.dist_backend, acc.device()) == ("cpu", 0, False, "gloo", "cpu")
    assert acc.visible_devices_var is None and acc.kernel_backend() == "cpu"
    assert options.choose_dtype("auto")[0] == torch.float32
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.current().bf16 and options.choose_dtype("auto")[0] == torch.bfloat16


@pytest.mark.parametrize("kind", ["npu", "xpu", "rocm"])
def test_dtype_and_attention_follow_the_accelerator_not_cuda_alone(machine, kind, monkeypatch):
    machine(kind, count=2, bf16=True)
    assert options.choose_dtype("auto") == (torch.bfloat16, f"dtype bfloat16 (infer_dtype auto: the {kind} device "
                                                            f"supports bf16)")
    machine(kind, count=2, bf16=False)
    assert options.choose_dtype("auto")[0] == torch.float16
    monkeypatch.setattr(options.importlib.util, "find_spec", lambda name: object())  # flash_attn "installed"
    chosen = options.choose_attention("auto", torch.bfloat16)[0]
    assert chosen == ("flash_attention_2" if kind == "rocm" else "sdpa")
    if kind != "rocm":
        with pytest.raises(ValueError, match=f"fa2 needs a CUDA or ROCm GPU, this is {kind}"):
            options.choose_attention("fa2", torch.bfloat16)


def test_npu_order_wins_over_a_cuda_probe(machine):
    machine("cuda", count=2)
    assert machine("npu", count=8).kind == "npu"  # torch_npu present: the NPU, whatever else answers


def test_an_npu_that_does_not_load_or_is_not_seen_is_an_error_not_the_cpu(machine, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "7")
    with pytest.raises(device.DeviceError, match="torch_npu is installed but sees no NPU .ASCEND_RT_VISIBLE_DEV"):
        machine("npu", count=0)
    monkeypatch.setattr(device, "_load_torch_npu", lambda: "ImportError: libhccl.so: cannot open shared object")
    with pytest.raises(device.DeviceError, match="does not load .ImportError: libhccl.so.*source CANN's set_env.sh"):
        device.current()


def test_torch_npu_is_loaded_only_when_installed(monkeypatch):
    device._load_torch_npu.cache_clear()
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails as for a broken install
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: object())
    assert device._load_torch_npu().startswith("ModuleNotFoundError: import of torch_npu halted")
    device._load_torch_npu.cache_clear()
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: None)
    assert device._load_torch_npu() is None
    device._load_torch_npu.cache_clear()


def test_the_torch_npu_extra_names_the_torch_npu_of_lfs_torch():
    """torch_npu's releases follow torch's (2.13.x for torch 2.13, each built against that torch): lf[torch-npu],
    CI's pins and the torch the tests run with agree."""
    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (npu,) = map(Requirement, extras["torch-npu"])
    lines = (root / ".ci" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    release = torch.__version__.split("+")[0]
    assert npu.name == "torch-npu" and pins["torch"] == release
    assert pins["torch-npu"] in npu.specifier and pins["torch-npu"].split(".")[:2] == release.split(".")[:2]
    assert f"{release.split('.')[0]}.{int(release.split('.')[1]) + 1}.0" not in npu.specifier  # not the next torch's


BASE = {"model_name_or_path": "m", "dataset": "d", "template": "qwen", "output_dir": "o", "finetuning_type": "lora",
        "quantization_bit": 4}


def test_double_quantization_is_refused_on_npu_with_the_reason(machine):
    assert parse_train_args(BASE).model.double_quantization  # the default, fine off the NPU
    machine("npu", count=1)
    with pytest.raises(ConfigError, match="double_quantization: true on an Ascend NPU: bitsandbytes' NPU backend"):
        parse_train_args(BASE)
    assert parse_train_args({**BASE, "double_quantization": False}).model.quantization_bit == 4


def test_multi_process_defaults_keep_the_accelerator(machine, monkeypatch):
    """lf's defaults for a torchrun process (HF's TrainingArguments would start the process group: not built here)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    training = {}
    parser._default_training(training, set())
    assert training["use_cpu"] and training["ddp_backend"] == "gloo"  # the CPU: HF's DDP over gloo
    machine("npu", count=2)
    training = {}
    parser._default_training(training, set())
    assert "use_cpu" not in training and "ddp_backend" not in training  # was forced onto the CPU before lf.device


# ---- launch -------------------------------------------------------------------------------------------------------

def _options(cmd: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith("--"))


@pytest.mark.parametrize("kind,count,nproc", [("cpu", 0, None), ("cuda", 1, None), ("cuda", 8, "8"),
                                              ("npu", 4, "4"), ("rocm", 2, "2")])
def test_lf_train_starts_torchrun_on_every_accelerator_it_counts(machine, kind, count, nproc):
    machine(kind, count=count)
    cmd = launch.command(["cfg.yaml", "max_steps=2"])
    if nproc is None:
        assert cmd is None  # one process: trains in place
        return
    assert cmd[1:4] == ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    assert cmd[-5:] == ["-m", "lf.cli", "train", "cfg.yaml", "max_steps=2"]
    opts = _options(cmd)
    assert (opts["nnodes"], opts["node_rank"], opts["master_addr"]) == ("1", "0", "127.0.0.1")
    assert int(opts["master_port"]) > 0


def test_launch_variables(machine, monkeypatch):
    machine("cuda", count=8)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.command(["c.yaml"]) is None  # already one of torchrun's processes
    monkeypatch.delenv("LOCAL_RANK")
    for name, value in {"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert _options(launch.command(["c.yaml"])) == {"nproc_per_node": "2", "nnodes": "2", "node_rank": "1",
                                                     "master_addr": "10.0.0.1", "master_port": "29500"}
    machine("cpu")
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    monkeypatch.setenv("NNODES", "1")
    assert launch.command(["c.yaml"]) is None
    monkeypatch.setenv("FORCE_TORCHRUN", "1")  # one process, under torchrun all the same
    assert _options(launch.command(["c.yaml"]))["nproc_per_node"] == "1"
    monkeypatch.setenv("NPROC_PER_NODE", "two")
    with pytest.raises(ConfigError, match="NPROC_PER_NODE='two' is not a whole number"):
        launch.command(["c.yaml"])


def test_use_ray_without_ray_is_refused_in_one_line(machine, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("USE_RAY", "1")
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    assert cli.main(["train", "model_name_or_path=lf-tiny-llama", "dataset=demo",
                     f"output_dir={tmp_path / 'out'}", "ray_num_workers=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log's lines
    assert err.startswith("lf train: USE_RAY=1 trains on Ray, which is not installed: pip install lf[ray]")


def test_lf_env_prints_the_device_layer_view(machine, capsys):
    machine("cpu")
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for field in ("PyTorch version", "Transformers version", "Datasets version", "Accelerate version",
                  "PEFT version", "TRL version", "accelerator: cpu", "distributed backend: gloo", "bf16: no",
                  "attention: sdpa, eager", "lf kernels on cpu: cpu backend", "CPU kernels:", "Default data directory"):
        assert field in out, field


def test_lf_env_reports_an_unusable_npu_with_the_versions(machine, capsys):
    with pytest.raises(device.DeviceError):
        machine("npu", count=0)  # torch_npu installed, no NPU seen
    assert cli.main(["env"]) == 1
    out = capsys.readouterr().out
    assert "- accelerator: not usable: torch_npu is installed but sees no NPU" in out
    assert "- Transformers version:" in out and "- CPU kernels:" in out
