"""What a user sees of a training run: one plain line per logging step, `trainer_log.jsonl` (LLaMA-Factory's keys,
which its tools read), a progress bar with loss, learning rate and tokens/s, and a guard that stops the run at the
first loss that is not a number."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import timedelta

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

log = logging.getLogger("lf")
LOG_FILE = "trainer_log.jsonl"


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class RunLog(TrainerCallback):
    """Appends one JSON line per log to output_dir/trainer_log.jsonl and logs it in words. A resumed run keeps the
    lines up to its checkpoint (the whole history, each step once) and goes on counting total_tokens and
    elapsed_time from its last kept line. Tokens/s and the time left come from this process's own steps: the real
    (non-padding) tokens the trainer saw (`trainer.tokens_seen`) since it started training."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.start = None
        self.start_tokens = self.start_step = 0
        self.before = {}  # the last line kept from the run this one resumes

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_tokens = time.perf_counter(), self.trainer.tokens_seen
        self.start_step = state.global_step  # (the step resumed from; 0 for a fresh run)
        if state.is_world_process_zero:
            self.before = _keep_until(self._path(args), state.global_step)

    @staticmethod
    def _path(args) -> str:
        return os.path.join(args.output_dir, LOG_FILE)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.start is None or not logs or not {"loss", "eval_loss"} & set(logs):
            return  # (the end-of-training summary goes to all_results.json)
        elapsed = time.perf_counter() - self.start
        done = max(state.global_step - self.start_step, 1)
        tokens = self.trainer.tokens_seen - self.start_tokens
        remaining = elapsed / done * max(state.max_steps - state.global_step, 0)
        record = {"current_steps": state.global_step, "total_steps": state.max_steps,
                  "loss": logs.get("loss"), "eval_loss": logs.get("eval_loss"), "lr": logs.get("learning_rate"),
                  "epoch": logs.get("epoch", state.epoch),
                  "percentage": round(100 * state.global_step / state.max_steps, 2) if state.max_steps else 0,
                  "total_tokens": self.before.get("total_tokens", 0) + tokens,
                  "throughput": round(tokens / elapsed, 2) if elapsed else 0,
                  "elapsed_time": _duration(_seconds(self.before.get("elapsed_time")) + elapsed),
                  "remaining_time": _duration(remaining)}
        record = {k: v for k, v in record.items() if v is not None}
        os.makedirs(args.output_dir, exist_ok=True)
        with open(self._path(args), "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trainer.last_record = record
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{name} {logs[key]:.4g}" for key, name in (("loss", "loss"), ("eval_loss", "eval loss"),
                                                              ("learning_rate", "lr")) if key in logs]
        if "loss" in logs:
            parts.append(f"{record['throughput']:,.0f} tokens/s")
            parts.append(f"{record['elapsed_time']} elapsed, {record['remaining_time']} left")
        log.info("%s", ", ".join(parts))


def _seconds(duration: str | None) -> int:
    """_duration's "[D day(s), ]H:MM:SS" back to seconds; 0 for none."""
    if not duration:
        return 0
    days, _, clock = duration.rpartition(", ")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return (int(days.split()[0]) if days else 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def _keep_until(path: str, step: int) -> dict:
    """The log keeps its lines up to `step` and drops the later ones: those of a killed run past the checkpoint this
    run resumes from, which this run logs again (each step once). A fresh run (step 0) starts a fresh log. Returns
    the last kept training line ({} for none): where the resumed run's counts go on from."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = f.readlines()
    kept = [line.rstrip("\n") + "\n" for line in lines if _step(line) is not None and _step(line) <= step]
    if not kept:
        os.remove(path)
    elif kept != lines:
        _replace(path, kept)
    counted = [record for record in map(json.loads, kept) if "total_tokens" in record]
    return counted[-1] if counted else {}


def _replace(path: str, lines: list[str]) -> None:
    staged = f"{path}.{os.getpid()}"  # replaced in one rename: a kill now keeps the old log whole
    with open(staged, "w") as f:
        f.writelines(lines)
    os.replace(staged, path)


def _step(line: str) -> int | None:
    """The step a log line records; None for a line a kill cut short."""
    try:
        return json.loads(line)["current_steps"]
    except (ValueError, KeyError, TypeError):
        return None


class Progress(ProgressCallback):
    """HF's progress bar, showing loss, learning rate and tokens/s instead of printing every log dict."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs or "loss" not in logs:
            return
        record = getattr(self.trainer, "last_record", {})
        self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                      tok_s=f"{record.get('throughput', 0):,.0f}", refresh=False)


class LossGuard(TrainerCallback):
    """Stops at the first step whose loss is nan or inf (the trainer flags it), without saving that step:
    the last checkpoint stays the last good one. The recipe then raises TrainError."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _check(self, control, loss=None):
        if loss is not None and not math.isfinite(loss) and self.trainer.nonfinite_step is None:
            self.trainer.nonfinite_step = self.trainer.state.global_step
        if self.trainer.nonfinite_step is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._check(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        return self._check(control, (logs or {}).get("loss"))


class ReleaseFreedMemory(TrainerCallback):
    """cpu_allocator: tuned on the CPU: freed heap goes back to the OS at a step's end once the resident set has
    grown by a tenth past a step's working size (lf.allocator.GrowthRelease; why there)."""

    def __init__(self, releaser=None):
        from lf import allocator

        self.releaser = releaser or allocator.GrowthRelease()

    def on_step_end(self, args, state, control, **kwargs):
        if self.releaser.check() and self.releaser.releases == 1:
            log.info("CPU allocator: freed memory went back to the OS after step %d: it does whenever the resident "
                     "set has grown by a tenth past a step's working size, which bounds the heap's fragmentation",
                     state.global_step)
