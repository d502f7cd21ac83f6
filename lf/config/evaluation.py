"""The evaluation group: `lf eval`'s multiple-choice tasks (LLaMA-Factory's key names)."""

from dataclasses import dataclass


@dataclass
class EvaluationArguments:
    task: str | None = None  # <folder>_<split> under task_dir: lf_mc_demo_test, mmlu_test (lf/eval_tasks.py)
    task_dir: str = "evaluation"  # relative to the working dir; this default falls back to lf's own evaluation/
    batch_size: int = 4  # questions per forward pass
    seed: int = 42  # draws each question's shots from the dev split
    lang: str = "en"  # the prompt's language: en | zh
    n_shot: int = 5  # solved examples from the task's dev split before each question
    save_dir: str | None = None  # results.json, results.log (LLaMA-Factory's), lf_results.json; None: printed
