"""Adapter variants beyond plain LoRA, trained end to end on the tiny Llama: PiSSA (the initialised model computes
what the base did; pissa_convert's adapter on the ORIGINAL base computes what the trained model did)."""

import math

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


def test_oft_trains_peft_oft_adapters_that_start_as_the_base_and_reload(tmp_path):
    """finetuning_type: oft is PEFT's OFT with LLaMA-Factory's keys: the saved config is the one PEFT builds from
    them, the rotations start at the identity (the base's logits), and the saved adapter on the base reproduces
    the trained model (PEFT's own loading: the reference)."""
    from peft import OFTConfig, PeftConfig, PeftModel

    logits = Logits()
    out = tmp_path / "out"
    run(parse_train_args(options(out, **QUICK, finetuning_type="oft", oft_block_size=16, oft_target="q_proj,down_proj",
                                 module_dropout=0.1)), [logits])
    base = base_logits()
    assert (logits.seen["begin"] - base).abs().max() < ATOL
    assert (logits.seen["end"] - base).abs().max() > 100 * ATOL

    saved = PeftConfig.from_pretrained(out)
    expected = OFTConfig(r=0, oft_block_size=16, module_dropout=0.1, target_modules=["q_proj", "down_proj"])
    assert isinstance(saved, OFTConfig)
    assert (saved.r, saved.oft_block_size, saved.module_dropout, set(saved.target_modules)) == (
        expected.r, expected.oft_block_size, expected.module_dropout, set(expected.target_modules))
    original = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(original, out)
    # q_proj's input (256) in blocks of 16: 16 blocks of 16 * 15 / 2 rotation parameters each
    shapes = {name.split(".")[-4]: p.shape for name, p in reloaded.named_parameters() if "oft_R" in name}
    assert shapes == {"q_proj": (16, 120), "down_proj": (704 // 16, 120)}
    assert (base_logits(reloaded) - logits.seen["end"]).abs().max() < ATOL


def test_oft_keys_need_oft_and_one_block_setting(tmp_path):
    with pytest.raises(ConfigError, match="set finetuning_type: oft"):
        parse_train_args(options(tmp_path, oft_target="q_proj"))
    with pytest.raises(ConfigError, match="exactly one"):
        parse_train_args(options(tmp_path, finetuning_type="oft", oft_rank=0, oft_block_size=0))
    with pytest.raises(ConfigError, match="not OFT adapters"):
        parse_train_args(options(tmp_path, finetuning_type="oft", use_badam=True))


def test_use_dft_loss_trains_on_the_probability_weighted_loss(tmp_path):
    """DFT's loss is each token's cross-entropy times its probability: for the tiny random model, whose tokens have
    probabilities near 1/vocabulary (cross-entropy near log(vocabulary), above 5), far below 1 but above zero."""
    out = tmp_path / "out"
    run(parse_train_args(options(out, **{**QUICK, "max_steps": 1}, use_dft_loss=True)))
    vocab = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama")).config.vocab_size
    assert math.log(vocab) > 5
    assert 0 < records(out)[0]["loss"] < 0.1
    with pytest.raises(ConfigError, match="set stage: sft"):
        parse_train_args(options(tmp_path, stage="pt", use_dft_loss=True))


def test_use_eaft_loss_trains_on_the_entropy_weighted_loss(tmp_path):
    """EAFT weights each token by (entropy of its top-20 logits / 3) ** eaft_alpha: just below 1 for the tiny random
    model's near-uniform logits, so a high alpha lowers the first step's loss below plain cross-entropy's."""
    one = {**QUICK, "max_steps": 1}
    run(parse_train_args(options(tmp_path / "plain", **one)))
    run(parse_train_args(options(tmp_path / "eaft", **one, use_eaft_loss=True, eaft_alpha=200.0)))
    ratio = records(tmp_path / "eaft")[0]["loss"] / records(tmp_path / "plain")[0]["loss"]
    assert 0.01 < ratio < 0.99
    with pytest.raises(ConfigError, match="set stage: sft"):
        parse_train_args(options(tmp_path, stage="pt", use_eaft_loss=True))


def _first_loss(out, **overrides) -> float:
    run(parse_train_args(options(out, **{**QUICK, "max_steps": 1}, **overrides)))
    return records(out)[0]["loss"]


@pytest.fixture(scope="module")
def other_reference(tmp_path_factory, lf_home):  # noqa: F811 (the module's LF_HOME fixture)
    """The tiny Llama with a noisy head: a reference model whose next-token distributions differ from it."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("reference")
    model = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.lm_head.weight
        head.add_(torch.randn(head.shape, generator=generator) * 3 * head.std())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama")).save_pretrained(path)
    return str(path)


def test_use_asft_loss_is_dft_plus_asft_alpha_times_the_kl_from_the_reference(tmp_path, other_reference):
    """ASFT's first step: against the model as it starts (LoRA with its adapter off, or full's frozen copy) the KL
    term is 0 and the loss is DFT's; against another model it adds asft_alpha times a positive divergence."""
    for finetuning_type in ("lora", "full"):
        dft = _first_loss(tmp_path / f"dft-{finetuning_type}", finetuning_type=finetuning_type, use_dft_loss=True)
        asft = _first_loss(tmp_path / f"asft-{finetuning_type}", finetuning_type=finetuning_type, use_asft_loss=True)
        assert asft == pytest.approx(dft, rel=1e-5, abs=1e-9)
    low, high = (_first_loss(tmp_path / f"other-{alpha}", use_asft_loss=True, asft_alpha=alpha,
                             ref_model=other_reference) for alpha in (0.5, 2.0))
    assert low - dft > 1e-3
    assert (high - dft) / (low - dft) == pytest.approx(4.0, rel=1e-3)
    with pytest.raises(ConfigError, match="set stage: sft"):
        parse_train_args(options(tmp_path, stage="pt", use_asft_loss=True))


def test_the_asft_reference_of_a_lora_model_is_its_base():
    """Without ref_model a LoRA run's reference is the model with its adapter off: its hidden states are the
    base's, whatever the adapter has learnt (here: random B matrices), and the adapter is back on after."""
    from peft import LoraConfig, get_peft_model

    from lf.kernels.patch import reference_head
    from lf.train.reference import as_reference

    base = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    with torch.no_grad():
        expected = base.model(input_ids=IDS).last_hidden_state
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    with as_reference(model) as reference:
        head = reference_head(reference, {"input_ids": IDS, "labels": IDS})
    assert (head["ref_hidden"] - expected).abs().max() < ATOL
    assert head["ref_weight"] is model.get_base_model().lm_head.weight
    assert model.training
    adapted = reference_head(model, {"input_ids": IDS})["ref_hidden"]
    assert (adapted - expected).abs().max() > 100 * ATOL  # the adapter is on again, and does something


def test_use_asft_loss_training_lowers_it(tmp_path, other_reference):
    """With a reference the model starts far from, ASFT's KL term dominates and training lowers the loss."""
    out = tmp_path / "out"
    run(parse_train_args(options(out, **{**QUICK, "max_steps": 6, "learning_rate": 2e-3}, finetuning_type="full",
                                 use_asft_loss=True, asft_alpha=1.0, ref_model=other_reference)))
    losses = [record["loss"] for record in records(out)]
    assert losses[-1] < 0.8 * losses[0], losses


class Dtypes(TrainerCallback):
    """The dtypes of what trains, of the optimizer's state and whether autocast is on, after a step."""

    def __init__(self):
        self.seen = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.seen = ({p.dtype for p in model.parameters() if p.requires_grad},
                     {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim()},
                     {p.dtype for p in model.parameters()}, args.bf16 or args.fp16)


def test_pure_bf16_trains_bf16_weights_and_adapters_without_autocast(tmp_path):
    """LLaMA-Factory's pure_bf16: the model in bf16 whatever the device prefers, adapters too (lf keeps LoRA weights
    in fp32 otherwise), the optimizer's moments in bf16, and no autocast. (full and freeze keep the loaded dtype
    anyway: pure_bf16 only makes it bf16.)"""
    dtypes = Dtypes()
    out = tmp_path / "out"
    run(parse_train_args(options(out, **{**QUICK, "max_steps": 1}, infer_dtype="auto", pure_bf16=True)), [dtypes])
    trainable, state, weights, autocast = dtypes.seen
    assert trainable == state == weights == {torch.bfloat16} and not autocast
    assert torch.isfinite(torch.tensor(records(out)[0]["loss"]))
    plain = Dtypes()
    run(parse_train_args(options(tmp_path / "plain", **{**QUICK, "max_steps": 1}, infer_dtype="bfloat16")), [plain])
    assert plain.seen[0] == {torch.float32}  # without it, LoRA weights are fp32: the check above can fail
