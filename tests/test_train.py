"""`lf train` end to end on the quickstart's tiny Llama (built here under a temporary LF_HOME): outputs a user
expects, full/freeze/LoRA, kernels on vs off, killed runs that resume to the same adapter, a loss that becomes nan,
an output_dir that holds another run, LoRA+, and the CLI."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lf import cli
from lf.config import parse_train_args
from lf.errors import TrainError
from lf.train import recipe, run
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


def losses(output_dir) -> list[float]:
    lines = (Path(output_dir) / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


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
options, where = {options!r}, {where!r}
class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if where == "between steps" and state.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
if where == "while saving":
    save = LFTrainer._save_optimizer_and_scheduler
    def killed(self, output_dir):
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # the model of checkpoint-4 is written, its optimizer not
        save(self, output_dir)
    LFTrainer._save_optimizer_and_scheduler = killed
run(parse_train_args(options), [Kill()])
"""


@pytest.mark.parametrize("where", ["between steps", "while saving"])
def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, where):
    steady = tmp_path / "steady"
    train(steady, max_steps=6)
    killed = tmp_path / "killed"
    script = KILLER.format(options=options(killed, max_steps=6), where=where)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    expected_last = "checkpoint-4" if where == "between steps" else "checkpoint-2"
    assert sorted(p.name for p in killed.glob("checkpoint-*"))[-1] == expected_last
    train(killed, max_steps=6)  # resumes from the last complete checkpoint, as the log says
    a, b = load_file(steady / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert not (killed / ".lf-saving").exists()


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
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    monkeypatch.setattr(recipe, "load_tokenizer", lambda *a: pytest.fail("loaded a tokenizer before the check"))
    with pytest.raises(TrainError, match="already holds files \\(notes.txt\\).*overwrite_output_dir"):
        train(out)
    with pytest.raises(TrainError, match="holds no checkpoint"):
        train(tmp_path / "empty", resume_from_checkpoint=True)


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


@pytest.mark.parametrize("deepspeed", [None, "ds_z2.json", "ds_z3.json"])
def test_two_processes_train_what_one_process_trains(tmp_path, deepspeed):
    """NPROC_PER_NODE=2: lf starts torchrun itself; DDP on the CPU over gloo, or DeepSpeed ZeRO-2/3 on its CPU
    accelerator. Same global batch (2 x 1 vs 1 x 2), same final adapter (SGD: see
    test_kernels_do_not_change_the_losses)."""
    same = {"optim": "sgd", "learning_rate": 0.05, "max_steps": 3, "save_steps": 10, "packing": True}
    train(tmp_path / "one", per_device_train_batch_size=2, **same)
    two = tmp_path / "two"
    cfg = tmp_path / "ddp.yaml"
    extra = {"deepspeed": str(REPO / "configs" / "deepspeed" / deepspeed)} if deepspeed else {}
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options(two, per_device_train_batch_size=1,
                                                                         **same, **extra).items()))
    env = {**os.environ, "NPROC_PER_NODE": "2", "DS_ACCELERATOR": "cpu"}
    child = subprocess.run([sys.executable, "-m", "lf.cli", "train", str(cfg)], capture_output=True, text=True,
                           env=env, cwd=REPO)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "torch.distributed.run --nproc_per_node=2" in child.stderr
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=RTOL)


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
