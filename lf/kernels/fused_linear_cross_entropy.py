"""The output projection (lm_head) and the cross-entropy in one op, without ever holding the full logits.

Tokens go through in chunks: a chunk's logits ``hidden_chunk @ weight.T (+ bias)`` land in one reused buffer,
the row kernel of :mod:`lf.kernels.cross_entropy` turns them into their loss and (in place) their gradient, and
that gradient goes at once into the gradients of hidden, weight and bias; then the buffer serves the next chunk.
Tokens whose label is ``ignore_index`` are dropped before the matmul: they cost neither logits nor gradient
work. The matmuls are the platform's (torch.mm; fp32 logits on an AMX CPU by oneDNN's inner product, see
:func:`lf.kernels._backend.onednn_fp32_linear`); what is fused is the softmax/loss/gradient pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from lf.kernels import _alloc, _checks
from lf.kernels._backend import matmul_in_fp32, onednn_fp32_linear
from lf.kernels.cross_entropy import (NONE, check_labels_match, check_options, cross_entropy_reference, fake_loss,
                                      flat_labels, reduced_loss, row_losses, scale_saved_grads)
from lf.labels import IGNORE_INDEX

MIN_CHUNK_BYTES = 512 << 20


def chunk_rows(tokens: int, hidden: int, vocab: int, logits_size: int) -> int:
    """Tokens per chunk: the chunk's logits (``logits_size`` bytes each) take at most as many bytes as the
    hidden states would in that size, or 512 MiB when those are smaller; at least one row. Thinner chunks
    cost speed, not only on GPUs: Llama-3's lm_head in fp32 on 2 CPU cores over 1024 tokens took 35.3 s in
    130-token chunks (64 MiB), 27.3 s in 520-token chunks (256 MiB) and 24.2 s in one chunk (HF: 25.5 s)."""
    budget = max(tokens * hidden * logits_size, MIN_CHUNK_BYTES)
    return max(1, min(tokens, budget // (vocab * logits_size)))


def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, **options):
    """The oracle: the full logits, then :func:`cross_entropy_reference`."""
    logits = hidden @ weight.T
    return cross_entropy_reference(logits if bias is None else logits + bias, labels, **options)


class _Matmuls:
    """A chunk's matmuls, by torch.mm in the tensors' own dtype; fp32 logits by oneDNN where
    :func:`onednn_fp32_linear` says (its op has no ``out``: each chunk's logits are then a fresh tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias, self.dtype = weight, bias, weight.dtype
        self.onednn = onednn_fp32_linear(weight)

    def buffer(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """A buffer for ``rows`` tokens' logits that every chunk reuses; None when :meth:`logits` returns fresh ones."""
        return None if self.onednn else _alloc.empty((rows, self.weight.shape[0]), like, self.dtype)

    def logits(self, h: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        """The chunk's logits: the first rows of ``buffer`` (from :meth:`buffer`), or fresh when it is None."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(h, self.weight, self.bias, "none", [], "")
        out = buffer[: h.shape[0]]
        if self.bias is None:
            torch.mm(h, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, h, self.weight.t(), out=out)
        return out

    def backward(self, z: torch.Tensor, h: torch.Tensor, d_weight: torch.Tensor | None, need_hidden: bool):
        """Adds the chunk's term to ``d_weight`` (if given); returns the chunk's hidden gradient (if asked)."""
        if d_weight is not None:
            d_weight.addmm_(z.t(), h)
        return z @ self.weight if need_hidden else None


class _Fp32Blocks(_Matmuls):
    """For 16-bit weights on a CPU without native 16-bit dot products (AVX512-BF16, AMX): torch's bf16
    matmuls there run at 0.25-21 GFLOP/s depending on the operands' layout, against 120-160 in fp32
    (measured on a 2-core AVX2 EPYC, torch 2.13). So ``BLOCK`` rows of the weight at a time are widened into a
    reused fp32 buffer (a copy that costs ~0.2 ns an element, a few % of the matmuls) and every matmul, the
    logits and their gradient run in fp32."""

    BLOCK = 1024

    def __init__(self, weight, bias):
        super().__init__(weight, bias)
        self.dtype = torch.float32
        rows = min(self.BLOCK, weight.shape[0])
        self.w32 = torch.empty(rows, weight.shape[1], dtype=torch.float32, device=weight.device)
        self.dw32 = torch.empty_like(self.w32)
        self.bias32 = None if bias is None else bias.float()

    def _blocks(self):
        for begin in range(0, self.weight.shape[0], self.BLOCK):
            end = min(begin + self.BLOCK, self.weight.shape[0])
            w = self.w32[: end - begin]
            w.copy_(self.weight[begin:end])
            yield begin, end, w

    def logits(self, h, buffer):
        h32, out = h.float(), buffer[: h.shape[0]]
        for begin, end, w in self._blocks():
            torch.mm(h32, w.t(), out=out[:, begin:end])
        if self.bias32 is not None:
            out.add_(self.bias32)
        return out

    def backward(self, z, h, d_weight, need_hidden):
        h32 = h.float()
        d_hidden = torch.zeros_like(h32) if need_hidden else None
        for begin, end, w in self._blocks():
            z_block = z[:, begin:end]
            if need_hidden:
                d_hidden.addmm_(z_block, w)
            if d_weight is not None:
                dw = self.dw32[: end - begin]
                torch.mm(z_block.t(), h32, out=dw)
                d_weight[begin:end] += dw
        return d_hidden


def _matmuls_for(weight: torch.Tensor, bias: torch.Tensor | None) -> _Matmuls:
    return (_Fp32Blocks if matmul_in_fp32(weight) else _Matmuls)(weight, bias)


# EAFT's entropy: over the softmax of a token's EAFT_TOP_K largest logits, divided by EAFT_ENTROPY_SCALE (about
# log(20), its largest value), as LLaMA-Factory 0.9.5 defines it
EAFT_TOP_K, EAFT_ENTROPY_SCALE = 20, 3.0


def _eaft_weights(logits: torch.Tensor, softcap: float, alpha: float) -> torch.Tensor:
    """Each row's EAFT weight, (entropy of its top logits / EAFT_ENTROPY_SCALE) ** alpha, in fp32."""
    top = logits.topk(min(EAFT_TOP_K, logits.shape[-1]), dim=-1).values.float()
    if softcap:  # the capped logits' order is the raw ones'
        top = softcap * torch.tanh(top / softcap)
    logp = top.log_softmax(-1)
    return (-(logp.exp() * logp).sum(-1) / EAFT_ENTROPY_SCALE) ** alpha


def _kl_rows(z: torch.Tensor, r: torch.Tensor, softcap: float, ref_softcap: float, grad: bool) -> torch.Tensor:
    """Each row's KL(softmax(r) || softmax(z)), the reference's distribution first, in fp32 (softcaps applied to
    their own logits). With ``grad``, ``r`` is overwritten by the KL's gradient in ``z``, softmax(z) - softmax(r)
    (times the softcap's derivative). Row blocks keep the fp32 temporaries near 2^22 elements."""
    rows, vocab = z.shape
    out = torch.empty(rows, dtype=torch.float32, device=z.device)
    step = max(1, (1 << 22) // vocab)
    for begin in range(0, rows, step):
        end = min(rows, begin + step)
        x, y = z[begin:end].float(), r[begin:end].float()
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        if ref_softcap:
            y = ref_softcap * torch.tanh(y / ref_softcap)
        log_p, log_q = x.log_softmax(-1), y.log_softmax(-1)
        q = log_q.exp()
        out[begin:end] = (q * (log_q - log_p)).sum(-1)
        if grad:
            g = log_p.exp_().sub_(q)
            if softcap:
                g.mul_(1 - (x / softcap) ** 2)
            r[begin:end] = g
    return out


def _sweep(hidden, weight, bias, labels, ignore_index, smoothing, softcap, z_loss, dft, eaft, kl, ref_hidden,
           ref_weight, ref_bias, ref_softcap, scale, row_weight, chunk, need_hidden, need_weight, need_bias):
    """One pass over the tokens in chunks: per-token fp32 losses and, as asked, the gradients of hidden,
    weight and bias, each token's gradient scaled by ``scale`` (and by ``row_weight`` when given). ``dft``: each
    token's loss and gradient times exp(-its loss), its probability, as a constant (DFT). ``eaft`` (alpha; 0: off):
    times the entropy weight of _eaft_weights, a constant too (EAFT). ``kl`` (0: off): plus kl times the KL
    divergence of the token's distribution from the reference's, whose logits ``ref_hidden @ ref_weight.T (+
    ref_bias)`` are computed chunk by chunk beside the model's (ASFT's second term)."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    valid = labels != ignore_index
    kept = None if bool(valid.all()) else valid.nonzero()[:, 0]  # ignored tokens take no part
    n = tokens if kept is None else kept.numel()
    with_grad = need_hidden or need_weight or need_bias
    matmuls = _matmuls_for(weight, bias)
    losses = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)

    def none():  # placeholder for a gradient not asked for (a custom op returns tensors, each its own)
        return hidden.new_empty(0)

    d_hidden = (_alloc.empty_like(hidden) if kept is None else torch.zeros_like(hidden)) if need_hidden else none()
    d_weight = torch.zeros_like(weight) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    logits = matmuls.buffer(min(chunk, n), hidden)
    if kl:
        ref_matmuls = _matmuls_for(ref_weight, ref_bias)
        ref_logits = ref_matmuls.buffer(min(chunk, n), ref_hidden)
    for begin in range(0, n, chunk):
        end = min(n, begin + chunk)
        rows = None if kept is None else kept[begin:end]
        h = hidden[begin:end] if rows is None else hidden.index_select(0, rows)
        y = labels[begin:end] if rows is None else labels.index_select(0, rows)
        z = r = None  # the last chunk's logits, if fresh (not in a buffer), are freed before this chunk's come
        z = matmuls.logits(h, logits)
        factor = _eaft_weights(z, softcap, eaft) if eaft else None  # before z turns into the gradient
        if kl:  # before z turns into the gradient too; r turns into the KL's
            r = ref_matmuls.logits(ref_hidden[begin:end] if rows is None else ref_hidden.index_select(0, rows),
                                   ref_logits)
            divergence = _kl_rows(z, r, softcap, ref_softcap, with_grad)
        loss = row_losses(z, y, z if with_grad else None, ignore_index, smoothing, softcap, z_loss, scale)
        if dft:
            factor = torch.exp(-loss)  # the token's probability (DFT's weight)
        if factor is not None:
            loss = loss * factor
        if kl:
            loss = loss + kl * divergence
        if rows is None:
            losses[begin:end] = loss
        else:
            losses.index_copy_(0, rows, loss)
        if not with_grad:
            continue
        if kl:  # the weighted cross-entropy's gradient plus the divergence's, before row_weight scales both
            if factor is not None:
                z.mul_(factor[:, None].to(z.dtype))
            z.add_(r, alpha=kl * scale)
            factor = None
        if row_weight is not None:
            w_rows = row_weight[begin:end] if rows is None else row_weight.index_select(0, rows)
            factor = w_rows if factor is None else factor * w_rows
        if factor is not None:
            z.mul_(factor[:, None].to(z.dtype))
        d_h = matmuls.backward(z, h, d_weight, need_hidden)
        if need_hidden:
            if rows is None:
                d_hidden[begin:end] = d_h
            else:
                d_hidden.index_copy_(0, rows, d_h.to(d_hidden.dtype))
        if need_bias:
            d_bias += z.sum(0, dtype=torch.float32)
    return (losses, d_hidden, d_weight if need_weight else none(),
            d_bias.to(bias.dtype) if need_bias else none())


def _reference(op, hidden, weight, kl, ref_hidden, ref_weight, ref_bias, ref_softcap) -> tuple:
    """The op's reference-model arguments (kl, ref_hidden as rows, ref_weight, ref_bias, ref_softcap), checked."""
    if not kl:
        if ref_hidden is not None or ref_weight is not None:
            _checks.fail(op, "`ref_hidden`/`ref_weight` give a reference model for the KL term, but `kl` is 0: pass "
                             "kl > 0 with them, or drop them")
        return 0.0, None, None, None, 0.0
    if not kl > 0:
        _checks.fail(op, f"`kl`={kl} must be >= 0 (the weight of the KL divergence from the reference; 0: off)")
    if ref_hidden is None or ref_weight is None:
        _checks.fail(op, "`kl` > 0 needs the reference model's `ref_hidden` and `ref_weight` (its lm_head.weight)")
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)) + (
            (("ref_bias", ref_bias),) if ref_bias is not None else ()):
        _checks.tensor(op, name, t)
    _checks.same_device_and_dtype(op, "ref_hidden", ref_hidden, ref_weight=ref_weight,
                                  **({} if ref_bias is None else {"ref_bias": ref_bias}))
    if ref_hidden.device != hidden.device:
        _checks.fail(op, f"`ref_hidden` is on {ref_hidden.device} but `hidden` is on {hidden.device}; move them together")
    if (ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0] or ref_hidden.shape[:-1] != hidden.shape[:-1]
            or ref_hidden.shape[-1] != ref_weight.shape[1]):
        _checks.fail(op, f"the reference's `ref_hidden` {tuple(ref_hidden.shape)} and `ref_weight` "
                         f"{tuple(ref_weight.shape)} must have `hidden`'s tokens {tuple(hidden.shape[:-1])} and "
                         f"`weight`'s vocabulary {weight.shape[0]} (a reference with the model's tokenizer)")
    if ref_bias is not None and ref_bias.shape != ref_weight.shape[:1]:
        _checks.fail(op, f"`ref_bias` {tuple(ref_bias.shape)} must be ({ref_weight.shape[0]},)")
    if ref_softcap is not None and not ref_softcap > 0:
        _checks.fail(op, f"`ref_softcap`={ref_softcap} must be positive, or None for no capping")
    rows = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    return (float(kl), rows, ref_weight.detach(), None if ref_bias is None else ref_bias.detach(),
            float(ref_softcap or 0.0))


@torch.library.custom_op("lf::fused_linear_cross_entropy", mutates_args=())
def _flce(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
          ignore_index: int, smoothing: float, softcap: float, z_loss: float, dft: bool, eaft: float, kl: float,
          ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor],
          ref_softcap: float, reduction: int, num_items: Optional[torch.Tensor], row_weight: Optional[torch.Tensor],
          chunk: int, need_hidden: bool, need_weight: bool,
          need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = []

    def rows(scale):
        losses, *found = _sweep(hidden, weight, bias, labels, ignore_index, smoothing, softcap, z_loss, dft, eaft, kl,
                                ref_hidden, ref_weight, ref_bias, ref_softcap, scale, row_weight, chunk, need_hidden,
                                need_weight, need_bias)
        grads.extend(found)
        return losses

    loss = reduced_loss("fused_linear_cross_entropy", labels, weight.shape[0], ignore_index, reduction, num_items,
                        rows)
    return loss, *grads


@_flce.register_fake
def _(hidden, weight, bias, labels, ignore_index, smoothing, softcap, z_loss, dft, eaft, kl, ref_hidden, ref_weight,
      ref_bias, ref_softcap, reduction, num_items, row_weight, chunk, need_hidden, need_weight, need_bias):
    return (fake_loss(hidden.shape[0], reduction, hidden),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else hidden.new_empty(0))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, smoothing, softcap, z_loss, dft, eaft, reference,
                reduction, num_items, chunk):
        need = tuple(ctx.needs_input_grad[:3])
        options = (ignore_index, smoothing, softcap, z_loss, dft, eaft, *reference)  # reference: no gradient
        ctx.options, ctx.chunk, ctx.need, ctx.per_row = options, chunk, need, reduction == NONE
        # Per-token losses: a token's hidden gradient is its incoming gradient times the one computed here, but the
        # weight's and bias's sum over tokens, so those are computed in backward (a frozen head, as under LoRA, is
        # the common case and needs no second pass)
        ctx.deferred = reduction == NONE and (need[1] or need[2])
        if ctx.deferred:
            loss, *_ = torch.ops.lf.fused_linear_cross_entropy(hidden, weight, bias, labels, *options, NONE, None,
                                                               None, chunk, False, False, False)
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            loss, *grads = torch.ops.lf.fused_linear_cross_entropy(hidden, weight, bias, labels, *options, reduction,
                                                                   num_items, None, chunk, *need)
            ctx.save_for_backward(*[g if wanted else None for g, wanted in zip(grads, need)])
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.deferred:
            hidden, weight, bias, labels = ctx.saved_tensors
            _, *grads = torch.ops.lf.fused_linear_cross_entropy(hidden, weight, bias, labels, *ctx.options, NONE,
                                                                None, grad_out.float(), ctx.chunk, *ctx.need)
        else:
            grads = scale_saved_grads(ctx, grad_out, per_row=ctx.per_row)
        grads = [g if wanted else None for g, wanted in zip(grads, ctx.need)]
        return *grads, *[None] * 11


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                               label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                               z_loss: float = 0.0, num_items_in_batch=None,
                               chunk_size: int | None = None, dft: bool = False, eaft: float = 0.0, kl: float = 0.0,
                               ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                               ref_bias: torch.Tensor | None = None, ref_softcap: float | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` without materialising the logits.

    ``hidden`` is (..., H), ``weight`` (V, H) as ``nn.Linear`` stores it, ``labels`` (...) already aligned
    with ``hidden`` (for a causal LM, shift them by one first); the options are
    :func:`lf.kernels.cross_entropy`'s, with the same meaning (float32 loss; ``num_items_in_batch`` as in
    transformers; a batch without label tokens gives loss 0 and zero gradients, not NaN). ``dft``: Dynamic
    Fine-Tuning's loss (LLaMA-Factory's use_dft_loss): each token's loss times its probability exp(-loss), a
    constant to the gradient (so each token's gradient is scaled by it too), reduced as asked. ``eaft`` (alpha;
    0: off): Entropy-Adaptive Fine-Tuning's loss (LLaMA-Factory's use_eaft_loss, eaft_alpha): each token's loss
    times (H / 3) ** alpha, H the entropy of the softmax of its 20 largest logits, a constant as DFT's weight.
    ``kl`` (0: off): each token's loss plus ``kl`` times KL(q || p), p its softmax and q a reference model's, whose
    logits are ``ref_hidden @ ref_weight.T (+ ref_bias)`` (capped at ``ref_softcap``), computed a chunk at a time
    beside the model's and given no gradient; with ``dft``, ASFT's loss (LLaMA-Factory's use_asft_loss, kl its
    asft_alpha). ``ref_hidden`` has ``hidden``'s rows, ``ref_weight`` the same vocabulary as ``weight``.

    Memory: beyond the gradients themselves (of hidden, weight and bias, which the forward pass computes and
    the backward pass scales by the incoming gradient), one chunk of ``chunk_size`` tokens' logits exists at a
    time, plus that chunk's hidden rows and hidden gradient when some labels are ignored. By default
    ``chunk_size`` is chosen so that the chunk's logits take at most ``max(N * H, 512 MiB / element size)``
    elements, i.e. no more than the hidden states themselves (N tokens) or 512 MiB. On a CPU without native
    bf16/fp16 dot products, 16-bit matmuls run in fp32 (see :class:`_Fp32Blocks`): the chunk's logits are then
    fp32, plus two fp32 buffers of 1024 weight rows and fp32 copies of the chunk's hidden rows.
    With ``reduction="none"`` the
    hidden gradient is still computed in the forward pass (each token's is scaled by its incoming gradient), but
    the weight's and bias's sum over tokens weighted by those, so when they need gradients all are computed in the
    backward pass, recomputing the logits chunk by chunk (one matmul more).
    """
    op = "fused_linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        _checks.tensor(op, name, t)
    _checks.same_device_and_dtype(op, "hidden", hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    reduction_code, cap, num_items = check_options(op, ignore_index, label_smoothing, reduction, softcap, z_loss,
                                                   num_items_in_batch)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        _checks.fail(op, f"`weight` {tuple(weight.shape)} must be (vocab, hidden) with hidden = `hidden`'s last "
                         f"dimension, {hidden.shape[-1] if hidden.dim() else '?'} "
                         f"(lm_head.weight as nn.Linear stores it)")
    if hidden.numel() == 0 or weight.numel() == 0:
        _checks.fail(op, f"`hidden` {tuple(hidden.shape)} or `weight` {tuple(weight.shape)} is empty")
    if bias is not None and bias.shape != weight.shape[:1]:
        _checks.fail(op, f"`bias` {tuple(bias.shape)} must be ({weight.shape[0]},), one per vocabulary entry")
    check_labels_match(op, labels, "hidden", hidden, "hidden")
    if dft and eaft:
        _checks.fail(op, "dft and eaft weight each token's loss differently: pass one of them")
    reference = _reference(op, hidden, weight, kl, ref_hidden, ref_weight, ref_bias, ref_softcap)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        _checks.fail(op, f"`chunk_size`={chunk_size!r} must be a positive int (tokens per chunk), or None to choose")
    rows = hidden.reshape(-1, hidden.shape[-1])
    logits_size = 4 if matmul_in_fp32(weight) else hidden.element_size()
    if kl:  # the reference's chunk of logits beside the model's
        logits_size += 4 if matmul_in_fp32(ref_weight) else ref_hidden.element_size()
    chunk = chunk_size or chunk_rows(rows.shape[0], rows.shape[1], weight.shape[0], logits_size)
    loss = FusedLinearCrossEntropyFunction.apply(rows, weight, bias, flat_labels(op, labels), ignore_index,
                                                 float(label_smoothing), cap, float(z_loss), bool(dft), float(eaft),
                                                 reference, reduction_code, num_items, chunk)
    return loss.reshape(labels.shape) if reduction_code == NONE else loss
