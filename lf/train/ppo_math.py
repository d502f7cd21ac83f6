"""The arithmetic of PPO for language models, one small function per equation, over (batch, tokens) tensors with a
mask marking each row's response tokens. The equations are those of Schulman et al. 2017, "Proximal Policy
Optimization Algorithms" (PPO, eqs. 7, 9, 11, 12), Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation" (GAE, eq. 16), and Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (the KL-penalised reward, eq. 2, and its adaptive coefficient, section 2.2). The constants are those of
the PPO that LLaMA-Factory 0.9.5 runs (TRL 0.9's): gamma 1, lambda 0.95, clip ranges 0.2, value coefficient 0.1, KL
coefficient starting at 0.2 with horizon 10000. tests/test_ppo_math.py checks each against a float64 reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GAMMA, LAMBDA = 1.0, 0.95  # discount and GAE's lambda
CLIP_RANGE, CLIP_RANGE_VALUE = 0.2, 0.2  # epsilon of the policy ratio and of the value's move
VALUE_COEF = 0.1  # c1: the value loss's weight in the total loss
INIT_KL_COEF, KL_HORIZON = 0.2, 10000
KL_ERROR_CLIP = 0.2  # the adaptive controller's proportional error is clipped to +-this
EPS = 1e-8


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * m) / sum(m): the mean over the response tokens."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unbiased variance over the response tokens: sum(m (x - mean)^2) / (n - 1), n = sum(m)."""
    n = mask.sum()
    return ((x - masked_mean(x, mask)) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, keep_mean: bool = False) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the response tokens (mean and unbiased variance of the masked values);
    `keep_mean` adds the mean back (rewards are whitened in scale only, advantages centred too)."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + EPS)
    return out + mean if keep_mean else out


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ziegler et al.'s reward, eq. 2, spread over tokens: r_t = -beta (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) at every
    response token, plus the sequence's score r(x, y) at its last one. Returns (rewards, kl) with kl_t = log pi -
    log pi_ref (zero off the mask)."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = mask.sum(-1).long() - 1 + first_index(mask)  # each row's last response token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """Each row's first masked position (a row's response is one run of ones)."""
    return mask.float().argmax(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA,
        lam: float = LAMBDA) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (GAE eq. 16, PPO eq. 11-12): delta_t = r_t + gamma V(s_{t+1}) - V(s_t),
    A_t = delta_t + gamma lambda A_{t+1}, with V and A zero past the response's end. Returns (advantages, returns),
    returns R_t = A_t + V(s_t), the value's target. Rows hold their response from some column on (mask)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = CLIP_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (eq. 7), as a loss: mean over tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = pi(a|s) / pi_old(a|s) = exp(log pi - log pi_old). Returns (loss, clip fraction: the share of tokens where
    the clipped term is the larger)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = CLIP_RANGE_VALUE) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss (PPO's L^VF, eq. 9, clipped as OpenAI's baselines do): 1/2 mean over tokens of
    max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2). Returns (loss, clip fraction)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_a p(a) log p(a) per row of logits (the policy's spread at each token; logged, not trained)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class KLController:
    """The KL coefficient beta. Adaptive (Ziegler et al. section 2.2) when `target` is set: after a step whose KL
    was KL_t over n sequences, e_t = clip(KL_t / target - 1, -0.2, 0.2) and beta <- beta (1 + e_t n / horizon), so
    beta grows while the policy drifts past the target and shrinks below it. Fixed when `target` is None."""

    value: float = INIT_KL_COEF
    target: float | None = None
    horizon: int = KL_HORIZON

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -KL_ERROR_CLIP), KL_ERROR_CLIP)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


@dataclass
class RunningMoments:
    """The running mean and standard deviation of every score seen (Chan et al.'s parallel update of count, mean and
    sum of squared deviations); `normalise` gives (score - mean) / std with the batch counted in: ppo_score_norm."""

    mean: float = 0.0
    m2: float = 0.0  # the sum of squared deviations from the mean
    count: int = 0

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        x = scores.double()
        n, batch_mean = x.numel(), x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total
        std = math.sqrt(self.m2 / (total - 1)) if total > 1 else 1.0
        return ((scores - self.mean) / (std + EPS)).to(scores.dtype)
