"""The task folders `lf eval` reads: lf's own layout and LLaMA-Factory's mmlu, cmmlu and ceval folders, unchanged.

`task: <folder>_<split>` (e.g. lf_mc_demo_test, mmlu_test, ceval_validation) reads `<task_dir>/<folder>/`:

    mapping.json     {"<subject>": {"name": "<subject as the prompt names it>", "category": "<group>"}, ...}
    <split folders>  one CSV per subject in each: dev (the solved questions the shots are drawn from, needed when
                     n_shot > 0) and the scored split (test, val, ...)

The split folders lie in the task folder itself, in its data/ subfolder, or in the zip file `<folder>.zip` beside
mapping.json (at its root or under data/): LLaMA-Factory's mmlu.zip holds data/{dev,val,test}/, its ceval.zip and
cmmlu.zip {dev,val,test}/ and {dev,test}/. Extracted folders are read before the zip. LLaMA-Factory's split names
are read as its dataset scripts map them: `validation` is the folder val/ (or validation/), `train` is dev/.

A subject's file in the split folder <f> is `<subject>.csv` (lf, CMMLU) or `<subject>_<f>.csv` (MMLU, C-Eval). Each
CSV is UTF-8 (a BOM is skipped). When its first row names a column `question` it is a header row, read case-blind
(C-Eval's id,question,A,B,C,D,answer,explanation; CMMLU's ,Question,A,B,C,D,Answer; lf's question,A,B,C,D,answer,
any order, other columns ignored); otherwise the file has no header and every row is question,A,B,C,D,answer in
that order (MMLU). No cell of those columns may be empty and answer is one of A-D; a split without an answer
column (C-Eval's test split) cannot be scored. Every subject of mapping.json needs its file in each split read, a
CSV there without a subject in mapping.json is refused, and a file breaking a rule is refused with its path and
line. Cells are read as text (LLaMA-Factory's pandas reads "None" or "NA" as a missing value, written "nan").

task_dir (default "evaluation") is read relative to the working directory; when the default is given and the task
is not there, lf's own evaluation/ folder (lf.resources: the repository's, or the wheel's copy) is searched, so the
demo tasks (lf_mc_demo, lf_mmlu_demo, lf_ceval_demo) run from any directory.
"""

from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lf.errors import ConfigError, DataError, did_you_mean
from lf.resources import shipped

CHOICES = ("A", "B", "C", "D")
COLUMNS = ("question", *CHOICES, "answer")
DEV_SPLIT = "dev"
SPLIT_FOLDERS = {"validation": ("validation", "val"), "val": ("val", "validation"), "train": (DEV_SPLIT,)}
DEFAULT_TASK_DIR = "evaluation"
BUILTIN_TASK_DIR = shipped("evaluation")


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, ...]  # the contents of A, B, C, D
    answer: str  # one of CHOICES


@dataclass(frozen=True)
class Subject:
    key: str  # mapping.json's key, the CSV files' name
    name: str  # as the header writes it
    category: str
    dev: tuple[Question, ...]  # empty when n_shot is 0 (not read)
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Task:
    name: str  # <folder>_<split>, as given
    path: Path
    split: str
    subjects: tuple[Subject, ...]


# ---- the task folder -------------------------------------------------------------------------------------------

def data_roots(path: Path) -> list:
    """Where a task folder's split folders may lie: the folder, its data/, then <folder>.zip's root and data/
    (zipfile.Path, read like a folder)."""
    roots = [path, path / "data"]
    archive = path / f"{path.name}.zip"
    if archive.is_file():
        try:
            zipped = zipfile.Path(archive)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{archive} is not a readable zip file ({exc}): replace it with the task's zip "
                            f"(LLaMA-Factory's evaluation/<task>/<task>.zip) or its extracted folders") from None
        roots += [zipped, zipped / "data"]
    return [root for root in roots if root.is_dir()]


def split_names(path: Path) -> list[str]:
    """The scorable splits of a task folder, by LLaMA-Factory's names (val/ is `validation`)."""
    names = {("validation" if d.name == "val" else d.name) for root in data_roots(path) for d in root.iterdir()
             if d.is_dir() and d.name not in (DEV_SPLIT, "data")}
    return sorted(names)


def split_folder(path: Path, split: str):
    """The folder holding `split`'s CSV files (a Path or a zipfile.Path), or None."""
    return next((root / name for root in data_roots(path) for name in SPLIT_FOLDERS.get(split, (split,))
                 if (root / name).is_dir()), None)


def find_task(task: str | None, task_dir: str, n_shot: int) -> tuple[Path, str]:
    """(the task folder, the split to score) for task = <folder>_<split>, or a ConfigError saying what exists."""
    if not task:
        raise ConfigError("task is missing: name the task folder and the split to score as <folder>_<split>, e.g. "
                          "task: lf_mc_demo_test (lf's demo task) or mmlu_test (LLaMA-Factory's evaluation/mmlu)")
    roots = [Path(task_dir)]
    if task_dir == DEFAULT_TASK_DIR and BUILTIN_TASK_DIR.resolve() != roots[0].resolve():
        roots.append(BUILTIN_TASK_DIR)
    folder, _, split = task.rpartition("_")
    path = next((root / folder for root in roots if folder and (root / folder).is_dir()), None)
    if path is not None and not (path / "mapping.json").is_file():
        raise DataError(f"{path / 'mapping.json'} is missing: a task folder names its subjects there, "
                        f'{{"<subject>": {{"name": ..., "category": ...}}}} (see lf/eval_tasks.py\'s docstring)')
    if path is None:
        known = [f"{p.name}_{s}" for root in roots if root.is_dir() for p in sorted(root.iterdir())
                 if (p / "mapping.json").is_file() for s in split_names(p)]
        where = " or ".join(str(root.resolve()) for root in roots)
        raise ConfigError(f"task: no task {task!r} in {where} (task is <folder>_<split>, the folder holding "
                          f"mapping.json).{did_you_mean(task, known)} Tasks there: {', '.join(known) or 'none'}")
    if DEV_SPLIT in SPLIT_FOLDERS.get(split, (split,)) and n_shot > 0:
        raise ConfigError(f"task: {task!r} scores the dev split, which the {n_shot} shots are drawn from (a question "
                          f"could be its own example): score another split, or set n_shot: 0")
    if split_folder(path, split) is None:
        raise ConfigError(f"task: {path} has no split {split!r} (a folder of CSV files, in the task folder, its "
                          f"data/ or {path.name}.zip); its splits: {', '.join(split_names(path)) or 'none'}")
    return path, split


def read_mapping(file: Path) -> dict[str, dict]:
    """mapping.json: {subject: {"name": ..., "category": ...}}, checked."""
    try:
        mapping = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {file}: {exc}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f'{file} must be a JSON object of subjects: {{"<subject>": {{"name": ..., "category": ...}}}}')
    for subject, entry in mapping.items():
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) and entry[key]
                                                for key in ("name", "category"))):
            raise DataError(f'{file}: subject {subject!r} maps to {entry!r}; it must map to {{"name": "<shown in the '
                            f'prompt>", "category": "<group>"}}, both non-empty strings')
    return mapping


def subject_files(folder, mapping: dict) -> dict:
    """{subject: its CSV in `folder`} (<subject>.csv or <subject>_<folder>.csv); a CSV of no subject is refused."""
    files = {}
    for file in sorted(folder.iterdir(), key=lambda f: f.name):
        if not file.name.endswith(".csv") or not file.is_file():
            continue
        stem = file.name[:-len(".csv")]
        subject = stem if stem in mapping else stem.removesuffix(f"_{folder.name}")
        if subject not in mapping:
            raise DataError(f"{file}: subject {subject!r} is not in mapping.json: add it there (name and category) "
                            f"or remove the file")
        files[subject] = file
    return files


def read_questions(file) -> tuple[Question, ...]:
    """The questions of one CSV (see the module docstring), or a DataError naming the file and line."""
    questions = []
    try:
        with file.open("r", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)  # bad quoting is an error, not a cell swallowing the rest
            columns, done = None, 0  # done: the lines of the rows read
            for row in reader:
                done = reader.line_num
                if not row:
                    continue  # a blank line
                if columns is None:
                    columns = _columns(row, file)
                    if columns is not COLUMNS:
                        continue  # that was the header row
                where = f"{file}:{reader.line_num} (question {len(questions) + 1})"
                questions.append(_question(row, columns, where))
    except csv.Error as exc:  # the broken row starts on the line after the rows read
        raise DataError(f"{file}:{done + 1} (question {len(questions) + 1}): malformed CSV ({exc}): a cell "
                        f"holding a comma, a quote or a line break is written in double quotes, its quotes doubled "
                        f'("say ""hi"", 1")') from None
    except UnicodeDecodeError:
        raise DataError(f"{file} is not UTF-8 text: save it as UTF-8") from None
    if not questions:
        raise DataError(f"{file} holds no questions: add one row per question")
    return tuple(questions)


def _columns(first_row: list[str], file):
    """COLUMNS itself for a file without a header row, else {column: its index} read off the header row."""
    names = [cell.strip().lower() for cell in first_row]
    if "question" not in names:
        return COLUMNS
    missing = [column for column in COLUMNS if column.lower() not in names]
    if missing == ["answer"]:
        raise DataError(f"{file}:1: the header row has no answer column (it has {', '.join(first_row)}): a split "
                        f"without answers (like C-Eval's test split) cannot be scored: score another split, e.g. "
                        f"<folder>_validation")
    if missing:
        raise DataError(f"{file}:1: the header row lacks the column(s) {', '.join(missing)} (it has "
                        f"{', '.join(first_row)}): the header names the columns {','.join(COLUMNS)}, or the file "
                        f"has no header and every row holds them in that order")
    return {column: names.index(column.lower()) for column in COLUMNS}


def _question(row: list[str], columns, where: str) -> Question:
    if columns is COLUMNS:  # no header: the cells in COLUMNS' order
        if len(row) != len(COLUMNS):
            raise DataError(f"{where}: {len(row)} cells: a CSV without a header row holds the 6 cells "
                            f"{','.join(COLUMNS)} in each row (or give it a header row naming them)")
        columns = {column: i for i, column in enumerate(COLUMNS)}
    cells = {column: row[i].strip() if i < len(row) else "" for column, i in columns.items()}
    empty = [column for column in COLUMNS if not cells[column]]
    if empty:
        raise DataError(f"{where}: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: each row holds the "
                        f"question, its four choices A-D and the answer letter")
    if cells["answer"] not in CHOICES:
        raise DataError(f"{where}: answer {cells['answer']!r} is not one of {', '.join(CHOICES)}: write the letter "
                        f"of the right choice")
    return Question(cells["question"], tuple(cells[letter] for letter in CHOICES), cells["answer"])


def load_task(task: str | None, task_dir: str = DEFAULT_TASK_DIR, n_shot: int = 5) -> Task:
    """The task's subjects with their questions (and dev questions when n_shot > 0), every file checked."""
    path, split = find_task(task, task_dir, n_shot)
    mapping = read_mapping(path / "mapping.json")
    splits = {split: split_folder(path, split)}
    if n_shot > 0:
        splits[DEV_SPLIT] = split_folder(path, DEV_SPLIT)
        if splits[DEV_SPLIT] is None:
            raise DataError(f"{path} has no dev split (a folder dev/ of CSV files) to draw the {n_shot} shots from: "
                            f"add it, or set n_shot: 0")
    files = {name: subject_files(folder, mapping) for name, folder in splits.items()}
    for name, folder in splits.items():
        for subject in mapping:
            if subject not in files[name]:
                why = "the shots are drawn from it (or set n_shot: 0)" if name == DEV_SPLIT else "it is scored"
                raise DataError(f"{folder / subject}.csv is missing (nor is there {subject}_{folder.name}.csv): "
                                f"subject {subject!r} is in {path / 'mapping.json'} and {why}")
    subjects = tuple(Subject(key, entry["name"], entry["category"],
                             read_questions(files[DEV_SPLIT][key]) if n_shot > 0 else (),
                             read_questions(files[split][key])) for key, entry in mapping.items())
    return Task(task, path, split, subjects)
