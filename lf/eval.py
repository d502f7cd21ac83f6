"""`lf eval cfg.yaml [key=value ...]`: multiple-choice evaluation in the MMLU style, as LLaMA-Factory's
`llamafactory-cli eval` runs it.

Each question of the scored split is asked as a chat in the model's template (`template:`, else the tokenizer's
own): `n_shot` solved questions of the subject's dev split, drawn at random with `seed`, are the earlier turns (the
question as a user turn, its answer letter as the reply), then the question is the last user turn. The first user
turn opens with the header "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
(`lang: zh`: LLaMA-Factory's Chinese wording), and each question is written as

    <question>\\nA. <choice A>\\nB. <choice B>\\nC. <choice C>\\nD. <choice D>\\nAnswer:

The model's answer is the letter whose token has the largest logit where its reply starts (after what every reply
opens with, e.g. Qwen3's empty think block). Questions run in batches of `batch_size`, left-padded. Accuracy per
subject, per category and over all questions ("Average") is printed as a table. With `save_dir`, the files
LLaMA-Factory writes: results.json ({subject: {"<question index>": "<predicted letter>"}}) and results.log (a line
"{category:>15}: {accuracy %:.2f}" for Average, then STEM, Social Sciences, Humanities, Other and any other
category), and lf_results.json beside them (the accuracies with their counts, the predictions, the options).

The task folders (lf's own layout and LLaMA-Factory's mmlu, cmmlu and ceval folders, zipped or not) are read by
lf.eval_tasks; its docstring has the format.

Where lf differs from LLaMA-Factory: the letters' tokens are those the template's replies are encoded with
(LLaMA-Factory takes the last token of encoding each letter alone, the wrong one for " {content}" replies and
thinking templates); batches are left-padded, with positions counting real tokens; tasks are read without their
dataset script; a category outside LLaMA-Factory's four is scored (LLaMA-Factory stops on it); an existing
save_dir is written into unless it already holds results (LLaMA-Factory refuses any existing save_dir). When
n_shot is larger than a subject's dev split, all of it is used.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lf.data.conversation import ASSISTANT, USER
from lf.errors import ConfigError, ModelError, did_you_mean
from lf.eval_tasks import CHOICES, Question, Task, load_task

log = logging.getLogger("lf")

USAGE = """usage: lf eval cfg.yaml [key=value ...]

Scores a model on a multiple-choice task in the MMLU style: task (<folder>_<split>, e.g. lf_mc_demo_test, or
mmlu_test, cmmlu_test, ceval_validation with LLaMA-Factory's evaluation/ folder as task_dir), task_dir,
n_shot, batch_size, lang (en | zh), seed, save_dir, with the model keys of lf train (model_name_or_path,
adapter_name_or_path, template, ...). Start from configs/examples/eval_demo.yaml."""


@dataclass(frozen=True)
class PromptStyle:
    header: str  # opens the first user turn; {subject} is the subject's name
    choice: str  # one choice; {letter} and {content}
    answer: str  # ends each question


PROMPT_STYLES = MappingProxyType({
    "en": PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                      "\n{letter}. {content}", "\nAnswer:"),
    "zh": PromptStyle("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n{letter}. {content}", "\n答案："),
})


# ---- prompts and scores ----------------------------------------------------------------------------------------

def format_question(question: Question, style: PromptStyle) -> str:
    choices = "".join(style.choice.format(letter=letter, content=content)
                      for letter, content in zip(CHOICES, question.choices))
    return question.text + choices + style.answer


def build_messages(question: Question, shots, subject_name: str, style: PromptStyle) -> list[dict]:
    """The chat asking `question`: each shot a user turn answered by its letter, then the question as the last user
    turn; the header opens the first user turn (LLaMA-Factory's layout)."""
    messages = []
    for shot in shots:
        messages += [{"role": USER, "content": format_question(shot, style)},
                     {"role": ASSISTANT, "content": shot.answer}]
    messages.append({"role": USER, "content": format_question(question, style)})
    messages[0]["content"] = style.header.format(subject=subject_name) + messages[0]["content"]
    return messages


def answer_tokens(template, tokenizer) -> tuple[list[int], list[int]]:
    """(the ids every reply opens with before its letter, the id of each letter A-D), read off the template's
    encoding of replies "A".."D": the letter is scored where the model writes it (after " " in templates whose reply
    is " {content}", after Qwen3's empty think block)."""
    chat = [{"role": USER, "content": "?"}]
    replies = [template.encode_oneturn(tokenizer, chat + [{"role": ASSISTANT, "content": letter}])[1]
               for letter in CHOICES]
    opening = 0
    while all(len(r) > opening for r in replies) and len({r[opening] for r in replies}) == 1:
        opening += 1
    letters = [r[opening] if len(r) > opening else None for r in replies]
    if None in letters or len(set(letters)) != len(CHOICES):
        raise ModelError(f"the tokenizer does not write the letters {', '.join(CHOICES)} as four different tokens "
                         f"in a reply of template {template.name!r} (replies: {replies}), so they cannot be scored: "
                         f"use a template and tokenizer that do")
    return replies[0][:opening], letters


def encode_prompt(template, tokenizer, messages: list[dict], opening: list[int]) -> list[int]:
    """The ids of the chat through the point where the model writes its answer letter."""
    prompt, _ = template.encode_oneturn(tokenizer, messages + [{"role": ASSISTANT, "content": CHOICES[0]}])
    return prompt + opening


def letter_logits(model, prompts: list[list[int]], letter_ids: list[int], pad_id: int):
    """(len(prompts), 4) float32 logits of the letters' tokens after each prompt, the prompts left-padded into one
    batch."""
    import torch

    from lf.data.collator import left_padded

    ids, mask = left_padded(prompts, pad_id)
    # positions count real tokens only, as HF's generate (pads get 1): RoPE ignores the offset, learned absolute
    # positions do not, and lf's packed attention must not read the pads' zeros as restarting examples
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, logits_to_keep=1).logits
    return logits[:, -1, letter_ids].float().cpu()


def evaluate(model, tokenizer, template, task: Task, *, n_shot: int = 5, batch_size: int = 4, lang: str = "en",
             seed: int = 42) -> dict:
    """Scores `model` on `task` (see the module docstring); returns results.json's content."""
    from tqdm.auto import tqdm

    style = PROMPT_STYLES[lang]
    opening, letter_ids = answer_tokens(template, tokenizer)
    pad_id = tokenizer.pad_token_id or 0  # masked out: any id does where the tokenizer has no pad token
    subjects, categories = {}, {}
    bar = tqdm(task.subjects, desc="subjects", unit="subject")
    for subject in bar:
        bar.set_postfix_str(subject.key)
        rng = random.Random(f"{seed}/{subject.key}")  # a subject's shots do not depend on the other subjects
        prompts = [encode_prompt(template, tokenizer, build_messages(
            question, rng.sample(subject.dev, min(n_shot, len(subject.dev))), subject.name, style), opening)
            for question in subject.questions]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # like lengths share a batch: less padding
        predictions = [""] * len(prompts)
        for start in tqdm(range(0, len(order), batch_size), desc=subject.key, unit="batch", leave=False):
            rows = order[start:start + batch_size]
            scores = letter_logits(model, [prompts[i] for i in rows], letter_ids, pad_id)
            for i, best in zip(rows, scores.argmax(-1).tolist()):
                predictions[i] = CHOICES[best]
        correct = sum(p == q.answer for p, q in zip(predictions, subject.questions))
        subjects[subject.key] = {"name": subject.name, "category": subject.category,
                                 **_score(correct, len(predictions)), "predictions": predictions}
        counts = categories.setdefault(subject.category, [0, 0])
        counts[0] += correct
        counts[1] += len(predictions)
    total = [sum(c[0] for c in categories.values()), sum(c[1] for c in categories.values())]
    return {"task": task.name, "split": task.split, "n_shot": n_shot, "lang": lang, "seed": seed, "subjects": subjects,
            "categories": {name: _score(*counts) for name, counts in categories.items()}, "average": _score(*total)}


def _score(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total}


def format_table(results: dict) -> str:
    """Accuracy (%) per subject, per category (the rows without a subject) and on average, as aligned text."""
    parts = [[(key, s["category"], s) for key, s in results["subjects"].items()],
             [("", name, c) for name, c in results["categories"].items()],
             [("Average", "", results["average"])]]
    first = max(len("subject"), *(len(name) for part in parts for name, _, _ in part))
    second = max(len("category"), *(len(category) for part in parts for _, category, _ in part))

    def line(name, category, questions, accuracy) -> str:
        return f"{name:<{first}}  {category:<{second}}  {questions:>9}  {accuracy:>12}"

    out = [line("subject", "category", "questions", "accuracy (%)")]
    for part in parts:
        out.append("-" * len(out[0]))
        out += [line(name, category, s["total"], f"{100 * s['accuracy']:.2f}") for name, category, s in part]
    return "\n".join(out)


# ---- the command -----------------------------------------------------------------------------------------------

RESULT_FILES = ("results.json", "results.log", "lf_results.json")
CATEGORY_ORDER = ("STEM", "Social Sciences", "Humanities", "Other")  # LLaMA-Factory's, after "Average"


def score_lines(results: dict) -> str:
    """results.log as LLaMA-Factory writes it: "Average" and each category's accuracy (%), its categories first."""
    categories = results["categories"]
    names = [name for name in CATEGORY_ORDER if name in categories]
    names += [name for name in categories if name not in CATEGORY_ORDER]
    rows = [("Average", results["average"])] + [(name, categories[name]) for name in names]
    return "\n".join(f"{name:>15}: {100 * score['accuracy']:.2f}" for name, score in rows)


def predictions_by_subject(results: dict) -> dict:
    """results.json as LLaMA-Factory writes it: {subject: {"<question index>": "<predicted letter>"}}."""
    return {key: {str(i): letter for i, letter in enumerate(subject["predictions"])}
            for key, subject in results["subjects"].items()}


def check_options(evaluation) -> None:
    """The evaluation group's values lf eval can run, before anything loads."""
    if evaluation.lang not in PROMPT_STYLES:
        raise ConfigError(f"lang: {evaluation.lang!r} is not one of {', '.join(PROMPT_STYLES)} (the prompt's language)."
                          f"{did_you_mean(evaluation.lang, PROMPT_STYLES)}")
    if evaluation.n_shot < 0:
        raise ConfigError(f"n_shot: {evaluation.n_shot} must be 0 or more (solved examples before each question)")
    if evaluation.batch_size < 1:
        raise ConfigError(f"batch_size: {evaluation.batch_size} must be 1 or more (questions per forward pass)")
    if evaluation.save_dir:
        taken = [name for name in RESULT_FILES if (Path(evaluation.save_dir) / name).exists()]
        if taken:
            raise ConfigError(f"save_dir: {evaluation.save_dir} already holds {', '.join(taken)} of an earlier "
                              f"evaluation: choose another save_dir, or remove them to write new ones")


def save_results(results: dict, save_dir: str) -> list[Path]:
    """results.json and results.log as LLaMA-Factory writes them, and lf_results.json (all of `results`), in
    save_dir; returns their paths."""
    folder = Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in RESULT_FILES]
    paths[0].write_text(json.dumps(predictions_by_subject(results), indent=2), encoding="utf-8")
    paths[1].write_text(score_lines(results), encoding="utf-8")
    paths[2].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def run(cfg) -> dict:
    """`lf eval` for an InferConfig (lf.config.parse_infer_args): loads the task, the tokenizer with its template
    and the model, scores, prints the table and writes save_dir's files. Returns the results."""
    from lf.data import fit_template
    from lf.model import load_inference_model, load_tokenizer

    evaluation = cfg.evaluation
    check_options(evaluation)
    task = load_task(evaluation.task, evaluation.task_dir, evaluation.n_shot)  # a bad task fails before the model loads
    log.info("task %s: %d subjects from %s (split %s)", task.name, len(task.subjects), task.path, task.split)
    tokenizer = load_tokenizer(cfg.model)
    template = fit_template(tokenizer, cfg.data)
    model = load_inference_model(tokenizer, cfg.model, cfg.finetuning)
    results = evaluate(model, tokenizer, template, task, n_shot=evaluation.n_shot, batch_size=evaluation.batch_size,
                       lang=evaluation.lang, seed=evaluation.seed)
    results["model"] = cfg.model.model_name_or_path
    results["adapter"] = cfg.model.adapter_name_or_path
    table = format_table(results)
    print(table)
    if evaluation.save_dir:
        for path in save_results(results, evaluation.save_dir):
            print(f"lf eval: wrote {path}")
    return results


def command(argv: list[str]) -> int:
    """`lf eval cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors)."""
    from lf.config import parse_infer_args

    run(parse_infer_args(argv, "eval"))
    return 0
