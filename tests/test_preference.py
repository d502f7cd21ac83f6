"""rm, dpo and kto: each pref_loss and kto trains and saves on the tiny Llama (test_train's temporary LF_HOME and
options), its loss equals TRL's on the same log-probabilities, lf's fused log-probabilities train what TRL's fused
head trains, the reward model reloads with transformers + peft and ranks the pairs it learned, and bad data or
configs are refused with what to do."""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from support import one_thread  # noqa: F401 (autouse: this module's runs on one thread)
from test_train import lf_home, losses, options  # noqa: F401 (lf_home: the module's tiny model)

from lf.config import parse_train_args
from lf.config.finetuning import FinetuningArguments
from lf.errors import ConfigError, DataError, ModelError, TrainError
from lf.tiny import tiny_path
from lf.train import run
from lf.kernels.fused_linear_preference_loss import preference_loss
from lf.model.logps import check_trl
from lf.train.dpo import RewardBaseline, dpo_loss

PAIRS = {"dataset": "lf_pref_demo", "max_samples": 4, "per_device_train_batch_size": 4}  # one batch, every step


def train(output_dir, **overrides) -> dict:
    return run(parse_train_args(options(output_dir, **{**PAIRS, **overrides})))


def pair_batch(output_dir, stage):
    """The trained pairs as lf's pipeline makes them, with the saved tokenizer: (ids, mask, labels), chosen first."""
    from transformers import AutoTokenizer

    from lf.data import collator, get_dataset, resolve_template
    from lf.train.preference import pairs as _pairs

    cfg = parse_train_args(options(output_dir / "unused", stage=stage, **PAIRS))
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    template, _ = resolve_template(tokenizer, "qwen")
    rows = get_dataset(cfg.data, tokenizer=tokenizer, template=template, stage=stage).train_dataset
    pad = collator(tokenizer)
    return _pairs(pad([rows[i] for i in range(len(rows))]), pad.pad_token_id)


# ---- dpo ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"])
def test_each_pref_loss_trains_saves_and_reloads_preferring_the_chosen_replies(tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from lf.model.logps import trl_logps as _trl_logps

    out = tmp_path / kind
    train(out, stage="dpo", pref_loss=kind, max_steps=3)
    curve = losses(out)
    assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
    assert curve[0] > curve[1] > curve[2], curve
    if kind == "sigmoid":  # LoRA starts as the identity: policy = reference, loss log 2
        assert curve[0] == pytest.approx(math.log(2), abs=1e-6)
    if kind == "kto_pair":  # every log-ratio 0 at the start: each reply's loss 1 - sigmoid(0)
        assert curve[0] == pytest.approx(0.5, abs=1e-6)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(0 <= h["rewards/accuracies"] <= 1 and "rewards/margins" in h for h in history if "loss" in h)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama")), out)
    add_fused_lm_head(model.get_base_model())
    ids, mask, labels = pair_batch(out, "dpo")
    with torch.no_grad():
        trained, _ = _trl_logps(model, ids, mask, labels)
        with model.disable_adapter():
            start, _ = _trl_logps(model, ids, mask, labels)
    gain = (trained - start).chunk(2)  # how much each reply gained since the start
    assert (gain[0] - gain[1]).mean() > 0  # the chosen replies gained on the rejected ones


@pytest.mark.parametrize("finetuning_type, reference", [("full", None), ("lora", "tiny")])
def test_a_frozen_copy_or_ref_model_is_the_reference(tmp_path, finetuning_type, reference):
    ref_model = str(tiny_path("lf-tiny-llama")) if reference else None
    out = tmp_path / finetuning_type
    train(out, stage="dpo", finetuning_type=finetuning_type, ref_model=ref_model, max_steps=2, learning_rate=1e-4)
    first, second = losses(out)
    assert first == pytest.approx(math.log(2), abs=1e-6)  # the reference is the starting model
    assert second < first
    saved = "model.safetensors" if finetuning_type == "full" else "adapter_model.safetensors"
    assert (out / saved).exists()


@pytest.fixture
def ref_adapter(tmp_path):
    """A LoRA adapter with random (non-zero) weights over the tiny model, and the model with it merged."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_path("lf-tiny-llama")
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    return str(tmp_path / "adapter"), merged.merge_and_unload()


def reference_of(tmp_path, **overrides):
    from lf.model import load_tokenizer
    from lf.train.reference import reference_model

    cfg = parse_train_args(options(tmp_path / "out", **{**PAIRS, "stage": "dpo", "finetuning_type": "full",
                                                          "ref_model": str(tiny_path("lf-tiny-llama")), **overrides}))
    return reference_model(load_tokenizer(cfg.model), None, cfg, "sigmoid")


def test_ref_model_adapters_are_merged_into_the_reference(tmp_path, ref_adapter):
    path, merged = ref_adapter
    reference = reference_of(tmp_path, ref_model_adapters=path)
    expected = dict(merged.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, expected[name], msg=name)
    assert not any(p.requires_grad for p in reference.parameters())


def test_ref_model_quantization_bit_loads_the_reference_in_4_bits(tmp_path, ref_adapter):
    import bitsandbytes as bnb

    from safetensors.torch import load_file

    path, _ = ref_adapter
    reference = reference_of(tmp_path, ref_model_adapters=path, ref_model_quantization_bit=4)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reference.modules()) == 4 * 7  # every layer's linears
    # a quantized model cannot take merged weights: the adapter stays beside them, as saved
    saved = load_file(f"{path}/adapter_model.safetensors")
    loaded = {name.replace(".default", ""): p for name, p in reference.named_parameters() if "lora_" in name}
    assert loaded.keys() == saved.keys()
    for name, weight in saved.items():
        assert torch.equal(loaded[name].float(), weight.float()), name


def _trl_dpo(loss_types, loss_weights, per_token, completion_mask, ref_sums, beta):
    """TRL 1.16's DPOTrainer._compute_loss (its own code, unbound) with precomputed reference log-probabilities,
    on a stand-in model whose fused head returns `per_token` log-probabilities."""
    from trl import DPOTrainer

    rows = per_token.shape[0]
    zeros = torch.zeros_like(per_token)
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, loss_types=loss_types, loss_weights=loss_weights,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", label_smoothing=0.0,
        use_weighting=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, accelerator=SimpleNamespace(device=per_token.device, gather=lambda t: t,
                                                gather_for_metrics=lambda t: t))
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_sums[:rows // 2], "ref_rejected_logps": ref_sums[rows // 2:]}

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return DPOTrainer._compute_loss(stand_in, model, inputs, False)


def _trl_cpo(kind, chosen, rejected, beta, gamma, smoothing):
    """TRL's CPO loss (trl.experimental.cpo, a function of per-reply log-probabilities), per pair."""
    from trl.experimental.cpo import CPOTrainer

    stand_in = SimpleNamespace(alpha=0.0, loss_type=kind, beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
                               accelerator=SimpleNamespace(device=chosen.device))
    return CPOTrainer.cpo_loss(stand_in, chosen, rejected)[0]


def kto_pair_loss(per_token, ref_sums, *, beta):
    """kto_pair (TRL 1.x has none) from LLaMA-Factory's definition: the KTO loss on each pair's chosen reply as
    desirable and rejected one as undesirable, the KL estimate of either half the other half's mean log-ratio,
    clamped at 0; the mean over all replies."""
    chosen, rejected = (per_token.sum(-1) - ref_sums).chunk(2)
    chosen_kl, rejected_kl = chosen.mean().clamp(min=0), rejected.mean().clamp(min=0)
    return torch.cat([1 - torch.sigmoid(beta * (chosen - rejected_kl)),
                      1 - torch.sigmoid(beta * (chosen_kl - rejected))]).mean()


def trl_loss(kind, per_token, completion, ref_sums, *, beta, gamma=0.5, smoothing=0.0, ftx=0.0):
    """TRL's loss for lf's pref_loss `kind` over per-token log-probabilities (zero outside the replies, chosen rows
    first), the completion mask (one column more) and the reference's sums. pref_ftx is TRL's DPO "sft" loss, the
    token mean over the batch's chosen replies: with replies of one length, the mean of their per-reply means,
    which lf takes as LLaMA-Factory does."""
    from trl.experimental.orpo import ORPOTrainer

    sums, tokens = per_token.sum(-1), completion.sum(-1)
    means = sums / tokens
    if kind == "kto_pair":
        assert ftx == 0 and smoothing == 0
        return kto_pair_loss(per_token, ref_sums, beta=beta)
    if kind in ("hinge", "ipo") or (kind == "sigmoid" and smoothing == 0):
        types, weights = ([kind, "sft"], [1.0, ftx]) if ftx else ([kind], [1.0])
        return _trl_dpo(types, weights, per_token, completion, ref_sums, beta)
    assert ftx == 0, "TRL's CPO and ORPO losses have no sft term"
    if kind == "sigmoid":  # conservative DPO: TRL's DPO has no smoothed sigmoid; its CPO is the same formula over
        return _trl_cpo("sigmoid", *(sums - ref_sums).chunk(2), beta, gamma, smoothing).mean()  # log-ratios
    if kind == "simpo":
        return _trl_cpo("simpo", *means.chunk(2), beta, gamma, smoothing).mean()
    # ORPO's odds-ratio term; lf adds the chosen replies' mean negative log-likelihood to it
    odds = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu")),
                                       *means.chunk(2))[0]
    return -means.chunk(2)[0].mean() - odds.mean()


def trl_kto_loss(per_token, completion, desirable, ref_sums, kl_policy, kl_reference, *, beta, desirable_weight,
                 undesirable_weight):
    """TRL's KTO loss (KTOTrainer._compute_loss, loss_type kto) over per-token log-probabilities as trl_loss's,
    the replies' desirable flags, the reference's sums and the policy's and reference's sums over mismatched
    pairs (for the KL estimate)."""
    from trl import KTOTrainer

    zeros = torch.zeros_like(per_token)
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, loss_type="kto", desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, calculate_KL=True, precompute_ref_logps=True, aux_loss_enabled=False,
        _compute_kl_logps=lambda model, batch: kl_policy, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=per_token.device, gather_for_metrics=lambda t: t))
    inputs = {"input_ids": torch.zeros(completion.shape, dtype=torch.long),
              "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "label": desirable, "ref_logps": ref_sums, "ref_KL_logps": kl_reference}

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    return KTOTrainer._compute_loss(stand_in, model, inputs, False)


def _logps(pairs, equal_lengths, seed):
    """Per-token log-probabilities of `pairs` chosen and as many rejected replies after a 3-token prompt (zero
    outside the replies, as TRL's fused head gives them), their completion mask, and reference sums."""
    generator = torch.Generator().manual_seed(seed)
    length = 12
    replies = torch.full((2 * pairs,), 6) if equal_lengths else torch.randint(2, length - 3, (2 * pairs,),
                                                                             generator=generator)
    positions = torch.arange(length)
    completion = ((positions >= 3) & (positions < 3 + replies[:, None])).long()
    per_token = -torch.rand(2 * pairs, length - 1, generator=generator) * completion[:, 1:]
    ref_sums = -torch.rand(2 * pairs, generator=generator) * replies
    return per_token, completion, ref_sums


@pytest.mark.parametrize("kind, ftx, smoothing", [("sigmoid", 0.0, 0.0), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0),
                                                  ("sigmoid", 0.5, 0.0), ("sigmoid", 0.0, 0.2), ("simpo", 0.0, 0.0),
                                                  ("simpo", 0.0, 0.1), ("orpo", 0.0, 0.0), ("kto_pair", 0.0, 0.0)])
def test_dpo_losses_equal_trls_on_the_same_log_probabilities(kind, ftx, smoothing):
    beta, gamma = 0.3, 0.7
    per_token, completion, ref_sums = _logps(pairs=5, equal_lengths=ftx > 0, seed=len(kind) + int(10 * smoothing))
    sums, tokens = per_token.sum(-1), completion.sum(-1)
    fin = FinetuningArguments(stage="dpo", pref_loss=kind, pref_beta=beta, pref_ftx=ftx, simpo_gamma=gamma,
                              dpo_label_smoothing=smoothing)
    ours, _, metrics = dpo_loss(fin, sums, tokens, None if kind in ("orpo", "simpo") else ref_sums)
    theirs = trl_loss(kind, per_token, completion, ref_sums, beta=beta, gamma=gamma, smoothing=smoothing, ftx=ftx)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert metrics["rewards/accuracies"].shape == (5,)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_pref_bco_weight_mixes_trls_bco_pair_into_the_dpo_loss(kind):
    """With delta 0, LLaMA-Factory's (dpo + w bco) / (1 + w) is TRL's loss_type [kind, bco_pair] with weights
    1 / (1 + w) and w / (1 + w): TRL's own code is the reference. (With ipo, LLaMA-Factory's BCO term takes ipo's
    per-token means, TRL's bco_pair the sums: lf follows LLaMA-Factory.)"""
    w = 0.7
    per_token, completion, ref_sums = _logps(pairs=5, equal_lengths=False, seed=3)
    fin = FinetuningArguments(stage="dpo", pref_loss=kind, pref_beta=0.3, pref_bco_weight=w)
    ours = dpo_loss(fin, per_token.sum(-1), completion.sum(-1), ref_sums, baseline=lambda mean: 0.0).loss
    theirs = _trl_dpo([kind, "bco_pair"], [1 / (1 + w), w / (1 + w)], per_token, completion, ref_sums, 0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bco_delta_is_the_running_mean_of_the_batches_mean_rewards():
    """RewardBaseline over three batches, and the loss's shift by delta, written out."""
    beta, w = 0.3, 2.0
    baseline = RewardBaseline()
    fin = FinetuningArguments(stage="dpo", pref_beta=beta, pref_bco_weight=w)
    batch_means, losses = [], []
    for seed in range(3):
        per_token, completion, ref_sums = _logps(pairs=4, equal_lengths=False, seed=seed)
        sums = per_token.sum(-1)
        losses.append(dpo_loss(fin, sums, completion.sum(-1), ref_sums, baseline=baseline).loss)
        rewards = beta * (sums - ref_sums)
        batch_means.append(float(rewards.mean()))
        delta = sum(batch_means) / len(batch_means)  # this batch included
        chosen, rejected = rewards.chunk(2)
        sigmoid = -torch.nn.functional.logsigmoid(chosen - rejected)
        bco = -torch.nn.functional.logsigmoid(chosen - delta) - torch.nn.functional.logsigmoid(delta - rejected)
        torch.testing.assert_close(losses[-1], ((sigmoid + w * bco) / (1 + w)).mean(), rtol=1e-5, atol=1e-6)
    assert baseline.count == 3 and abs(baseline.total / 3 - sum(batch_means) / 3) < 1e-6


def test_pref_bco_weight_reaches_the_trainers_loss(tmp_path):
    """First step: the policy is the reference, every reward 0 and so delta: dpo's loss is log 2, BCO's 2 log 2, and
    with weight 1 the loss (log 2 + 2 log 2) / 2."""
    train(tmp_path, stage="dpo", max_steps=1, pref_bco_weight=1.0)
    assert losses(tmp_path)[0] == pytest.approx(1.5 * math.log(2), rel=1e-4)


def test_the_fused_head_gives_the_logits_log_probabilities(tmp_path):
    """lf's patched tiny model under TRL's fused LM head: the log-probabilities of the full logits."""
    from trl.trainer.utils import add_fused_lm_head

    from lf.model import load_model, load_tokenizer
    from lf.model.logps import trl_logps as _trl_logps

    cfg = parse_train_args(options(tmp_path, stage="dpo", **PAIRS))
    model, _ = load_model(load_tokenizer(cfg.model), cfg.model, cfg.finetuning, is_trainable=True)
    model.eval()  # no gradient checkpointing under no_grad
    ids = torch.randint(0, 3000, (4, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2:, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
        add_fused_lm_head(model.get_base_model())
        sums, tokens = _trl_logps(model, ids, mask, labels)
    shifted = labels[:, 1:]
    expected = logits[:, :-1].log_softmax(-1).gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(sums.double(), (expected * (shifted != -100)).sum(-1), rtol=1e-5, atol=1e-4)
    assert tokens.tolist() == [15, 15, 10, 10]


def test_gradient_accumulation_trains_what_one_batch_trains(tmp_path):
    """The pair loss is a mean per micro-batch, which the Trainer divides by the accumulation steps: 2 x 2 pairs
    take the step 4 pairs take (SGD: see test_train's test_kernels_do_not_change_the_losses)."""
    same = {"stage": "dpo", "optim": "sgd", "learning_rate": 0.5, "max_steps": 2}
    train(tmp_path / "one", **same)
    train(tmp_path / "two", per_device_train_batch_size=2, gradient_accumulation_steps=2, **same)
    one, two = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.parametrize("kind", ["sigmoid", "kto_pair"])
def test_lf_and_trl_log_probabilities_train_the_same(tmp_path, kind):
    """dpo with lf's fused_linear_preference_loss (kernels on) and with TRL's fused head (use_lf_kernels: false):
    the same losses and the same adapter after two SGD steps."""
    same = {"stage": "dpo", "pref_loss": kind, "optim": "sgd", "learning_rate": 0.5, "max_steps": 2}
    train(tmp_path / "lf", **same)
    train(tmp_path / "trl", use_lf_kernels=False, **same)
    ours, theirs = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("lf", "trl"))
    assert any(v.abs().sum() > 0 for k, v in ours.items() if "lora_B" in k)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
    assert losses(tmp_path / "lf") == pytest.approx(losses(tmp_path / "trl"), rel=1e-4)


def test_ld_alpha_reaches_the_dpo_loss_on_both_log_probability_sources(tmp_path):
    """At the first step the policy is the reference: plain dpo's loss is log 2 exactly; LD-DPO weights the policy's
    tails only (LLaMA-Factory), so it is not, and lf's fused op and TRL's head give the same training."""
    same = {"stage": "dpo", "optim": "sgd", "learning_rate": 0.5, "max_steps": 2, "ld_alpha": 0.5}
    train(tmp_path / "lf", **same)
    train(tmp_path / "trl", use_lf_kernels=False, **same)
    assert abs(losses(tmp_path / "lf")[0] - math.log(2)) > 1e-3
    assert losses(tmp_path / "lf") == pytest.approx(losses(tmp_path / "trl"), rel=1e-4)


# ---- kto ---------------------------------------------------------------------------------------------------------

FEEDBACK = {"dataset": "lf_kto_demo", "max_samples": 8, "per_device_train_batch_size": 8}


def test_kto_trains_saves_and_reloads_preferring_the_desirable_replies(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lf.data import collator, get_dataset, resolve_template

    out = tmp_path / "kto"
    run(parse_train_args(options(out, stage="kto", max_steps=3, pref_beta=0.5, **FEEDBACK)))
    curve = losses(out)
    assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
    assert curve[0] == pytest.approx(0.5, abs=1e-6)  # policy = reference, KL 0: 1 - sigmoid(0) for every reply
    assert curve[0] > curve[1] > curve[2], curve
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert all(h["kl"] >= 0 and "rewards/desirable" in h and "rewards/undesirable" in h for h in history)

    cfg = parse_train_args(options(out / "unused", stage="kto", **FEEDBACK))
    tokenizer = AutoTokenizer.from_pretrained(out)
    template, _ = resolve_template(tokenizer, "qwen")
    rows = get_dataset(cfg.data, tokenizer=tokenizer, template=template, stage="kto").train_dataset
    batch = collator(tokenizer)([rows[i] for i in range(len(rows))])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama")), out).eval()

    def logps():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (per_token * (labels != -100)).sum(-1)

    with torch.no_grad():
        trained = logps()
        with model.disable_adapter():
            start = logps()
    gain, desirable = trained - start, batch["kto_tags"].bool()
    assert gain[desirable].mean() > gain[~desirable].mean()


def test_kto_loss_equals_trls_on_the_same_log_probabilities():
    per_token, completion, ref_sums = _logps(pairs=3, equal_lengths=False, seed=5)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl_policy, kl_reference = -torch.rand(6) * 5, -torch.rand(6) * 5
    ours = preference_loss("kto", per_token.sum(-1), completion.sum(-1), ref_sums, beta=0.3, desirable=desirable,
                           kl=(kl_policy - kl_reference).mean(), desirable_weight=1.3, undesirable_weight=0.6)
    theirs = trl_kto_loss(per_token, completion, desirable, ref_sums, kl_policy, kl_reference, beta=0.3,
                          desirable_weight=1.3, undesirable_weight=0.6)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)


def test_kto_refuses_data_without_desirable_flags(tmp_path):
    with pytest.raises(DataError, match=r"stage kto learns from replies flagged desirable or not, but lf_pref_demo in "
                                        r".*dataset_info.json has no kto_tag column.*lf_kto_demo"):
        train(tmp_path / "kto", stage="kto")


# ---- rm ----------------------------------------------------------------------------------------------------------

def test_reward_model_learns_logs_accuracy_and_reloads_to_rank_the_pairs(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    train(out, stage="rm", max_steps=6, learning_rate=1e-2, eval_dataset="lf_pref_demo", do_train=True,
          do_eval=True)
    curve = losses(out)
    assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    accuracy = [h["accuracy"] for h in history if "loss" in h]
    assert len(accuracy) == 6 and accuracy[-1] == 1.0
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == 1.0  # the 4 trained pairs
    assert any(".score." in key for key in load_file(out / "adapter_model.safetensors"))  # the value head

    base = AutoModelForSequenceClassification.from_pretrained(tiny_path("lf-tiny-llama"), num_labels=1)
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    records = json.loads((Path(options(tmp_path)["dataset_dir"]) / "lf_pref_demo.json").read_text())[:4]

    def score(prompt, reply):
        # the chat template as saved, ending at the reply's end-of-turn token, where training scored it
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": reply}], tokenize=False).rstrip()
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits.item()

    for record in records:
        assert score(record["instruction"], record["chosen"]) > score(record["instruction"], record["rejected"])


@pytest.mark.parametrize("finetuning_type", ["lora", "freeze"])
def test_the_value_head_trains_fully_and_is_no_lora_target(tmp_path, finetuning_type):
    from lf.model import load_model, load_tokenizer

    cfg = parse_train_args(options(tmp_path, stage="rm", finetuning_type=finetuning_type, **PAIRS))
    model, lines = load_model(load_tokenizer(cfg.model), cfg.model, cfg.finetuning, is_trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert type(model.get_base_model() if finetuning_type == "lora" else model).__name__ == \
        "LlamaForSequenceClassification"
    assert [name for name in trainable if "score" in name] == (
        ["base_model.model.score.modules_to_save.default.weight"] if finetuning_type == "lora" else ["score.weight"])
    assert "score" in lines[-2]  # the method's line names it


# ---- refusals ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_a_dataset_without_pairs_is_refused_by_name_with_the_fix(tmp_path, stage):
    with pytest.raises(DataError, match=rf"stage {stage} learns from pairs.*but lf_demo_en in .*dataset_info.json "
                                        r"has one reply per prompt.*\"ranking\": true.*stage: sft"):
        train(tmp_path / stage, stage=stage, dataset="lf_demo_en")


@pytest.mark.parametrize("overrides, expected", [
    ({"stage": "dpo", "pref_loss": "orpo", "ref_model": "some/model"},
     "pref_loss: orpo compares the trained model's replies with each other and uses no reference model, but "
     "ref_model is some/model"),
    ({"stage": "sft", "pref_beta": 0.2}, "pref_beta tune(s) dpo and kto training, but stage is sft"),
    ({"stage": "kto", "simpo_gamma": 1.0}, "simpo_gamma tune(s) dpo training, but stage is kto"),
    ({"stage": "dpo", "pref_loss": "kto"}, "pref_loss: kto is not one of sigmoid, hinge, ipo, kto_pair, orpo, simpo"),
    ({"stage": "dpo", "pref_loss": "hinge", "dpo_label_smoothing": 0.1},
     "dpo_label_smoothing softens the sigmoid and simpo losses, not pref_loss: hinge"),
])
def test_contradictions_are_refused_before_any_work(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        parse_train_args(options(tmp_path, **{**PAIRS, **overrides}))


def test_lora_on_the_lm_head_is_refused_for_dpo(tmp_path):
    with pytest.raises(ModelError, match="lora_target names the LM head.*additional_target: lm_head"):
        train(tmp_path / "head", stage="dpo", lora_target="q_proj,lm_head")


def test_dpo_needs_the_tested_trl():
    check_trl("1.16.0")
    for installed, found in (("1.17.0", "TRL 1.17.0 is installed"), ("1.15.2", "TRL 1.15.2 is installed"),
                             (None, "TRL is not installed")):
        with pytest.raises(TrainError, match=rf"tested with TRL >=1.16,<1.17; {found}: pip install 'trl>=1.16,<1.17"):
            check_trl(installed)
