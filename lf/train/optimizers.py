"""The optimizers LLaMA-Factory offers beside the trainer's `optim`: one entry each in OPTIMIZERS, the finetuning
key that turns it on -> the package it needs and the factory that builds it for a model.

A factory takes the model, HF's TrainingArguments, lf's finetuning group and the names of the parameters that
take weight decay (HF's rule: not norms, not biases), and returns a torch Optimizer. Where an optimizer is made of
several (Muon beside AdamW, layer-wise GaLore's one per parameter), `Joined` presents them as one: it holds their
very param_groups, so the trainer's learning-rate schedule reaches every part.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lf.config.finetuning import GALORE_CLASSES, OPTIMIZER_KEYS
from lf.errors import ConfigError


class Joined(torch.optim.Optimizer):
    """Optimizers stepped as one. layerwise: each part already stepped in its parameter's gradient hook, as soon as
    the gradient was ready (the memory saving of layer-wise GaLore), so step() has nothing left to do."""

    def __init__(self, parts: list[torch.optim.Optimizer], layerwise: bool = False):
        self.parts, self.layerwise = parts, layerwise
        # add_param_group keeps each group dict itself: a schedule's lr written here is the part's lr
        super().__init__([group for part in parts for group in part.param_groups], {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if not self.layerwise:
            for part in self.parts:
                part.step()
        return loss

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict):
        for part, saved in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(saved)


def _trainable(model) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _adam_kwargs(args) -> dict:
    return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


# ---- GaLore and APOLLO: Adam on low-rank projections of the linear layers' gradients ----

def projected_targets(model, key: str, target: str) -> list[nn.Parameter]:
    """The trainable weight matrices of the linear layers `key` (galore_target, apollo_target) names: all of them
    but the output head, or those whose module path contains one of the comma-separated names."""
    head = model.get_output_embeddings()
    names = None if target.strip() == "all" else [t.strip() for t in target.split(",") if t.strip()]
    found = [module.weight for path, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not head and module.weight.requires_grad
             and (names is None or any(name in path for name in names))]
    if not found:
        raise ConfigError(f"{key}: {target} names no trainable linear layer of the model: give module names such as "
                          "q_proj,v_proj, or all")
    return found


def _resumable(*projectors) -> None:
    """The projector objects in GaLore's and APOLLO's optimizer state may be read back from a checkpoint: the
    Trainer resumes with torch.load(weights_only=True), which refuses classes it does not know."""
    torch.serialization.add_safe_globals(list(projectors))


def _projected(model, args, decayed: set[str], cls, kwargs: dict, prefix: str, finetuning, projection: dict):
    """cls (GaLore's or APOLLO's Adam) with LLaMA-Factory's groups, in its order (APOLLO seeds each matrix's random
    projection by its place): vectors without decay, other decayed weights, the projected matrices (decayed too).
    Layer-wise: one optimizer per parameter, stepped in its gradient hook."""
    projected = {id(p) for p in projected_targets(model, f"{prefix}_target", getattr(finetuning, f"{prefix}_target"))}
    plain, decay, low_rank = [], [], []
    for name, param in _trainable(model):
        (low_rank if id(param) in projected else decay if name in decayed else plain).append(param)
    groups = [(plain, 0.0, {}), (decay, args.weight_decay, {}), (low_rank, args.weight_decay, projection)]
    if not getattr(finetuning, f"{prefix}_layerwise"):
        return cls([{"params": params, "weight_decay": wd, **extra} for params, wd, extra in groups], **kwargs)
    parts = {param: cls([{"params": [param], "weight_decay": wd, **extra}], **kwargs)
             for params, wd, extra in groups for param in params}

    def step_now(param):  # the gradient is complete (no accumulation): step and free it
        parts[param].step()
        parts[param].zero_grad(set_to_none=True)

    for param in parts:
        param.register_post_accumulate_grad_hook(step_now)
    return Joined(list(parts.values()), layerwise=True)


def _galore(model, args, finetuning, decayed: set[str]) -> torch.optim.Optimizer:
    import galore_torch
    from galore_torch.galore_projector import GaLoreProjector

    _resumable(GaLoreProjector)
    cls = getattr(galore_torch, GALORE_CLASSES[str(getattr(args.optim, "value", args.optim))])
    kwargs = {"lr": args.learning_rate} if cls.__name__ == "Adafactor" else _adam_kwargs(args)
    if cls.__name__ == "AdamW":
        kwargs["no_deprecation_warning"] = True
    projection = {"rank": finetuning.galore_rank, "update_proj_gap": finetuning.galore_update_interval,
                  "scale": finetuning.galore_scale, "proj_type": finetuning.galore_proj_type}
    return _projected(model, args, decayed, cls, kwargs, "galore", finetuning, projection)


def _apollo(model, args, finetuning, decayed: set[str]) -> torch.optim.Optimizer:
    """apollo_scale_front is the optimizer's argument (LLaMA-Factory puts it in the group, where APOLLO ignores it)."""
    from apollo_torch import APOLLOAdamW
    from apollo_torch.random_projector import GradientProjector
    from apollo_torch.svd_projector import GaLoreProjector

    _resumable(GradientProjector, GaLoreProjector)
    projection = {"rank": finetuning.apollo_rank, "proj": finetuning.apollo_proj,
                  "proj_type": finetuning.apollo_proj_type, "update_proj_gap": finetuning.apollo_update_interval,
                  "scale": finetuning.apollo_scale, "scale_type": finetuning.apollo_scale_type}
    kwargs = {**_adam_kwargs(args), "scale_front": finetuning.apollo_scale_front}
    return _projected(model, args, decayed, APOLLOAdamW, kwargs, "apollo", finetuning, projection)


# ---- BAdam: Adam on one block of parameters at a time ----

def _badam(model, args, finetuning, decayed: set[str]) -> torch.optim.Optimizer:
    """layer: the trainer's optimizer over one decoder layer at a time, the next every badam_switch_interval steps
    (the others frozen); ratio: badam_update_ratio of each weight matrix's entries update, the rest masked."""
    import badam

    groups = [{"params": [p for n, p in _trainable(model) if n not in decayed], "weight_decay": 0.0},
              {"params": [p for n, p in _trainable(model) if n in decayed], "weight_decay": args.weight_decay}]
    named = list(model.named_parameters())
    kwargs = _adam_kwargs(args)
    if finetuning.badam_mode == "ratio":
        return badam.BlockOptimizerRatio(param_groups=groups, named_parameters_list=named,
                                         update_ratio=finetuning.badam_update_ratio,
                                         mask_mode=finetuning.badam_mask_mode, verbose=finetuning.badam_verbose,
                                         include_embedding=False, **kwargs)
    return _resumable_blocks(badam.BlockOptimizer)(
        base_optimizer=torch.optim.AdamW(groups, **kwargs), named_parameters_list=named,
        switch_block_every=finetuning.badam_switch_interval, start_block=finetuning.badam_start_block,
        switch_mode=finetuning.badam_switch_mode, verbose=finetuning.badam_verbose)


def _resumable_blocks(block_optimizer: type) -> type:
    """badam.BlockOptimizer whose checkpoint holds where the block schedule stands. BAdam's own saves the Adam
    moments of the block in training only, so a resumed run would start over at the first block, with another
    block's moments; this one saves the block in training, the next one and the step count beside them. Under
    ZeRO-3 DeepSpeed's optimizer wraps this one and checkpoints its own shards: BAdam's behaviour stays there."""

    class ResumableBlockOptimizer(block_optimizer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            del self.state_dict  # BAdam's instance attribute (the AdamW's state_dict) hides the method

        def _active_block(self) -> int:
            return next(i for i, block in enumerate(self.block_prefix_list)
                        if block + self.active_modules == self.active_param_prefixs)

        def state_dict(self):
            if self.ds_zero3_enabled:
                return self.base_optimizer.state_dict()
            return {"adamw": self.base_optimizer.state_dict(), "global_step": self.global_step,
                    "active_block": self._active_block(), "next_block": self.current_block_idx,
                    "block_order": list(getattr(self, "block_order", []))}

        def load_state_dict(self, state_dict):
            if self.ds_zero3_enabled:
                return self.base_optimizer.load_state_dict(state_dict)
            self.current_block_idx = state_dict["active_block"]
            self.switch_trainable_params(verbose=0)  # that block's weights train again, from the loaded values
            self.current_block_idx, self.global_step = state_dict["next_block"], state_dict["global_step"]
            self.block_order = list(state_dict["block_order"])
            self.base_optimizer.load_state_dict(state_dict["adamw"])

    return ResumableBlockOptimizer


# ---- Adam-mini ----

def _adam_mini(model, args, finetuning, decayed: set[str]) -> torch.optim.Optimizer:
    """Adam-mini partitions the weights by their names (q/k heads, v, o and MLP neurons, embeddings) and reads the
    head counts from the model's config; it decays what it decides to (no norms, no biases)."""
    from adam_mini import Adam_mini

    config = model.config.get_text_config()
    return Adam_mini(named_parameters=_trainable(model), weight_decay=args.weight_decay, model_sharding=False,
                     dim=config.hidden_size, n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False, **_adam_kwargs(args))


# ---- Muon ----

def muon_split(model) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters: Muon orthogonalises the hidden weight matrices; the embeddings, the
    output head and the vectors take AdamW (LLaMA-Factory's split)."""
    muon, adamw = [], []
    for name, param in _trainable(model):
        hidden = param.ndim == 2 and "embed" not in name and "lm_head" not in name
        (muon if hidden else adamw).append(param)
    return muon, adamw


def _muon(model, args, finetuning, decayed: set[str]) -> torch.optim.Optimizer:
    """torch's Muon with its learning rate matched to AdamW's update size (0.2 x sqrt(larger side), Moonlight's
    rule, which LLaMA-Factory's Muon uses), weight decay on every parameter as LLaMA-Factory's does."""
    muon, adamw = muon_split(model)
    parts = [torch.optim.Muon(muon, lr=args.learning_rate, weight_decay=args.weight_decay,
                              adjust_lr_fn="match_rms_adamw")] if muon else []
    if adamw:
        parts.append(torch.optim.AdamW(adamw, weight_decay=args.weight_decay, **_adam_kwargs(args)))
    return Joined(parts)


@dataclass(frozen=True)
class Optimizer:
    feature: str  # in words, for messages
    module: str  # the package it imports
    extra: str  # lf's pip extra that installs it
    build: Callable


OPTIMIZERS = types.MappingProxyType({
    "use_galore": Optimizer("GaLore", "galore_torch", "galore", _galore),
    "use_apollo": Optimizer("APOLLO", "apollo_torch", "apollo", _apollo),
    "use_badam": Optimizer("BAdam", "badam", "badam", _badam),
    "use_adam_mini": Optimizer("Adam-mini", "adam_mini", "adam-mini", _adam_mini),
    "use_muon": Optimizer("Muon", "torch", "", _muon),  # torch >= 2.9 has torch.optim.Muon
})


assert tuple(OPTIMIZERS) == OPTIMIZER_KEYS


def chosen(finetuning) -> list[str]:
    """The OPTIMIZERS keys the config turns on."""
    return [key for key in OPTIMIZERS if getattr(finetuning, key, False)]


def build(model, args, finetuning, decayed) -> torch.optim.Optimizer | None:
    """The optimizer the config chooses (None: the trainer's own `optim`)."""
    keys = chosen(finetuning)
    if not keys:
        return None
    entry = OPTIMIZERS[keys[0]]
    try:
        importlib.import_module(entry.module)
    except ImportError as e:
        raise ConfigError(f"{keys[0]}: true ({entry.feature}) needs the {entry.module} package ({e}): pip install 'lf[{entry.extra}]'")
    return entry.build(model, args, finetuning, set(decayed))
