"""Mixture-of-Depths (Raposo et al., 2024; LLaMA-Factory's `mixture_of_depths: convert | load`), lf's own.

Every other decoder layer (1, 3, 5, ...) gets a router: a linear map of each token's hidden state to one score.
In training a row's top CAPACITY (12.5%) tokens by score go through the layer; the others skip it along the
residual stream, unchanged. A routed token's layer contribution is scaled by its score,

    out = x + score * (layer(x) - x)

so the LM loss reaches the router. The chosen tokens run as a shorter sequence (the layer's cost falls with
them): in their original order, at their own positions (RoPE), attending causally to the other chosen tokens of
their row (and of their example, in a packed row); padding is chosen only when a row has too few real tokens.

Top-k over a row looks at the future: whether a token routes depends on the scores of the tokens after it, which
sampling cannot know. In eval mode (lf eval, evaluation during training) each token decides alone, causally: it
routes when its score reaches its router's threshold, a running mean of the top-k cut-off kept in training (saved
with the router). Generation is refused: a routed layer's skipped tokens would leave holes in its KV cache.

A new router has weight 0 and bias 1: every score is 1, so a routed token's output is the original layer's, and
until training sets a threshold every token routes at evaluation (the converted model computes what the original
did). `convert` adds routers to a plain model and marks its config (CONFIG_KEY: the routed layers, the capacity);
the saved model keeps its architecture and stores each router beside its layer (`model.layers.1.mod_router.*`,
which plain transformers ignores); `load` rebuilds the routers from the mark and reads them back. Routers train
fully with any finetuning_type (beside a LoRA adapter, as modules it saves).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from lf.errors import ModelError

CAPACITY = 0.125  # the paper's share of the tokens through a routed layer (LLaMA-Factory's package ends there too)
ROUTER = "mod_router"  # a routed layer's router module, whose linear map is mod_score (never a LoRA target)
CONFIG_KEY = "lf_mixture_of_depths"
THRESHOLD_MOMENTUM = 0.99  # of the running mean of the top-k cut-off
# decoder layers that take (hidden, attention_mask, position_embeddings=(cos, sin), ...) and return the hidden
# states: LLaMA-Factory's list without ALiBi (bloom, falcon) and MoE (mixtral, whose load-balancing loss counts
# every token of every layer), with Qwen2/3 (the same layer arguments)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "starcoder2")
ATTENTIONS = ("sdpa", "eager", "lf_packed")  # the attentions that take a (batch, 1, query, key) mask tensor


class Router(nn.Module):
    """One score per token; `threshold` (the running mean of the top-k cut-off, moved by each backward pass;
    -inf until training sets it) routes tokens at evaluation."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device):
        super().__init__()
        self.mod_score = nn.Linear(hidden_size, 1, dtype=dtype, device=device)
        nn.init.zeros_(self.mod_score.weight)
        nn.init.ones_(self.mod_score.bias)
        self.register_buffer("threshold", torch.tensor(-math.inf, device=device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mod_score(hidden).squeeze(-1)

    @torch.no_grad()
    def track(self, cutoffs: torch.Tensor) -> None:
        """Moves the threshold towards the batch's mean top-k cut-off (takes it as it is the first time). Rows
        whose cut-off fell on padding (-inf) say nothing."""
        cutoffs = cutoffs[torch.isfinite(cutoffs)].float()
        if cutoffs.numel():
            mean = cutoffs.mean()
            first = torch.isinf(self.threshold)
            self.threshold.copy_(torch.where(first, mean, THRESHOLD_MOMENTUM * self.threshold
                                             + (1 - THRESHOLD_MOMENTUM) * mean))


def route(router: Router, hidden: torch.Tensor, real: torch.Tensor | None, capacity: float, training: bool):
    """(scores (B, L), chosen positions (B, k) in order, which of them route (B, k) bool). Training: each row's
    top ceil(capacity * L) real tokens (padding only when a row has too few real ones); evaluation: the tokens
    whose score reaches the threshold (each row filled up to the longest with tokens that do not route)."""
    scores = router(hidden)
    ranked = scores.float() if real is None else scores.float().masked_fill(~real, -math.inf)
    if training:
        top = ranked.topk(max(1, math.ceil(capacity * hidden.shape[1])), dim=1)
        if scores.requires_grad:  # tracked as the gradient passes: once a step, though checkpointing reruns this
            cutoffs = top.values[:, -1].detach()
            scores.register_hook(lambda grad: router.track(cutoffs))
        chosen = top.indices.sort(dim=1).values
        return scores, chosen, torch.ones_like(chosen, dtype=torch.bool)
    routes = ranked >= router.threshold
    k = int(routes.sum(dim=1).max())
    # the routing positions first, in order, then the others: the first k, put back in order
    chosen = torch.argsort((~routes).to(torch.int8), dim=1, stable=True)[:, :k].sort(dim=1).values
    return scores, chosen, routes.gather(1, chosen)


def _rows(t: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """t (B or 1, L, ...) at the chosen positions (B, k) -> (B, k, ...)."""
    t = t.expand(chosen.shape[0], *t.shape[1:])
    index = chosen.view(*chosen.shape, *(1,) * (t.dim() - 2)).expand(*chosen.shape, *t.shape[2:])
    return t.gather(1, index)


def _allowed(mask) -> torch.Tensor | None:
    """The model's (B, 1, q, k) attention mask as booleans (True: may attend); None stays None."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise ModelError(f"mixture_of_depths: a routed layer got an attention mask of type {type(mask).__name__}; "
                         f"it cuts a (batch, 1, query, key) tensor to its tokens: set flash_attn: sdpa")
    return mask if mask.dtype == torch.bool else mask == 0


def sub_mask(allowed: torch.Tensor | None, position_ids, chosen: torch.Tensor, routes: torch.Tensor):
    """The chosen tokens' (B, 1, k, k) boolean mask: causal, within their example in a packed row (position ids
    restarting at 0), what the model's mask allowed, towards routing tokens only; and each token sees itself (a
    padding token filling a row must not be left with nothing to attend to)."""
    k = chosen.shape[1]
    mask = torch.ones(k, k, dtype=torch.bool, device=chosen.device).tril().expand(chosen.shape[0], k, k)
    if position_ids is not None and position_ids.dim() == 2:
        example = _rows((position_ids == 0).cumsum(dim=1), chosen)
        mask = mask & (example[:, :, None] == example[:, None, :])
    if allowed is not None:
        rows = _rows(allowed[:, 0], chosen)  # (B, k, L)
        mask = mask & rows.gather(2, chosen[:, None, :].expand(-1, k, -1))
    mask = (mask & routes[:, None, :]) | torch.eye(k, dtype=torch.bool, device=chosen.device)
    return mask[:, None]


class RoutedLayer:
    """Put before a decoder layer's class (`_routed_class`): the layer's own forward runs on the tokens its router
    chooses, as one shorter sequence per row."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if past_key_values is not None:
            raise ModelError("mixture_of_depths: a routed layer was called with a KV cache, in which its skipped "
                             "tokens would leave holes: run the model with use_cache=False (lf refuses generation "
                             "with mixture_of_depths)")
        kwargs.pop("cache_position", None)  # the whole row's
        allowed = _allowed(attention_mask)
        real = None if allowed is None else allowed[:, 0].diagonal(dim1=-2, dim2=-1)  # padding cannot see itself
        scores, chosen, routes = route(getattr(self, ROUTER), hidden_states, real, self.mod_capacity, self.training)
        if chosen.shape[1] == 0:
            return hidden_states
        mask = sub_mask(allowed, position_ids, chosen, routes)
        if self.mod_eager:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=hidden_states.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(hidden_states.dtype).min)
        picked = _rows(hidden_states, chosen)
        cos, sin = position_embeddings
        out = super().forward(picked, attention_mask=mask, position_ids=None, past_key_values=None, use_cache=False,
                              position_embeddings=(_rows(cos, chosen), _rows(sin, chosen)), **kwargs)
        weight = _rows(scores, chosen).unsqueeze(-1).to(picked.dtype)
        out = torch.where(routes.unsqueeze(-1), picked + weight * (out - picked), picked)
        return hidden_states.scatter(1, chosen.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]), out)


_ROUTED: dict[type, type] = {}


def _routed_class(cls: type) -> type:
    """cls with RoutedLayer's forward first, one class per decoder layer class: the layer stays an instance of
    its class (transformers' hooks that record each layer's hidden states find it; gradient checkpointing wraps
    the routed forward, router included)."""
    if cls not in _ROUTED:
        _ROUTED[cls] = type(f"Routed{cls.__name__}", (RoutedLayer, cls), {"__module__": __name__})
    return _ROUTED[cls]


def _check(model) -> nn.ModuleList:
    """The model's decoder layers, or a ModelError saying why lf cannot route them."""
    config = model.config
    if config.model_type not in FAMILIES:
        raise ModelError(f"mixture_of_depths: model_type {config.model_type!r} is not one lf routes ("
                         f"{', '.join(FAMILIES)}: decoder layers that take RoPE's cos and sin and return the hidden "
                         f"states); remove mixture_of_depths")
    if config._attn_implementation not in ATTENTIONS:
        raise ModelError(f"mixture_of_depths: the model's attention is {config._attn_implementation!r}, whose mask "
                         f"a routed layer cannot cut to its tokens: set flash_attn: sdpa (or disabled)")
    return getattr(model, model.base_model_prefix).layers


def _wrap(model, layers: list[int], capacity: float) -> list[nn.Module]:
    decoder = _check(model)
    dtype = model.get_input_embeddings().weight.dtype  # (a quantized layer's weights are integers)
    routed = []
    for i in layers:
        layer = decoder[i]
        layer.__class__ = _routed_class(type(layer))
        layer.add_module(ROUTER, Router(model.config.hidden_size, dtype, model.get_input_embeddings().weight.device))
        layer.mod_capacity = capacity
        layer.mod_eager = model.config._attn_implementation == "eager"
        routed.append(layer)
    model.config.use_cache = False  # see RoutedLayer.forward
    return routed


def routers(model) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def convert(model) -> str:
    """Adds a router to every other decoder layer of a plain model and marks its config."""
    if getattr(model.config, CONFIG_KEY, None):
        raise ModelError(f"mixture_of_depths: convert: this model was converted already (its config has "
                         f"{CONFIG_KEY}): set mixture_of_depths: load")
    layers = list(range(1, model.config.num_hidden_layers, 2))
    _wrap(model, layers, CAPACITY)
    setattr(model.config, CONFIG_KEY, {"layers": layers, "capacity": CAPACITY})
    return (f"mixture_of_depths: convert: new routers on decoder layers {', '.join(map(str, layers))}; in training "
            f"the top {CAPACITY:.1%} of each row's tokens go through them, the others skip them")


def _saved(path: str, names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    if not files:
        raise ModelError(f"mixture_of_depths: load reads the routers from the model's safetensors files, and "
                         f"{path} is not a folder holding them: name the folder a convert run saved")
    found = {}
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            found.update({key: f.get_tensor(key) for key in f.keys() if key in names})  # noqa: SIM118
    return found


def load(model, path: str) -> str:
    """Rebuilds the routers a converted model was saved with (its config's mark) and reads them from `path`."""
    mark = getattr(model.config, CONFIG_KEY, None)
    if not mark:
        raise ModelError(f"mixture_of_depths: load: {path} has no routers (its config lacks {CONFIG_KEY}, which "
                         f"lf's convert writes): set mixture_of_depths: convert to add new ones")
    routed = _wrap(model, list(mark["layers"]), float(mark["capacity"]))
    names = {layer: name for name, layer in model.named_modules() if any(layer is r for r in routed)}
    wanted = {f"{names[layer]}.{ROUTER}.{key}": value for layer in routed
              for key, value in getattr(layer, ROUTER).state_dict().items()}
    saved = _saved(path, set(wanted))
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise ModelError(f"mixture_of_depths: load: {path} lacks {len(missing)} router tensor(s), e.g. {missing[0]}: "
                         f"name the folder a convert run saved whole (full or freeze; a LoRA run's adapter holds "
                         f"its routers: use it with mixture_of_depths: convert, or lf export it so)")
    for name, value in wanted.items():
        value.copy_(saved[name])  # state_dict's tensors share the module's storage
    return (f"mixture_of_depths: load: routers on decoder layers {', '.join(map(str, mark['layers']))} read from "
            f"{path} (in training the top {float(mark['capacity']):.1%} of each row's tokens go through them; at "
            f"evaluation a token goes through when its score reaches its router's threshold)")


def apply(model, mode: str, path: str) -> str:
    """mixture_of_depths: convert or load; says what was done, in one line."""
    return convert(model) if mode == "convert" else load(model, path)
