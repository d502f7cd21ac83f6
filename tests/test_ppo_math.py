"""lf.train.ppo_math against float64 references written from the papers' equations as plain Python loops over
numbers, and small cases worked by hand."""

import math
import random

import pytest
import torch

from lf.train import ppo_math as pm


def batch(seed=0, rows=3, width=7):
    """Random rewards, values and log-probabilities with each row's response a run of ones somewhere."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width)
    for r in range(rows):
        start = int(torch.randint(0, 3, (1,), generator=g))
        mask[r, start:start + int(torch.randint(1, width - start + 1, (1,), generator=g))] = 1
    rand = lambda: torch.randn(rows, width, generator=g, dtype=torch.float64)  # noqa: E731
    return mask.double(), rand(), rand(), rand() * 0.1 - 2, rand() * 0.1 - 2


def response(mask_row):
    return [t for t, m in enumerate(mask_row.tolist()) if m]


def ref_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for r in range(len(rewards)):
        ts = response(mask[r])
        for i, t in enumerate(ts):  # A_t = sum_l (gamma lam)^l delta_{t+l}
            total = 0.0
            for l, u in enumerate(ts[i:]):
                next_value = values[r, u + 1].item() if u + 1 in ts else 0.0
                delta = rewards[r, u].item() + gamma * next_value - values[r, u].item()
                total += (gamma * lam) ** l * delta
            adv[r, t], ret[r, t] = total, total + values[r, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_the_sum_of_discounted_td_errors(gamma, lam):
    for seed in range(4):
        mask, rewards, values, _, _ = batch(seed)
        adv, ret = pm.gae(rewards, values, mask, gamma, lam)
        want_adv, want_ret = ref_gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, want_adv)
        torch.testing.assert_close(ret * mask, want_ret)


def test_gae_by_hand():
    # two tokens, reward 1 at the end, V = (0.5, 0.25), gamma 1, lambda 0.5:
    # delta_1 = 1 - 0.25 = 0.75, delta_0 = 0 + 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.5 * 0.75 = 0.125
    adv, ret = pm.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 0.5)
    assert adv.tolist() == [[0.125, 0.75]] and ret.tolist() == [[0.625, 1.0]]


def test_whiten_by_hand_and_against_the_definition():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1
    torch.testing.assert_close(pm.whiten(x, mask)[:, :3], torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pm.whiten(x, mask, keep_mean=True)[:, :3], torch.tensor([[1.0, 2.0, 3.0]]),
                               atol=1e-6, rtol=0)
    mask, x, _, _, _ = batch(3)
    values = [x[r, t].item() for r in range(len(x)) for t in response(mask[r])]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) + 1e-8)
    out = pm.whiten(x, mask)
    for r in range(len(x)):
        for t in response(mask[r]):
            assert out[r, t].item() == pytest.approx((x[r, t].item() - mean) / std, rel=1e-12)


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    mask, _, _, logps, ref_logps = batch(5)
    scores = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    rewards, kl = pm.kl_penalised_rewards(scores, logps, ref_logps, mask, 0.2)
    for r in range(3):
        ts = response(mask[r])
        for t in range(mask.shape[1]):
            k = logps[r, t].item() - ref_logps[r, t].item() if t in ts else 0.0
            assert kl[r, t].item() == pytest.approx(k, abs=1e-15)
            assert rewards[r, t].item() == pytest.approx(-0.2 * k + (scores[r].item() if t == ts[-1] else 0.0))


def ref_policy_loss(logps, old, adv, mask, eps):
    terms, clipped = [], 0
    for r in range(len(logps)):
        for t in response(mask[r]):
            ratio = math.exp(logps[r, t].item() - old[r, t].item())
            a = adv[r, t].item()
            plain, capped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(plain, capped))
            clipped += capped > plain
    return sum(terms) / len(terms), clipped / len(terms)


def ref_value_loss(values, old, returns, mask, eps):
    terms, clipped = [], 0
    for r in range(len(values)):
        for t in response(mask[r]):
            v, o, ret = values[r, t].item(), old[r, t].item(), returns[r, t].item()
            plain, capped = (v - ret) ** 2, (o + min(max(v - o, -eps), eps) - ret) ** 2
            terms.append(0.5 * max(plain, capped))
            clipped += capped > plain
    return sum(terms) / len(terms), clipped / len(terms)


@pytest.mark.parametrize("seed", range(4))
def test_clipped_losses_match_the_equations(seed):
    mask, adv, returns, logps, _ = batch(seed)
    old = logps + torch.randn_like(logps) * 0.3  # ratios on both sides of the clip range
    loss, fraction = pm.policy_loss(logps, old, adv, mask)
    want, want_fraction = ref_policy_loss(logps, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-12) and fraction.item() == pytest.approx(want_fraction)
    values, old_values = adv * 0.5, adv * 0.5 + torch.randn_like(adv) * 0.3
    loss, fraction = pm.value_loss(values, old_values, returns, mask)
    want, want_fraction = ref_value_loss(values, old_values, returns, mask, 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-12) and fraction.item() == pytest.approx(want_fraction)


def test_clipped_losses_by_hand():
    one = torch.ones(1, 1)
    # ratio e^0.5 = 1.65 with A = 1: clipped at 1.2, loss -1.2, clipped
    loss, fraction = pm.policy_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), one, one)
    assert loss.item() == pytest.approx(-1.2) and fraction.item() == 1.0
    # the same ratio with A = -1: the unclipped -A r = 1.65 is the larger, not clipped
    loss, fraction = pm.policy_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), -one, one)
    assert loss.item() == pytest.approx(math.exp(0.5)) and fraction.item() == 0.0
    # V moved 1 -> 2 towards R = 3: the clipped V 1.2 is further from R: 0.5 * 1.8^2
    loss, fraction = pm.value_loss(torch.tensor([[2.0]]), one, torch.tensor([[3.0]]), one)
    assert loss.item() == pytest.approx(0.5 * 1.8 ** 2) and fraction.item() == 1.0
    # with ratio 1 the loss is -mean(A), its gradient -A / n per token
    logps = torch.zeros(1, 2, requires_grad=True)
    pm.policy_loss(logps, torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2))[0].backward()
    assert logps.grad.tolist() == [[-1.0, 0.5]]


def test_entropy_of_uniform_and_certain_policies():
    assert pm.entropy(torch.zeros(1, 8)).item() == pytest.approx(math.log(8))
    assert pm.entropy(torch.tensor([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_by_hand_and_fixed():
    kl = pm.KLController(0.2, target=6.0, horizon=10000)
    assert kl.update(9.0, 100) == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))  # 9/6 - 1 = 0.5, clipped to 0.2
    value = kl.value
    assert kl.update(5.4, 100) == pytest.approx(value * (1 - 0.1 * 100 / 10000))  # 5.4/6 - 1 = -0.1
    fixed = pm.KLController(0.2)
    assert fixed.update(100.0, 100) == 0.2


def test_running_moments_normalise_with_every_score_seen():
    rng = random.Random(0)
    moments, seen = pm.RunningMoments(), []
    for size in (3, 1, 5, 2):
        scores = [rng.gauss(2.0, 3.0) for _ in range(size)]
        seen += scores
        out = moments.normalise(torch.tensor(scores, dtype=torch.float64))
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((s - mean) ** 2 for s in seen) / (len(seen) - 1)) if len(seen) > 1 else 1.0
        torch.testing.assert_close(out, torch.tensor([(s - mean) / (std + 1e-8) for s in scores],
                                                     dtype=torch.float64))


@pytest.mark.parametrize("bias, softcap, temperature", [(False, None, 1.0), (True, None, 0.7), (True, 30.0, 0.5)])
def test_fused_and_plain_log_probabilities_of_the_sampling_distribution_agree(bias, softcap, temperature):
    from lf.train.ppo import token_logps

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=g) * 3)  # logits of a few tens: the soft-cap matters
    hidden, targets = torch.randn(7, 16, generator=g), torch.randint(0, 50, (7,), generator=g)
    logits = head(hidden).double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.log_softmax(logits / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    for fused in (True, False):
        got = token_logps(hidden, head, targets, softcap, temperature, fused)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
