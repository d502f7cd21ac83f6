"""Where the stages that train on log-probabilities (lf.stages' `logps`: dpo, kto) get the summed log-probability
of each sequence's reply tokens, chosen beside lf's other kernels: lf's fused_linear_preference_loss, which runs
the LM head in chunks of tokens and never holds the logits, where lf's kernels are on (`use_lf_kernels`) and the
head is a plain linear layer; else TRL's fused LM head, which tiles the head too (TESTED_TRL: the TRL versions lf
was tested with).

    logps, line = choose(model, model_args, stage)   # refuses a LoRA adapter on the head, an untested TRL
    logps.prepare(model, reference)                  # TRL's head added where it is TRL's
    out = logps.loss(model, ids, mask, labels, "sigmoid", reference_sums, beta=0.1)

`media`, where given, holds the forward's other inputs for a vision-language model (pixel_values, ...: the
collator's MEDIA of these rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lf.errors import ModelError, TrainError
from lf.kernels.fused_linear_preference_loss import PreferenceLoss, ld_weights, preference_loss, sequence_logps
from lf.labels import IGNORE_INDEX

TESTED_TRL = ("1.16", "1.17")  # from, up to (excluded): add_fused_lm_head's call and output as lf uses them


@dataclass(frozen=True)
class SequenceLogps:
    """Log-probabilities from lf's fused op (`fused`) or from TRL's fused LM head."""

    fused: bool

    def loss(self, model, ids, mask, labels, kind: str, reference, unwrapped=None, media=None,
             **options) -> PreferenceLoss:
        """policy_loss with this source."""
        return policy_loss(model, ids, mask, labels, kind, reference, self.fused, unwrapped, media, **options)

    def of(self, model, ids, mask, labels, unwrapped=None, media=None) -> torch.Tensor:
        """reply_logps with this source."""
        return reply_logps(model, ids, mask, labels, self.fused, unwrapped, media)

    def prepare(self, *models) -> None:
        """Adds TRL's fused head to each model given (None: skipped) when the log-probabilities are TRL's; do it
        after copying the policy into its reference (the head closes over the model it is added to)."""
        if self.fused:
            return
        from trl.trainer.utils import add_fused_lm_head

        for model in models:
            if model is not None:
                add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)


def choose(model, model_args, stage: str) -> tuple[SequenceLogps, str]:
    """The source for `stage`'s log-probabilities and a line saying which; refuses before any work a LoRA adapter
    on the head (ModelError) and, where TRL's head is the source, a TRL outside TESTED_TRL (TrainError)."""
    _check_head(model, stage)
    fused = model_args.use_lf_kernels and _plain_head(model)
    if not fused:
        check_trl(_installed("trl"), stage)
    source = "lf's fused_linear_preference_loss" if fused else "TRL's fused LM head"
    return SequenceLogps(fused), f"{stage} log-probabilities: {source}"


def policy_loss(model, ids, mask, labels, kind: str, reference, fused: bool, unwrapped=None, media=None,
                ld_alpha: float | None = None, **options) -> PreferenceLoss:
    """The preference loss `kind` of the policy `model` over these sequences: through lf's
    fused_linear_preference_loss (`fused`) or TRL's fused head. `unwrapped`: the model inside DDP's wrapper;
    `ld_alpha`: LD-DPO's weight of the tokens beyond the shorter reply's length."""
    if fused:
        from lf.kernels.fused_linear_preference_loss import fused_linear_preference_loss

        hidden, head, softcap = _last_hidden(model, ids, mask, unwrapped or model, media)
        return fused_linear_preference_loss(hidden[:, :-1], head.weight, labels[:, 1:], kind, reference, head.bias,
                                            softcap=softcap, ld_alpha=ld_alpha, **options)
    return preference_loss(kind, *trl_logps(model, ids, mask, labels, media, ld_alpha), reference, **options)


def reply_logps(model, ids, mask, labels, fused: bool, unwrapped=None, media=None) -> torch.Tensor:
    """Per sequence, the summed log-probability of its labelled tokens (lf's fused op or TRL's fused head)."""
    if not fused:
        return trl_logps(model, ids, mask, labels, media)[0]
    hidden, head, softcap = _last_hidden(model, ids, mask, unwrapped or model, media)
    return sequence_logps(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, softcap=softcap)[0]


def trl_logps(model, ids, mask, labels, media=None, ld_alpha=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its labelled tokens (TRL's fused head: zero elsewhere; weighted
    by ld_weights when `ld_alpha`), and their count."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False,
                **(media or {}))
    shifted = labels[:, 1:]
    per_token = out.log_probs if ld_alpha is None else out.log_probs * ld_weights(shifted, ld_alpha)
    return per_token.sum(-1), (shifted != IGNORE_INDEX).sum(-1)


def _last_hidden(model, ids, mask, unwrapped, media=None):
    """The last layer's (normed) hidden states through the model's own forward (so that DDP and PEFT see the call;
    the logits of no position: an int logits_to_keep of 1 took 2 s in bf16 on the CPU, where torch's linear
    copied the head's weight once per sequence), the LM head, and its logit soft-cap (Gemma-2)."""
    nothing = torch.empty(0, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=nothing, use_cache=False,
                **(media or {}))
    softcap = getattr(unwrapped.config.get_text_config(), "final_logit_softcapping", None)
    return out.hidden_states[-1], unwrapped.get_output_embeddings(), softcap


def _check_head(model, stage: str) -> None:
    """Both sources multiply by lm_head.weight themselves: a LoRA adapter on the head would never train."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base.get_output_embeddings(), BaseTunerLayer):
        raise ModelError(f"lora_target names the LM head, but {stage} computes log-probabilities from the head's own "
                         f"weight, so its adapter would never train: remove it from lora_target (additional_target: "
                         f"lm_head trains the head fully)")


def _plain_head(model) -> bool:
    """lf's fused op computes logits as hidden @ lm_head.weight.T (+ bias, soft-capped): not for models that scale
    their logits too (Cohere's logit_scale, Granite's logits_scaling, ...), which TRL's head handles."""
    config = model.config.get_text_config()
    scales = [getattr(config, key, None) for key in ("logit_scale", "logits_scaling", "lm_head_multiplier",
                                                     "output_multiplier")]
    return all(scale in (None, 1, 1.0) for scale in scales)


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
