"""The rm, dpo and kto recipes: prompts with replies ranked (a chosen and a rejected one: rm, dpo) or flagged
(desirable or not: kto) train a reward model (rm) or a policy that prefers the better replies. The steps are
sft.py's (tokenizer and template -> datasets -> model -> trainer -> train, save, evaluate, plot) over lf's
pairwise or feedback data; only the trainer's loss differs.

dpo and kto: the losses (`pref_loss` sigmoid | hinge | ipo | orpo | simpo; kto) are those of
lf.kernels.fused_linear_preference_loss, whose docstring gives the formulas, over the log-probabilities of the
reply tokens under the trained model (policy) and the reference. The reference is the model as it starts: with
LoRA the same model with its adapter switched off (no second copy of the weights), with full or freeze a frozen
copy; `ref_model` names another model instead. With lf's kernels on (`use_lf_kernels`, the default) the
log-probabilities come from that op, which runs the LM head in chunks of tokens and never holds the logits;
with them off, from TRL's fused LM head, which tiles the head too (TESTED_TRL: the TRL versions lf was tested
with). kto also needs the KL estimate of its paper: the policy's and the reference's log-probabilities of
mismatched pairs (each prompt with another row's reply), under no_grad.

rm: the model with a value head (transformers' XForSequenceClassification, one label: `score`, trained fully and,
with LoRA, saved beside the adapter) scores the last token of each sequence; loss -log sigmoid(r_chosen -
r_rejected), and the share of pairs scored the right way round is logged as `accuracy`.

All log their per-pair metrics beside the loss (trainer_state.json's log_history, the trackers, one line each).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections import defaultdict

import torch
import torch.nn.functional as F

from lf.data import collator
from lf.data.collator import TOKENS_KEY
from lf.data.processors import IGNORE_INDEX
from lf.data.registry import dataset_attrs
from lf.errors import DataError, ModelError, TrainError
from lf.kernels.fused_linear_preference_loss import (REFERENCE_FREE, PreferenceLoss, preference_loss,
                                                     sequence_logps)
from lf.model import load_model
from lf.train.recipe import prepare, train_and_save
from lf.train.trainer import LFTrainer

log = logging.getLogger("lf")
TESTED_TRL = ("1.16", "1.17")  # from, up to (excluded): add_fused_lm_head's call and output as lf uses them


def _options(fin) -> dict:
    """fused_linear_preference_loss's options from the finetuning group."""
    return dict(beta=fin.pref_beta, gamma=fin.simpo_gamma, label_smoothing=fin.dpo_label_smoothing, ftx=fin.pref_ftx,
                desirable_weight=fin.kto_chosen_weight, undesirable_weight=fin.kto_rejected_weight)


def dpo_loss(fin, sums, tokens, ref_sums=None) -> PreferenceLoss:
    """A batch's dpo loss (the mean over its pairs) and per-pair metrics, from the summed log-probabilities of its
    sequences (the chosen rows, then the rejected ones), their reply token counts and the reference's sums."""
    return preference_loss(fin.pref_loss, sums, tokens, ref_sums, **_options(fin))


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
    """dpo and kto: log-probabilities of the labelled tokens, per sequence, under the policy and the reference;
    `fused`: from lf's fused_linear_preference_loss, else from TRL's fused LM head (add_fused_lm_head)."""

    def __init__(self, *args, ref_model=None, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        self.fused = fused

    def _policy_loss(self, model, ids, mask, labels, reference, **options) -> PreferenceLoss:
        """The loss of `pref_loss` (or kto) over the policy's log-probabilities of these sequences."""
        kind = "kto" if self.finetuning_args.stage == "kto" else self.finetuning_args.pref_loss
        return policy_loss(model, ids, mask, labels, kind, reference, self.fused, self.accelerator.unwrap_model(model),
                           **{**_options(self.finetuning_args), **options})

    def _logps(self, model, ids, mask, labels) -> torch.Tensor:
        """Summed log-probabilities, without gradient."""
        with torch.no_grad():
            return reply_logps(model, ids, mask, labels, self.fused, self.accelerator.unwrap_model(model))

    @contextlib.contextmanager
    def _as_reference(self, model):
        """The reference model in eval mode: the policy with its adapter off, or the frozen copy."""
        reference = self.ref_model if self.ref_model is not None else model
        adapter_off = (self.accelerator.unwrap_model(model).disable_adapter() if self.ref_model is None
                       else contextlib.nullcontext())
        with eval_mode(reference), adapter_off:
            yield reference


def policy_loss(model, ids, mask, labels, kind: str, reference, fused: bool, unwrapped=None,
                **options) -> PreferenceLoss:
    """The preference loss `kind` of the policy `model` over these sequences: through lf's
    fused_linear_preference_loss (`fused`) or TRL's fused head. `unwrapped`: the model inside DDP's wrapper."""
    if fused:
        from lf.kernels.fused_linear_preference_loss import fused_linear_preference_loss

        hidden, head, softcap = _last_hidden(model, ids, mask, unwrapped or model)
        return fused_linear_preference_loss(hidden[:, :-1], head.weight, labels[:, 1:], kind, reference, head.bias,
                                            softcap=softcap, **options)
    return preference_loss(kind, *_trl_logps(model, ids, mask, labels), reference, **options)


def reply_logps(model, ids, mask, labels, fused: bool, unwrapped=None) -> torch.Tensor:
    """Per sequence, the summed log-probability of its labelled tokens (lf's fused op or TRL's fused head)."""
    if not fused:
        return _trl_logps(model, ids, mask, labels)[0]
    hidden, head, softcap = _last_hidden(model, ids, mask, unwrapped or model)
    return sequence_logps(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, softcap=softcap)[0]


def _last_hidden(model, ids, mask, unwrapped):
    """The last layer's (normed) hidden states through the model's own forward (so that DDP and PEFT see the call;
    the logits of no position: an int logits_to_keep of 1 took 2 s in bf16 on the CPU, where torch's linear
    copied the head's weight once per sequence), the LM head, and its logit soft-cap (Gemma-2)."""
    nothing = torch.empty(0, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=nothing, use_cache=False)
    softcap = getattr(unwrapped.config.get_text_config(), "final_logit_softcapping", None)
    return out.hidden_states[-1], unwrapped.get_output_embeddings(), softcap


class PreferenceTrainer(LogpsTrainer):
    """dpo: the loss of `pref_loss` over the policy's (and the reference's) log-probabilities of both replies."""

    def pair_loss(self, model, batch):
        ids, mask, labels = _pairs(batch, self.data_collator.pad_token_id)
        reference = None
        if self.finetuning_args.pref_loss not in REFERENCE_FREE:
            with self._as_reference(model) as ref:
                reference = self._logps(ref, ids, mask, labels)
        out = self._policy_loss(model, ids, mask, labels, reference)
        return out.loss, out.metrics


class KTOTrainer(LogpsTrainer):
    """kto: replies flagged desirable or not, against the reference, shifted by the KL estimate from mismatched
    pairs (the mean over the batch, across processes, of policy - reference log-probabilities, clamped at 0)."""

    def pair_loss(self, model, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        kl_ids, kl_mask, kl_labels = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
        with eval_mode(model):  # a detached baseline: neither dropout nor gradient checkpointing has a part in it
            policy_kl = self._logps(model, kl_ids, kl_mask, kl_labels)
        with self._as_reference(model) as ref:
            reference = self._logps(ref, ids, mask, labels)
            reference_kl = self._logps(ref, kl_ids, kl_mask, kl_labels)
        kl = self.accelerator.gather_for_metrics((policy_kl - reference_kl).mean().detach()).mean().clamp(min=0)
        out = self._policy_loss(model, ids, mask, labels, reference, desirable=batch["kto_tags"].bool(), kl=kl)
        return out.loss, {**out.metrics, "kl": kl.reshape(1)}


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode (no dropout, no gradient checkpointing) for passes without gradient."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _trl_logps(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
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

def check_trl(installed: str | None, stage: str = "dpo") -> None:
    """A TrainError unless `installed` (TRL's version, None when missing) is in TESTED_TRL's range."""
    from packaging.version import Version

    low, high = TESTED_TRL
    if installed is not None and Version(low) <= Version(installed) < Version(high):
        return
    found = f"TRL {installed} is installed" if installed else "TRL is not installed"
    raise TrainError(f"stage {stage} with use_lf_kernels: false computes log-probabilities with TRL's fused LM head "
                     f"and was tested with TRL >={low},<{high}; {found}: pip install 'trl>={low},<{high}' (or keep "
                     f"lf's kernels on)")


def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _check_data(data_args, stage: str) -> None:
    """rm and dpo learn from pairs (ranking data: chosen and rejected replies), kto from replies flagged desirable
    or not (a kto_tag column): every dataset named must be such data."""
    wrong = [attr.name for names in (data_args.dataset, data_args.eval_dataset)
             for attr in dataset_attrs(names, data_args.dataset_dir)
             if (("kto_tag" not in attr.columns) if stage == "kto" else not attr.ranking)]
    if not wrong:
        return
    info = os.path.join(data_args.dataset_dir, "dataset_info.json")
    one = len(wrong) == 1
    names, has = ", ".join(wrong), "has" if one else "have"
    if stage == "kto":
        raise DataError(f"stage kto learns from replies flagged desirable or not, but {names} in {info} {has} no "
                        f"kto_tag column: map one (\"columns\": {{\"kto_tag\": \"label\"}}, as lf_kto_demo does), "
                        f"or train pairs of replies with stage: dpo")
    raise DataError(f"stage {stage} learns from pairs of replies (chosen and rejected), but {names} in {info} {has} "
                    f"one reply per prompt: name preference data instead (an entry with \"ranking\": true and "
                    f"chosen/rejected columns, such as lf_pref_demo), or train {'it' if one else 'them'} with "
                    f"stage: sft")


def _check_head(model) -> None:
    """TRL's fused head multiplies by lm_head.weight itself: a LoRA adapter on the head would never train."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base.get_output_embeddings(), BaseTunerLayer):
        raise ModelError("lora_target names the LM head, but dpo and kto compute log-probabilities from the head's "
                         "own "
                         "weight, so its adapter would never train: remove it from lora_target (additional_target: "
                         "lm_head trains the head fully)")


def _plain_head(model) -> bool:
    """lf's fused op computes logits as hidden @ lm_head.weight.T (+ bias, soft-capped): not for models that scale
    their logits too (Cohere's logit_scale, Granite's logits_scaling, ...), which TRL's head handles."""
    config = model.config.get_text_config()
    scales = [getattr(config, key, None) for key in ("logit_scale", "logits_scaling", "lm_head_multiplier",
                                                     "output_multiplier")]
    return all(scale in (None, 1, 1.0) for scale in scales)


def _reference(tokenizer, model, cfg):
    """The frozen reference, or None where the policy itself serves (a LoRA model with its adapter off, or a loss
    that needs none)."""
    fin = cfg.finetuning
    if (fin.stage == "dpo" and fin.pref_loss in REFERENCE_FREE) or (fin.ref_model is None
                                                                     and hasattr(model, "disable_adapter")):
        return None
    if fin.ref_model is None:  # the weights as they start, exactly
        reference = copy.deepcopy(model)
    else:
        model_args = dataclasses.replace(cfg.model, model_name_or_path=fin.ref_model, adapter_name_or_path=None)
        reference, _ = load_model(tokenizer, model_args, fin, is_trainable=False, cutoff_len=cfg.data.cutoff_len)
        log.info("reference model: %s", fin.ref_model)
    return reference.requires_grad_(False).eval()


TRAINERS = {"rm": RewardTrainer, "dpo": PreferenceTrainer, "kto": KTOTrainer}


def run_preference(cfg, callbacks=()) -> dict:
    """rm, dpo or kto as `cfg` says; returns what was written where, like run_sft."""
    fin = cfg.finetuning
    _check_data(cfg.data, fin.stage)
    parts = prepare(cfg)
    model, tokenizer = parts.model, parts.tokenizer
    batches = collator(tokenizer, count_tokens=True)
    extra = {}
    if fin.stage == "rm":  # the value head scores the last token that is not padding
        model.config.pad_token_id = batches.pad_token_id
    else:
        _check_head(model)
        extra["ref_model"] = _reference(tokenizer, model, cfg)
        extra["fused"] = cfg.model.use_lf_kernels and _plain_head(model)
        log.info("%s log-probabilities: %s", fin.stage, "lf's fused_linear_preference_loss" if extra["fused"]
                 else "TRL's fused LM head")
        if not extra["fused"]:
            check_trl(_installed("trl"), fin.stage)
            from trl.trainer.utils import add_fused_lm_head

            for m in (model, extra["ref_model"]):
                if m is not None:
                    add_fused_lm_head(m.get_base_model() if hasattr(m, "get_base_model") else m)
    trainer = TRAINERS[fin.stage](model=model, args=cfg.training, finetuning_args=fin,
                                  train_dataset=parts.data.train_dataset, eval_dataset=parts.data.eval_dataset,
                                  data_collator=batches, processing_class=tokenizer, **extra)
    return train_and_save(trainer, cfg, parts, callbacks)
