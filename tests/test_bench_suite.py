"""`lf bench` (bench/suite.py) writes its report when a benchmark or one of its baselines fails: the failure is
named in the report and the exit code, and every other result is still there."""

import json
from pathlib import Path

import pytest

from bench import suite


def qlora_result(baseline_failed: bool) -> dict:
    """A qlora_linear result of one group: lf measured, PEFT + bitsandbytes measured or failed in its child."""
    rows, totals = [], []
    for variant, failed in (("peft_bnb", baseline_failed), ("lf", False)):
        status = "failed (exit code 1) during setup" if failed else "ok"
        rows.append({"dtype": "bf16", "group": "mlp", "variant": variant, "status": status, "projections": [],
                     "shapes": ["up_proj"]})
        for group in ("mlp", "all"):
            totals.append({"dtype": "bf16", "group": group, "variant": variant, "fwd_ms": None if failed else 4.0,
                           "fwd_bwd_ms": None if failed else 9.0, "extra_peak_mib": None if failed else 3.0,
                           "speedup_vs_peft_bnb": None if baseline_failed else 1.0,
                           "memory_vs_peft_bnb": None if baseline_failed else 1.0})
    return {"rows": rows, "totals": totals, "problems": []}


def test_qlora_summary_of_a_failed_baseline_says_so():
    table = suite.summary("qlora_linear", qlora_result(baseline_failed=True))
    assert "| mlp | bf16 | 9.00 | n/a | n/a | n/a |" in table
    assert "Failed: peft_bnb (bf16, mlp): failed (exit code 1) during setup." in table
    assert "Failed" not in suite.summary("qlora_linear", qlora_result(baseline_failed=False))


def test_a_benchmark_whose_child_fails_is_reported_and_the_rest_written(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "results_folder", lambda quick: tmp_path)
    monkeypatch.setattr(suite, "REPO", tmp_path)
    broken = suite.Benchmark("ops", "Kernels", ("bench.no_such_benchmark",))
    why = suite.run_benchmark(broken, quick=True, started=0.0)
    assert why.startswith("`-m bench.no_such_benchmark --quick` exited with 1 and wrote no ")

    written = tmp_path / "qlora.json"
    written.write_text(json.dumps({**qlora_result(baseline_failed=True), "command": "python -m bench qlora-linear"}))
    outcomes = {"ops": why, "qlora_linear": written}
    monkeypatch.setattr(suite, "run_benchmark", lambda bench, quick, started: outcomes[bench.name])
    monkeypatch.setattr(suite, "update_readme", lambda: pytest.fail("a failed run must leave the README alone"))
    assert suite.main(["ops"]) == 1
    [report] = tmp_path.glob("*-lf-bench-ops.md")
    text = report.read_text()
    assert "**Failed:** ops: `-m bench.no_such_benchmark --quick` exited with 1" in text
    assert "### QLoRA linear vs PEFT + bitsandbytes" in text and "| mlp | bf16 | 9.00 | n/a |" in text
    assert json.loads(report.with_suffix(".json").read_text())["failed"] == {"ops": why}


# ---- bench.train_e2e's vision-language row, bench.ops's multimodal RoPE case ----

def test_train_e2e_plans_the_vl_row_on_llava_and_mllm_demo_against_llamafactory():
    from bench import train_e2e

    runs = train_e2e.plan(["fp32", "bf16"], 30, {"vl": Path("/m/llava")}, "/venv/python")
    assert [(g, d, system) for g, d, _, system, _ in runs] == [
        ("vl", dtype, system) for dtype in ("fp32", "bf16") for system in ("llamafactory", "lf", "lf")]
    for _, dtype, variant, system, config in runs:
        assert (config["dataset"], config["template"], config["model_name_or_path"]) == (
            "mllm_demo", "llava", "/m/llava")
        assert config["cutoff_len"] == 1024 and config["per_device_train_batch_size"] == 2 and config["max_steps"] == 30
        assert config["finetuning_type"] == "lora" and config["lora_target"] == "all"
        assert config.get("bf16", False) == (dtype == "bf16")
        if system == "lf":
            assert config["use_lf_kernels"] == ("kernels on" in variant)
    assert not any(system == "llamafactory" for *_, system, _ in train_e2e.plan(["fp32"], 3, {"vl": Path("m")}, None))


def test_train_e2e_plans_only_the_variants_named():
    from bench import train_e2e

    runs = train_e2e.plan(["fp32"], 8, {"text": Path("m")}, "/venv/python", ["no packing, LoRA"])
    assert [(variant, config["packing"] if system == "lf" else config.get("packing"))
            for _, _, variant, system, config in runs] == [
        ("LLaMA-Factory, no packing, LoRA", None), ("lf, kernels on, no packing, LoRA", False),
        ("lf, kernels off, no packing, LoRA", False)]


def test_train_e2e_tables_compare_each_group_with_its_own_llamafactory_row():
    from bench import train_e2e

    def row(group, variant, system, tokens_per_s):
        return dict(group=group, dtype="fp32", variant=variant, system=system, tokens_per_s=tokens_per_s, steps=30,
                    tokens=1000, peak_rss_mib=700.0, peak_above_baseline_mib=100.0, final_loss=1.5)

    rows = [row("text", "LLaMA-Factory, no packing, LoRA", "llamafactory", 400.0),
            row("text", train_e2e.LF_BASELINE, "lf", 800.0),
            row("vl", "LLaMA-Factory, LoRA, VL", "llamafactory", 100.0),
            row("vl", "lf, kernels on, LoRA, VL", "lf", 150.0)]
    vl = train_e2e.table(rows, "fp32", group="vl")
    assert "speed-up vs LLaMA-Factory, LoRA, VL" in vl[0] and len(vl) == 4
    assert vl[3].startswith("| lf, kernels on, LoRA, VL | 30 | 1,000 | 150 | 1.50x |")
    assert train_e2e.table(rows, "fp32")[3].startswith(f"| {train_e2e.LF_BASELINE} | 30 | 1,000 | 800 | 2.00x |")
    # without LLaMA-Factory the VL rows are measured against lf's kernels-off row
    alone = [row("vl", name, "lf", speed) for name, speed in (("lf, kernels on, LoRA, VL", 150.0),
                                                              (train_e2e.VL.lf_baseline, 100.0))]
    assert "vs lf, kernels off, LoRA, VL" in train_e2e.table(alone, "fp32", compact=True, group="vl")[0]


def built_once(ensure, dataset: str, name: str, tmp_path, monkeypatch) -> Path:
    """A bench model's folder, built by `ensure` from LLaMA-Factory's `dataset` into $LF_HOME/bench/`name`; a
    second call finds it there."""
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / f"{dataset}.json"
    if not data.is_file():
        pytest.skip(f"LLaMA-Factory's {dataset} is not at {data} (../shared/data beside the repository)")
    monkeypatch.setenv("LF_HOME", str(tmp_path))
    folder = ensure(data)
    assert folder == tmp_path / "bench" / name and ensure(data) == folder
    return folder


def test_the_vl_bench_model_is_a_llava_that_its_processor_and_lf_read(tmp_path, monkeypatch):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bench import e2e_model

    folder = built_once(e2e_model.ensure_vl_model, "mllm_demo", e2e_model.VL_NAME, tmp_path, monkeypatch)
    processor = AutoProcessor.from_pretrained(folder)
    ids = processor(text="<image>hi", images=[Image.new("RGB", (300, 200))])["input_ids"][0]
    image_token = processor.tokenizer.convert_tokens_to_ids(e2e_model.IMAGE_TOKEN)
    assert ids.count(image_token) == (e2e_model.IMAGE_SIZE // e2e_model.PATCH) ** 2  # 64 tokens an image
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.model_type == "llava" and model.config.image_token_id == image_token
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)


def test_train_e2e_plans_the_qwen2_vl_rows_against_plain_transformers_not_llamafactory():
    from bench import train_e2e

    models = {"video": Path("/m/qwen2_vl"), "vl_qwen2": Path("/m/qwen2_vl")}
    runs = train_e2e.plan(["bf16"], 30, models, "/venv/python")  # LLaMA-Factory installed: it cannot run Qwen2-VL
    assert [(g, system) for g, _, _, system, _ in runs] == [(g, s) for g in models for s in ("hf", "lf", "lf")]
    for group, _, variant, system, config in runs:
        assert (config["dataset"], config["template"]) == (
            {"video": "mllm_video_demo", "vl_qwen2": "mllm_demo"}[group], "qwen2_vl")
        assert config["infer_dtype"] == "bfloat16" and config["bf16"] and config["cutoff_len"] == 1024
        assert config.get("image_max_pixels") == (224 * 224 if group == "vl_qwen2" else None)
        assert config.get("use_lf_kernels", False) == ("kernels on" in variant)


HIDDEN = """
import importlib.util, json, sys
from bench import train_e2e
hidden = train_e2e.hide_unused_packages(json.loads(sys.argv[1]))
from torch.utils._triton import has_triton_package
try:
    import triton
except ImportError:
    triton = None
print(json.dumps([hidden, [importlib.util.find_spec(name) is None for name in train_e2e.UNUSED_ON_CPU],
                  has_triton_package(), triton is None]))
"""


@pytest.mark.parametrize("config, hidden", [({}, ["triton", "deepspeed", "bitsandbytes"]),
                                            ({"quantization_bit": 4}, ["triton", "deepspeed"])])
def test_train_e2e_workers_see_the_packages_a_cpu_run_does_not_use_as_uninstalled(config, hidden):
    import importlib.util
    import subprocess
    import sys

    # installed here (lf's test extras), so hiding them is what makes them look absent
    assert all(importlib.util.find_spec(name) for name in ("triton", "deepspeed", "bitsandbytes"))
    child = subprocess.run([sys.executable, "-c", HIDDEN, json.dumps(config)], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1], check=True)
    names, absent, torch_sees_triton, import_failed = json.loads(child.stdout.strip().splitlines()[-1])
    assert names == hidden
    assert absent == [name in hidden for name in ("triton", "deepspeed", "bitsandbytes")]
    assert not torch_sees_triton and import_failed


def test_the_qwen2_vl_bench_model_carries_qwen2_vl_tokens_and_mrope(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from bench import e2e_model

    folder = built_once(e2e_model.ensure_qwen2_vl_model, "mllm_video_demo", e2e_model.QWEN2_VL_NAME, tmp_path,
                        monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.model_type == "qwen2_vl" and model.config.text_config.vocab_size >= len(tokenizer)
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>")):
        assert getattr(model.config, key) == tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    assert tokenizer.tokenize("<|im_start|>user\nhi<|im_end|>")[:2] == ["<|im_start|>", "user"]
    assert model.config.vision_config.hidden_size == model.config.text_config.hidden_size  # the merger's output
    assert model.config.text_config.rope_parameters["mrope_section"] == e2e_model.QWEN2_VL_MROPE


def test_the_mrope_bench_case_times_hfs_section_split_against_lfs_rope():
    import torch

    from bench import ops
    from lf.kernels import rope

    case = ops.build("qwen2-vl-7b", "rope", "fp32", 64, "cpu")
    q, k, cos, sin = case.args
    assert cos.shape == (3, 1, 64, 128) and not torch.equal(cos[0], cos[1])  # the streams differ: selection matters
    grads = torch.randn_like(q), torch.randn_like(k)
    results = {}
    for name, fn in case.impls.items():
        q.grad = k.grad = None
        out = fn(q, k, cos, sin)
        torch.autograd.backward(out, grads)
        results[name] = (*out, q.grad, k.grad)
    for lf_value, hf_value in zip(results["lf"], results["eager"]):
        torch.testing.assert_close(lf_value, hf_value, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(results["lf"][0], rope(q, k, cos[0], sin[0])[0])  # not the temporal stream alone
    assert ops.MODELS["qwen2-vl-7b"].ops == ("rope",)


@pytest.mark.parametrize("variant", ["lf", "trl"])
def test_dpo_step_variants_give_the_full_logits_loss_and_gradients(variant):
    """bench dpo-step's three ways to a dpo step compute one loss and one LoRA gradient (the bench compares their
    cost only); a renamed import in lf fails here instead of in a bench run's table."""
    import torch

    from bench import dpo_step

    sizes = dict(hidden=128, vocab=512)
    batch = dpo_step._batch(24, 4, sizes["vocab"])

    def loss_and_grads(name):
        model = dpo_step._model(sizes["hidden"], sizes["vocab"], torch.float32)
        for n, p in model.named_parameters():  # LoRA B starts at zero: the policy would equal the reference
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
        if name == "trl":
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model.get_base_model())
        loss = dpo_step.step(name, model, *batch)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(variant)
    want_loss, want_grads = loss_and_grads("logits")
    assert loss == pytest.approx(want_loss, rel=1e-5) and loss != pytest.approx(0.693147, abs=1e-4)
    assert grads.keys() == want_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_quant_linear_without_the_gptq_venv_reports_its_rows_as_not_run(tmp_path, monkeypatch):
    from bench import quant_linear

    written = {}

    def write_report(name, text, data, quick):
        written.update(text=text, quick=quick)
        return quant_linear.REPO / "report.md"

    monkeypatch.setattr(quant_linear, "GPTQ_VENV", tmp_path / "no-venv")
    monkeypatch.setattr(quant_linear.harness, "write_report", write_report)
    assert quant_linear.main(["--methods", "gptq4,awq4"]) == 0  # no child started; the run does not fail
    why = (f"not run: GPTQModel is in a venv of its own, and there is none at {tmp_path / 'no-venv'} (.ci/run's): "
           f"give its python with --gptq-python")
    assert written["quick"] and written["text"].count(f"| {why} |") == 2
    with pytest.raises(SystemExit):  # a python that is not there is refused before anything runs
        quant_linear.parse_args(["--gptq-python", str(tmp_path / "python")], "quant-linear")
