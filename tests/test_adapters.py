"""Adapter variants beyond plain LoRA, trained end to end on the tiny Llama: PiSSA (the initialised model computes
what the base did; pissa_convert's adapter on the ORIGINAL base computes what the trained model did)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from lf.config import parse_train_args
from lf.errors import ConfigError
from lf.model import pissa
from lf.tiny import tiny_path
from lf.train import run
from tests.test_train import lf_home, options, records  # noqa: F401 (lf_home: the module's LF_HOME fixture)

ATOL = 1e-4  # fp32 logits of a model whose weights were split by an SVD and summed back: rounding only
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
QUICK = {"max_steps": 3, "max_samples": 8, "cutoff_len": 64, "save_steps": 10, "learning_rate": 1e-2}


class Logits(TrainerCallback):
    """The model's logits on IDS as training begins and as it ends."""

    def __init__(self):
        self.seen = {}

    def _take(self, when, model):
        with torch.no_grad():
            self.seen[when] = model(input_ids=IDS).logits.float()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take("begin", model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._take("end", model)


def base_logits(model=None):
    model = model or AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("pissa_iter, init", [(-1, "pissa"), (2, "pissa_niter_2")])
def test_pissa_starts_as_the_base_and_converts_to_an_adapter_of_the_original_base(tmp_path, pissa_iter, init):
    from peft import PeftConfig, PeftModel

    logits = Logits()
    out = tmp_path / "out"
    run(parse_train_args(options(out, **QUICK, pissa_init=True, pissa_iter=pissa_iter, pissa_convert=True)), [logits])
    base = base_logits()
    assert (logits.seen["begin"] - base).abs().max() < ATOL  # the residual base plus the adapter is the base
    assert (logits.seen["end"] - base).abs().max() > 100 * ATOL  # training changed it: the check below can fail

    assert PeftConfig.from_pretrained(out / pissa.BACKUP).init_lora_weights == init
    converted = PeftConfig.from_pretrained(out)
    assert converted.r == 8  # PEFT's conversion: twice the rank
    original = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    restored = base_logits(PeftModel.from_pretrained(original, out))
    assert (restored - logits.seen["end"]).abs().max() < ATOL


def test_pissa_convert_without_pissa_init_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pissa_init"):
        parse_train_args(options(tmp_path, pissa_convert=True))
    with pytest.raises(ConfigError, match="pissa_init"):
        parse_train_args(options(tmp_path, pissa_init=True, finetuning_type="full"))


def test_neftune_noise_alpha_adds_noise_to_the_embeddings_in_training(tmp_path):
    """HF's Trainer does NEFTune (a forward hook on the input embeddings while training); lf passes the key on."""
    seen = []

    class Hooks(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(len(model.get_input_embeddings()._forward_hooks))

    first = {}
    for alpha in (None, 50.0):
        out = tmp_path / f"alpha-{alpha}"
        run(parse_train_args(options(out, **QUICK, neftune_noise_alpha=alpha)), [Hooks()] if alpha else [])
        first[alpha] = records(out)[0]["loss"]
    assert seen and all(seen)
    assert first[50.0] != first[None]  # the noise reached the loss


def test_early_stopping_steps_stops_after_that_many_evaluations_without_a_better_loss(tmp_path):
    """A learning rate too small to move the eval loss: the first evaluation is the best, the next one does not
    beat it, and with early_stopping_steps 1 the run stops there instead of at max_steps."""
    out = tmp_path / "out"
    run(parse_train_args(options(out, **{**QUICK, "max_steps": 6, "learning_rate": 1e-12, "save_steps": 1}, val_size=0.25,
                                 eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                                 early_stopping_steps=1)))
    assert [r["current_steps"] for r in records(out)] == [1, 2]
