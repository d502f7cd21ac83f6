"""The Evaluate & Predict tab's pieces without a browser (lf.serve.webeval): the configs it runs, read back by
`lf train`'s and `lf eval`'s parsers, its refusals, and the tables it makes of a run's result files. The tab itself
runs in tests/test_webui.py's browser test."""

import csv
import json
from pathlib import Path

import pytest

from lf.config import parse_infer_args, parse_train_args
from lf.errors import ConfigError
from lf.serve import webeval
from lf.serve.webaccess import Root

REPO = Path(__file__).resolve().parent.parent
MODEL = {"model_name_or_path": "lf-tiny-llama", "template": "qwen"}


def fields(**changes) -> dict:
    return {**webeval.EVAL_DEFAULTS, "dataset_dir": str(REPO / "data"), "task_dir": str(REPO / "evaluation"),
            **changes}


def test_predict_config_is_a_predict_only_lf_train_run(tmp_path):
    command, config = webeval.eval_config({**MODEL, "adapter_name_or_path": "saves/x"},
                                          fields(output_dir=str(tmp_path), max_samples=0))
    assert command == "train" and "max_samples" not in config
    cfg = parse_train_args(dict(config))
    assert cfg.training.do_predict and not cfg.training.do_train and cfg.training.predict_with_generate
    assert cfg.data.eval_dataset == "lf_demo_en" and cfg.model.adapter_name_or_path == "saves/x"
    assert cfg.training.per_device_eval_batch_size == 4 and cfg.training.output_dir == str(tmp_path)


def test_eval_config_is_an_lf_eval_run(tmp_path):
    command, config = webeval.eval_config(MODEL, fields(mode="eval", n_shot=2, lang="zh",
                                                        output_dir=str(tmp_path / "res")))
    assert command == "eval"
    evaluation = parse_infer_args(dict(config), "eval").evaluation
    assert (evaluation.task, evaluation.n_shot, evaluation.lang) == ("lf_mc_demo_test", 2, "zh")
    assert evaluation.save_dir == str(tmp_path / "res") and evaluation.batch_size == 4


def test_refusals_before_anything_runs(tmp_path):
    (tmp_path / "root").mkdir()
    root = Root(str(tmp_path / "root"))
    inside = str(tmp_path / "root" / "out")
    check = webeval.checked_eval_config
    with pytest.raises(ConfigError, match="is outside"):
        check(MODEL, fields(output_dir=str(tmp_path / "elsewhere")), root)
    with pytest.raises(ConfigError, match="is outside"):
        check(MODEL, fields(mode="eval", output_dir=str(tmp_path / "elsewhere")), root)
    with pytest.raises(ConfigError, match="output_dir is empty"):
        check(MODEL, fields(output_dir=" "), root)
    with pytest.raises(ConfigError, match="no_such_task"):
        check(MODEL, fields(mode="eval", task="no_such_task_test", output_dir=inside), root)
    Path(inside).mkdir()
    (Path(inside) / "lf_results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds lf_results.json"):
        check(MODEL, fields(mode="eval", output_dir=inside), root)
    assert check(MODEL, fields(output_dir=inside), root)[0] == "train"  # predict writes over its output_dir


def test_predict_tables(tmp_path):
    (tmp_path / "predict_results.json").write_text(json.dumps({
        "predict_bleu-4": 12.5, "predict_rouge-1": 30.0, "predict_rouge-2": 10.0, "predict_rouge-l": 25.0,
        "predict_runtime": 3.2}))
    rows = [{"prompt": f"q{i}", "predict": f"p{i}", "label": f"l{i}"} for i in range(webeval.ROWS + 5)]
    (tmp_path / "generated_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics, predictions = webeval.results("train", {"output_dir": str(tmp_path)}, "zh")
    assert list(metrics.columns) == ["指标", "数值（%）"]
    assert metrics.values.tolist() == [["bleu-4", 12.5], ["rouge-1", 30.0], ["rouge-2", 10.0], ["rouge-l", 25.0]]
    assert len(predictions) == webeval.ROWS and predictions.values.tolist()[3] == ["q3", "p3", "l3"]


def test_eval_tables_put_the_answers_beside_the_predictions(tmp_path):
    """Every question answered "B": the tables' accuracies and answers equal the CSV files' share of B."""
    task_dir = REPO / "evaluation" / "lf_mc_demo"
    answers = {path.stem: [row["answer"] for row in csv.DictReader(path.open())]
               for path in sorted((task_dir / "test").glob("*.csv"))}
    mapping = json.loads((task_dir / "mapping.json").read_text())
    by_category = {}
    for key, letters in answers.items():
        by_category.setdefault(mapping[key]["category"], []).extend(letters)
    score = lambda letters: {"correct": letters.count("B"), "total": len(letters),  # noqa: E731
                             "accuracy": letters.count("B") / len(letters)}
    every = [letter for letters in answers.values() for letter in letters]
    (tmp_path / "lf_results.json").write_text(json.dumps({
        "subjects": {key: {"predictions": ["B"] * len(letters)} for key, letters in answers.items()},
        "categories": {name: score(letters) for name, letters in by_category.items()}, "average": score(every)}))
    config = {"save_dir": str(tmp_path), "task": "lf_mc_demo_test", "task_dir": str(REPO / "evaluation")}
    metrics, predictions = webeval.results("eval", config)
    assert metrics.values.tolist()[0] == ["Average", round(100 * every.count("B") / len(every), 2), len(every)]
    assert {row[0]: row[1] for row in metrics.values.tolist()[1:]} == {
        name: round(100 * letters.count("B") / len(letters), 2) for name, letters in by_category.items()}
    assert list(predictions.columns) == ["subject", "question", "prediction", "answer"]
    assert predictions["answer"].tolist() == every[:webeval.ROWS] and set(predictions["prediction"]) == {"B"}
