"""What the preference recipes share (rm.py, dpo.py, kto.py): a trainer over batches of pairs that logs per-pair
metrics beside the loss (PairTrainer), and for the stages that train on log-probabilities (lf.stages' `logps`:
dpo, kto) the trainer base, the reference model and the recipe itself (run_logps), over lf.model.logps.

The reference model is lf.train.reference's.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F

from lf.data.collator import MEDIA, TOKENS_KEY
from lf.kernels.fused_linear_preference_loss import PreferenceLoss
from lf.labels import IGNORE_INDEX
from lf.model.logps import choose
from lf.train.recipe import make_trainer, prepare, train_and_save
from lf.train.reference import reference_model
from lf.train.trainer import LFTrainer

log = logging.getLogger("lf")


def loss_options(fin) -> dict:
    """fused_linear_preference_loss's options from the finetuning group."""
    return dict(beta=fin.pref_beta, gamma=fin.simpo_gamma, label_smoothing=fin.dpo_label_smoothing, ftx=fin.pref_ftx,
                desirable_weight=fin.kto_chosen_weight, undesirable_weight=fin.kto_rejected_weight,
                bco_weight=fin.pref_bco_weight)


def pairs(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels of the chosen rows followed by the rejected ones (one forward for both)."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(name, pad):
        return torch.cat([F.pad(batch[f"{side}_{name}"], (0, length - batch[f"{side}_{name}"].shape[1]), value=pad)
                          for side in ("chosen", "rejected")])

    return both("input_ids", pad_id), both("attention_mask", 0), both("labels", IGNORE_INDEX)


def media(batch: dict, prefix: str = "") -> dict:
    """The other inputs of a forward over the batch's rows of group `prefix` ("": the pairs' concatenated rows, or
    kto's rows; "kl_": kto's mismatched pairs): a vision-language model's pixel_values and the like, or none."""
    return batch.get(f"{prefix}{MEDIA}") or {}


class PairTrainer(LFTrainer):
    """lf's trainer over batches of pairs. A subclass's `pair_loss(model, batch)` returns the batch's loss (a mean
    over its pairs) and per-pair metrics, which are averaged between logs and logged beside the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # a mean over one micro-batch: HF divides it by the accumulation steps
        self._metrics = {True: defaultdict(list), False: defaultdict(list)}  # by model.training
        self._eval_prefix = "eval"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = inputs.pop(TOKENS_KEY, None)
        if tokens is not None and model.training:
            self.tokens_seen += int(tokens)
        loss, metrics = self.pair_loss(model, inputs)
        for name, values in metrics.items():  # (kto's per-kind rewards may be empty in a batch)
            gathered = self.accelerator.gather_for_metrics(values.detach().float())
            if gathered.numel():
                self._metrics[model.training][name].append(gathered.mean().item())
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **kwargs):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **kwargs):
        self._eval_prefix = metric_key_prefix  # one per eval set with eval_on_each_dataset
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)

    def log(self, logs, start_time=None):
        training = self.model.training
        prefix = "" if training else f"{self._eval_prefix}_"
        metrics = {f"{prefix}{name}": sum(v) / len(v) for name, v in self._metrics[training].items() if v}
        self._metrics[training].clear()
        if metrics and self.is_world_process_zero():
            log.info("step %d: %s", self.state.global_step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        logs.update(metrics)  # in place: evaluate() returns this dict (eval_results.json)
        super().log(logs, start_time)


class LogpsTrainer(PairTrainer):
    """dpo and kto: log-probabilities of the labelled tokens, per sequence, under the policy and the reference,
    from `logps` (lf.model.logps: lf's fused op or TRL's fused head). A subclass names its loss (`loss_kind`)."""

    @staticmethod
    def loss_kind(fin) -> str:
        """The kind of lf.kernels.fused_linear_preference_loss this trainer's stage trains with."""
        raise NotImplementedError

    def __init__(self, *args, logps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.logps = logps

    def _policy_loss(self, model, ids, mask, labels, reference, inputs=None, **options) -> PreferenceLoss:
        """The stage's loss over the policy's log-probabilities of these sequences (`inputs`: the forward's
        media, if any)."""
        fin = self.finetuning_args
        return self.logps.loss(model, ids, mask, labels, self.loss_kind(fin), reference,
                               self.accelerator.unwrap_model(model), inputs, **{**loss_options(fin), **options})

    def _logps(self, model, ids, mask, labels, inputs=None) -> torch.Tensor:
        """Summed log-probabilities, without gradient."""
        with torch.no_grad():
            return self.logps.of(model, ids, mask, labels, self.accelerator.unwrap_model(model), inputs)

def run_logps(cfg, trainer_class, callbacks=()) -> dict:
    """dpo or kto as `cfg` says, with `trainer_class`; returns what was written where, like run_sft."""
    parts = prepare(cfg)
    model, tokenizer = parts.model, parts.tokenizer
    logps, line = choose(model, cfg.model, cfg.finetuning.stage)
    reference = reference_model(tokenizer, model, cfg, trainer_class.loss_kind(cfg.finetuning))
    logps.prepare(model, reference)
    log.info("%s", line)
    trainer = make_trainer(trainer_class, cfg, parts, ref_model=reference, logps=logps)
    return train_and_save(trainer, cfg, parts, callbacks)
