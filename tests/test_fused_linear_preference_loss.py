"""lf.kernels.fused_linear_preference_loss on every backend: loss and gradients (hidden states and, when the head
trains, its weight) equal TRL's own loss over TRL's own chunked log-probabilities of the same inputs, evaluated in
float64; fp32 and bf16, each kind, odd shapes; and bad inputs are refused by name."""

import pytest
import torch
from support import assert_close
from test_preference import trl_kto_loss, trl_loss

from lf.kernels._checks import KernelInputError
from lf.kernels.fused_linear_preference_loss import fused_linear_preference_loss, sequence_logps

DTYPES = [torch.float32, torch.bfloat16]
BETA, GAMMA = 0.3, 0.7
CASES = {  # kind -> options; frozen head unless "head" (weight gradient, computed in backward)
    "sigmoid": dict(),
    "sigmoid, ftx, head": dict(ftx=0.5, head=True),
    "sigmoid, smoothing": dict(label_smoothing=0.2),
    "hinge": dict(),
    "kto_pair, head": dict(head=True),
    "ipo, head": dict(head=True),
    "simpo": dict(),
    "orpo": dict(),
    "kto": dict(),
    "kto, weights, head": dict(desirable_weight=1.5, undesirable_weight=0.5, head=True),
}


def _batch(rows, length, vocab, hidden_size, dtype, head, seed, equal=False):
    """Hidden states (rows, length - 1, H) predicting tokens 1.. of random ids; replies after a 3-token prompt, of
    random lengths (equal ones: TRL's sft term is a token mean over the batch, lf's a mean of per-reply means)."""
    g = torch.Generator().manual_seed(seed)
    replies = torch.full((rows,), 5) if equal else torch.randint(1, length - 3, (rows,), generator=g)
    positions = torch.arange(length)
    completion = ((positions >= 3) & (positions < 3 + replies[:, None])).long()
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.masked_fill(completion == 0, -100)[:, 1:]
    hidden = torch.randn(rows, length - 1, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype).requires_grad_(head)
    return hidden, weight, labels, completion


def _trl_per_token(hidden, weight, labels):
    """TRL's chunked log-probabilities (its fused LM head's kernel), zero outside the labelled tokens."""
    from trl.kernels import ChunkedLogProbFunction

    mask = labels != -100
    logps = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, 32768, None, 1.0,
                                         ("log_probs",))[0]
    return logps.new_zeros(mask.shape).masked_scatter(mask, logps)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_trls_loss_and_gradients(backend, dtype, case):
    options = dict(CASES[case])
    head = options.pop("head", False)
    kind = case.split(",")[0]
    pairs = 3
    rows = 2 * pairs if kind != "kto" else 5
    hidden, weight, labels, completion = _batch(rows, 13, 301, 24, dtype, head, seed=len(case), equal="ftx" in options)
    g = torch.Generator().manual_seed(1)
    reference = None if kind in ("orpo", "simpo") else -torch.rand(rows, generator=g) * 10
    extra = {}
    if kind == "kto":
        desirable = torch.tensor([True, False, True, True, False])
        kl_policy, kl_reference = -torch.rand(rows, generator=g) * 10, -torch.rand(rows, generator=g) * 10
        extra = dict(desirable=desirable, kl=(kl_policy - kl_reference).mean())
    elif kind not in ("orpo", "simpo", "kto_pair"):
        extra = dict(label_smoothing=options.pop("label_smoothing", 0.0))
    if kind == "simpo":
        extra = dict(gamma=GAMMA)

    out = fused_linear_preference_loss(hidden, weight, labels, kind, reference, beta=BETA, chunk_size=7, **options,
                                       **extra)
    leaves = [hidden] + ([weight] if head else [])
    grads = torch.autograd.grad(out.loss, leaves)

    # TRL, float64, on the same inputs
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    weight64 = leaves64[1] if head else weight.detach().double()
    per_token = _trl_per_token(leaves64[0], weight64, labels)
    if kind == "kto":
        theirs = trl_kto_loss(per_token, completion, desirable, reference.double(), kl_policy.double(),
                              kl_reference.double(), beta=BETA, desirable_weight=options.get("desirable_weight", 1.0),
                              undesirable_weight=options.get("undesirable_weight", 1.0))
    else:
        theirs = trl_loss(kind, per_token, completion, None if reference is None else reference.double(), beta=BETA,
                          gamma=GAMMA, smoothing=extra.get("label_smoothing", 0.0), ftx=options.get("ftx", 0.0))
    grads64 = torch.autograd.grad(theirs, leaves64)
    factor = 1.0 if dtype == torch.float32 else 2.0
    assert_close(out.loss, theirs, dtype, "loss", factor, min_scale=1.0)
    for name, grad, grad64 in zip(("hidden", "weight"), grads, grads64):
        assert_close(grad, grad64, dtype, f"grad {name}", factor)
    assert out.logps.shape == (rows,) and not out.logps.requires_grad


def test_sequence_logps_are_the_logits_log_probabilities(backend):
    hidden, weight, labels, _ = _batch(4, 9, 50, 16, torch.float32, False, seed=3)
    bias = torch.randn(50)
    with torch.no_grad():
        sums, counts = sequence_logps(hidden, weight, labels, bias, softcap=5.0, chunk_size=3)
    logits = hidden.double() @ weight.double().T + bias.double()
    logits = 5.0 * torch.tanh(logits / 5.0)
    expected = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    assert_close(sums, expected.sum(-1), torch.float32, "sums", min_scale=1.0)
    assert counts.tolist() == (labels != -100).sum(-1).tolist()


def test_bad_inputs_are_refused_by_name():
    hidden, weight, labels, _ = _batch(4, 9, 50, 16, torch.float32, False, seed=3)
    with pytest.raises(KernelInputError, match="kind 'sigmoid' compares the policy with a reference: pass `reference`"):
        fused_linear_preference_loss(hidden, weight, labels, "sigmoid")
    with pytest.raises(KernelInputError, match="`kind`.*'dpo'"):
        fused_linear_preference_loss(hidden, weight, labels, "dpo")
    with pytest.raises(KernelInputError, match="3 sequences: a paired loss needs chosen then rejected sequences"):
        fused_linear_preference_loss(hidden[:3], weight, labels[:3], "simpo")
    with pytest.raises(KernelInputError, match="kind 'kto' needs `desirable`"):
        fused_linear_preference_loss(hidden, weight, labels, "kto", torch.zeros(4))
    with pytest.raises(KernelInputError, match=r"`hidden` \(4, 8, 16\) must be \(sequences, tokens, hidden\) and "
                                               r"`labels` \(4, 7\)"):
        sequence_logps(hidden, weight, labels[:, 1:])


def test_its_loss_names_are_the_configs():
    """lf.config declares pref_loss's choices once (a Literal); the kernel, which imports no config, names the same
    losses and the same reference-free ones."""
    import typing

    from lf.config.finetuning import PrefLoss, ReferenceFreeLoss
    from lf.kernels.fused_linear_preference_loss import PAIRED, REFERENCE_FREE

    assert typing.get_args(PrefLoss) == PAIRED and typing.get_args(ReferenceFreeLoss) == REFERENCE_FREE


def _ld_reference(hidden, weight, labels, reference, kind, alpha):
    """LD-DPO written out reply by reply in float64: the first min(chosen, rejected) reply tokens count fully, the
    rest alpha times; sigmoid over sums, ipo over means by the reply's whole length."""
    logps = torch.log_softmax(hidden @ weight.T, -1)
    pairs = labels.shape[0] // 2
    values, counts = [], []
    for row in range(labels.shape[0]):
        positions = [t for t in range(labels.shape[1]) if labels[row, t] != -100]
        other = (row + pairs) % (2 * pairs)
        shared = min(len(positions), int((labels[other] != -100).sum()))
        values.append(sum((1.0 if i < shared else alpha) * logps[row, t, labels[row, t]]
                          for i, t in enumerate(positions)))
        counts.append(len(positions))
    policy = torch.stack(values)
    ref = reference.double()
    if kind == "ipo":
        policy, ref = policy / torch.tensor(counts), ref / torch.tensor(counts)
    margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
    losses = -torch.nn.functional.logsigmoid(BETA * margin) if kind == "sigmoid" else (margin - 1 / (2 * BETA)) ** 2
    return losses.mean()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_ld_alpha_weights_the_tokens_beyond_the_shorter_reply(backend, kind):
    hidden, weight, labels, _ = _batch(6, 13, 301, 24, torch.float32, True, seed=3)
    reference = -torch.rand(6, generator=torch.Generator().manual_seed(2)) * 10
    lengths = (labels != -100).sum(-1)
    assert (lengths[:3] != lengths[3:]).all()  # every pair has a tail to weight
    out = fused_linear_preference_loss(hidden, weight, labels, kind, reference, beta=BETA, chunk_size=5,
                                       ld_alpha=0.4)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    expected = _ld_reference(*leaves64, labels, reference, kind, 0.4)
    grads64 = torch.autograd.grad(expected, leaves64)
    assert_close(out.loss, expected, torch.float32, "loss", min_scale=1.0)
    for name, g, g64 in zip(("hidden", "weight"), grads, grads64):
        assert_close(g, g64, torch.float32, f"grad {name}")
    plain = fused_linear_preference_loss(hidden, weight, labels, kind, reference, beta=BETA)
    assert abs((plain.loss - out.loss).item()) > 1e-3  # the tails' weight changed the loss
    one = fused_linear_preference_loss(hidden, weight, labels, kind, reference, beta=BETA, ld_alpha=1.0)
    assert abs((plain.loss - one.loss).item()) < 1e-5  # ld_alpha 1 is plain dpo
