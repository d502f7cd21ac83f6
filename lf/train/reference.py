"""The reference model the stages that compare with one share (dpo, kto, ppo; sft's use_asft_loss): built once
(reference_model) and switched to for a pass without gradient (as_reference).

The reference is the model as it starts: with LoRA the same model with its adapter switched off (no second copy of
the weights), with full or freeze a frozen copy; `ref_model` names another model instead (with
`ref_model_adapters` merged into it, loaded in `ref_model_quantization_bit` bits); a reference-free loss (orpo,
simpo) has none.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

from lf.kernels.fused_linear_preference_loss import REFERENCE_FREE
from lf.model import load_model

log = logging.getLogger("lf")


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode (no dropout, no gradient checkpointing) for passes without gradient."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def as_reference(model, reference=None, unwrapped=None):
    """The reference in eval mode: `reference` (a frozen copy, or the model ref_model names), or without one
    `model` itself with its adapter off (`unwrapped`: the PEFT model inside a distributed wrapper, if any)."""
    if reference is not None:
        with eval_mode(reference):
            yield reference
        return
    with eval_mode(model), (unwrapped if unwrapped is not None else model).disable_adapter():
        yield model


def reference_model(tokenizer, model, cfg, kind: str):
    """The frozen reference, or None where the policy itself serves (a LoRA model with its adapter off) or the
    loss `kind` needs none."""
    fin = cfg.finetuning
    if kind in REFERENCE_FREE or (fin.ref_model is None and hasattr(model, "disable_adapter")):
        return None
    if fin.ref_model is None:  # the weights as they start, exactly
        reference = copy.deepcopy(model)
    else:  # LLaMA-Factory's create_ref_model: ref_model with ref_model_adapters merged, in its own bits
        model_args = dataclasses.replace(cfg.model, model_name_or_path=fin.ref_model,
                                         adapter_name_or_path=fin.ref_model_adapters,
                                         quantization_bit=fin.ref_model_quantization_bit)
        as_ref = dataclasses.replace(fin, finetuning_type="lora") if fin.ref_model_adapters else fin
        reference, lines = load_model(tokenizer, model_args, as_ref, is_trainable=False,
                                      cutoff_len=cfg.data.cutoff_len)
        log.info("reference model: %s%s", fin.ref_model, "".join(f"; {line}" for line in lines))
    return reference.requires_grad_(False).eval()
