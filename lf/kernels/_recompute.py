"""Inputs an lf op need not keep for its backward pass: outputs of lf ops that say how to compute them again, bit
for bit, from tensors their own autograd node keeps anyway.

RMSNorm's output feeds the attention's q/k/v and the MLP's gate/up projections; each LoRA projection keeps its
input for the adapters' gradients, so without this one (tokens, hidden) tensor per norm stays alive until the
backward pass while the norm keeps its own input beside it (8 MiB a decoder layer at bench.train_e2e's 4 x 512
fp32 tokens, hidden 512). :func:`mark` (rms_norm) records on the tensor it returns how to
compute it; :func:`save` and :func:`saved` (the LoRA ops' autograd function) keep that recipe's tensors in its
place and, in the backward pass, compute it once for all its consumers: the first to need it computes it, the last
drops it.

The consumer keeps the tensor itself when it was changed in place since it was marked, and where saved-tensor hooks
(gradient checkpointing, offloading) or torch.compile decide what the backward pass keeps (:func:`graph_decides`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

_ATTR = "_lf_recipe"


def graph_decides() -> bool:
    """Whether something else decides what this forward keeps for the backward pass: saved-tensor hooks
    (checkpointing recomputes the layer anyway, offloading moves what is kept) or torch.compile."""
    return torch.compiler.is_compiling() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


@dataclass(eq=False)
class Recipe:
    compute: Callable[..., torch.Tensor]  # compute(*inputs) gives the marked tensor again, bit for bit
    inputs: tuple[torch.Tensor, ...]  # kept by the producing op's own node
    version: int  # the marked tensor's version counter when marked: an in-place change since voids the recipe
    consumers: int = 0  # backward passes still to read the value
    value: torch.Tensor | None = None  # computed in the backward pass, while consumers remain


def mark(out: torch.Tensor, compute: Callable[..., torch.Tensor], *inputs: torch.Tensor, **constants) -> torch.Tensor:
    """Records on ``out`` (returned) that ``compute(*inputs, **constants)`` gives it again. Only for an output the
    graph records (its producer keeps ``inputs`` then); ``inputs`` must be tensors that producer saves."""
    if out.requires_grad and not graph_decides():
        setattr(out, _ATTR, Recipe(functools.partial(compute, **constants), inputs, out._version))
    return out


def save(ctx, x: torch.Tensor, *tensors: torch.Tensor) -> None:
    """``ctx.save_for_backward(x, *tensors)``; for a marked ``x`` unchanged since, its recipe's inputs in its place."""
    recipe = getattr(x, _ATTR, None)
    if recipe is None or x._version != recipe.version or graph_decides():
        ctx.recipe = None
        ctx.save_for_backward(x, *tensors)
        return
    recipe.consumers += 1
    ctx.recipe = recipe
    ctx.save_for_backward(*recipe.inputs, *tensors)  # version-checked as any saved tensor


def saved(ctx) -> tuple[torch.Tensor, ...]:
    """``(x, *tensors)`` as given to :func:`save`, x computed again where its recipe was kept."""
    tensors, recipe = ctx.saved_tensors, ctx.recipe
    if recipe is None:
        return tensors
    count, value = len(recipe.inputs), recipe.value
    if value is None:
        with torch.no_grad():
            value = recipe.compute(*tensors[:count])
    recipe.consumers -= 1  # below 0 only when a graph is run backward again (retain_graph): computed each time
    recipe.value = value if recipe.consumers > 0 else None
    return (value, *tensors[count:])
