"""The dpo recipe: prompts with a chosen and a rejected reply train a policy that prefers the chosen ones, by the
loss of `pref_loss` (sigmoid | hinge | ipo | kto_pair | orpo | simpo: lf.kernels.fused_linear_preference_loss
gives the formulas) over the log-probabilities of both replies under the policy and the reference (orpo and simpo
use none). sft.py's steps over lf's pairwise data; the trainer, reference and recipe are lf.train.preference's."""

from __future__ import annotations

import torch

from lf.kernels.fused_linear_preference_loss import REFERENCE_FREE, PreferenceLoss, preference_loss
from lf.train.preference import LogpsTrainer, loss_options, media, pairs, run_logps


def dpo_loss(fin, sums, tokens, ref_sums=None, baseline=None) -> PreferenceLoss:
    """A batch's dpo loss (the mean over its pairs) and per-pair metrics, from the summed log-probabilities of its
    sequences (the chosen rows, then the rejected ones), their reply token counts and the reference's sums
    (`baseline`: BCO's RewardBaseline, with pref_bco_weight)."""
    return preference_loss(fin.pref_loss, sums, tokens, ref_sums, **loss_options(fin), baseline=baseline)


class RewardBaseline:
    """BCO's delta (pref_bco_weight): the running mean of the batches' mean rewards, each batch's mean first averaged
    over the processes (`gather`), every batch counting once, this one included (TRL's RunningMoments as
    LLaMA-Factory updates it: once per loss computed, in training and evaluation alike). Not saved in checkpoints:
    a resumed run starts it afresh, as LLaMA-Factory does."""

    def __init__(self, gather=lambda t: t):
        self.gather, self.total, self.count = gather, 0.0, 0

    def __call__(self, mean_reward: torch.Tensor) -> float:
        self.total += float(self.gather(mean_reward.reshape(1).float()).mean())
        self.count += 1
        return self.total / self.count


class DPOTrainer(LogpsTrainer):
    """The loss of `pref_loss` over the policy's (and the reference's) log-probabilities of both replies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.baseline = RewardBaseline(self.accelerator.gather)

    @staticmethod
    def loss_kind(fin) -> str:
        return fin.pref_loss

    def pair_loss(self, model, batch):
        ids, mask, labels = pairs(batch, self.data_collator.pad_token_id)
        inputs, reference = media(batch), None
        if self.finetuning_args.pref_loss not in REFERENCE_FREE:
            with self._as_reference(model) as ref:
                reference = self._logps(ref, ids, mask, labels, inputs)
        out = self._policy_loss(model, ids, mask, labels, reference, inputs, ld_alpha=self.finetuning_args.ld_alpha,
                                baseline=self.baseline)
        return out.loss, out.metrics


def run_dpo(cfg, callbacks=()) -> dict:
    """Trains and evaluates as `cfg` says; returns what was written where, for the CLI to print."""
    return run_logps(cfg, DPOTrainer, callbacks)
