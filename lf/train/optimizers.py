"""Optimizers lf builds itself for LLaMA-Factory's keys (HF's `optim` covers the rest).

Muon (`use_muon`): torch's own `torch.optim.Muon` steps the hidden layers' weight matrices (every trainable 2-D
parameter but the embeddings and the output head, LoRA's A and B included) and AdamW the rest (embeddings, head,
norms, biases), as Muon's authors prescribe. Both take learning_rate and weight_decay; Muon's step is scaled to
AdamW's update size (`adjust_lr_fn="match_rms_adamw"`, 0.2 x sqrt(max(rows, cols))) so that one learning rate,
and one schedule, suits both.
"""

from __future__ import annotations

import torch

MUON_MOMENTUM = 0.95  # Muon's usual momentum (torch's default too)


def on_muon(name: str, param: torch.Tensor) -> bool:
    """Whether Muon steps this parameter: a hidden layer's matrix, not an embedding or the output head."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer (what HF's Trainer, its schedulers and checkpoints expect) over two: torch's Muon for
    `muon_groups`, AdamW for `adamw_groups`. The group dicts are shared with the inner optimizers, so a scheduler
    setting a group's lr reaches the optimizer that steps it."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, betas: tuple[float, float],
                 eps: float):
        super().__init__([*muon_groups, *adamw_groups], {})
        muon, adamw = self.param_groups[:len(muon_groups)], self.param_groups[len(muon_groups):]
        self.inner = {}  # name -> optimizer; an empty side gets none (torch refuses an empty parameter list)
        if muon:
            self.inner["muon"] = torch.optim.Muon(muon, momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw")
        if adamw:
            self.inner["adamw"] = torch.optim.AdamW(adamw, betas=betas, eps=eps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.inner.values():
            optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.inner.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, optimizer in self.inner.items():
            optimizer.load_state_dict(state_dict[name])
