"""Bad input fails in Python, before any backend, with a message naming the argument and the fix."""
import pytest
import torch

from lf.errors import KernelDTypeError, KernelInputError
from lf.kernels import cross_entropy, fused_linear_cross_entropy, geglu, rms_norm, rope, swiglu


def _qkcs(b=1, h=2, s=3, d=8, **over):
    t = dict(q=torch.randn(b, h, s, d), k=torch.randn(b, h, s, d), cos=torch.randn(b, s, d), sin=torch.randn(b, s, d))
    t.update(over)
    return t


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(5)), KernelInputError, r"`weight` has shape \(5,\).*\(4,\)"),
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(4, dtype=torch.bfloat16)), KernelDTypeError,
     r"`weight` is torch.bfloat16 but `x` is torch.float32; cast"),
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(4, device="meta")), KernelInputError,
     r"`weight` is on meta but `x` is on cpu; move"),
    (lambda: rms_norm(torch.ones(2, 4, dtype=torch.int64), torch.ones(4)), KernelDTypeError,
     r"`x` has dtype torch.int64.*float32, bfloat16 or float16"),
    (lambda: rms_norm([1.0, 2.0], torch.ones(2)), KernelInputError, r"`x` must be a torch.Tensor, got list"),
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), casting="qwen"), KernelInputError,
     r"`casting`='qwen' is not one of 'llama', 'gemma', 'none'"),
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), eps=0.0), KernelInputError, r"`eps`=0.0 must be positive"),
    (lambda: rms_norm(torch.randn(0, 4), torch.ones(4)), KernelInputError, r"is empty"),
    (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 5)), KernelInputError, r"`gate` \(2, 4\) and `up` \(2, 5\)"),
    (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float16)), KernelDTypeError, r"cast `up`"),
    (lambda: geglu(torch.randn(2, 4), torch.randn(2, 4), approximate="erf"), KernelInputError,
     r"`approximate`='erf' is not one of 'tanh', 'none'"),
    (lambda: rope(**_qkcs(q=torch.randn(2, 3, 8))), KernelInputError, r"must be 4-D.*transpose\(1, 2\)"),
    (lambda: rope(**_qkcs(k=torch.randn(1, 2, 4, 8))), KernelInputError, r"`k` \(1, 2, 4, 8\) must match `q`"),
    (lambda: rope(**_qkcs(d=7)), KernelInputError, r"head_dim 7 must be even"),
    (lambda: rope(**_qkcs(cos=torch.randn(1, 5, 8), sin=torch.randn(1, 5, 8))), KernelInputError,
     r"`cos`/`sin` \(1, 5, 8\) must be \(1 or 1, 3, 8\)"),
    (lambda: rope(**_qkcs(sin=torch.randn(3, 8))), KernelInputError, r"must have the same shape"),
    (lambda: rope(**_qkcs(cos=torch.randn(1, 3, 8, dtype=torch.float64))), KernelDTypeError, r"`cos` has dtype"),
    (lambda: rope(**_qkcs(cos=torch.randn(1, 3, 8, requires_grad=True))), KernelInputError, r"cos.detach\(\)"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.tensor([1, 7])), KernelInputError,
     r"`labels` holds 7 at flat position 1, outside the vocabulary \[0, 5\) and not ignore_index=-100"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.tensor([1.0, 2.0])), KernelInputError, r"integer token ids"),
    (lambda: cross_entropy(torch.randn(2, 3, 5), torch.tensor([1, 2])), KernelInputError,
     r"`labels` \(2,\) must be `logits`'s shape without the vocabulary dimension, \(2, 3\)"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), reduction="avg"), KernelInputError,
     r"`reduction`='avg' is not one of 'none', 'sum', 'mean'"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), reduction="sum", num_items_in_batch=4),
     KernelInputError, r"`num_items_in_batch` divides the summed loss.*reduction='mean'"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), softcap=-30.0), KernelInputError,
     r"`softcap`=-30.0 must be positive"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), label_smoothing=1.5), KernelInputError,
     r"`label_smoothing`=1.5 must be in \[0, 1\]"),
    (lambda: cross_entropy(torch.randn(5, 3).t(), torch.tensor([1, 2, 0]), overwrite_logits=True),
     KernelInputError, r"needs contiguous logits"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 7), torch.tensor([1, 2, 3])),
     KernelInputError, r"`weight` \(10, 7\) must be \(vocab, hidden\) with hidden = `hidden`'s last dimension, 8"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]),
                                        bias=torch.randn(9)), KernelInputError, r"`bias` \(9,\) must be \(10,\)"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(10, 8),
                                        torch.tensor([1, 2, 3])), KernelDTypeError, r"cast `weight` to torch.bfloat16"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]), chunk_size=0),
     KernelInputError, r"`chunk_size`=0 must be a positive int"),
])
def test_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_errors_are_value_and_type_errors():
    assert issubclass(KernelInputError, ValueError)
    assert issubclass(KernelDTypeError, TypeError) and issubclass(KernelDTypeError, ValueError)


def test_lf_modules_raise_lfs_error_families():
    """A user-facing failure outside the kernels is one of lf.errors' types: packing a too-long example is a
    DataError, a serving request the engine refuses a RequestError (still a ValueError for older callers)."""
    from lf.data.packing import best_fit_decreasing
    from lf.errors import DataError, RequestError
    from lf.serve.engine import RequestError as served

    with pytest.raises(DataError, match="does not fit a row of 10: cut the examples"):
        best_fit_decreasing([11], 10)
    assert served is RequestError and issubclass(RequestError, ValueError)


def test_an_allocator_that_cannot_apply_is_a_config_error(monkeypatch):
    from lf import allocator
    from lf.errors import ConfigError

    monkeypatch.setattr(allocator, "glibc", lambda: (None, "the C library is musl, not glibc"))
    with pytest.raises(ConfigError, match="cpu_allocator: tuned cannot be applied: the C library is musl.*"
                                          "set cpu_allocator: default"):
        allocator.apply("tuned")
