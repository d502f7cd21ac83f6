"""lf eval on LLaMA-Factory's task folders: the mmlu (no header, data/ in the zip), ceval (header, id and explanation
columns) and cmmlu (header with an index column) layouts, zipped or extracted, and the two demo tasks written for lf
(evaluation/lf_mmlu_demo, evaluation/lf_ceval_demo); the prompts in English and Chinese, 0-shot and n-shot; the
accuracies per subject and category against a reference computed here from the same logits; the files LLaMA-Factory
writes to save_dir; bad task names and folders refused in one line."""

import csv
import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_eval import tokenizer  # noqa: F401 (the tiny model's tokenizer)
from test_train import lf_home  # noqa: F401 (the module's tiny model)

from lf import cli
from lf import eval as lf_eval
from lf.data import get_template
from lf.errors import ConfigError, DataError
from lf.eval_tasks import Question

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "evaluation"
EN, ZH = lf_eval.PROMPT_STYLES["en"], lf_eval.PROMPT_STYLES["zh"]

# one subject's questions, with the cells CSV must quote: a comma, a doubled quote, a line break
DEV = [Question("What is 1 + 1?", ("1", "2", "3", "4"), "B"), Question('Say "hi", then?', ("a", "b", "c", "d"), "D")]
TEST = [Question("Which is\nbig?", ("ant", "whale", "cat", "dog"), "B"),
        Question("2, 3: the sum?", ("5", "6", "1", "0"), "A"),
        Question("None", ("NA", "null", "nan", "-"), "C")]  # cells pandas would read as missing values


def csv_text(header: list[str] | None, rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(([header] if header else []) + rows)
    return out.getvalue()


def cells(q: Question) -> list[str]:
    return [q.text, *q.choices, q.answer]


# each layout as LLaMA-Factory's dataset script reads it: the file of (subject, split folder), and its text
LAYOUTS = {
    "mmlu": (lambda s, split: f"data/{split}/{s}_{split}.csv",  # a BOM before the first question: Excel writes one
             lambda qs: "\ufeff" + csv_text(None, [cells(q) for q in qs])),
    "ceval": (lambda s, split: f"{split}/{s}_{split}.csv",
              lambda qs: csv_text(["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                                  [[str(i), *cells(q), "because"] for i, q in enumerate(qs)])),
    "cmmlu": (lambda s, split: f"{split}/{s}.csv",  # pandas' index column first
              lambda qs: csv_text(["", "Question", "A", "B", "C", "D", "Answer"],
                                             [[str(i), *cells(q)] for i, q in enumerate(qs)])),
}


def write_layout(root: Path, layout: str, zipped: bool, subjects=("alpha", "beta")) -> Path:
    """A task folder root/<layout> in that layout: mapping.json, and dev/test files, in <layout>.zip or not."""
    folder = root / layout
    folder.mkdir(parents=True)
    (folder / "mapping.json").write_text(json.dumps({s: {"name": s.upper(), "category": "STEM"} for s in subjects}))
    (folder / f"{layout}.py").write_text("# LLaMA-Factory's dataset script: not read\n")
    name, text = LAYOUTS[layout]
    files = {name(s, split): text(qs) for s in subjects for split, qs in (("dev", DEV), ("test", TEST))}
    if zipped:
        with zipfile.ZipFile(folder / f"{layout}.zip", "w") as z:  # no folder entries, as zip -j writes them
            for path, content in files.items():
                z.writestr(path, content)
    else:
        for path, content in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(content, encoding="utf-8")
    return folder


@pytest.mark.parametrize("zipped", [True, False], ids=["zipped", "extracted"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llamafactory_layouts_load(tmp_path, layout, zipped):
    write_layout(tmp_path, layout, zipped)
    task = lf_eval.load_task(f"{layout}_test", str(tmp_path), n_shot=2)
    assert [(s.key, s.name, s.category) for s in task.subjects] == [("alpha", "ALPHA", "STEM"),
                                                                    ("beta", "BETA", "STEM")]
    for subject in task.subjects:
        assert subject.dev == tuple(DEV) and subject.questions == tuple(TEST)


def test_demo_tasks_load():
    mmlu = lf_eval.load_task("lf_mmlu_demo_test", str(TASKS), n_shot=3)  # zipped, no header, under data/
    assert [(s.key, s.category, len(s.dev), len(s.questions)) for s in mmlu.subjects] == [
        ("astronomy", "STEM", 3, 4), ("nutrition", "Other", 3, 4), ("philosophy", "Humanities", 3, 4)]
    assert mmlu.subjects[2].dev[2] == Question('Who wrote "I think, therefore I am"?',
                                               ("René Descartes", "Immanuel Kant", "David Hume", "John Locke"), "A")
    assert [len(s.questions) for s in lf_eval.load_task("lf_mmlu_demo_validation", str(TASKS), 3).subjects] == [2, 2, 2]
    ceval = lf_eval.load_task("lf_ceval_demo_validation", str(TASKS), n_shot=3)  # extracted, header rows
    assert [(s.key, s.name, s.category, len(s.dev), len(s.questions)) for s in ceval.subjects] == [
        ("middle_school_mathematics", "初中数学", "STEM", 3, 4),
        ("middle_school_geography", "初中地理", "Social Sciences", 3, 4),
        ("chinese_classics", "中国古典文学", "Humanities", 3, 4)]
    assert ceval.subjects[0].questions[1] == Question("1, 2, 3, 4 这四个数的平均数是____。", ("2", "2.5", "3", "10"), "B")


# ---- prompts -----------------------------------------------------------------------------------------------------

def test_prompts_en_and_zh_zero_and_n_shot(tokenizer):  # noqa: F811
    mmlu = lf_eval.load_task("lf_mmlu_demo_test", str(TASKS), n_shot=3).subjects
    ceval = lf_eval.load_task("lf_ceval_demo_validation", str(TASKS), n_shot=3).subjects
    assert lf_eval.build_messages(mmlu[0].questions[0], [], "astronomy", EN) == [{"role": "user", "content": (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What causes day and night on Earth?\nA. Earth's rotation on its axis\nB. Earth's orbit around the Sun\n"
        "C. The Moon's phases\nD. Solar flares\nAnswer:")}]
    philosophy = mmlu[2]
    assert lf_eval.build_messages(philosophy.questions[3], [philosophy.dev[2], philosophy.dev[0]], "philosophy",
                                  EN) == [
        {"role": "user", "content": "The following are multiple choice questions (with answers) about philosophy.\n\n"
                                    'Who wrote "I think, therefore I am"?\nA. René Descartes\nB. Immanuel Kant\n'
                                    "C. David Hume\nD. John Locke\nAnswer:"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Which Greek philosopher was the teacher of Plato?\nA. Aristotle\nB. Socrates\n"
                                    "C. Epicurus\nD. Zeno\nAnswer:"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "Which thinker is known for the Analects, a book of sayings?\nA. Laozi\n"
                                    "B. Mencius\nC. Socrates\nD. Confucius\nAnswer:"}]
    assert lf_eval.build_messages(ceval[0].questions[1], [], "初中数学", ZH) == [{"role": "user", "content": (
        "以下是中国关于初中数学考试的单项选择题，请选出其中的正确答案。\n\n"
        "1, 2, 3, 4 这四个数的平均数是____。\nA. 2\nB. 2.5\nC. 3\nD. 10\n答案：")}]
    geography = ceval[1]
    messages = lf_eval.build_messages(geography.questions[3], geography.dev[:2], "初中地理", ZH)
    text = get_template("chatml").render(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\n以下是中国关于初中地理考试的单项选择题，请选出其中的正确答案。\n\n"
        "世界上面积最大的大洋是____。\nA. 大西洋\nB. 印度洋\nC. 太平洋\nD. 北冰洋\n答案：<|im_end|>\n"
        "<|im_start|>assistant\nC<|im_end|>\n"
        "<|im_start|>user\n中国的首都是____。\nA. 北京\nB. 上海\nC. 广州\nD. 西安\n答案：<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\n世界上最高的山峰是____。\nA. 泰山\nB. 黄山\nC. 华山\nD. 珠穆朗玛峰\n答案：<|im_end|>\n"
        "<|im_start|>assistant\n")
    template = get_template("chatml")
    template.prepare_tokenizer(tokenizer)
    assert tokenizer.decode(lf_eval.encode_prompt(template, tokenizer, messages, [])) == text


# ---- accuracies ----------------------------------------------------------------------------------------------------

class SeededLogits(torch.nn.Module):
    """Logits drawn from a generator seeded by each prompt's real ids (the same prompt, the same logits whatever its
    batch and padding); records each prompt's ids and its letters' logits."""

    def __init__(self, vocab: int, letter_ids: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.letter_ids, self.seen = vocab, letter_ids, []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            real = ids[mask.bool()].tolist()
            row = torch.randn(self.vocab, generator=torch.Generator().manual_seed(hash(tuple(real)) % 2**62))
            self.seen.append((real, row[self.letter_ids]))
            rows.append(row)
        return SimpleNamespace(logits=torch.stack(rows)[:, None, :])


@pytest.mark.parametrize("task, lang, n_shot", [("lf_ceval_demo_validation", "zh", 2), ("lf_mc_demo_test", "en", 3),
                                                ("lf_mmlu_demo_test", "en", 0)])
def test_accuracy_per_subject_and_category_matches_the_logits(tokenizer, tmp_path, task, lang, n_shot):  # noqa: F811
    task = lf_eval.load_task(task, str(TASKS), n_shot=n_shot)
    template = get_template("chatml")
    template.prepare_tokenizer(tokenizer)
    _, letter_ids = lf_eval.answer_tokens(template, tokenizer)
    model = SeededLogits(len(tokenizer), letter_ids)
    results = lf_eval.evaluate(model, tokenizer, template, task, n_shot=n_shot, batch_size=3, lang=lang, seed=1)

    # the reference: each prompt's question is the last one written in it; its prediction the argmax letter
    style = lf_eval.PROMPT_STYLES[lang]
    blocks = {(s.key, i): f"{q.text}\nA. {q.choices[0]}" for s in task.subjects for i, q in enumerate(s.questions)}
    predicted = {}
    for ids, letters in model.seen:
        text = tokenizer.decode(ids)
        assert text.rstrip().endswith(style.answer.strip() + "<|im_end|>\n<|im_start|>assistant")
        asked = max(blocks, key=lambda key: text.rfind(blocks[key]))
        predicted[asked] = "ABCD"[int(letters.argmax())]
    assert len(predicted) == len(model.seen) == len(blocks)  # each question asked once
    correct, categories = {}, {}
    for s in task.subjects:
        hits = [predicted[s.key, i] == q.answer for i, q in enumerate(s.questions)]
        correct[s.key] = (sum(hits), len(hits))
        category = categories.setdefault(s.category, [0, 0])
        category[0] += sum(hits)
        category[1] += len(hits)
    for s in task.subjects:
        assert results["subjects"][s.key]["predictions"] == [predicted[s.key, i] for i in range(len(s.questions))]
        assert (results["subjects"][s.key]["correct"], results["subjects"][s.key]["total"]) == correct[s.key]
        assert results["subjects"][s.key]["accuracy"] == correct[s.key][0] / correct[s.key][1]
    assert results["categories"] == {name: {"correct": c, "total": t, "accuracy": c / t}
                                     for name, (c, t) in categories.items()}
    all_correct, total = sum(c for c, _ in correct.values()), sum(t for _, t in correct.values())
    assert results["average"] == {"correct": all_correct, "total": total, "accuracy": all_correct / total}
    assert 0 < all_correct < total  # random logits: some right, some wrong

    # save_dir: LLaMA-Factory's results.json and results.log, lf_results.json beside them
    lf_eval.save_results(results, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == {
        s.key: {str(i): predicted[s.key, i] for i in range(len(s.questions))} for s in task.subjects}
    order = [name for name in ("STEM", "Social Sciences", "Humanities", "Other") if name in categories]
    assert (tmp_path / "results.log").read_text() == "\n".join(
        [f"        Average: {100 * all_correct / total:.2f}"] +
        [f"{name:>15}: {100 * categories[name][0] / categories[name][1]:.2f}" for name in order])
    assert json.loads((tmp_path / "lf_results.json").read_text()) == json.loads(json.dumps(results))


# ---- refused ---------------------------------------------------------------------------------------------------------

def _corrupt_zip(folder):
    (folder / "mmlu.zip").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")


def _short_row(folder):
    with zipfile.ZipFile(folder / "mmlu.zip", "w") as z:
        z.writestr("data/test/alpha_test.csv", "What is 1 + 1?,1,2,3,B\n")
        z.writestr("data/dev/alpha_dev.csv", csv_text(None, [cells(q) for q in DEV]))


@pytest.mark.parametrize("setup, task, task_dir, message", [
    (None, "mmlu_test", "missing", "lf eval: task: no task 'mmlu_test' in "),
    (None, "mmlu_tset", None, "lf eval: task: {folder} has no split 'tset' (a folder of CSV files, in the task "
                              "folder, its data/ or mmlu.zip); its splits: test"),
    (None, "mmlu_train", None, "lf eval: task: 'mmlu_train' scores the dev split, which the 5 shots are drawn from"),
    (_corrupt_zip, "mmlu_test", None, "lf eval: {folder}/mmlu.zip is not a readable zip file"),
    (_short_row, "mmlu_test", None, "lf eval: {folder}/mmlu.zip/data/test/alpha_test.csv:1 (question 1): 5 cells: a "
                                    "CSV without a header row holds the 6 cells question,A,B,C,D,answer"),
    (None, "lf_ceval_demo_test", str(TASKS),
     "lf eval: {tasks}/lf_ceval_demo/test/middle_school_mathematics_test.csv:1: the header row has no answer column "
     "(it has id, question, A, B, C, D)"),
])
def test_bad_tasks_are_one_line(tmp_path, capsys, setup, task, task_dir, message):
    folder = write_layout(tmp_path, "mmlu", zipped=True, subjects=("alpha",))
    if setup:
        setup(folder)
    task_dir = task_dir or str(tmp_path)
    code = cli.main(["eval", "model_name_or_path=lf-tiny-llama", f"task={task}", f"task_dir={task_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1, err
    assert err[0].startswith(message.format(folder=folder, tasks=TASKS)), err[0]


def test_error_classes(tmp_path):
    """A missing or misnamed task is the config's fault; a broken file the data's."""
    write_layout(tmp_path, "ceval", zipped=False, subjects=("alpha",))
    with pytest.raises(ConfigError):
        lf_eval.load_task("ceval_val1dation", str(tmp_path))
    (tmp_path / "ceval" / "dev" / "alpha_dev.csv").unlink()
    with pytest.raises(DataError, match=r"dev/alpha\.csv is missing \(nor is there alpha_dev\.csv\)"):
        lf_eval.load_task("ceval_test", str(tmp_path), n_shot=1)
    assert len(lf_eval.load_task("ceval_test", str(tmp_path), n_shot=0).subjects[0].questions) == 3
