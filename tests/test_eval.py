"""`lf eval`: the prompt of a 2-shot question through a chat template, scoring as the argmax over the letters'
logits (a fake model), left-padded batches scoring as single prompts, the demo task end to end on the tiny Llama
(test_train's temporary LF_HOME), and task folders that break the format refused with the file and line."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import lf_home  # noqa: F401 (the module's tiny model)

from lf import cli
from lf import eval as lf_eval
from lf.config import parse_infer_args
from lf.data import get_template
from lf.errors import ConfigError, DataError
from lf.model import load_model, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "evaluation" / "lf_mc_demo"
HEADER = "question,A,B,C,D,answer\n"


def write_task(root: Path, subjects: dict[str, tuple[str, list[str], list[str]]]) -> Path:
    """A task folder root/mc: subjects {key: (category, dev rows, test rows)}, rows as CSV lines."""
    folder = root / "mc"
    for split in ("dev", "test"):
        (folder / split).mkdir(parents=True)
    mapping = {key: {"name": key.replace("_", " "), "category": category} for key, (category, _, _) in subjects.items()}
    (folder / "mapping.json").write_text(json.dumps(mapping))
    for key, (_, dev, test) in subjects.items():
        (folder / "dev" / f"{key}.csv").write_text(HEADER + "".join(row + "\n" for row in dev))
        (folder / "test" / f"{key}.csv").write_text(HEADER + "".join(row + "\n" for row in test))
    return folder


@pytest.fixture(scope="module")
def tokenizer(lf_home):  # noqa: F811
    return load_tokenizer(parse_infer_args({"model_name_or_path": "lf-tiny-llama"}, "eval").model)


# ---- prompts -------------------------------------------------------------------------------------------------------

def test_two_shot_prompt_through_the_template(tokenizer):
    q = lf_eval.Question
    shots = [q("What is 2 + 2?", ("3", "4", "5", "6"), "B"),
             q("Which is a planet?", ("Mars", "Moon", "Sun", "Io"), "A")]
    question = q('Is "1,000" a number?', ("yes", "no", "maybe", "never"), "A")
    messages = lf_eval.build_messages(question, shots, "general knowledge", lf_eval.PROMPT_STYLES["en"])
    template = get_template("chatml")
    text = template.render(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nThe following are multiple choice questions (with answers) about general knowledge.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nWhich is a planet?\nA. Mars\nB. Moon\nC. Sun\nD. Io\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
        '<|im_start|>user\nIs "1,000" a number?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:<|im_end|>\n'
        "<|im_start|>assistant\n")
    # the ids the model reads are that text, and the letters are the tokens the template's replies write
    template.prepare_tokenizer(tokenizer)
    opening, letters = lf_eval.answer_tokens(template, tokenizer)
    assert opening == [] and letters == [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    assert tokenizer.decode(lf_eval.encode_prompt(template, tokenizer, messages, opening)) == text
    zh = lf_eval.build_messages(question, [], "物理", lf_eval.PROMPT_STYLES["zh"])
    assert zh == [{"role": "user", "content": '以下是中国关于物理考试的单项选择题，请选出其中的正确答案。\n\n'
                                              'Is "1,000" a number?\nA. yes\nB. no\nC. maybe\nD. never\n答案：'}]


def test_letters_are_scored_where_the_reply_writes_them(tokenizer):
    """" {content}" replies score the " A" tokens; Qwen3's empty think block goes into the prompt before them."""
    vicuna = get_template("vicuna")
    _, letters = lf_eval.answer_tokens(vicuna, tokenizer)
    assert [tokenizer.decode([t]) for t in letters] == [" A", " B", " C", " D"]
    qwen3 = get_template("qwen3")
    qwen3.prepare_tokenizer(tokenizer)
    opening, letters = lf_eval.answer_tokens(qwen3, tokenizer)
    assert tokenizer.decode(opening) == "<think>\n\n</think>\n\n"
    assert [tokenizer.decode([t]) for t in letters] == list("ABCD")


# ---- scoring ---------------------------------------------------------------------------------------------------------

class FavouriteLetter(torch.nn.Module):
    """Logits that favour one letter's token among the four (and a non-letter token above all, which must not
    count); records each batch it sees."""

    def __init__(self, vocab: int, letter_id: int, other_id: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.letter_id, self.other_id, self.batches = vocab, letter_id, other_id, []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        self.batches.append((input_ids, attention_mask, position_ids))
        logits = torch.randn(input_ids.shape[0], logits_to_keep, self.vocab)
        logits[..., self.letter_id] = 50.0
        logits[..., self.other_id] = 100.0
        return SimpleNamespace(logits=logits)


def test_scoring_is_the_argmax_over_the_letters(tokenizer, tmp_path):
    rows = [f"Question {'very ' * i}{i}?,one,two,three,four,B" for i in range(5)]  # lengths differ: padding
    task = lf_eval.load_task("mc_test", str(write_task(tmp_path, {
        "all_b": ("easy", rows[:3], rows), "all_c": ("hard", rows[:3], [r[:-1] + "C" for r in rows[:4]])}).parent),
        n_shot=2)
    template = get_template("chatml")
    template.prepare_tokenizer(tokenizer)
    b = tokenizer.convert_tokens_to_ids("B")
    model = FavouriteLetter(len(tokenizer), b, other_id=b + 100)
    results = lf_eval.evaluate(model, tokenizer, template, task, n_shot=2, batch_size=2, seed=3)
    assert results["subjects"]["all_b"] == {"name": "all b", "category": "easy", "correct": 5, "total": 5,
                                            "accuracy": 1.0, "predictions": list("BBBBB")}
    assert results["subjects"]["all_c"]["accuracy"] == 0.0 and results["subjects"]["all_c"]["predictions"] == ["B"] * 4
    assert results["categories"] == {"easy": {"correct": 5, "total": 5, "accuracy": 1.0},
                                     "hard": {"correct": 0, "total": 4, "accuracy": 0.0}}
    assert results["average"] == {"correct": 5, "total": 9, "accuracy": 5 / 9}
    # batches of at most 2, left-padded: every row ends with a real token and its positions count real tokens only
    assert [len(ids) for ids, _, _ in model.batches] == [2, 2, 1, 2, 2]
    for ids, mask, positions in model.batches:
        assert bool(mask[:, -1].all())
        for row in range(len(ids)):
            real = int(mask[row].sum())
            assert mask[row].tolist() == [0] * (len(mask[row]) - real) + [1] * real
            assert positions[row, -real:].tolist() == list(range(real))
    table = lf_eval.format_table(results)
    assert table.splitlines()[2].split() == ["all_b", "easy", "5", "100.00"]
    assert table.splitlines()[-1].split() == ["Average", "9", "55.56"]


def test_shots_come_from_the_seed(tokenizer):
    """The same seed draws the same shots, another seed others; each question gets n_shot distinct dev questions."""
    task = lf_eval.load_task("lf_mc_demo_test", str(DEMO.parent), n_shot=3)
    chatml = get_template("chatml")
    chats = []

    class Recording:  # chatml, recording the chats it encodes
        name = chatml.name

        def encode_oneturn(self, tok, messages):
            chats.append(messages)
            return chatml.encode_oneturn(tok, messages)

    model = FavouriteLetter(len(tokenizer), letter_id=0, other_id=1)
    runs = []
    for seed in (5, 5, 6):
        chats.clear()
        lf_eval.evaluate(model, tokenizer, Recording(), task, n_shot=3, batch_size=8, seed=seed)
        runs.append(chats[len(lf_eval.CHOICES):])  # after answer_tokens' probes: one chat per question
    assert len(runs[0]) == 30 and runs[0] == runs[1] != runs[2]
    for chat in runs[0]:
        questions = [m["content"] for m in chat if m["role"] == "user"]
        assert len(questions) == 4 and len(set(questions)) == 4


# ---- the tiny model ------------------------------------------------------------------------------------------------

def test_left_padded_batch_scores_each_prompt_as_alone(tokenizer):
    cfg = parse_infer_args({"model_name_or_path": "lf-tiny-llama", "infer_dtype": "float32"}, "eval")
    model, _ = load_model(tokenizer, cfg.model, cfg.finetuning, is_trainable=False)
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in
               ("What is 2 + 2?\nA. 3\nAnswer:", "Hi", "The following are multiple choice questions about x.")]
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    batched = lf_eval.letter_logits(model, prompts, letters, tokenizer.pad_token_id)
    alone = torch.cat([lf_eval.letter_logits(model, [p], letters, tokenizer.pad_token_id) for p in prompts])
    assert batched.shape == (3, 4)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_demo_task_end_to_end(tmp_path, monkeypatch, capsys):
    """configs/examples/eval_demo.yaml from another directory: task_dir "evaluation" falls back to lf's own."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    argv = ["eval", str(REPO / "configs" / "examples" / "eval_demo.yaml"), f"save_dir={out}", "n_shot=2",
            "infer_dtype=float32"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "lf_results.json").read_text())
    assert set(results) >= {"task", "split", "n_shot", "subjects", "categories", "average", "model"}
    assert list(results["subjects"]) == ["arithmetic", "geography", "science"]
    assert set(results["categories"]) == {"STEM", "Social Sciences"}
    for subject in results["subjects"].values():
        assert subject["total"] == 10 and set(subject["predictions"]) <= set("ABCD")
        assert 0.0 <= subject["accuracy"] <= 1.0
    average = results["average"]
    assert average["total"] == 30 and average["accuracy"] == average["correct"] / 30
    table = lf_eval.format_table(results)
    assert table in printed and f"{100 * average['accuracy']:.2f}" in table.splitlines()[-1]
    # LLaMA-Factory's files: each question's letter by subject, and the accuracy lines
    assert json.loads((out / "results.json").read_text()) == {
        key: {str(i): p for i, p in enumerate(s["predictions"])} for key, s in results["subjects"].items()}
    assert (out / "results.log").read_text() == "\n".join(
        f"{name:>15}: {100 * score['accuracy']:.2f}" for name, score in
        [("Average", average), ("STEM", results["categories"]["STEM"]),
         ("Social Sciences", results["categories"]["Social Sciences"])])
    # a second run never overwrites the first one's results
    assert cli.main(argv) == 2
    assert "already holds results.json, results.log, lf_results.json" in capsys.readouterr().err


# ---- refused ---------------------------------------------------------------------------------------------------------

GOOD = ["What is 1 + 1?,1,2,3,4,B", "What is 2 + 1?,1,2,3,4,C", "What is 0 + 1?,1,2,3,4,A"]


def _break_column(folder):
    (folder / "test" / "s1.csv").write_text("question,A,B,D,answer\nq,1,2,3,A\n")


def _break_answer(folder):
    (folder / "test" / "s1.csv").write_text(HEADER + "\n".join(GOOD[:2] + ["What is 3 - 3?,0,1,2,3,E"]) + "\n")


def _break_cell(folder):
    (folder / "dev" / "s2.csv").write_text(HEADER + GOOD[0] + "\nWhat is 9?,,1,2,3,A\n")


def _break_quoting(folder):
    (folder / "test" / "s2.csv").write_text(HEADER + '"What is\n1 + 1?",1,2,3,4,B\n"Unclosed,1,2,3,4,B\n')


@pytest.mark.parametrize("damage, where, what", [
    (_break_column, "test/s1.csv:1", "lacks the column(s) C"),
    (_break_answer, "test/s1.csv:4 (question 3)", "answer 'E' is not one of A, B, C, D"),
    (_break_cell, "dev/s2.csv:3 (question 2)", "A is empty"),
    (_break_quoting, "test/s2.csv:4", "malformed CSV"),
    (lambda f: (f / "dev" / "s2.csv").unlink(), "dev/s2.csv is missing", "(or set n_shot: 0)"),
    (lambda f: (f / "test" / "extra.csv").write_text(HEADER + GOOD[0]), "test/extra.csv", "is not in"),
    (lambda f: (f / "test" / "s1.csv").write_text(HEADER), "test/s1.csv", "holds no questions"),
    (lambda f: (f / "mapping.json").write_text('{"s1": {"name": "one"}, "s2": {}}'), "mc/mapping.json",
     "subject 's1' maps to {'name': 'one'}"),
    (lambda f: (f / "mapping.json").write_text('{"s1": {"name": "one",\n}'), "mapping.json:2", "malformed JSON"),
    (lambda f: (f / "mapping.json").unlink(), "mc/mapping.json is missing", "a task folder names its subjects"),
    (lambda f: (f / "test" / "s1.csv").write_bytes(HEADER.encode() + "Qu\xe9?,1,2,3,4,A\n".encode("latin-1")),
     "test/s1.csv", "not UTF-8"),
])
def test_broken_task_files_are_refused_with_file_and_line(tmp_path, damage, where, what):
    folder = write_task(tmp_path, {"s1": ("c", GOOD, GOOD), "s2": ("c", GOOD, GOOD)})
    assert len(lf_eval.load_task("mc_test", str(tmp_path), n_shot=2).subjects) == 2  # intact, it loads
    damage(folder)
    with pytest.raises(DataError) as error:
        lf_eval.load_task("mc_test", str(tmp_path), n_shot=2)
    assert where in str(error.value) and what in str(error.value), str(error.value)


def test_task_names_and_options_are_checked(tmp_path, monkeypatch):
    write_task(tmp_path, {"s1": ("c", GOOD, GOOD)})
    for task, n_shot, message in [
        (None, 5, "task is missing"),
        ("mc_tset", 5, "mc has no split 'tset' (a folder of CSV files, in the task folder, its data/ or mc.zip); its "
                         "splits: test"),
        ("mv_test", 5, "no task 'mv_test' in"),
        ("mc_dev", 5, "scores the dev split, which the 5 shots are drawn from"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            lf_eval.load_task(task, str(tmp_path), n_shot=n_shot)
    with pytest.raises(ConfigError, match=re.escape("Did you mean: mc_test?")):
        lf_eval.load_task("mv_test", str(tmp_path))
    assert lf_eval.load_task("mc_dev", str(tmp_path), n_shot=0).split == "dev"
    # the default task_dir falls back to lf's own evaluation/ only for the default name
    monkeypatch.chdir(tmp_path)
    assert lf_eval.load_task("lf_mc_demo_test", "evaluation").path == DEMO
    with pytest.raises(ConfigError, match="no task 'lf_mc_demo_test'"):
        lf_eval.load_task("lf_mc_demo_test", ".")
    for key, value, message in [("lang", "fr", "lang: 'fr' is not one of en, zh"), ("n_shot", -1, "0 or more"),
                                ("batch_size", 0, "1 or more")]:
        with pytest.raises(ConfigError, match=message):
            lf_eval.check_options(SimpleNamespace(**{"lang": "en", "n_shot": 5, "batch_size": 4, "save_dir": None,
                                                     key: value}))


def test_cli_errors_are_one_line(tmp_path, capsys):
    folder = write_task(tmp_path, {"s1": ("c", GOOD, GOOD)})
    _break_answer(folder)
    base = ["eval", "model_name_or_path=lf-tiny-llama", f"task_dir={tmp_path}"]
    assert cli.main(base + ["task=mc_test"]) == 1  # the task is read before the model loads
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"lf eval: {folder}/test/s1.csv:4")
    assert cli.main(base) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lf eval: task is missing")
    assert cli.main(["eval"]) == 2 and "usage: lf eval" in capsys.readouterr().out
