"""Every registered template through lf.data's tokenization with the tiny model's tokenizer, and `lf train` with one
template of each shape (reasoning opened by the prompt, history blocks, eos-ended GLM replies, bos/eos-built turns,
markers the tokenizer lacks), on the quickstart's tiny Llama in a temporary LF_HOME."""

import copy
import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lf.config import DataArguments, parse_train_args
from lf.data import TEMPLATES, get_dataset, get_template
from lf.data.processors import IGNORE_INDEX
from lf.tiny import tiny_path
from lf.train import run

REPO = Path(__file__).resolve().parent.parent
DEMO = json.loads((REPO / "data" / "lf_demo_en.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def lf_home(tmp_path_factory):
    old = os.environ.get("LF_HOME")
    os.environ["LF_HOME"] = str(tmp_path_factory.mktemp("lf_home"))
    yield
    if old is None:
        del os.environ["LF_HOME"]
    else:
        os.environ["LF_HOME"] = old


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama"))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_tokenizes_the_demo_for_the_tiny_model(tiny_tokenizer, tmp_path, name):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    template = get_template(name)
    template.prepare_tokenizer(tokenizer)  # the stop words become single tokens
    data_args = DataArguments(dataset="lf_demo_en", dataset_dir=str(REPO / "data"), cutoff_len=4096, max_samples=2)
    train = get_dataset(data_args, tokenizer=tokenizer, template=template, stage="sft").train_dataset
    first = DEMO[0]
    assert not first["input"] and not first["history"]
    prompt, reply = template.encode_oneturn(tokenizer, [{"role": "user", "content": first["instruction"]},
                                                        {"role": "assistant", "content": first["output"]}])
    assert train[0]["input_ids"] == prompt + reply
    assert train[0]["labels"] == [IGNORE_INDEX] * len(prompt) + reply  # the prompt masked, the reply learned
    if name != "empty":  # the reply ends with a token that stops generation
        assert reply[-1] in template.stop_token_ids(tokenizer)


# One template per shape (see the module docstring of lf.data.templates).
SHAPES = ["glm4_moe", "glm4_7", "gemma4", "seed_oss", "minimax2", "qwen3_5", "llama4", "hunyuan_small",
          "deepseekcoder", "olmo"]


@pytest.mark.parametrize("name", SHAPES)
def test_lf_train_runs_with_the_template(tmp_path, name):
    out = tmp_path / "run"
    result = run(parse_train_args({
        "model_name_or_path": "lf-tiny-llama", "dataset": "lf_demo_en", "dataset_dir": str(REPO / "data"),
        "template": name, "cutoff_len": 128, "max_samples": 8, "output_dir": str(out), "max_steps": 2,
        "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 100, "lora_rank": 4,
        "infer_dtype": "float32"}))
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in logged if "loss" in record]
    assert len(losses) == 2 and all(loss > 0 for loss in losses), result
    saved = AutoTokenizer.from_pretrained(out)  # the template travels with the adapter as its chat template
    assert saved.chat_template == get_template(name).to_jinja()
