"""dataset_info.json -> canonical rows: file types, formattings, mixing, sampling, eval split, and the errors.

Most data is built in tmp_path. The LLaMA-Factory demo datasets in ../shared/data are read with their own
dataset_info.json when that folder exists; the tests on tmp_path files cover the same formats without it.
"""

import csv
import json
import logging
import pickle
import sys
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lf.config import DataArguments
from lf.data.converters import CONVERTERS, FEATURES
from lf.data.loader import load_canonical, split_eval
from lf.data.readers import read_raw
from lf.data.registry import DEFAULT_COLUMNS, DatasetAttr, dataset_attrs
from lf.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COLUMNS = list(FEATURES)


@pytest.fixture(autouse=True, scope="module")
def datasets_cache(tmp_path_factory):
    """A fresh `datasets` cache: tests neither read stale conversions nor fill the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def message(role, text):
    return {"role": role, "content": text}


def row(prompt, response, system="", tools="", kto_tag=None, images=()):
    return {"prompt": prompt, "response": response, "system": system, "tools": tools, "kto_tag": kto_tag,
            "images": list(images), "videos": [], "audios": []}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_lines(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def register(folder: Path, **entries) -> Path:
    write_json(folder / "dataset_info.json", entries)
    return folder


def load(folder: Path, names, **options):
    return load_canonical(names, DataArguments(dataset_dir=str(folder), **options))


def rows(dataset) -> list[dict]:
    return list(dataset)


ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Translate to English:", "input": "chat", "output": "cat"},
          {"instruction": "Name a colour.", "input": "", "output": "blue"}]
ALPACA_ROWS = [row([user("Add 2 and 3.")], [assistant("5")]),
               row([user("Translate to English:\nchat")], [assistant("cat")]),
               row([user("Name a colour.")], [assistant("blue")])]


def _write_csv(path, records):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _write_arrow(path, records):
    table = pa.Table.from_pylist(records)
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)


WRITERS = {
    "list.json": lambda path, records: write_json(path, records),
    "lines.json": write_lines,
    "data.jsonl": write_lines,
    "data.csv": _write_csv,
    "data.parquet": lambda path, records: pq.write_table(pa.Table.from_pylist(records), path),
    "data.arrow": _write_arrow,
}


@pytest.mark.parametrize("file_name", list(WRITERS))
def test_every_file_type_gives_the_same_rows(tmp_path, file_name):
    WRITERS[file_name](tmp_path / file_name, ALPACA)
    register(tmp_path, demo={"file_name": file_name})
    dataset = load(tmp_path, "demo")
    assert dataset.column_names == COLUMNS and dataset.features == FEATURES
    assert rows(dataset) == ALPACA_ROWS


def test_a_folder_reads_its_files_in_name_order(tmp_path):
    write_lines(tmp_path / "parts" / "b.jsonl", ALPACA[2:])
    write_json(tmp_path / "parts" / "a.json", ALPACA[:2])  # .json and .jsonl: one builder
    register(tmp_path, demo={"file_name": "parts"})
    assert rows(load(tmp_path, "demo")) == ALPACA_ROWS


def test_plain_text_goes_to_the_prompt_with_no_response(tmp_path):
    (tmp_path / "wiki.txt").write_text("First document.\nSecond document.\n", encoding="utf-8")
    register(tmp_path, wiki={"file_name": "wiki.txt", "columns": {"prompt": "text"}})
    assert rows(load(tmp_path, "wiki")) == [row([user("First document.")], []),
                                            row([user("Second document.")], [])]


def test_alpaca_history_system_tools_and_renamed_columns(tmp_path):
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    write_json(tmp_path / "d.json", [
        {"q": "And 3 + 3?", "a": "6", "past": [["1 + 1?", "2"], ["2 + 2?", "4"]], "sys": "Be brief.",
         "fns": json.dumps(tools)},
        {"q": "Hi", "a": "Hello", "past": None, "sys": None, "fns": None},
    ])
    register(tmp_path, d={"file_name": "d.json", "columns": {"prompt": "q", "response": "a", "history": "past",
                                                              "system": "sys", "tools": "fns"}})
    assert rows(load(tmp_path, "d")) == [
        row([user("1 + 1?"), assistant("2"), user("2 + 2?"), assistant("4"), user("And 3 + 3?")], [assistant("6")],
            system="Be brief.", tools=json.dumps(tools)),
        row([user("Hi")], [assistant("Hello")]),
    ]


def test_alpaca_ranking_and_kto(tmp_path):
    write_json(tmp_path / "pairs.json", [{"instruction": "Pick", "input": "", "chosen": "good", "rejected": "bad"}])
    write_json(tmp_path / "kto.json", [{"prompt": "Q1", "completion": "A1", "label": True},
                                       {"prompt": "Q2", "completion": "A2", "label": False}])
    register(tmp_path, pairs={"file_name": "pairs.json", "ranking": True},
             kto={"file_name": "kto.json", "columns": {"prompt": "prompt", "response": "completion",
                                                       "kto_tag": "label"}})
    assert rows(load(tmp_path, "pairs")) == [row([user("Pick")], [assistant("good"), assistant("bad")])]
    assert rows(load(tmp_path, "kto")) == [row([user("Q1")], [assistant("A1")], kto_tag=True),
                                           row([user("Q2")], [assistant("A2")], kto_tag=False)]


CALL = json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})
TOOLS = json.dumps([{"name": "weather", "description": "Current weather", "parameters": {"type": "object"}}])
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Weather in Oslo?"},
                       {"from": "function_call", "value": CALL}, {"from": "observation", "value": "{\"c\": 4}"},
                       {"from": "gpt", "value": "4 °C."}], "tools": TOOLS},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "tools": ""},
]
SHAREGPT_ROWS = [
    row([user("Weather in Oslo?"), message("function", CALL), message("observation", "{\"c\": 4}")],
        [assistant("4 °C.")], system="You are terse.", tools=TOOLS),
    row([user("Hi")], [assistant("Hello")]),
]
SHAREGPT_ENTRY = {"file_name": "chat.json", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "tools": "tools"}}


def test_sharegpt_with_system_tools_and_function_turns(tmp_path):
    write_json(tmp_path / "chat.json", SHAREGPT)
    register(tmp_path, chat=SHAREGPT_ENTRY)
    assert rows(load(tmp_path, "chat")) == SHAREGPT_ROWS


def test_a_system_column_wins_over_a_leading_system_message(tmp_path):
    write_json(tmp_path / "chat.json", [{"conversations": SHAREGPT[0]["conversations"], "sys": "Column system."},
                                        {"conversations": SHAREGPT[0]["conversations"], "sys": ""}])
    register(tmp_path, chat={"file_name": "chat.json", "formatting": "sharegpt", "columns": {"system": "sys"}})
    assert [r["system"] for r in load(tmp_path, "chat")] == ["Column system.", "You are terse."]


def test_sharegpt_ranking_and_kto_with_tags(tmp_path):
    write_json(tmp_path / "dpo.json", [{"conversations": [{"from": "human", "value": "Q"}],
                                        "chosen": {"from": "gpt", "value": "good"},
                                        "rejected": {"from": "gpt", "value": "bad"}}])
    write_json(tmp_path / "kto.json", [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": False}])
    register(tmp_path,
             dpo={"file_name": "dpo.json", "formatting": "sharegpt", "ranking": True,
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
             kto={"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages",
                                                                                 "kto_tag": "label"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}})
    assert rows(load(tmp_path, "dpo")) == [row([user("Q")], [assistant("good"), assistant("bad")])]
    assert rows(load(tmp_path, "kto")) == [row([user("Q")], [assistant("A")], kto_tag=False)]


def test_openai_tool_calls_results_and_content_parts(tmp_path):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}
    write_json(tmp_path / "oa.json", [{"messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo"},
                                     {"type": "text", "text": "and Rome?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "function": {
            "name": "weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "content": "4"}, {"role": "tool", "content": "19"},
        {"role": "assistant", "content": "Oslo 4, Rome 19."}], "tools": tools}])
    register(tmp_path, oa={"file_name": "oa.json", "formatting": "openai", "columns": {"tools": "tools"}})
    calls = [{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "weather", "arguments": {"city": "Rome"}}]
    assert rows(load(tmp_path, "oa")) == [row(
        [user("Weather in Oslo\nand Rome?"), message("function", json.dumps(calls)),
         message("observation", json.dumps(["4", "19"]))],
        [assistant("Oslo 4, Rome 19.")], system="Use tools.", tools=json.dumps(tools))]


BAD_CHATS = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"conversations": [{"from": "gpt", "value": "I speak first"}, {"from": "human", "value": "?"}]},
    {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "?"}]},
    {"conversations": []},
    {"conversations": [{"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]},
]


def test_rows_out_of_order_are_skipped_and_counted(tmp_path, caplog):
    write_json(tmp_path / "chat.json", BAD_CHATS)
    register(tmp_path, chat={"file_name": "chat.json", "formatting": "sharegpt"})
    with caplog.at_level(logging.WARNING, logger="lf.data.converters"):
        dataset = load(tmp_path, "chat")
    assert rows(dataset) == [row([user("Hi")], [assistant("Hello")]), row([user("Bye")], [assistant("Bye!")])]
    assert [r.getMessage() for r in caplog.records if r.name == "lf.data.converters"] == [
        "dataset chat: skipped 4 of 6 rows (2 turns not alternating user/assistant, 1 unknown role 'bot', "
        "1 no turns), e.g. row 1"]


def test_a_dataset_without_a_usable_row_is_an_error(tmp_path):
    write_json(tmp_path / "chat.json", BAD_CHATS[1:5])
    register(tmp_path, chat={"file_name": "chat.json", "formatting": "sharegpt"})
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"dataset 'chat': no usable row: .*4 rows were skipped \(2 turns not "
                                            r"alternating user/assistant.*e\.g\. row 0"):
            load(tmp_path, "chat", streaming=streaming)


def test_worker_processes_give_the_same_rows(tmp_path):
    write_json(tmp_path / "chat.json", SHAREGPT * 3)
    register(tmp_path, chat=SHAREGPT_ENTRY)
    assert rows(load(tmp_path, "chat", preprocessing_num_workers=2, preprocessing_batch_size=2)) == SHAREGPT_ROWS * 3


def test_streaming_gives_the_same_rows(tmp_path, caplog):
    write_json(tmp_path / "chat.json", SHAREGPT + BAD_CHATS)
    write_lines(tmp_path / "a.jsonl", ALPACA)
    register(tmp_path, chat={**SHAREGPT_ENTRY, "columns": {"messages": "conversations"}},
             alpaca={"file_name": "a.jsonl"})
    for names in ("chat", "alpaca", "chat,alpaca"):
        stream = load(tmp_path, names, streaming=True)
        assert isinstance(stream, datasets.IterableDataset) and stream.features == FEATURES
        with caplog.at_level(logging.WARNING, logger="lf.data.converters"):
            streamed = rows(stream)
        assert streamed == rows(load(tmp_path, names))
    assert "dataset chat: skipping row 3 (turns not alternating user/assistant)" in caplog.text


def _labelled(folder: Path, **sizes):
    for name, size in sizes.items():
        write_lines(folder / f"{name}.jsonl", [{"instruction": f"{name}{i}", "input": "", "output": name}
                                               for i in range(size)])
    register(folder, **{name: {"file_name": f"{name}.jsonl"} for name in sizes})


def _sources(dataset) -> list[str]:
    return [r["response"][0]["content"] for r in dataset]


def _prompts(dataset) -> list[str]:
    return [r["prompt"][0]["content"] for r in dataset]


def test_concat_keeps_order_and_max_samples_cuts_each_dataset(tmp_path):
    _labelled(tmp_path, a=5, b=3)
    assert _sources(load(tmp_path, "a,b")) == ["a"] * 5 + ["b"] * 3
    assert _sources(load(tmp_path, ["b", "a"], max_samples=2)) == ["b", "b", "a", "a"]
    assert _sources(load(tmp_path, "a,b", max_samples=2, streaming=True)) == ["a", "a", "b", "b"]


def test_interleave_follows_the_probabilities_and_the_seed(tmp_path):
    _labelled(tmp_path, a=1000, b=1000)
    options = dict(mix_strategy="interleave_under", interleave_probs="0.8,0.2")
    mixed = _sources(load(tmp_path, "a,b", **options))
    assert 0.75 < mixed.count("a") / len(mixed) < 0.85 and mixed.count("a") == 1000  # stops when a runs out
    assert mixed == _sources(load(tmp_path, "a,b", **options))
    assert mixed != _sources(load_canonical("a,b", DataArguments(dataset_dir=str(tmp_path), **options), seed=7))
    streamed = _sources(load(tmp_path, "a,b", streaming=True, **options))
    assert 0.75 < streamed.count("a") / len(streamed) < 0.85


def test_interleave_over_sees_every_row_of_every_dataset(tmp_path):
    _labelled(tmp_path, a=50, b=10)
    mixed = load(tmp_path, "a,b", mix_strategy="interleave_over", interleave_probs="0.5,0.5")
    assert set(_prompts(mixed)) == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(10)}
    assert len(mixed) > 60  # b's rows come back until a is exhausted


def test_num_samples_draws_and_repeats_rows(tmp_path):
    _labelled(tmp_path, a=10)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    register(tmp_path, few={**info["a"], "num_samples": 4}, many={**info["a"], "num_samples": 25})
    few = _prompts(load(tmp_path, "few"))
    assert len(few) == 4 == len(set(few)) and few != [f"a{i}" for i in range(4)]
    assert few == _prompts(load(tmp_path, "few"))
    many = Counter(_prompts(load(tmp_path, "many")))
    assert sum(many.values()) == 25 and set(many) == {f"a{i}" for i in range(10)}
    assert _prompts(load(tmp_path, "few", streaming=True)) == [f"a{i}" for i in range(4)]  # a stream's first rows


def test_split_eval_by_fraction_and_count(tmp_path):
    _labelled(tmp_path, a=20)
    dataset = load(tmp_path, "a")
    train, evals = split_eval(dataset, 0.25)
    assert (len(train), len(evals)) == (15, 5)
    assert sorted(_prompts(train) + _prompts(evals)) == sorted(_prompts(dataset))
    assert _prompts(evals) == _prompts(split_eval(dataset, 0.25)[1]) != _prompts(split_eval(dataset, 0.25, seed=1)[1])
    train, evals = split_eval(dataset, 3)
    assert (len(train), len(evals)) == (17, 3)
    assert split_eval(dataset, 0.0) == (dataset, None)
    stream = load(tmp_path, "a", streaming=True)
    train, evals = split_eval(stream, 3)
    assert _prompts(evals) == ["a0", "a1", "a2"] and _prompts(train) == [f"a{i}" for i in range(3, 20)]
    with pytest.raises(DataError, match="a stream's length is unknown"):
        split_eval(stream, 0.1)
    with pytest.raises(DataError, match="gives 20 eval rows of the dataset's 20"):
        split_eval(dataset, 20)
    with pytest.raises(DataError, match="whole count"):
        split_eval(dataset, 2.5)


def test_no_names_give_no_dataset(tmp_path):
    assert load(tmp_path, None) is None and load(tmp_path, " , ") is None


def test_project_datasets():
    identity = rows(load(ROOT / "data", "identity"))
    replies = [r["response"][0]["content"] for r in identity]
    assert len(identity) >= 40 and all(len(r["prompt"]) == 1 for r in identity)
    assert sum("{{name}}" in t for t in replies) > 30 and sum("{{author}}" in t for t in replies) > 30
    demo = rows(load(ROOT / "data", "lf_demo_en"))
    assert len(demo) >= 60 and all(r["prompt"][-1]["content"] and r["response"][0]["content"] for r in demo)
    with_history = [r for r in demo if len(r["prompt"]) > 1]
    assert with_history and all([m["role"] for m in r["prompt"]] == ["user", "assistant"] * (len(r["prompt"]) // 2)
                                + ["user"] for r in with_history)
    assert any("\n" in r["prompt"][-1]["content"] for r in demo)  # instruction + input


# -- errors


@pytest.mark.parametrize("file_name,content,pattern", [
    ("d.json", b'[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "a" "input": ""}\n]\n',
     r"d\.json, line 3: Expecting ',' delimiter \(column 23\)"),
    ("d.jsonl", b'{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a",}\n',
     r"d\.jsonl, line 2: Expecting property name enclosed in double quotes \(column 21\)"),
    ("d.jsonl", b'{"instruction": "a", "input": "", "output": "b"}\n\n{"instruction": "caf\xe9"}\n',
     r"d\.jsonl, line 3: bytes that are not UTF-8 text"),
    ("d.json", b"[]", r"d\.json: an empty list: no rows"),
    ("d.json", b"", r"d\.json: the file is empty"),
    ("d.csv", b"instruction,input,output\na,,b\nc,d,e,f\n", r"d\.csv, line 3: 4 fields where the header has 3"),
    ("d.csv", b'instruction,input,output\na,,b\n"c,d,e\n', r"d\.csv, line 3: a quoted field starting here is "
                                                             r"never closed"),
    ("d.csv", b"instruction,input,output\n", r"d\.csv: no rows under the header"),
], ids=["json", "jsonl", "utf8", "empty-list", "empty-file", "csv-fields", "csv-quote", "csv-header-only"])
def test_unreadable_files_name_the_file_and_line(tmp_path, file_name, content, pattern):
    (tmp_path / file_name).write_bytes(content)
    register(tmp_path, d={"file_name": file_name})
    with pytest.raises(DataError, match=rf"dataset 'd': .*{pattern}"):
        load(tmp_path, "d")


def test_a_missing_column_names_the_data_columns(tmp_path):
    write_lines(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    register(tmp_path, d={"file_name": "d.jsonl"}, e={"file_name": "d.jsonl", "columns": {"prompt": "question",
                                                                                            "response": "reply"}})
    with pytest.raises(DataError, match=r"dataset 'd': column 'instruction' \(prompt\), 'input' \(query\), "
                                        r"'output' \(response\) not in the data, whose columns are 'question', "
                                        r"'answer' \(alpaca formatting's defaults"):
        load(tmp_path, "d")
    with pytest.raises(DataError, match=r"column 'reply' \(response\) not in the data, whose columns are "
                                        r"'question', 'answer'\. Name"):
        load(tmp_path, "e")


@pytest.mark.parametrize("entry,pattern", [
    ({"file_name": "x.json", "colums": {}}, r"dataset 'd' in .*dataset_info\.json: unknown key 'colums'\. "
                                            r"Did you mean: columns\?"),
    ({"file_name": "x.json", "columns": {"promt": "a"}}, r"unknown key 'promt' in columns\. Did you mean: prompt"),
    ({"file_name": "x.json", "formatting": "sharegpt", "tags": {"role": "r"}}, r"unknown key 'role' in tags"),
    ({"file_name": "x.json", "formatting": "sharegtp"}, r"formatting 'sharegtp' is not one of alpaca, sharegpt, "
                                                        r"openai\. Did you mean: sharegpt\?"),
    ({"file_name": "x.json", "columns": {"messages": "m"}}, r"column key 'messages' is not read by alpaca "
                                                            r"formatting; set \"formatting\": \"sharegpt\""),
    ({"file_name": "x.json", "columns": {"chosen": "c"}}, r"chosen/rejected columns need \"ranking\": true"),
    ({"file_name": "x.json", "tags": {"role_tag": "r"}}, r"tags describe sharegpt/openai messages"),
    ({"file_name": "x.json", "ranking": "yes"}, r"ranking must be true or false, not 'yes'"),
    ({"file_name": "x.json", "num_samples": 0}, r"num_samples must be at least 1"),
    ({"file_name": "x.json", "split": "test"}, r"a local file has a single split"),
    ({"script_url": "scripts/x"}, r"lf cannot read dataset loading scripts \(script_url\)"),
    ({"om_hub_url": "x/y"}, r"lf cannot read the Modelers \(openMind\) hub"),
    ({"formatting": "alpaca"}, r"says nowhere to read the data from"),
])
def test_bad_entries(tmp_path, entry, pattern):
    register(tmp_path, d=entry)
    with pytest.raises(DataError, match=pattern):
        dataset_attrs("d", str(tmp_path))


def test_an_unknown_name_suggests_close_ones_and_names_the_file(tmp_path):
    register(tmp_path, alpaca_en_demo={"file_name": "a.json"}, identity={"file_name": "i.json"})
    with pytest.raises(DataError, match=r"dataset 'alpaca_demo' is not in .*dataset_info\.json\. Did you mean: "
                                        r"alpaca_en_demo\?"):
        dataset_attrs("identity,alpaca_demo", str(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"dataset_info\.json does not exist: `dataset_dir` \('.*'\) must be the "
                                        r"folder holding dataset_info\.json"):
        dataset_attrs("a", str(tmp_path))
    register(tmp_path, a={"file_name": "nowhere.json"}, mixed={"file_name": "mixed"})
    with pytest.raises(DataError, match=r"nowhere\.json does not exist \(its file_name 'nowhere\.json' is relative"):
        load(tmp_path, "a")
    write_json(tmp_path / "mixed" / "a.json", ALPACA)
    _write_csv(tmp_path / "mixed" / "b.csv", ALPACA)
    with pytest.raises(DataError, match=r"mixes file types \(json: a\.json, csv: b\.csv\)"):
        load(tmp_path, "mixed")


def test_bad_mix_options_fail_before_reading(tmp_path):
    register(tmp_path, a={"file_name": "missing.json"}, b={"file_name": "missing.json"})
    with pytest.raises(DataError, match=r"mix_strategy 'interleave' is not one of .*Did you mean: interleave_"):
        load(tmp_path, "a,b", mix_strategy="interleave")
    with pytest.raises(DataError, match=r"gives 1 probabilities for 2 datasets \(a, b\)"):
        load(tmp_path, "a,b", mix_strategy="interleave_under", interleave_probs="1.0")
    with pytest.raises(DataError, match=r"must be non-negative and sum to 1 \(they sum to 1\.5\)"):
        load(tmp_path, "a,b", mix_strategy="interleave_over", interleave_probs="0.5,1")
    with pytest.raises(DataError, match=r"only applies to mix_strategy interleave_under or interleave_over"):
        load(tmp_path, "a,b", interleave_probs="0.5,0.5")


def test_hub_datasets_offline(tmp_path, monkeypatch):
    register(tmp_path, hub={"hf_hub_url": "someone/some_dataset", "ms_hub_url": "someone/some_dataset"})
    attr = dataset_attrs("hub", str(tmp_path))[0]
    assert (attr.source, attr.path) == ("hf_hub", "someone/some_dataset")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as when the variable is set after the import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"dataset 'hub': cannot load 'someone/some_dataset' from the Hugging Face "
                                        r"hub \(offline mode was set after .*Download it beforehand"):
        load(tmp_path, "hub")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as when set before `datasets` is imported
    with pytest.raises(DataError, match=r"\(offline mode, and it is not in the cache\).*put its files in "
                                        r"dataset_dir"):
        load(tmp_path, "hub")


def test_modelscope_needs_its_package(tmp_path, monkeypatch):
    register(tmp_path, hub={"hf_hub_url": "someone/some_dataset", "ms_hub_url": "ms/some_dataset"})
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    attr = dataset_attrs("hub", str(tmp_path))[0]
    assert (attr.source, attr.path) == ("ms_hub", "ms/some_dataset")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not importable, installed or not
    with pytest.raises(DataError, match=r"needs the modelscope package: pip install modelscope"):
        read_raw(attr, str(tmp_path))


def test_online_names_are_hub_ids():
    attrs = dataset_attrs("org/a, org/b", "ONLINE")
    assert [(a.name, a.source, a.path, a.formatting) for a in attrs] == [
        ("org/a", "hf_hub", "org/a", "alpaca"), ("org/b", "hf_hub", "org/b", "alpaca")]
    assert dict(attrs[0].columns) == DEFAULT_COLUMNS["alpaca"]


def test_dataset_attrs_are_read_only_and_pickle(tmp_path):
    register(tmp_path, chat=SHAREGPT_ENTRY)
    attr = dataset_attrs("chat", str(tmp_path))[0]
    assert attr.columns == {"messages": "conversations", "tools": "tools"} and attr.tags["role_tag"] == "from"
    with pytest.raises(TypeError):
        attr.columns["messages"] = "other"
    assert pickle.loads(pickle.dumps(attr)) == attr and hash(attr) == hash(pickle.loads(pickle.dumps(attr)))
    built = DatasetAttr("t", "file", "t.txt", columns={"prompt": "text"})
    assert built.columns == {"prompt": "text"} and not isinstance(built.columns, dict)
    assert set(CONVERTERS) == set(DEFAULT_COLUMNS)


# -- LLaMA-Factory's demo datasets, read with its dataset_info.json unchanged (when ../shared/data exists)

if (SHARED / "dataset_info.json").is_file():

    def _shared(name):
        return load(SHARED, name)

    def test_lf_alpaca_and_text_demos():
        alpaca = _shared("alpaca_en_demo")
        assert len(alpaca) == 999 and alpaca.column_names == COLUMNS
        first = json.loads((SHARED / "alpaca_en_demo.json").read_text())[0]
        assert alpaca[0] == row([user(first["instruction"])], [assistant(first["output"])])
        wiki = _shared("wiki_demo")
        assert len(wiki) == 30 and wiki[0]["prompt"][0]["content"].startswith("Anarchism is a political philosophy")
        assert wiki[0]["response"] == []
        c4 = _shared("c4_demo")
        assert len(c4) == 300 and c4[0]["prompt"][0]["content"].startswith("Don’t think you need all the bells")

    def test_lf_toolcall_dpo_and_kto_demos():
        glaive = _shared("glaive_toolcall_en_demo")
        assert len(glaive) == 300
        raw = json.loads((SHARED / "glaive_toolcall_en_demo.json").read_text())[0]
        roles = {"human": "user", "gpt": "assistant", "function_call": "function", "observation": "observation"}
        turns = [message(roles[m["from"]], m["value"]) for m in raw["conversations"]]
        assert [m["role"] for m in turns[:6]] == ["user", "assistant", "user", "function", "observation", "assistant"]
        assert glaive[0] == row(turns[:-1], turns[-1:], tools=raw["tools"])
        assert json.loads(glaive[0]["tools"])[0]["name"] == "search_recipes"
        dpo = _shared("dpo_en_demo")
        assert len(dpo) == 300 and [m["role"] for m in dpo[0]["response"]] == ["assistant", "assistant"]
        assert dpo[0]["prompt"] == [user("Hi! I'd like to create a new language game simulating the first person "
                                         "perspective of a character named Angela.")]
        kto = _shared("kto_en_demo")
        assert len(kto) == 300 and kto[0]["kto_tag"] is True and {r["kto_tag"] for r in kto} == {True, False}
        assert kto[0]["response"][0]["content"].startswith("Ooh ooh ah ah!")

    def test_lf_image_video_and_audio_demos_are_read():
        mllm = _shared("mllm_demo")
        assert len(mllm) == 6 and mllm[0]["images"] == [{"bytes": None, "path": "mllm_demo_data/1.jpg"}] * 2
        assert mllm[0]["prompt"][0]["content"] == "<image>Who are they?" and mllm[0]["videos"] == []
        video = _shared("mllm_video_demo")
        assert video[0]["videos"] == [{"bytes": None, "path": "mllm_demo_data/1.mp4"}] and video[0]["images"] == []
        assert video[0]["prompt"][0]["content"] == "<video>Why is this video funny?"
        audio = _shared("mllm_audio_demo")
        assert audio[0]["audios"] == [{"bytes": None, "path": "mllm_demo_data/1.mp3"}]
        both = _shared("mllm_video_audio_demo")
        assert both[0]["videos"] and both[0]["audios"]

    def test_every_lf_entry_parses():
        info = json.loads((SHARED / "dataset_info.json").read_text())
        for name in info:
            assert dataset_attrs(name, str(SHARED))[0].source in ("file", "hf_hub", "ms_hub"), name
