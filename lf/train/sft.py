"""The pt and sft recipe: lf.train.recipe's steps with LFTrainer and lf's collator (padding, or packed rows), token
accuracy at evaluation (compute_accuracy, lf.train.accuracy), the reference model of use_asft_loss, then the answers to eval_dataset generated with the
model (do_predict, lf.train.predict)."""

from __future__ import annotations

from lf.train.accuracy import TokenAccuracy, predicted_ids
from lf.train.predict import predict
from lf.train.recipe import make_trainer, prepare, train_and_save
from lf.train.reference import reference_model
from lf.train.trainer import LFTrainer


def run_sft(cfg, callbacks=()) -> dict:
    """Trains, evaluates and predicts as `cfg` says; returns what was written where, for the CLI to print."""
    parts = prepare(cfg)
    extra = (dict(compute_metrics=TokenAccuracy(), preprocess_logits_for_metrics=predicted_ids)
             if cfg.finetuning.compute_accuracy else {})
    if cfg.finetuning.use_asft_loss:  # ASFT's KL term compares with a reference model
        extra["ref_model"] = reference_model(parts.tokenizer, parts.model, cfg, "asft")
    trainer = make_trainer(LFTrainer, cfg, parts, **extra)
    outputs = train_and_save(trainer, cfg, parts, callbacks, perplexity=True)
    if cfg.training.do_predict:  # after training: the trained model answers
        outputs.update(predict(trainer, cfg, parts.tokenizer, parts.template))
    return outputs
