"""compute_accuracy (sft): token accuracy at evaluation, LLaMA-Factory's ComputeAccuracy. Per example, the share of
its label tokens that the model's most likely next token (the logits' argmax at t, for the label at t + 1) equals;
`accuracy` is the mean over the examples that have label tokens (LLaMA-Factory's mean would be nan with one that
has none).

Memory: HF's Trainer hands each eval batch's logits to `predicted_ids` (its preprocess_logits_for_metrics) and keeps
only what it returns, the argmax ids, (batch, tokens) integers instead of (batch, tokens, vocabulary) floats; with
`batch_eval_metrics: true` not even those are kept past their batch (TokenAccuracy adds up as it goes).
"""

from __future__ import annotations

import numpy as np
import torch

from lf.labels import IGNORE_INDEX


def predicted_ids(logits, labels) -> torch.Tensor:
    """The most likely token at each position (logits may come in a tuple with other outputs, e.g. an MoE's
    router logits)."""
    if isinstance(logits, (tuple, list)):
        logits = next(t for t in logits if isinstance(t, torch.Tensor) and t.dim() == 3)
    return logits.argmax(-1)


class TokenAccuracy:
    """compute_metrics: {"accuracy": mean per-example token accuracy}; accumulates over calls with
    compute_result=False (batch_eval_metrics) and reports at the first call with compute_result=True."""

    def __init__(self):
        self.scores: list[float] = []

    def __call__(self, eval_pred, compute_result: bool = True) -> dict[str, float] | None:
        predictions, labels = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
                               for x in (eval_pred.predictions, eval_pred.label_ids))
        for predicted, label in zip(predictions[:, :-1], labels[:, 1:]):
            scored = label != IGNORE_INDEX
            if scored.any():
                self.scores.append(float((predicted[scored] == label[scored]).mean()))
        if not compute_result:
            return None
        result, self.scores = {"accuracy": float(np.mean(self.scores)) if self.scores else 0.0}, []
        return result
