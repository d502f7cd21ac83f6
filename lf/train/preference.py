"""The rm and dpo recipes: prompts with two replies, one chosen and one rejected, train a reward model (rm) or a
policy that prefers the chosen reply (dpo). The steps are sft.py's (tokenizer and template -> datasets -> model
-> trainer -> train, save, evaluate, plot) over lf's pairwise data; only the trainer's loss differs.

dpo, from the log-probabilities of the reply tokens under the trained model (policy, p) and the reference (q),
per reply: summed for sigmoid and hinge, per-token means for ipo, orpo and simpo (MEAN_LOGPS). With
d = (p_chosen - q_chosen) - (p_rejected - q_rejected), beta = pref_beta, e = dpo_label_smoothing:
  sigmoid  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)       (DPO; with e > 0, conservative DPO)
  hinge    max(0, 1 - beta d)
  ipo      (d - 1 / (2 beta))^2
  simpo    sigmoid's form over beta (p_chosen - p_rejected) - simpo_gamma                       (no reference)
  orpo     -p_chosen - beta log sigmoid(log odds(chosen) - log odds(rejected)), odds = P / (1 - P),
           P = exp(mean log-probability): an sft term and an odds-ratio term                    (no reference)
pref_ftx adds pref_ftx x the chosen reply's mean negative log-likelihood to any of them. The reference is the
model as it starts: with LoRA the same model with its adapter switched off (no second copy of the weights), with
full or freeze a frozen copy; `ref_model` names another model instead. The log-probabilities come from TRL's
fused LM head, which projects the hidden states onto the vocabulary in tiles and never holds the whole logits: a
dpo run checks that TRL is a version lf was tested with (TESTED_TRL).

rm: the model with a value head (transformers' XForSequenceClassification, one label: `score`, trained fully and,
with LoRA, saved beside the adapter) scores the last token of each sequence; loss -log sigmoid(r_chosen -
r_rejected), and the share of pairs scored the right way round is logged as `accuracy`.

Both log their per-pair metrics beside the loss (trainer_state.json's log_history, the trackers, one line each).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
from collections import defaultdict

import torch
import torch.nn.functional as F

from lf.config.rules import REFERENCE_FREE
from lf.data import collator
from lf.data.collator import TOKENS_KEY
from lf.data.processors import IGNORE_INDEX
from lf.data.registry import dataset_attrs
from lf.errors import DataError, ModelError, TrainError
from lf.model import load_model
from lf.train.recipe import prepare, train_and_save
from lf.train.trainer import LFTrainer

log = logging.getLogger("lf")
TESTED_TRL = ("1.16", "1.17")  # from, up to (excluded): add_fused_lm_head's call and output as lf uses them
MEAN_LOGPS = ("ipo", "orpo", "simpo")  # losses over per-token mean log-probabilities (the others: sums)


# ---- losses ----------------------------------------------------------------------------------------------------

def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _logistic(margin: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)


def preference_loss(kind: str, chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta: float,
                    gamma: float = 0.5, smoothing: float = 0.0):
    """Per-pair losses of `pref_loss` `kind` and the rewards they give the chosen and rejected replies, from
    per-reply log-probabilities of the policy and the reference (None for orpo and simpo): sums, or per-token
    means for the kinds in MEAN_LOGPS. The formulas are in the module docstring."""
    chosen, rejected = chosen.float(), rejected.float()
    if kind not in REFERENCE_FREE:
        chosen, rejected = chosen - ref_chosen.float(), rejected - ref_rejected.float()  # log-ratios to the reference
    delta = chosen - rejected
    if kind == "sigmoid":
        losses = _logistic(beta * delta, smoothing)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif kind == "simpo":
        losses = _logistic(beta * delta - gamma, smoothing)
    elif kind == "orpo":
        log_odds = delta - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -chosen - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown pref_loss {kind!r}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def dpo_loss(fin, sums, tokens, ref_sums=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch's dpo loss (the mean over its pairs) and per-pair metrics, from the summed log-probabilities of its
    sequences (the chosen rows, then the rejected ones), their reply token counts and the reference's sums."""
    tokens = tokens.clamp(min=1)
    per_reply = (lambda s: s / tokens) if fin.pref_loss in MEAN_LOGPS else (lambda s: s)
    policy = per_reply(sums)
    reference = per_reply(ref_sums).chunk(2) if ref_sums is not None else (None, None)
    losses, chosen_reward, rejected_reward = preference_loss(
        fin.pref_loss, *policy.chunk(2), *reference, beta=fin.pref_beta, gamma=fin.simpo_gamma,
        smoothing=fin.dpo_label_smoothing)
    chosen_mean = (sums / tokens).chunk(2)[0]
    loss = (losses - fin.pref_ftx * chosen_mean).mean()
    chosen_logps, rejected_logps = policy.detach().chunk(2)
    return loss, {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                  "rewards/accuracies": (chosen_reward > rejected_reward).float(),
                  "rewards/margins": chosen_reward - rejected_reward,
                  "logps/chosen": chosen_logps, "logps/rejected": rejected_logps}


# ---- trainers ----------------------------------------------------------------------------------------------------

def _pairs(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels of the chosen rows followed by the rejected ones (one forward for both)."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(name, pad):
        return torch.cat([F.pad(batch[f"{side}_{name}"], (0, length - batch[f"{side}_{name}"].shape[1]), value=pad)
                          for side in ("chosen", "rejected")])

    return both("input_ids", pad_id), both("attention_mask", 0), both("labels", IGNORE_INDEX)


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
        for name, values in metrics.items():
            gathered = self.accelerator.gather_for_metrics(values.detach().float())
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


class PreferenceTrainer(PairTrainer):
    """dpo: the loss of `pref_loss` over the policy's (and the reference's) log-probabilities of both replies."""

    def __init__(self, *args, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None

    def pair_loss(self, model, batch):
        ids, mask, labels = _pairs(batch, self.data_collator.pad_token_id)
        sums, tokens = _reply_logps(model, ids, mask, labels)
        reference = None
        if self.finetuning_args.pref_loss not in REFERENCE_FREE:
            reference = self._reference_logps(model, ids, mask, labels)
        return dpo_loss(self.finetuning_args, sums, tokens, reference)

    def _reference_logps(self, model, ids, mask, labels) -> torch.Tensor:
        """The reference's summed log-probabilities: in eval mode (no dropout, no gradient checkpointing)."""
        reference = self.ref_model if self.ref_model is not None else model
        adapter_off = (self.accelerator.unwrap_model(model).disable_adapter() if self.ref_model is None
                       else contextlib.nullcontext())
        was_training = reference.training
        reference.eval()
        try:
            with torch.no_grad(), adapter_off:
                return _reply_logps(reference, ids, mask, labels)[0]
        finally:
            reference.train(was_training)


def _reply_logps(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its labelled tokens (TRL's fused head: zero elsewhere), and
    their count."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)


class RewardTrainer(PairTrainer):
    """rm: a score per sequence from the value head; the chosen reply should score higher."""

    def pair_loss(self, model, batch):
        ids, mask, _ = _pairs(batch, self.data_collator.pad_token_id)
        scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        return loss, {"accuracy": (chosen > rejected).float(), "rewards/chosen": chosen, "rewards/rejected": rejected}


# ---- the recipe ----------------------------------------------------------------------------------------------------

def check_trl(installed: str | None) -> None:
    """A TrainError unless `installed` (TRL's version, None when missing) is in TESTED_TRL's range."""
    from packaging.version import Version

    low, high = TESTED_TRL
    if installed is not None and Version(low) <= Version(installed) < Version(high):
        return
    found = f"TRL {installed} is installed" if installed else "TRL is not installed"
    raise TrainError(f"stage dpo computes log-probabilities with TRL's fused LM head and was tested with TRL "
                     f">={low},<{high}; {found}: pip install 'trl>={low},<{high}'")


def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _check_pairs(data_args, stage: str) -> None:
    """rm and dpo learn from pairs: every dataset named must be ranking data (chosen and rejected replies)."""
    single = [attr.name for names in (data_args.dataset, data_args.eval_dataset)
              for attr in dataset_attrs(names, data_args.dataset_dir) if not attr.ranking]
    if single:
        info = os.path.join(data_args.dataset_dir, "dataset_info.json")
        one = len(single) == 1
        raise DataError(f"stage {stage} learns from pairs of replies (chosen and rejected), but {', '.join(single)} "
                        f"in {info} {'has' if one else 'have'} one reply per prompt: name preference data instead "
                        f"(an entry with \"ranking\": true and chosen/rejected columns, such as lf_pref_demo), or "
                        f"train {'it' if one else 'them'} with stage: sft")


def _check_head(model) -> None:
    """TRL's fused head multiplies by lm_head.weight itself: a LoRA adapter on the head would never train."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base.get_output_embeddings(), BaseTunerLayer):
        raise ModelError("lora_target names the LM head, but dpo computes log-probabilities from the head's own "
                         "weight, so its adapter would never train: remove it from lora_target (additional_target: "
                         "lm_head trains the head fully)")


def _reference(tokenizer, model, cfg):
    """dpo's frozen reference, or None where the policy itself serves (a LoRA model with its adapter off, or a loss
    that needs none)."""
    fin = cfg.finetuning
    if fin.pref_loss in REFERENCE_FREE or (fin.ref_model is None and hasattr(model, "disable_adapter")):
        return None
    if fin.ref_model is None:  # the weights as they start, exactly
        reference = copy.deepcopy(model)
    else:
        model_args = dataclasses.replace(cfg.model, model_name_or_path=fin.ref_model, adapter_name_or_path=None)
        reference, _ = load_model(tokenizer, model_args, fin, is_trainable=False, cutoff_len=cfg.data.cutoff_len)
        log.info("reference model: %s", fin.ref_model)
    return reference.requires_grad_(False).eval()


def run_preference(cfg, callbacks=()) -> dict:
    """rm or dpo as `cfg` says; returns what was written where, like run_sft."""
    fin = cfg.finetuning
    if fin.stage == "dpo":
        check_trl(_installed("trl"))
    _check_pairs(cfg.data, fin.stage)
    parts = prepare(cfg)
    model, tokenizer = parts.model, parts.tokenizer
    pairs = collator(tokenizer, count_tokens=True)
    extra = {}
    if fin.stage == "dpo":
        from trl.trainer.utils import add_fused_lm_head

        _check_head(model)
        extra["ref_model"] = _reference(tokenizer, model, cfg)
        for m in (model, extra["ref_model"]):
            if m is not None:
                add_fused_lm_head(m.get_base_model() if hasattr(m, "get_base_model") else m)
    else:  # the value head scores the last token that is not padding
        model.config.pad_token_id = pairs.pad_token_id
    trainer_class = PreferenceTrainer if fin.stage == "dpo" else RewardTrainer
    trainer = trainer_class(model=model, args=cfg.training, finetuning_args=fin, train_dataset=parts.data.train_dataset,
                            eval_dataset=parts.data.eval_dataset, data_collator=pairs, processing_class=tokenizer,
                            **extra)
    return train_and_save(trainer, cfg, parts, callbacks)
