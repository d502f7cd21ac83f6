"""Cross-entropy over a vocabulary, with the gradient computed in the same pass as the loss.

A row's loss needs its log-sum-exp, and the logits' gradient needs nothing more: so the forward pass
writes the gradient (scaled for the reduction) right away, over the logits when the caller allows it, and
the backward pass only multiplies it by the incoming gradient (and skips that when it is 1). Backends:
Triton (``kernels/cross_entropy.py``), C++ (``csrc/cross_entropy.cpp``), torch (here). The same row kernel
serves :func:`lf.kernels.fused_linear_cross_entropy`, one chunk of logits at a time.

Per row with label y, logits x (soft-capped first: z = cap * tanh(x / cap) when ``softcap``), V columns,
smoothing eps: ``loss = lse(z) - (1 - eps) z_y - eps * mean(z) + z_loss * lse(z)^2``, which is
``torch.nn.functional.cross_entropy``'s label smoothing plus PaLM's z-loss. Rows whose label is
``ignore_index`` have loss 0 and a zero gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lf.kernels import _alloc, _checks
from lf.kernels._backend import Implementations
from lf.labels import IGNORE_INDEX

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
NONE, SUM, MEAN = 0, 1, 2


def cross_entropy_reference(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=0.0, reduction="mean",
                            softcap=None, z_loss=0.0, num_items_in_batch=None):
    """The oracle, in the dtype it is given (tests give float64), from torch's own log-sum-exp."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(z, -1)
    valid = labels != ignore_index
    z_y = z.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0]
    rows = lse - (1 - label_smoothing) * z_y - label_smoothing * z.mean(-1) + z_loss * lse**2
    rows = torch.where(valid, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = valid.sum() if num_items_in_batch is None else num_items_in_batch
    return rows.sum() / max(float(count), 1.0)


# ---- torch backend ----

def _torch_forward(logits, labels, grad, loss, ignore_index, smoothing, softcap, z_loss, grad_scale):
    """Per-row loss into ``loss`` and, if ``grad`` is given (it may be ``logits``), the scaled gradient.
    Row blocks keep the fp32 temporaries near 2^24 elements."""
    rows, vocab = logits.shape
    step = max(1, (1 << 24) // vocab)
    for begin in range(0, rows, step):
        end = min(rows, begin + step)
        x, y = logits[begin:end].float(), labels[begin:end]
        z = x if softcap == 0 else softcap * torch.tanh(x / softcap)
        m = z.max(-1, keepdim=True).values
        log_s = torch.exp(z - m).sum(-1).log()  # m and log(s) apart: lse = m + log(s) would round to ulp(m)
        lse = m[:, 0] + log_s
        valid = y != ignore_index
        target = torch.where(valid, y, 0)[:, None]
        row = (log_s + (1 - smoothing) * (m[:, 0] - z.gather(1, target)[:, 0]) + smoothing * (m[:, 0] - z.mean(-1))
               + z_loss * lse * lse)
        loss[begin:end] = torch.where(valid, row, 0.0)
        if grad is not None:
            g = torch.exp(z - m - log_s[:, None]).mul_((1 + 2 * z_loss * lse)[:, None]).sub_(smoothing / vocab)
            g.scatter_add_(1, target, torch.full_like(lse, smoothing - 1)[:, None])
            if softcap:
                g.mul_(1 - (z / softcap) ** 2)
            grad[begin:end] = g.mul_(torch.where(valid, grad_scale, 0.0)[:, None])


# ---- cpu backend ----

def _cpu_forward(logits, labels, grad, loss, ignore_index, smoothing, softcap, z_loss, grad_scale):
    from lf import _C

    rows, vocab = logits.shape
    _C.cross_entropy(_C.CrossEntropy(logits=logits.data_ptr(), grad=0 if grad is None else grad.data_ptr(),
                                     labels=labels.data_ptr(), loss=loss.data_ptr(), rows=rows, vocab=vocab,
                                     ignore_index=ignore_index, smoothing=smoothing, softcap=softcap, z_loss=z_loss,
                                     grad_scale=grad_scale, dtype=_checks.cpu_dtype(logits.dtype),
                                     threads=_checks.threads()))


ROWS = Implementations(triton="lf._triton.kernels.cross_entropy:forward", cpu=_cpu_forward, torch=_torch_forward)


def row_losses(logits, labels, grad, ignore_index, smoothing, softcap, z_loss, grad_scale) -> torch.Tensor:
    """Per-row fp32 losses of (N, V) ``logits``; the scaled gradient goes into ``grad`` (None: no gradient;
    may be ``logits`` itself). The building block of both ops; inputs are already validated."""
    loss = _alloc.empty((logits.shape[0],), logits, torch.float32)
    ROWS.for_device(logits.device)(logits, labels, grad, loss, ignore_index, smoothing, softcap, z_loss, grad_scale)
    return loss


# ---- reduction: shared with fused_linear_cross_entropy ----

def check_labels_match(op: str, labels: torch.Tensor, name: str, ref: torch.Tensor, last_dim: str) -> None:
    """``labels`` has one entry per row of ``ref`` (its shape without the last dimension), on its device."""
    if labels.shape != ref.shape[:-1]:
        _checks.fail(op, f"`labels` {tuple(labels.shape)} must be `{name}`'s shape without the {last_dim} dimension, "
                         f"{tuple(ref.shape[:-1])} (for a causal LM, shift labels by one first)")
    if labels.device != ref.device:
        _checks.fail(op, f"`labels` is on {labels.device} but `{name}` is on {ref.device}; move them together")


def flat_labels(op: str, labels: torch.Tensor) -> torch.Tensor:
    """Labels as a flat int64 tensor (their values are checked inside the ops, see :func:`reduced_loss`)."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        _checks.fail(op, f"`labels` has dtype {labels.dtype}; it must hold integer token ids (e.g. `labels.long()`)")
    return labels.reshape(-1).long().contiguous()


def reduced_loss(op: str, labels: torch.Tensor, vocab: int, ignore_index: int, reduction: int,
                 num_items: torch.Tensor | None, row_losses_for: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """What depends on the labels' values, run inside the custom ops (torch.compile traces none of it):
    checks every label is ``ignore_index`` or a vocabulary index, finds the gradient's scale (1/(label
    tokens) for "mean", or 1/num_items_in_batch, transformers' convention under gradient accumulation; else
    1), gets the per-row losses from ``row_losses_for(scale)`` and reduces them. A batch without label
    tokens has loss 0 and zero gradients, whatever the scale."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        at = int(bad.nonzero()[0, 0])
        _checks.fail(op, f"`labels` holds {int(labels[at])} at flat position {at}, outside the vocabulary "
                         f"[0, {vocab}) and not ignore_index={ignore_index}; mask such positions with {ignore_index}")
    scale = 1.0
    if reduction == MEAN:
        count = float((labels != ignore_index).sum()) if num_items is None else float(num_items)
        if count < 0:
            _checks.fail(op, f"`num_items_in_batch`={count:g} must be a count of label tokens (>= 0)")
        scale = 1.0 / count if count > 0 else 1.0
    rows = row_losses_for(scale)
    return rows if reduction == NONE else rows.sum() * scale


def fake_loss(rows: int, reduction: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((rows,) if reduction == NONE else (), dtype=torch.float32)


def check_options(op: str, ignore_index, label_smoothing, reduction, softcap, z_loss, num_items_in_batch):
    """Validates the options both ops share; returns (reduction code, softcap as a float, num_items)."""
    _checks.choice(op, "reduction", reduction, tuple(REDUCTIONS))
    if not isinstance(ignore_index, int):
        _checks.fail(op, f"`ignore_index` must be an int, got {ignore_index!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        _checks.fail(op, f"`label_smoothing`={label_smoothing} must be in [0, 1]")
    if softcap is not None and not softcap > 0:
        _checks.fail(op, f"`softcap`={softcap} must be positive (Gemma-2 uses 30.0), or None for no capping")
    if not z_loss >= 0:
        _checks.fail(op, f"`z_loss`={z_loss} must be >= 0 (PaLM uses 1e-4)")
    num_items = None
    if num_items_in_batch is not None:
        if reduction != "mean":
            _checks.fail(op, f"`num_items_in_batch` divides the summed loss, which is reduction='mean'; "
                             f"drop it or use reduction='mean' (got {reduction!r})")
        num_items = torch.as_tensor(num_items_in_batch)  # a tensor (as HF Trainer passes it): read inside the op
    return REDUCTIONS[reduction], float(softcap or 0.0), num_items


# ---- custom ops and autograd ----

@torch.library.custom_op("lf::cross_entropy", mutates_args=())
def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float, softcap: float,
                   z_loss: float, reduction: int, num_items: Optional[torch.Tensor],
                   with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad = _alloc.empty_like(logits) if with_grad else logits.new_empty(0)
    loss = reduced_loss("cross_entropy", labels, logits.shape[1], ignore_index, reduction, num_items, lambda scale: (
        row_losses(logits, labels, grad if with_grad else None, ignore_index, smoothing, softcap, z_loss, scale)))
    return loss, grad


@_cross_entropy.register_fake
def _(logits, labels, ignore_index, smoothing, softcap, z_loss, reduction, num_items, with_grad):
    return fake_loss(logits.shape[0], reduction, logits), torch.empty_like(logits) if with_grad else \
        logits.new_empty(0)


@torch.library.custom_op("lf::cross_entropy_overwrite", mutates_args=("logits",))
def _cross_entropy_overwrite(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float,
                             softcap: float, z_loss: float, reduction: int,
                             num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return reduced_loss("cross_entropy", labels, logits.shape[1], ignore_index, reduction, num_items, lambda scale: (
        row_losses(logits, labels, logits, ignore_index, smoothing, softcap, z_loss, scale)))


@_cross_entropy_overwrite.register_fake
def _(logits, labels, ignore_index, smoothing, softcap, z_loss, reduction, num_items):
    return fake_loss(logits.shape[0], reduction, logits)


def scale_saved_grads(ctx, grad_out: torch.Tensor, per_row: bool = False) -> list[torch.Tensor]:
    """The gradients the forward pass saved, times the incoming gradient (per row for reduction="none"), in
    place: they are lf's own buffers. Skipped when that gradient is 1, the usual case of a loss that is
    backpropagated as is."""
    if getattr(ctx, "scaled", False):
        raise RuntimeError("lf's cross-entropy ran backward twice on one graph; it scales its saved gradient in "
                           "place, so retain_graph=True is not supported: run the forward again instead")
    grads = list(ctx.saved_tensors)
    if per_row or torch.compiler.is_compiling() or float(grad_out) != 1.0:
        ctx.scaled = True
        factor = grad_out[:, None] if per_row else grad_out
        for g in grads:
            if g is not None:
                g.mul_(factor.to(g.dtype))
    return grads


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, smoothing, softcap, z_loss, reduction, num_items, overwrite):
        args = (labels, ignore_index, smoothing, softcap, z_loss, reduction, num_items)
        if not ctx.needs_input_grad[0]:
            loss, _ = torch.ops.lf.cross_entropy(logits, *args, False)
        elif overwrite:
            loss = torch.ops.lf.cross_entropy_overwrite(logits, *args)
            ctx.save_for_backward(logits)  # now holding the gradient
        else:
            loss, grad = torch.ops.lf.cross_entropy(logits, *args, True)
            ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = scale_saved_grads(ctx, grad_out, ctx.reduction == NONE)
        return grad, *[None] * 8


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                  z_loss: float = 0.0, num_items_in_batch=None, overwrite_logits: bool = False) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against integer ``labels`` (...), fused with its gradient.

    Like ``torch.nn.functional.cross_entropy`` on fp32-upcast logits, plus Gemma-2's ``softcap``
    (``cap * tanh(logits / cap)`` before the softmax, differentiated too) and a ``z_loss`` term
    (``z_loss * logsumexp^2`` per row). The loss is float32 whatever the logits' dtype.

    - ``reduction="mean"`` divides by the number of label tokens, or by ``num_items_in_batch`` when given
      (transformers' convention under gradient accumulation: the micro-batches' label tokens together).
      A batch in which every label is ``ignore_index`` gives loss 0 and zero gradients, not NaN.
    - ``overwrite_logits=True`` writes the gradient over the logits during the forward pass, so no second
      vocabulary-sized buffer exists; the logits' values are gone afterwards (only use it when nothing else
      reads them). Otherwise one gradient buffer of the logits' size is allocated (none without autograd).
    - Rows whose label is ``ignore_index`` cost no exp work: their gradient row is zero-filled.
    """
    op = "cross_entropy"
    _checks.tensor(op, "logits", logits)
    reduction_code, cap, num_items = check_options(op, ignore_index, label_smoothing, reduction, softcap, z_loss,
                                                   num_items_in_batch)
    if logits.dim() < 1 or logits.shape[-1] == 0 or logits.numel() == 0:
        _checks.fail(op, f"`logits` {tuple(logits.shape)} is empty; it must be (..., vocab) with tokens and vocab > 0")
    check_labels_match(op, labels, "logits", logits, "vocabulary")
    if overwrite_logits and not logits.is_contiguous():
        _checks.fail(op, "`overwrite_logits=True` needs contiguous logits (the gradient is written over their memory)")
    rows = logits.reshape(-1, logits.shape[-1]).contiguous()
    loss = CrossEntropyFunction.apply(rows, flat_labels(op, labels), ignore_index, float(label_smoothing), cap,
                                      float(z_loss), reduction_code, num_items, overwrite_logits)
    return loss.reshape(labels.shape) if reduction_code == NONE else loss
