"""get_dataset end to end: dataset_info.json -> canonical rows -> template -> labels -> packing -> cache -> batches,
on lf's own demo data and small files written here, with a BPE tokenizer trained on the spot."""

import json
import os
from pathlib import Path
from types import MappingProxyType

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lf.config import DataArguments
from lf.data import collator, get_dataset, get_template, pipeline
from lf.data.processors import IGNORE_INDEX
from lf.errors import ConfigError, DataError
from lf.tiny import train_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
CHATML = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def tokenizer():
    records = json.loads((DATA / "lf_demo_en.json").read_text())
    texts = [" ".join([r["instruction"], r["input"], r["output"]]) for r in records]
    return train_tokenizer(texts, vocab_size=600, extra_special_tokens=CHATML)


@pytest.fixture
def template(tokenizer):
    t = get_template("qwen")
    t.prepare_tokenizer(tokenizer)
    return t


def args(**kwargs):
    return DataArguments(**{"dataset": "lf_demo_en", "dataset_dir": str(DATA), "cutoff_len": 256, **kwargs})


def rows(dataset):
    return [dict(row) for row in dataset]


def as_set(dataset):
    """The rows, whatever their order and column order."""
    return sorted(json.dumps(row, sort_keys=True) for row in rows(dataset))


def test_sft_rows_are_the_template_encoding_with_prompts_masked(tokenizer, template):
    train = get_dataset(args(), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    records = json.loads((DATA / "lf_demo_en.json").read_text())
    assert len(train) == len(records)
    first = records[0]
    prompt, reply = template.encode_oneturn(tokenizer, [{"role": "user", "content": first["instruction"]},
                                                        {"role": "assistant", "content": first["output"]}])
    n = min(len(prompt) + len(reply), 256)
    assert train[0]["input_ids"] == (prompt + reply)[:n]
    assert train[0]["labels"] == ([IGNORE_INDEX] * len(prompt) + reply)[:n]
    assert tokenizer.decode(reply).startswith(first["output"][:20])
    assert all(len(r["input_ids"]) <= 256 and set(r["labels"]) != {IGNORE_INDEX} for r in rows(train))


def test_neat_packing_keeps_every_label_and_feeds_a_model(tokenizer, template):
    plain = get_dataset(args(), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    packed = get_dataset(args(packing=True), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    assert len(packed) < len(plain) and set(packed.column_names) == {"input_ids", "labels", "position_ids"}
    assert all(len(r["input_ids"]) <= 256 for r in rows(packed))

    def labelled(ds):
        return sorted(t for r in rows(ds) for t in r["labels"] if t != IGNORE_INDEX)

    assert labelled(packed) == labelled(plain)  # prompts come first, so no example loses a label to packing
    batch = collator(tokenizer)(rows(packed)[:2])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    loss = model(**batch, use_cache=False).loss
    assert torch.isfinite(loss)


def test_tokenized_path_saves_loads_and_survives_a_failed_run(tokenizer, template, tmp_path, monkeypatch):
    path = str(tmp_path / "cache")
    first = get_dataset(args(tokenized_path=path, val_size=5), tokenizer=tokenizer, template=template, stage="sft")
    assert os.path.exists(os.path.join(path, pipeline.MARKER))

    def no_reading(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(pipeline, "load_canonical", no_reading)
    again = get_dataset(args(tokenized_path=path, val_size=5), tokenizer=tokenizer, template=template, stage="sft")
    assert rows(again.train_dataset) == rows(first.train_dataset)
    assert rows(again.eval_dataset) == rows(first.eval_dataset) and len(again.eval_dataset) == 5
    with pytest.raises(DataError, match="tokenized for stage sft.*overwrite_cache"):
        get_dataset(args(tokenized_path=path, packing=True), tokenizer=tokenizer, template=template, stage="sft")
    # a run that fails while overwriting the cache leaves the previous cache whole
    monkeypatch.undo()

    def broken(batch, **kwargs):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(pipeline, "PROCESSORS", MappingProxyType({**pipeline.PROCESSORS, "supervised": broken}))
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        get_dataset(args(tokenized_path=path, val_size=5, overwrite_cache=True), tokenizer=tokenizer,
                    template=template, stage="sft")
    monkeypatch.undo()
    kept = get_dataset(args(tokenized_path=path, val_size=5), tokenizer=tokenizer, template=template, stage="sft")
    assert rows(kept.train_dataset) == rows(first.train_dataset)


def test_eval_sets(tokenizer, template):
    split = get_dataset(args(val_size=0.25), tokenizer=tokenizer, template=template, stage="sft")
    assert len(split.eval_dataset) == 15 and len(split.train_dataset) == 45
    each = get_dataset(args(dataset=None, eval_dataset="lf_demo_en,identity", eval_on_each_dataset=True),
                       tokenizer=tokenizer, template=template, stage="sft")
    assert each.train_dataset is None and set(each.eval_dataset) == {"lf_demo_en", "identity"}
    with pytest.raises(DataError, match="either val_size .* or eval_dataset"):
        get_dataset(args(val_size=0.1, eval_dataset="identity"), tokenizer=tokenizer, template=template, stage="sft")
    with pytest.raises(DataError, match="no dataset given"):
        get_dataset(args(dataset=None), tokenizer=tokenizer, template=template, stage="sft")


def test_streaming_tokenizes_and_packs_as_it_goes(tokenizer, template):
    streamed = get_dataset(args(streaming=True, packing=True), tokenizer=tokenizer, template=template,
                           stage="sft").train_dataset
    assert isinstance(streamed, datasets.IterableDataset)
    packed = get_dataset(args(packing=True), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    assert as_set(streamed) == as_set(packed)
    with pytest.raises(DataError, match="streamed"):
        get_dataset(args(streaming=True, tokenized_path="x"), tokenizer=tokenizer, template=template, stage="sft")


@pytest.mark.parametrize("stage, options, expected", [
    ("pt", {}, (True, False)),
    ("sft", {}, (False, False)),
    ("sft", {"packing": True}, (True, True)),  # neat by default for sft
    ("sft", {"packing": True, "neat_packing": False}, (True, False)),
    ("dpo", {}, (False, False)),
])
def test_plan_defaults(stage, options, expected):
    plan = pipeline.Plan.resolve(DataArguments(**options), stage)
    assert (plan.packing, plan.neat) == expected


@pytest.mark.parametrize("stage, options, message", [
    ("dpo", {"packing": True}, "for the pt and sft stages"),
    ("pt", {"neat_packing": True}, "pt concatenates"),
    ("sft", {"neat_packing": True, "packing": False}, "needs packing: true"),
])
def test_plan_errors(stage, options, message):
    with pytest.raises(DataError, match=message):
        pipeline.Plan.resolve(DataArguments(**options), stage)


def test_an_unknown_stage_is_the_config_error_of_lf_stages():
    with pytest.raises(ConfigError, match="stage: sfft is not a training stage: lf trains pt .*Did you mean: sft"):
        pipeline.Plan.resolve(DataArguments(), "sfft")


def _write(folder: Path, info: dict, files: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(info))
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return str(folder)


def test_pt_dpo_and_kto_stages(tokenizer, template, tmp_path):
    text = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
    pairs = [{"conversations": [{"from": "human", "value": f"question {i}"}],
              "chosen": {"from": "gpt", "value": "a good answer"}, "rejected": {"from": "gpt", "value": "bad"}}
             for i in range(6)]
    kto = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "label": i % 2 == 0} for i in range(6)]
    folder = _write(tmp_path, {
        "text": {"file_name": "text.txt", "columns": {"prompt": "text"}},
        "pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages",
                                                                             "kto_tag": "label"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}},
    }, {"text.txt": text, "pairs.json": pairs, "kto.json": kto})
    common = {"dataset_dir": folder, "cutoff_len": 64}
    pt = get_dataset(DataArguments(dataset="text", **common), tokenizer=tokenizer, template=template,
                     stage="pt").train_dataset
    assert len(pt) > 1 and all(len(r["input_ids"]) == 64 and r["labels"] == r["input_ids"] for r in rows(pt))
    dpo = get_dataset(DataArguments(dataset="pairs", **common), tokenizer=tokenizer, template=template,
                      stage="dpo").train_dataset
    assert len(dpo) == 6
    row = dpo[0]
    assert tokenizer.decode([t for t in row["chosen_labels"] if t != IGNORE_INDEX]).startswith("a good answer")
    assert tokenizer.decode([t for t in row["rejected_labels"] if t != IGNORE_INDEX]).startswith("bad")
    kt = get_dataset(DataArguments(dataset="kto", **common), tokenizer=tokenizer, template=template,
                     stage="kto").train_dataset
    assert kt["kto_tags"] == [True, False] * 3 and "kl_input_ids" in kt.column_names
    batch = collator(tokenizer)(rows(kt)[:2])
    assert batch["kto_tags"].dtype == torch.bool and batch["kl_attention_mask"].shape == batch["kl_input_ids"].shape


def test_worker_processes_give_the_same_rows(tokenizer, template):
    one = get_dataset(args(packing=True), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    two = get_dataset(args(packing=True, preprocessing_num_workers=2, preprocessing_batch_size=16),
                      tokenizer=tokenizer, template=template, stage="sft").train_dataset
    assert as_set(one) == as_set(two)


def test_datasets_cache_never_serves_results_of_other_options(tokenizer, template):
    """datasets caches map results; lf keys them by content (options, template, tokenizer, lf's code)."""
    long = get_dataset(args(), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    short = get_dataset(args(cutoff_len=64), tokenizer=tokenizer, template=template, stage="sft").train_dataset
    assert max(map(len, short["input_ids"])) == 64 < max(map(len, long["input_ids"]))
    other = get_template("chatml")
    plain = get_dataset(args(), tokenizer=tokenizer, template=other, stage="sft").train_dataset
    assert plain["input_ids"][0] != long["input_ids"][0]  # qwen's default system prompt is gone
    assert get_dataset(args(), tokenizer=tokenizer, template=template, stage="sft").train_dataset[:] == long[:]
