"""Preference losses (dpo's sigmoid, hinge, ipo and kto_pair; orpo, simpo; kto) from the last hidden states,
through the LM head, without ever holding the logits.

A preference loss needs, per sequence, the summed log-probability of its reply tokens: for chosen and rejected
replies that is twice the lm_head + log-softmax work and memory of sft. Here those sums come from
:func:`lf.kernels.fused_linear_cross_entropy` with ``reduction="none"`` (a token's loss is minus its
log-probability): tokens go through the head in chunks, each chunk's logits become the tokens' log-probabilities
and their gradient in one pass of the cross-entropy row kernel (Triton, C++ or torch, by device), and the hidden
gradient leaves the chunk at once; the weight gradient too when the head trains (then computed in the backward
pass). The loss formulas then act on a few numbers per sequence.

Per reply, with the policy's log-probability p and the reference's q (sums; per-token means for the kinds in
MEAN_LOGPS), d = (p_chosen - q_chosen) - (p_rejected - q_rejected), beta, e = label smoothing:
  sigmoid  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)       (DPO; with e > 0, conservative DPO)
  hinge    max(0, 1 - beta d)
  ipo      (d - 1 / (2 beta))^2
  kto_pair kto over the pairs, chosen desirable and rejected undesirable, each half's KL estimate the batch mean of
           the other half's log-ratios (not detached), clamped at 0: with r_c, r_r the chosen and rejected
           log-ratios p - q, the pair's loss is the mean of 1 - sigmoid(beta (r_c - z_r)) and
           1 - sigmoid(beta (z_c - r_r)), z_c = max(0, mean r_c), z_r = max(0, mean r_r)
  simpo    sigmoid's form over beta (p_chosen - p_rejected) - gamma                             (no reference)
  orpo     -p_chosen - beta log sigmoid(log odds(chosen) - log odds(rejected)), odds = P / (1 - P),
           P = exp(mean log-probability): an sft term and an odds-ratio term                    (no reference)
  kto      unpaired replies, each desirable or not, r = p - q, z = the policy's KL estimate (detached, >= 0):
           desirable 1 - sigmoid(beta (r - z)) x desirable_weight, else 1 - sigmoid(beta (z - r)) x undesirable_weight
``ftx`` adds ftx x the chosen (kto: desirable) replies' mean negative log-likelihood per token.

``bco_weight`` w (the kinds with a reference, as LLaMA-Factory's pref_bco_weight): the pair's loss becomes
(loss + w bco) / (1 + w), bco = -log sigmoid(beta r_c - delta) - log sigmoid(-(beta r_r - delta)) over the
log-ratios r, delta the ``baseline``'s answer to the batch's mean reward (lf.train.dpo's running mean: BCO's
reward shift).

``ld_alpha`` (LD-DPO, paired kinds, the policy's log-probabilities only, as LLaMA-Factory): a reply's tokens beyond
the length of the pair's shorter reply count ld_alpha times (``ld_weights``), so that a longer reply does not win
or lose by its length alone; the means of MEAN_LOGPS still divide by all of the reply's tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lf.kernels import _checks
from lf.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from lf.labels import IGNORE_INDEX

# The paired kinds are lf.config's pref_loss choices (PrefLoss; tests check they are the same): the kernel keeps
# its own names so that it imports nothing of lf's config.
PAIRED = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")
KINDS = PAIRED + ("kto",)
REFERENCE_FREE = ("orpo", "simpo")  # lf.config's ReferenceFreeLoss
MEAN_LOGPS = ("ipo", "orpo", "simpo")  # losses over per-token mean log-probabilities (the others: sums)


def ld_weights(labels: torch.Tensor, ld_alpha: float, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """LD-DPO's weight of each of (S, T) ``labels``' tokens, S/2 chosen sequences then their rejected ones: 1 for a
    reply's first m label tokens, m the label-token count of the pair's shorter reply, ``ld_alpha`` after them, 0 off
    the labels (a reply's label tokens are contiguous: counting them is counting positions from its first)."""
    valid = labels != ignore_index
    lengths = valid.sum(-1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)
    rank = valid.cumsum(-1)  # 1 at a reply's first label token
    return torch.where(rank <= shared[:, None], 1.0, ld_alpha) * valid


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, softcap: float | None = None, chunk_size: int | None = None,
                   ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of (S, T, H) ``hidden`` and (S, T) ``labels`` (aligned: shift a causal LM's by one first), the
    summed fp32 log-probability of its labelled tokens under ``hidden @ weight.T + bias`` (soft-capped as Gemma-2
    does when ``softcap``; each token weighted by :func:`ld_weights` when ``ld_alpha``), and their count.
    Differentiable, chunked: the logits never exist whole."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        _checks.fail("sequence_logps", f"`hidden` {tuple(hidden.shape)} must be (sequences, tokens, hidden) and "
                                       f"`labels` {tuple(labels.shape)} (sequences, tokens)")
    losses = fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index=ignore_index, reduction="none",
                                        softcap=softcap, chunk_size=chunk_size)
    if ld_alpha is not None:
        losses = losses * ld_weights(labels, ld_alpha, ignore_index)
    return -losses.sum(-1), (labels != ignore_index).sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _logistic(margin: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)


def pair_losses(kind: str, chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta: float, gamma: float = 0.5,
                smoothing: float = 0.0, bco_weight: float = 0.0, baseline=None):
    """Per-pair losses of a paired ``kind`` and the rewards they give the chosen and rejected replies, from
    per-reply log-probabilities of the policy and the reference (None for orpo and simpo): sums, or per-token
    means for the kinds in MEAN_LOGPS; with ``bco_weight``, mixed with BCO's loss around the delta that
    ``baseline`` (a callable) gives for the batch's mean reward. The formulas are in the module docstring."""
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
    elif kind == "kto_pair":
        chosen_kl, rejected_kl = chosen.mean().clamp(min=0), rejected.mean().clamp(min=0)
        losses = (2 - torch.sigmoid(beta * (chosen - rejected_kl)) - torch.sigmoid(beta * (chosen_kl - rejected))) / 2
    elif kind == "simpo":
        losses = _logistic(beta * delta - gamma, smoothing)
    elif kind == "orpo":
        log_odds = delta - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -chosen - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown paired preference loss {kind!r}; one of {', '.join(PAIRED)}")
    if bco_weight and kind not in REFERENCE_FREE:
        losses = (losses + bco_weight * _bco(beta * chosen, beta * rejected, baseline)) / (1 + bco_weight)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _bco(chosen_rewards, rejected_rewards, baseline):
    """BCO's per-pair loss: each reward classified against delta, the baseline's answer to the batch's mean."""
    delta = baseline(torch.cat([chosen_rewards, rejected_rewards]).mean().detach())
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(delta - rejected_rewards)


def kto_losses(policy, reference, desirable, kl, *, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """Per-reply kto losses and rewards (beta x log-ratio) from summed log-probabilities, ``desirable`` flags and
    the KL estimate ``kl`` (a detached scalar, clamped at 0)."""
    ratio = policy.float() - reference.float()
    kl = kl.detach().float().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor  # the batch's loss: a mean over its pairs (kto: its replies)
    logps: torch.Tensor  # the policy's per-sequence log-probabilities (sums; means for MEAN_LOGPS), detached
    metrics: dict[str, torch.Tensor]  # per pair (kto: per reply) rewards and accuracies, for the logs


def preference_loss(kind: str, logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None = None, *,
                    beta: float = 0.1, gamma: float = 0.5, label_smoothing: float = 0.0, ftx: float = 0.0,
                    desirable: torch.Tensor | None = None, kl: torch.Tensor | None = None,
                    desirable_weight: float = 1.0, undesirable_weight: float = 1.0, bco_weight: float = 0.0,
                    baseline=None) -> PreferenceLoss:
    """The loss of ``kind`` from per-sequence summed log-probabilities ``logps`` and label-token counts ``tokens``:
    for paired kinds the chosen sequences first, then as many rejected ones; ``reference`` the reference's sums
    (not for orpo and simpo); for kto the ``desirable`` flags and the ``kl`` estimate; ``bco_weight`` and
    ``baseline`` mix in BCO's loss (paired kinds with a reference)."""
    _checks.choice("fused_linear_preference_loss", "kind", kind, KINDS)
    if kind not in REFERENCE_FREE and reference is None:
        _checks.fail("fused_linear_preference_loss", f"kind {kind!r} compares the policy with a reference: pass "
                                                     f"`reference`, the reference model's summed log-probabilities")
    tokens = tokens.clamp(min=1)
    means = logps.float() / tokens
    if kind == "kto":
        if desirable is None or kl is None:
            _checks.fail("fused_linear_preference_loss", "kind 'kto' needs `desirable` (a bool per reply) and `kl`")
        losses, rewards = kto_losses(logps, reference, desirable, kl, beta=beta, desirable_weight=desirable_weight,
                                     undesirable_weight=undesirable_weight)
        sft = torch.where(desirable, -means, 0.0).sum() / desirable.sum().clamp(min=1)
        loss = losses.mean() + ftx * sft
        metrics = {"rewards/desirable": rewards[desirable], "rewards/undesirable": rewards[~desirable]}
        return PreferenceLoss(loss, logps.detach(), metrics)
    if logps.shape[0] % 2:
        _checks.fail("fused_linear_preference_loss", f"{logps.shape[0]} sequences: a paired loss needs chosen "
                                                     f"then rejected sequences, as many of each")
    per_reply = means if kind in MEAN_LOGPS else logps
    ref = (reference.float() / tokens if kind in MEAN_LOGPS else reference).chunk(2) if reference is not None \
        else (None, None)
    if bco_weight and kind not in REFERENCE_FREE and baseline is None:
        _checks.fail("fused_linear_preference_loss", "`bco_weight` needs `baseline`, the callable giving BCO's delta")
    losses, chosen_reward, rejected_reward = pair_losses(kind, *per_reply.chunk(2), *ref, beta=beta, gamma=gamma,
                                                         smoothing=label_smoothing, bco_weight=bco_weight,
                                                         baseline=baseline)
    loss = (losses - ftx * means.chunk(2)[0]).mean()
    chosen_logps, rejected_logps = per_reply.detach().chunk(2)
    return PreferenceLoss(loss, per_reply.detach(), {
        "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": chosen_logps, "logps/rejected": rejected_logps})


def fused_linear_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 kind: str = "sigmoid", reference: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                                 softcap: float | None = None, chunk_size: int | None = None,
                                 ld_alpha: float | None = None, **options) -> PreferenceLoss:
    """The preference loss ``kind`` (see the module docstring) of the sequences whose last hidden states are
    (S, T, H) ``hidden``, under the head ``weight`` (V, H) (+ ``bias``), scoring the (S, T) ``labels`` (aligned
    with ``hidden``; ``ignore_index`` outside the replies): for paired kinds S/2 chosen sequences, then their
    rejected ones; for kto S replies with ``desirable`` flags. ``reference``: the reference model's summed
    log-probabilities of the same sequences (:func:`sequence_logps` under no_grad), not needed for orpo and simpo.
    ``options``: beta, gamma (simpo), label_smoothing, ftx, bco_weight and baseline, and for kto desirable, kl,
    desirable_weight, undesirable_weight; ``ld_alpha`` weights the policy's tokens as LD-DPO (:func:`ld_weights`). Never holds more
    than one chunk of logits (see :func:`fused_linear_cross_entropy`)."""
    logps, tokens = sequence_logps(hidden, weight, labels, bias, ignore_index, softcap, chunk_size, ld_alpha)
    return preference_loss(kind, logps, tokens, reference, **options)
