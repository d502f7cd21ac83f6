"""do_predict with infer_backend: vllm: `lf train` trains a LoRA adapter on the tiny model and predicts eval_dataset
through vLLM (the adapter it just saved, served unmerged); the same adapter predicted by lf's transformers engine
gives the same greedy answers, record for record."""

import json
from pathlib import Path

from lf.config import parse_train_args
from lf.train import run

REPO = Path(__file__).resolve().parents[1]


def options(output_dir, **overrides) -> dict:
    return {"model_name_or_path": "lf-tiny-llama", "dataset": "lf_demo_en", "dataset_dir": str(REPO / "data"),
            "template": "qwen", "cutoff_len": 256, "max_samples": 8, "output_dir": str(output_dir), "max_steps": 3,
            "per_device_train_batch_size": 2, "learning_rate": 1e-2, "lora_rank": 4, "seed": 7,
            "infer_dtype": "float32", "do_train": True, "do_predict": True, "predict_with_generate": True, "eval_dataset": "lf_demo_en",
            "per_device_eval_batch_size": 3, "do_sample": False, "max_new_tokens": 16,
            "vllm_enforce_eager": True, "vllm_maxlen": 512, "vllm_max_lora_rank": 8, **overrides}


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generated_predictions.jsonl").read_text().splitlines()]


def test_vllm_predictions_equal_the_transformers_engines_greedy_predictions(tmp_path):
    trained = tmp_path / "vllm"
    run(parse_train_args(options(trained, infer_backend="vllm")))
    assert (trained / "adapter_model.safetensors").exists()
    hf = tmp_path / "hf"
    run(parse_train_args(options(hf, do_train=False, dataset=None, adapter_name_or_path=str(trained),
                                 finetuning_type="lora")))
    got, expected = records(trained), records(hf)
    assert len(got) == 8 and got == expected
    assert sum(bool(r["predict"]) for r in got) >= 4  # real answers, not empty ones
    results = json.loads((trained / "predict_results.json").read_text())
    assert results["predict_bleu-4"] == json.loads((hf / "predict_results.json").read_text())["predict_bleu-4"]
