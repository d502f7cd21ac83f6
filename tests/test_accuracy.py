"""compute_accuracy: LLaMA-Factory's token accuracy at evaluation, from the logits' argmax."""

import json

import numpy as np
import torch
from transformers import EvalPrediction

from lf.config import parse_train_args
from lf.train import run
from lf.train.accuracy import TokenAccuracy, predicted_ids
from tests.test_train import lf_home, options  # noqa: F401 (lf_home: the module's LF_HOME fixture)

IGNORE = -100


def _expected(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The definition, token by token: position t's argmax guesses label t + 1; per example the share right."""
    shares = []
    for row_logits, row_labels in zip(logits, labels):
        hits = [int(row_logits[t].argmax()) == int(row_labels[t + 1]) for t in range(len(row_labels) - 1)
                if row_labels[t + 1] != IGNORE]
        if hits:
            shares.append(sum(hits) / len(hits))
    return sum(shares) / len(shares)


def test_token_accuracy_matches_the_definition_whole_and_batch_by_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 5, generator=g)
    labels = torch.randint(0, 5, (6, 9), generator=g)
    labels[:, :3] = IGNORE  # prompts
    labels[2] = IGNORE  # an example without label tokens: left out
    labels[4, :] = logits[4].argmax(-1).roll(1)  # one the model gets all right
    ids = predicted_ids((logits, torch.zeros(1)), labels)  # with another output beside the logits
    assert ids.shape == labels.shape and not ids.is_floating_point()  # what HF keeps: ids, not logits
    expected = _expected(logits, labels)
    assert abs(TokenAccuracy()(EvalPrediction(ids.numpy(), labels.numpy()))["accuracy"] - expected) < 1e-12
    metric = TokenAccuracy()  # batch_eval_metrics: one call per batch, the result at the last
    assert metric(EvalPrediction(ids[:4], labels[:4]), compute_result=False) is None
    assert abs(metric(EvalPrediction(ids[4:], labels[4:]), compute_result=True)["accuracy"] - expected) < 1e-12
    assert 0 < expected < 1 and np.isclose(_expected(logits[4:5], labels[4:5]), 1.0)


def test_compute_accuracy_reports_eval_accuracy(tmp_path):
    out = tmp_path / "out"
    run(parse_train_args(options(out, max_steps=1, val_size=4, do_eval=True, compute_accuracy=True,
                                 predict_with_generate=True)))  # evaluation still scores logits, never generates
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and "eval_loss" in results
