"""The Evaluate & Predict tab of `lf webui`: the config of its run and the results it shows.

- predict: `lf train` with do_predict and predict_with_generate on eval_dataset (no training); output_dir gets
  predict_results.json (BLEU-4, ROUGE) and generated_predictions.jsonl (prompt, predict, label), lf.train.predict.
- eval: `lf eval` on a multiple-choice task (task, task_dir, n_shot, lang); save_dir (the tab's output folder) gets
  lf_results.json, whose predicted letters are shown beside the task's answers (read again with lf.eval_tasks).

The run itself is webui.Run, as the Train tab's: a child process, its output shown live.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lf.config import parse_infer_args, parse_train_args
from lf.errors import ConfigError
from lf.eval import check_options
from lf.eval_tasks import load_task
from lf.serve.webui_text import words
from lf.train.predict import PREDICTIONS

PREDICT, EVAL = "predict", "eval"
METRICS = "predict_results.json"
EVAL_RESULTS = "lf_results.json"
ROWS = 100  # predictions shown in the table
# the tab's fields and their starting values: the quickstart's demo data and lf's demo multiple-choice task
EVAL_DEFAULTS = {
    "mode": PREDICT, "dataset_dir": "data", "eval_dataset": ["lf_demo_en"], "cutoff_len": 512, "max_samples": 20,
    "per_device_eval_batch_size": 4, "max_new_tokens": 64, "task_dir": "evaluation", "task": "lf_mc_demo_test",
    "n_shot": 3, "lang": "en", "batch_size": 4, "output_dir": "saves/webui_eval",
}


def eval_config(model: dict, fields: dict) -> tuple[str, dict]:
    """(the lf command, its config) for the tab's fields over `model` (webui.model_config's keys)."""
    f = fields
    if f["mode"] == PREDICT:
        config = {**model, "stage": "sft", "do_predict": True, "predict_with_generate": True,
                  "dataset_dir": f["dataset_dir"].strip(), "eval_dataset": ",".join(f["eval_dataset"] or []),
                  "cutoff_len": int(f["cutoff_len"]),
                  "per_device_eval_batch_size": int(f["per_device_eval_batch_size"]), "max_new_tokens": int(f["max_new_tokens"]), "do_sample": False,
                  "output_dir": f["output_dir"].strip(), "overwrite_output_dir": True}
        if f["max_samples"] and f["max_samples"] > 0:  # 0: all of eval_dataset
            config["max_samples"] = int(f["max_samples"])
        if model.get("adapter_name_or_path"):
            config["finetuning_type"] = "lora"
        return "train", config
    if f["mode"] != EVAL:
        raise ConfigError(f"mode: {f['mode']!r} is not {PREDICT} or {EVAL}")
    return "eval", {**model, "task": f["task"].strip(), "task_dir": f["task_dir"].strip(), "n_shot": int(f["n_shot"]),
                    "lang": f["lang"], "batch_size": int(f["batch_size"]), "save_dir": f["output_dir"].strip()}


def checked_eval_config(model: dict, fields: dict, root) -> tuple[str, dict]:
    """eval_config, or a ConfigError where its command would refuse it or where it would read or write outside
    `root`'s folders (webaccess.Root; the reads checked before anything is read)."""
    command, config = eval_config(model, fields)
    root.check_reads(config)
    out = "output_dir" if command == "train" else "save_dir"
    if not config[out]:
        raise ConfigError("output_dir is empty: name the folder the results go to (e.g. saves/webui_eval)")
    if command == "train":
        parse_train_args(dict(config))
    else:
        check_options(parse_infer_args(dict(config), "eval").evaluation)
        load_task(config["task"], config["task_dir"], 0)  # a task that is not there, said before the model loads
    root.check("output_dir", config[out])
    return command, config


def _frame(rows: list[tuple], columns: tuple[str, ...], lang: str) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[words(f"col.{name}", lang) for name in columns])


def predict_results(output_dir: str, lang: str = "en") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(BLEU-4 and ROUGE in percent, the first ROWS predictions beside their labels) of a predict run."""
    folder = Path(output_dir)
    scores = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    metrics = [(name.removeprefix("predict_"), value) for name, value in scores.items()
               if name.startswith(("predict_bleu", "predict_rouge"))]
    with open(folder / PREDICTIONS, encoding="utf-8") as f:
        records = [json.loads(line) for line, _ in zip(f, range(ROWS))]
    rows = [(r["prompt"], r["predict"], r["label"]) for r in records]
    return _frame(metrics, ("metric", "value"), lang), _frame(rows, ("prompt", "predict", "label"), lang)


def eval_results(config: dict, lang: str = "en") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accuracy in percent on average and per category, the first ROWS questions with the predicted letter and
    the answer) of an `lf eval` run of `config`."""
    results = json.loads((Path(config["save_dir"]) / EVAL_RESULTS).read_text(encoding="utf-8"))
    scores = [("Average", results["average"]), *results["categories"].items()]
    metrics = [(name, round(100 * s["accuracy"], 2), s["total"]) for name, s in scores]
    task = load_task(config["task"], config["task_dir"], 0)
    rows = [(subject.key, question.text, predicted, question.answer)
            for subject in task.subjects
            for question, predicted in zip(subject.questions, results["subjects"][subject.key]["predictions"])]
    return (_frame(metrics, ("category", "accuracy", "questions"), lang),
            _frame(rows[:ROWS], ("subject", "question", "predict", "answer"), lang))


def results(command: str, config: dict, lang: str = "en") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The finished run's metrics and predictions tables."""
    return predict_results(config["output_dir"], lang) if command == "train" else eval_results(config, lang)
