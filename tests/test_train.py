"""`lf train` end to end on the quickstart's tiny Llama (built here under a temporary LF_HOME): outputs a user
expects, full/freeze/LoRA, kernels on vs off, killed runs that restart to the same adapter and log history, a loss
that becomes nan, an output_dir that holds another run, refused runs (one line, no new folder), a full disk, LoRA+,
and the CLI."""

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lf import cli
from lf.config import parse_train_args
from lf.config.rules import show
from lf.errors import KernelError, TrainError
from lf.train import callbacks, disk, launch, recipe, run
from lf.tiny import tiny_path
from lf.train.trainer import LFTrainer

REPO = Path(__file__).resolve().parent.parent
# fp32 (pinned: "auto" is bf16 on CPUs with AVX512-BF16/AMX), a handful of steps: runs that should agree do so
# to rounding
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module", autouse=True)
def lf_home(tmp_path_factory):
    """The tiny model is built once for the module, in a temporary LF_HOME."""
    old = os.environ.get("LF_HOME")
    os.environ["LF_HOME"] = str(tmp_path_factory.mktemp("lf_home"))
    yield os.environ["LF_HOME"]
    if old is None:
        del os.environ["LF_HOME"]
    else:
        os.environ["LF_HOME"] = old


def options(output_dir, **overrides) -> dict:
    return {"model_name_or_path": "lf-tiny-llama", "dataset": "lf_demo_en", "dataset_dir": str(REPO / "data"),
            "template": "qwen", "cutoff_len": 128, "max_samples": 24, "output_dir": str(output_dir),
            "max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2,
            "learning_rate": 1e-3, "lora_rank": 4, "seed": 7, "infer_dtype": "float32", **overrides}


def train(output_dir, callbacks=(), **overrides) -> dict:
    return run(parse_train_args(options(output_dir, **overrides)), callbacks)


def records(output_dir) -> list[dict]:
    """trainer_log.jsonl's training lines (those with a loss)."""
    lines = (Path(output_dir) / "trainer_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def losses(output_dir) -> list[float]:
    return [record["loss"] for record in records(output_dir)]


def test_lora_sft_writes_what_a_user_expects(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = train(out, plot_loss=True, report_to="tensorboard")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_log.jsonl",
                 "all_results.json", "trainer_state.json", "training_loss.png", "lf_run_config.json"):
        assert (out / name).exists(), name
    assert result["plots"] == [str(out / "training_loss.png")]
    assert len(losses(out)) == 4 and all(loss > 0 for loss in losses(out))
    record = json.loads((out / "trainer_log.jsonl").read_text().splitlines()[-1])
    assert record["current_steps"] == 4 and record["throughput"] > 0 and record["total_tokens"] > 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".lf-saving").exists()
    assert list(out.glob("runs/*/events.out.tfevents.*"))  # report_to: tensorboard
    # plain transformers + peft load it
    base = AutoModelForCausalLM.from_pretrained(Path(os.environ["LF_HOME"]) / "tiny" / "lf-tiny-llama")
    model = PeftModel.from_pretrained(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                           add_generation_prompt=True)  # the template trained on, as jinja
    assert prompt.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero: trained


def test_full_pt_saves_a_plain_model_and_freeze_trains_only_the_last_layer(tmp_path):
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"))  # built on first use
    train(tmp_path / "pt", stage="pt", finetuning_type="full", cutoff_len=64)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "pt")
    assert not torch.equal(full.model.embed_tokens.weight, initial.model.embed_tokens.weight)

    train(tmp_path / "freeze", finetuning_type="freeze", freeze_trainable_layers=1)
    frozen = AutoModelForCausalLM.from_pretrained(tmp_path / "freeze")
    last = len(frozen.model.layers) - 1
    for (name, param), (_, start) in zip(frozen.named_parameters(), initial.named_parameters()):
        assert torch.equal(param, start) != (f"layers.{last}." in name), name


def test_kernels_do_not_change_the_losses(tmp_path):
    # SGD: Adam divides each update by the gradient's own size, which turns rounding noise in near-zero gradients
    # into full-size steps; SGD keeps two runs that differ by rounding within rounding of each other
    same = {"packing": True, "optim": "sgd", "learning_rate": 0.2}  # large enough to fall within 4 steps
    on = losses(train(tmp_path / "on", **same)["output_dir"])
    off = losses(train(tmp_path / "off", use_lf_kernels=False, **same)["output_dir"])
    assert on[-1] < on[0]
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=RTOL, atol=ATOL)


def test_qlora_with_lf_4bit_kernel_equals_peft(tmp_path, caplog):
    """QLoRA sft with lf's kernels (every 4-bit LoRA projection a lora_nf4_linear) and without (PEFT over
    bitsandbytes): the same losses and the same trained adapter (SGD: the same LoRA gradients at each step)."""
    same = {"quantization_bit": 4, "optim": "sgd", "learning_rate": 0.05, "max_steps": 3, "save_steps": 10}
    with caplog.at_level(logging.INFO, logger="lf"):
        train(tmp_path / "on", **same)
    assert "lora_nf4_linear (28)" in caplog.text  # 4 layers x 7 projections
    train(tmp_path / "off", use_lf_kernels=False, **same)
    on, off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert len(on) == 3
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=RTOL, atol=ATOL)
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("on", "off"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL)


KILLER = """
import os, signal, sys
from transformers import TrainerCallback
from lf.config import parse_train_args
from lf.train import run
from lf.train.trainer import LFTrainer
options, where, step = {options!r}, {where!r}, {step!r}
class Kill(TrainerCallback):
    def on_log(self, args, state, control, **kwargs):
        if where != "while saving" and state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)  # lf's log has its line for this step (RunLog logs first)
if where == "while saving":
    save = LFTrainer._save_optimizer_and_scheduler
    def killed(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)  # the model of checkpoint-4 is written, its optimizer not
        save(self, output_dir)
    LFTrainer._save_optimizer_and_scheduler = killed
run(parse_train_args(options), [Kill()])
"""


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """An uninterrupted 6-step run, which killed and restarted ones must equal."""
    out = tmp_path_factory.mktemp("steady")
    train(out, max_steps=6)
    return out


def kill(output_dir, where: str, step: int, **overrides):
    """Runs `train(output_dir, **overrides)` in a child process killed with SIGKILL at `step`."""
    script = KILLER.format(options=options(output_dir, **overrides), where=where, step=step)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


@pytest.mark.parametrize("where, step, last_checkpoint, restart", [
    ("before the first checkpoint", 1, None, {}),  # the same command again: lf's own files do not block it
    ("between steps", 5, "checkpoint-4", {}),  # resumes by itself; the killed run's step 5 is trained and logged again
    ("while saving", 4, "checkpoint-2", {"resume_from_checkpoint": True}),
])
def test_a_killed_run_restarts_to_the_same_adapter_and_history(tmp_path, monkeypatch, steady, where, step,
                                                               last_checkpoint, restart):
    killed = tmp_path / "killed"
    same = {"max_steps": 6, "plot_loss": True, "report_to": "tensorboard"}  # the command run, then run again
    kill(killed, where, step, **same)
    assert max((p.name for p in killed.glob("checkpoint-*")), default=None) == last_checkpoint
    assert [record["current_steps"] for record in records(killed)] == list(range(1, step + 1))
    plotted = []

    def plot(output_dir, history):  # the steps the loss plot draws
        plotted.extend(entry["step"] for entry in history if "loss" in entry)
        return []

    monkeypatch.setattr(recipe, "plot_loss", plot)
    train(killed, **same, **restart)
    a, b = load_file(steady / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert not (killed / ".lf-saving").exists()
    # the whole history, each step once, as the uninterrupted run logged it; the plot draws all of it
    assert [record["current_steps"] for record in records(killed)] == plotted == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(losses(killed)), torch.tensor(losses(steady)), rtol=RTOL, atol=ATOL)
    # the restarted run counts on from the kept history: tokens as the uninterrupted run counted them, time onwards
    assert [r["total_tokens"] for r in records(killed)] == [r["total_tokens"] for r in records(steady)]
    elapsed = [callbacks._seconds(r["elapsed_time"]) for r in records(killed)]
    assert elapsed == sorted(elapsed)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    compute_loss = LFTrainer.compute_loss

    def poisoned(self, model, inputs, **kwargs):
        loss = compute_loss(self, model, inputs, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(LFTrainer, "compute_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainError, match=r"nan or inf at step 3.*checkpoint-2.*learning_rate is 0.001"):
        train(out, max_steps=6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()


def test_output_dir_holding_another_run_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "taken"
    (out / ".lf-saving" / "checkpoint-2").mkdir(parents=True)  # lf's own records never count (RECORDS)
    (out / "runs").mkdir()
    for name in ("trainer_log.jsonl", "training_loss.png", "lf_run_config.json"):
        (out / name).write_text("{}")
    (out / "notes.txt").write_text("someone else's")
    monkeypatch.setattr(recipe, "load_tokenizer", lambda *a: pytest.fail("loaded a tokenizer before the check"))
    with pytest.raises(TrainError, match="already holds files \\(notes.txt\\).*overwrite_output_dir"):
        train(out)
    with pytest.raises(TrainError, match="holds no checkpoint"):
        train(tmp_path / "empty", resume_from_checkpoint=True)


def test_a_bad_kernel_backend_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LF_KERNEL_BACKEND", "cuda")
    monkeypatch.setattr(recipe, "load_tokenizer", lambda *a: pytest.fail("loaded a tokenizer before the check"))
    with pytest.raises(KernelError, match="LF_KERNEL_BACKEND='cuda' is not a backend"):
        train(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def cli_train(output_dir, **overrides) -> int:
    """`lf train key=value ...` with options(output_dir, **overrides)."""
    return cli.main(["train", *(f"{key}={show(value)}" for key, value in options(output_dir, **overrides).items())])


def error_line(capsys) -> str:
    """The one line `lf train` printed for a refused or failed run; never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("lf train: ")]
    return line


@pytest.mark.parametrize("bad, code, expected", [
    ({"learning_rate": -1}, 2, "learning_rate: -1 must be above 0"),
    ({"learning_rate": math.nan}, 2, "learning_rate: .nan must be a finite number above 0"),
    ({"per_device_train_batch_size": 0}, 2, "per_device_train_batch_size: 0 must be at least 1"),
    ({"max_steps": 0}, 2, "max_steps: 0 would train no step"),
    ({"dataset": "nope"}, 1, "dataset 'nope' is not in"),  # found when the data loads
])
def test_a_refused_run_is_one_line_and_leaves_no_new_folder(tmp_path, capsys, bad, code, expected):
    assert cli_train(tmp_path / "new" / "run", **bad) == code
    assert error_line(capsys).startswith(f"lf train: {expected}")
    assert not (tmp_path / "new").exists()


def test_a_run_failing_before_it_writes_removes_only_the_folders_it_made(tmp_path):
    from transformers import TrainerCallback

    class Refuse(TrainerCallback):  # fails after HF's Trainer made output_dir (as its optimizer's checks do)
        def on_train_begin(self, args, state, control, **kwargs):
            raise ValueError("refused late")

    made = tmp_path / "made"
    made.mkdir()  # before its run
    for out in (tmp_path / "new" / "run", made):
        with pytest.raises(ValueError, match="refused late"):
            train(out, callbacks=[Refuse()], max_steps=1)
    assert not (tmp_path / "new").exists() and made.is_dir()


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save's, without errno


def test_a_full_disk_while_saving_is_one_line_and_the_checkpoints_before_stay(tmp_path, monkeypatch, capsys):
    """A filesystem that fills up while checkpoint-4 is written: torch.save fails as it does then (its zip writer's
    error, which carries no errno) and the filesystem has 4 KiB left."""
    save, failed = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" not in str(f):
            return save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04")  # what got out before the write failed
        failed.append(str(f))
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - 4096, 4096))
    out = tmp_path / "full"
    assert cli_train(out) == 1
    line = error_line(capsys)
    kept = out / "checkpoint-2"
    size = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) / 2**20
    assert line == (f"lf train: the disk is full: writing {failed[0]} failed with 4.0 KiB left on its filesystem, "
                    f"a checkpoint needs about {size:.1f} MiB (as checkpoint-2 took) (the partly written checkpoint "
                    f"was removed); the checkpoints saved before are intact, the last good one is {kept}: free some "
                    f"space (or keep fewer checkpoints with save_total_limit) and run the same command again to "
                    f"resume from it")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / ".lf-saving").exists()
    monkeypatch.undo()  # space freed: the same command resumes from checkpoint-2 and finishes
    assert cli_train(out) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-4").is_dir()


@pytest.mark.parametrize("error, free, full", [
    (OSError(errno.ENOSPC, "No space left on device"), 1 << 30, True),  # Python's files
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 1 << 30, True),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), 1 << 30, True),
    (RuntimeError(TORCH_FULL), 4096, True),
    (RuntimeError(TORCH_FULL), 1 << 30, False),  # torch.save failing with space left: not a full disk
    (OSError(errno.EACCES, "Permission denied"), 0, False),
    (RuntimeError("the loss became nan"), 0, False),
])
def test_a_full_disk_is_recognised_however_the_writer_says_it(monkeypatch, tmp_path, error, free, full):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - free, free))
    assert disk.is_full(error, str(tmp_path)) is full
    try:
        raise RuntimeError("while saving") from error
    except RuntimeError as wrapped:
        assert disk.is_full(wrapped, str(tmp_path)) is full  # the cause counts


def test_a_run_changes_neither_the_environment_nor_its_config(tmp_path, monkeypatch):
    """logging_dir reaches TensorBoard without TENSORBOARD_LOGGING_DIR being set, and the recipe leaves the
    training arguments as lf.config built them."""
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cfg = parse_train_args(options(tmp_path / "out", max_steps=1, report_to="tensorboard",
                                   logging_dir=str(tmp_path / "tb")))
    before = cfg.training.to_dict()
    run(cfg)
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert cfg.training.to_dict() == before


def test_loraplus_puts_the_b_matrices_in_a_faster_group(tmp_path):
    from transformers import TrainerCallback

    seen = {}

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            seen.update({names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]})

    train(tmp_path / "plus", callbacks=[Groups()], loraplus_lr_ratio=16.0, max_steps=1, save_steps=10)
    assert {lr for name, lr in seen.items() if "lora_A" in name} == {1e-3}
    assert {lr for name, lr in seen.items() if "lora_B" in name} == {16e-3}


def test_cli_runs_a_yaml_with_overrides_and_reports_bad_keys(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options(tmp_path / "cli").items()))
    assert cli.main(["train", str(cfg), "max_steps=2", "--save_steps", "5"]) == 0
    assert "lf train: done" in capsys.readouterr().out
    assert len(losses(tmp_path / "cli")) == 2
    assert cli.main(["train", str(cfg), "learing_rate=1"]) == 2
    assert "Did you mean: learning_rate?" in capsys.readouterr().err


def test_cli_help_and_bench_usage(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "usage: lf train cfg.yaml [key=value ...]" in capsys.readouterr().out
    assert cli.main(["train"]) == 2  # nothing to train: the usage, not a traceback
    assert cli.main(["bench", "--help"]) == 0  # the suite's own help, from the source checkout
    assert cli.main(["bench", "everything"]) == 2


FSDP2 = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}, "save_steps": 3}
# engine -> (the 2-process run's own keys, keys both runs take)
ENGINES = {"ddp": ({}, {}), "zero2": ({"deepspeed": str(REPO / "configs" / "deepspeed" / "ds_z2.json")}, {}),
           "zero3": ({"deepspeed": str(REPO / "configs" / "deepspeed" / "ds_z3.json")}, {}),
           "fsdp2": (FSDP2, {}), "fsdp2_qlora": (FSDP2, {"quantization_bit": 4})}


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_what_one_process_trains(tmp_path, engine):
    """NPROC_PER_NODE=2: lf starts torchrun itself; DDP on the CPU over gloo, DeepSpeed ZeRO-2/3 on its CPU
    accelerator, or FSDP2 (fully_shard over gloo), also over a 4-bit base (QLoRA: lf's NF4 LoRA kernel). Same
    global batch (2 x 1 vs 1 x 2), same final adapter (SGD: see test_kernels_do_not_change_the_losses)."""
    own, both = ENGINES[engine]
    same = {"optim": "sgd", "learning_rate": 0.05, "max_steps": 3, "save_steps": 10, "packing": True, **both}
    train(tmp_path / "one", per_device_train_batch_size=2, **same)
    two = tmp_path / "two"
    cfg = tmp_path / f"{engine}.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options(two, per_device_train_batch_size=1,
                                                                         **{**same, **own}).items()))
    env = {**os.environ, "NPROC_PER_NODE": "2", "DS_ACCELERATOR": "cpu"}
    child = subprocess.run([sys.executable, "-m", "lf.cli", "train", str(cfg)], capture_output=True, text=True,
                           env=env, cwd=REPO)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "torch.distributed.run --nproc_per_node=2" in child.stderr
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=RTOL)
    if own is FSDP2:  # sharded, not DDP under another name: accelerate saved the checkpoint the FSDP way
        assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= {p.name for p in (two / "checkpoint-3").iterdir()}


def test_two_nodes_on_one_machine_train_what_one_process_trains_and_save_once(tmp_path):
    """NNODES=2: two `lf train` launches rendezvous on 127.0.0.1 as node 0 and node 1 (one process each, gloo), as
    on two machines; each node has its own output_dir (its own disk), and only global rank 0 writes to its own."""
    same = {"optim": "sgd", "learning_rate": 0.05, "max_steps": 2, "save_steps": 10, "packing": True}
    train(tmp_path / "one", per_device_train_batch_size=2, **same)
    cfg = tmp_path / "nodes.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options(tmp_path / "node0",
                                                                         per_device_train_batch_size=1,
                                                                         **same).items()))
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(launch._free_port())}
    nodes = [subprocess.Popen([sys.executable, "-m", "lf.cli", "train", str(cfg), f"output_dir={tmp_path}/node{rank}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    for rank, node in enumerate(nodes):
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, f"node {rank}: {err[-3000:]}"
        assert f"--nnodes=2 --node_rank={rank} --master_addr=127.0.0.1" in err
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "node0" /
                                                                                "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert losses(tmp_path / "node0") == pytest.approx(losses(tmp_path / "one"), rel=RTOL)
    # saved once: node 1 (global rank 1) wrote no adapter, checkpoint or log
    assert not any((tmp_path / "node1").rglob("*.safetensors")) and not any((tmp_path / "node1").rglob("*.jsonl"))


def test_ray_workers_train_what_one_process_trains(tmp_path):
    """USE_RAY=1, ray_num_workers: 2: a local Ray cluster of 2 CPUs runs two actors, each `lf train` as one rank of
    torch.distributed over gloo (DDP); same global batch (2 x 1 vs 1 x 2), same final adapter."""
    same = {"optim": "sgd", "learning_rate": 0.05, "max_steps": 2, "save_steps": 10, "packing": True}
    train(tmp_path / "one", per_device_train_batch_size=2, **same)
    two = tmp_path / "two"
    cfg = tmp_path / "ray.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options(
        two, per_device_train_batch_size=1, ray_num_workers=2,
        ray_init_kwargs={"num_cpus": 2}, **same).items()))
    child = subprocess.run([sys.executable, "-m", "lf.cli", "train", str(cfg)], capture_output=True, text=True,
                           env={**os.environ, "USE_RAY": "1"}, cwd=REPO, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert f"lf train: done on 2 Ray workers. Outputs: {two}" in child.stdout
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=RTOL)
    too_many = subprocess.run([sys.executable, "-m", "lf.cli", "train", str(cfg), "ray_num_workers=3"],
                              capture_output=True, text=True, env={**os.environ, "USE_RAY": "1"}, cwd=REPO,
                              timeout=600)
    assert too_many.returncode == 2
    assert "ray_num_workers: 3 workers of {'CPU': 1.0} need 3 CPU, but the Ray cluster has 2 CPU" in too_many.stderr


@pytest.mark.parametrize("init, auth", [(None, "token"), ('{"address": "auto"}', None)])
def test_a_local_ray_cluster_starts_with_token_authentication(monkeypatch, init, auth):
    """Ray 2.60 leaves token authentication off, and a local cluster's ports, open on the node's address, would run
    anyone's tasks: the cluster lf starts has it on (set before `import ray`, which reads it); one it joins by
    address keeps its own setting. A stand-in `ray` records what ray.init would start with."""
    from types import SimpleNamespace

    from lf.train import ray_launch

    seen = {}

    def init_ray(**kwargs):
        seen.update(kwargs, auth=os.environ.get("RAY_AUTH_MODE"), imported_with=imported_with)
        raise KeyboardInterrupt  # stops train() here

    environ = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    monkeypatch.setattr(os, "environ", environ)
    imported_with = None

    def ray_module():
        nonlocal imported_with
        imported_with = os.environ.get("RAY_AUTH_MODE")
        return SimpleNamespace(init=init_ray, is_initialized=lambda: False)

    class Finder:  # `import ray` runs ray_module() then, as Ray reads its auth mode at import
        def find_spec(self, name, path=None, target=None):
            if name != "ray":
                return None
            import importlib.util
            return importlib.util.spec_from_loader(name, self)

        def create_module(self, spec):
            return ray_module()

        def exec_module(self, module):
            pass

    for name in ("ray", "ray.util", "ray.util.placement_group", "ray.util.scheduling_strategies"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "ray.util", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "ray.util.placement_group",
                        SimpleNamespace(placement_group=None, remove_placement_group=None))
    monkeypatch.setitem(sys.modules, "ray.util.scheduling_strategies",
                        SimpleNamespace(PlacementGroupSchedulingStrategy=None))
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    with pytest.raises(KeyboardInterrupt):
        ray_launch.train([], SimpleNamespace(finetuning=SimpleNamespace(ray_init_kwargs=init)))
    assert seen["auth"] == seen["imported_with"] == auth
    assert seen.get("include_dashboard") is (False if init is None else None)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_an_adapter_over_a_quantized_base(tmp_path, bits):
    out = tmp_path / f"qlora{bits}"
    train(out, quantization_bit=bits, max_steps=2, save_steps=10)
    assert len(losses(out)) == 2 and all(0 < loss < 20 for loss in losses(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in load_file(out / "adapter_model.safetensors").items())


def test_growth_release_hands_memory_back_only_as_the_heap_grows():
    from lf.allocator import GrowthRelease

    resident = iter([100, 109, 110, 111, 100, 104, 105, 110, 200])  # each check reads it once
    released = []
    releaser = GrowthRelease(rss=lambda: next(resident), release=lambda: released.append(True), growth=1.1)
    # the first step's end sets the working size (100); 110 is not past 1.1x; 111 is: released, and the next
    # step's end sets the size again (100)
    assert [releaser.check() for _ in range(9)] == [False, False, False, True, False, False, False, False, True]
    assert releaser.releases == len(released) == 2
