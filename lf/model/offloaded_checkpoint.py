"""Offloaded gradient checkpointing (LLaMA-Factory's `use_unsloth_gc`, Unsloth's idea): a checkpointed decoder
layer keeps only its input, and keeps it in CPU memory (pinned, copied without blocking) rather than the
accelerator's, until the backward pass copies it back and recomputes the layer from it. The accelerator then holds no
activation of any layer between the forward and the backward pass. The recomputation replays the forward's random
state (dropout) and autocast, so the gradients are plain backpropagation's.

A layer whose input is already in CPU memory (training on the CPU) has nothing to offload: it checkpoints as
transformers does. Tensors the layer takes other than its hidden states (masks, RoPE's cos/sin) get no gradient,
as in Unsloth's and LLaMA-Factory's versions: a decoder layer's do not need one.
"""

from __future__ import annotations

import torch

STORE = "cpu"  # where the checkpointed inputs wait for the backward pass


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _to_store(hidden: torch.Tensor) -> torch.Tensor:
    if hidden.device.type != "cuda":
        return hidden.detach().to(STORE, copy=True)
    kept = torch.empty(hidden.shape, dtype=hidden.dtype, device=STORE, pin_memory=True)
    return kept.copy_(hidden.detach(), non_blocking=True)  # stream-ordered: done before the memory is reused


class OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, hidden, *args):
        device = hidden.device
        ctx.function, ctx.args, ctx.device = function, args, device
        ctx.autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        ctx.rng = _rng_state(device)
        ctx.kept = _to_store(hidden)
        with torch.no_grad():
            return function(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        device = ctx.device
        hidden = ctx.kept.to(device, non_blocking=True).requires_grad_(True)
        del ctx.kept
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                outputs = ctx.function(hidden, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if torch.is_tensor(out) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, hidden.grad, *(None,) * len(ctx.args))


def offloaded_checkpoint(function, hidden, *args):
    """transformers' gradient-checkpointing function interface (`_gradient_checkpointing_func`): the layer's
    output, its input kept in CPU memory for the backward pass."""
    if hidden.device.type == STORE:  # nothing to offload: reentrant checkpointing, which recomputes the same way
        return torch.utils.checkpoint.checkpoint(function, hidden, *args, use_reentrant=True)
    return OffloadedCheckpoint.apply(function, hidden, *args)


def apply(model) -> None:
    """Makes the checkpointed layers of `model` (checkpointing on, in every layer or one in k) offload their input."""
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = offloaded_checkpoint
