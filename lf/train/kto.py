"""The kto recipe: replies flagged desirable or not (a kto_tag column) train a policy towards the desirable ones,
against the reference, shifted by the KL estimate of KTO's paper: the policy's and the reference's
log-probabilities of mismatched pairs (each prompt with another row's reply), under no_grad. sft.py's steps over
lf's feedback data; the trainer, reference and recipe are lf.train.preference's."""

from __future__ import annotations

from lf.train.preference import LogpsTrainer, media, run_logps
from lf.train.reference import eval_mode


class KTOTrainer(LogpsTrainer):
    """The kto loss of each reply against the reference, shifted by the KL estimate from mismatched pairs (the mean
    over the batch, across processes, of policy - reference log-probabilities, clamped at 0)."""

    @staticmethod
    def loss_kind(fin) -> str:
        return "kto"

    def pair_loss(self, model, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        kl_ids, kl_mask, kl_labels = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
        inputs, kl_inputs = media(batch), media(batch, "kl_")
        with eval_mode(model):  # a detached baseline: neither dropout nor gradient checkpointing has a part in it
            policy_kl = self._logps(model, kl_ids, kl_mask, kl_labels, kl_inputs)
        with self._as_reference(model) as ref:
            reference = self._logps(ref, ids, mask, labels, inputs)
            reference_kl = self._logps(ref, kl_ids, kl_mask, kl_labels, kl_inputs)
        kl = self.accelerator.gather_for_metrics((policy_kl - reference_kl).mean().detach()).mean().clamp(min=0)
        out = self._policy_loss(model, ids, mask, labels, reference, inputs, desirable=batch["kto_tags"].bool(),
                                kl=kl)
        return out.loss, {**out.metrics, "kl": kl.reshape(1)}


def run_kto(cfg, callbacks=()) -> dict:
    """Trains and evaluates as `cfg` says; returns what was written where, for the CLI to print."""
    return run_logps(cfg, KTOTrainer, callbacks)
