"""lf.train.optimizers: each optimizer lf builds from LLaMA-Factory's keys steps a tiny Llama exactly as the
reference package's own optimizer does on the same parameters and gradients, `lf train` with it lowers the loss
on a repeated batch. (The configs LLaMA-Factory refuses: tests/test_config.py's RULE_CASES.)"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from lf.config import parse_train_args
from lf.config.finetuning import FinetuningArguments
from lf.errors import ConfigError
from lf.tiny import TINY_MODELS
from lf.train import optimizers, run
from tests.support import one_thread  # noqa: F401 (autouse: this module's runs on one thread)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def lf_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LF_HOME", str(tmp_path_factory.mktemp("lf_home")))
        yield


def tiny_llama(seed: int = 0):
    """lf-tiny-llama's shape with two layers and a small vocabulary (no tokenizer needed), in fp32."""
    config = AutoConfig.for_model(**{**TINY_MODELS["lf-tiny-llama"].config, "vocab_size": 256,
                                     "num_hidden_layers": 2})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def backward(model, seed: int) -> None:
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=tokens, labels=tokens).loss.backward()


def decayed(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.ndim > 1]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), **{"learning_rate": 1e-2, "weight_decay": 0.1, "adam_beta2": 0.99,
                                                          "adam_epsilon": 1e-6, "optim": "adamw_torch", **overrides})


def lf_and_reference_steps(tmp_path, finetuning, reference, steps: int = 3, **args):
    """Steps lf's optimizer and `reference(model)` (the package's own) from the same weights on the same gradients;
    returns both models. With a layer-wise optimizer, lf's steps happen inside backward."""
    ours, theirs = tiny_llama(), tiny_llama()
    mine = optimizers.build(ours, training_args(tmp_path, **args), finetuning, decayed(ours))
    ref = reference(theirs)
    for step in range(steps):
        for model, opt in ((ours, mine), (theirs, ref)):
            backward(model, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return ours, theirs


def assert_same_weights(ours, theirs) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def changed(model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_llama().parameters()))


def lf_train(tmp_path, **overrides) -> list[float]:
    """`lf train` (full fine-tuning, sft) on one repeated batch of the demo data; its losses."""
    options = {"model_name_or_path": "lf-tiny-llama", "dataset": "lf_demo_en", "dataset_dir": str(REPO / "data"),
               "template": "qwen", "cutoff_len": 64, "max_samples": 4, "per_device_train_batch_size": 4,
               "output_dir": str(tmp_path), "max_steps": 5, "logging_steps": 1, "save_steps": 100,
               "learning_rate": 1e-3, "seed": 7, "infer_dtype": "float32", "finetuning_type": "full",
               "report_to": "none", **overrides}
    run(parse_train_args(options))
    lines = (tmp_path / "trainer_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# ---- GaLore ----

GALORE = dict(use_galore=True, finetuning_type="full", galore_rank=8, galore_update_interval=2, galore_scale=0.5)


def projected_reference(model, cls, projection: dict, **kwargs):
    """The package's optimizer `cls` with LLaMA-Factory's groups, in its order (APOLLO seeds each matrix's random
    projection by its place): vectors without decay, the other matrices, then every linear weight but the head
    with the projection (decayed too)."""
    head = model.get_output_embeddings()
    projected = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    ids = {id(p) for p in projected}
    matrices = [p for p in model.parameters() if p.ndim > 1 and id(p) not in ids]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    return cls([{"params": vectors, "weight_decay": 0.0}, {"params": matrices, "weight_decay": 0.1},
                {"params": projected, "weight_decay": 0.1, "rank": 8, "update_proj_gap": 2, **projection}],
               lr=1e-2, betas=(0.9, 0.99), eps=1e-6, **kwargs)


def galore_reference(model):
    from galore_torch import GaLoreAdamW

    return projected_reference(model, GaLoreAdamW, {"scale": 0.5, "proj_type": "std"}, no_deprecation_warning=True)


@pytest.mark.parametrize("layerwise", [False, True])
def test_galore_steps_as_galore_torch_does(tmp_path, layerwise):
    finetuning = FinetuningArguments(**GALORE, galore_layerwise=layerwise)
    ours, theirs = lf_and_reference_steps(tmp_path, finetuning, galore_reference, steps=2)
    assert changed(theirs)
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize("key", ["use_galore", "use_apollo"])
def test_a_run_resumes_from_a_checkpoint_with_the_projectors(tmp_path, key):
    """The optimizer state holds the package's projector objects, which the Trainer's weights-only load reads back."""
    lf_train(tmp_path, **{key: True}, max_steps=2, save_steps=1)
    lf_train(tmp_path, **{key: True}, max_steps=3, save_steps=1)  # resumes from checkpoint-2
    assert (tmp_path / "checkpoint-3").is_dir()


@pytest.mark.parametrize("options", [{"use_galore": True, "galore_rank": 8, "galore_update_interval": 2},
                                     {"use_galore": True, "galore_layerwise": True, "galore_update_interval": 2},
                                     {"use_apollo": True, "apollo_rank": 8, "apollo_update_interval": 2},
                                     {"use_badam": True, "badam_switch_interval": 2},
                                     {"use_adam_mini": True}, {"use_muon": True}],
                         ids=lambda options: "-".join(key for key, on in options.items() if on is True))
def test_resuming_from_a_saved_state_steps_as_if_uninterrupted(tmp_path, options):
    """What the Trainer does on resume: the weights and the optimizer's state_dict are saved (torch.save) and read
    back (torch.load, weights only) into a new optimizer built over the loaded weights. The resumed steps equal those
    of a run that went on: every part of the state came back (GaLore's projectors, BAdam's block schedule and the
    moments of the block in training, each of Muon's two optimizers)."""
    finetuning, args = FinetuningArguments(**options), training_args(tmp_path)

    def steps(model, optimizer, which):
        for step in which:
            backward(model, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    whole, first = tiny_llama(), tiny_llama()
    steps(whole, optimizers.build(whole, args, finetuning, decayed(whole)), range(4))
    optimizer = optimizers.build(first, args, finetuning, decayed(first))
    steps(first, optimizer, range(2))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed = tiny_llama(seed=1)
    resumed.load_state_dict(first.state_dict())
    optimizer = optimizers.build(resumed, args, finetuning, decayed(resumed))
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    steps(resumed, optimizer, range(2, 4))
    assert_same_weights(resumed, whole)


def test_galore_target_names_modules(tmp_path):
    model = tiny_llama()
    found = optimizers.projected_targets(model, "galore_target", "q_proj, down_proj")
    assert len(found) == 2 * 2  # two kinds in each of the 2 layers
    with pytest.raises(ConfigError, match="galore_target: nope names no trainable linear layer"):
        optimizers.projected_targets(model, "galore_target", "nope")


def test_lf_train_with_galore_lowers_the_loss(tmp_path):
    losses = lf_train(tmp_path, use_galore=True, galore_rank=8, galore_update_interval=2, galore_layerwise=True)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1


# ---- APOLLO ----

APOLLO = dict(use_apollo=True, finetuning_type="full", apollo_rank=8, apollo_update_interval=2, apollo_scale=4.0)


def apollo_reference(model, scale_type="channel", proj="random"):
    from apollo_torch import APOLLOAdamW

    return projected_reference(model, APOLLOAdamW, {"scale": 4.0, "proj_type": "std", "proj": proj,
                                                    "scale_type": scale_type})


@pytest.mark.parametrize("scale_type, proj", [("channel", "random"), ("tensor", "svd")])
def test_apollo_steps_as_apollo_torch_does(tmp_path, scale_type, proj):
    finetuning = FinetuningArguments(**APOLLO, apollo_scale_type=scale_type, apollo_proj=proj)
    ours, theirs = lf_and_reference_steps(tmp_path, finetuning,
                                          lambda m: apollo_reference(m, scale_type, proj), steps=2)
    assert changed(theirs)
    assert_same_weights(ours, theirs)


def test_lf_train_with_layerwise_apollo_lowers_the_loss(tmp_path):
    losses = lf_train(tmp_path, use_apollo=True, apollo_rank=8, apollo_update_interval=2, apollo_layerwise=True)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1


# ---- BAdam ----

def test_badam_layer_mode_steps_and_switches_as_badam_does(tmp_path):
    """Switching every step, ascending: step 1 trains block 0 only, step 2 block 1 only, as badam's own does."""
    from badam import BlockOptimizer

    finetuning = FinetuningArguments(use_badam=True, finetuning_type="full", badam_switch_interval=1)

    def reference(model):
        base = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
                                  {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.1}],
                                 lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
        return BlockOptimizer(base, list(model.named_parameters()), switch_block_every=1, switch_mode="ascending",
                              verbose=0)

    ours, theirs = lf_and_reference_steps(tmp_path, finetuning, reference, steps=2)
    assert_same_weights(ours, theirs)
    start = tiny_llama()
    moved = {n for (n, a), b in zip(ours.named_parameters(), start.parameters()) if not torch.equal(a, b)}
    assert moved and all(".layers.0." in n or ".layers.1." in n for n in moved)


def test_badam_ratio_mode_steps_as_badam_does(tmp_path):
    from badam import BlockOptimizerRatio

    finetuning = FinetuningArguments(use_badam=True, finetuning_type="full", badam_mode="ratio",
                                     badam_update_ratio=0.1)

    def reference(model):
        groups = [{"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
                  {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.1}]
        return BlockOptimizerRatio(groups, list(model.named_parameters()), update_ratio=0.1, mask_mode="adjacent",
                                   verbose=0, include_embedding=False, lr=1e-2, betas=(0.9, 0.99), eps=1e-6)

    torch.manual_seed(3)
    ours = tiny_llama()
    mine = optimizers.build(ours, training_args(tmp_path), finetuning, decayed(ours))
    torch.manual_seed(3)
    theirs = tiny_llama()
    ref = reference(theirs)
    for model, opt in ((ours, mine), (theirs, ref)):
        backward(model, 0)
        opt.step()
    assert changed(theirs)
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize("mode", ["layer", "ratio"])
def test_lf_train_with_badam_lowers_the_loss(tmp_path, mode):
    losses = lf_train(tmp_path, use_badam=True, badam_mode=mode, badam_switch_interval=2, badam_update_ratio=0.5)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.05


# ---- Adam-mini ----

def adam_mini_reference(model):
    from adam_mini import Adam_mini

    return Adam_mini(model.named_parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, dim=256,
                     n_heads=4, n_kv_heads=2, verbose=False)


def test_adam_mini_steps_as_adam_mini_does(tmp_path):
    ours, theirs = lf_and_reference_steps(tmp_path, FinetuningArguments(use_adam_mini=True), adam_mini_reference)
    assert changed(theirs)
    assert_same_weights(ours, theirs)


def test_lf_train_with_adam_mini_lowers_the_loss(tmp_path):
    losses = lf_train(tmp_path, use_adam_mini=True)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1


# ---- Muon ----

def muon_reference(model):
    """torch's Muon on the hidden matrices (lr matched to AdamW's RMS), AdamW on embeddings, head and norms."""
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    return optimizers.Joined([muon, adamw])


def test_muon_steps_as_torch_muon_does(tmp_path):
    ours, theirs = lf_and_reference_steps(tmp_path, FinetuningArguments(use_muon=True), muon_reference)
    assert changed(theirs)
    assert_same_weights(ours, theirs)
    muon, adamw = optimizers.muon_split(ours)
    assert len(muon) == 7 * 2 and all(p.ndim == 2 for p in muon)  # q k v o gate up down in each of 2 layers


def newton_schulz(g, steps: int = 5, a: float = 3.4445, b: float = -4.775, c: float = 2.0315):
    """Muon's orthogonalisation, from the paper's formula: X <- aX + (bXX^T + c(XX^T)^2)X on the wide side, from
    X = G / |G|_F; it pushes every singular value of G towards 1."""
    x = g / g.norm()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def test_muon_first_step_is_the_orthogonalised_gradient(tmp_path):
    """From zero momentum, Nesterov's momentum is a multiple of the gradient, so one step is
    W <- W - lr 0.2 sqrt(max(A, B)) NS(G) (weight decay 0 here); to bf16's precision, in which torch runs NS."""
    model = tiny_llama()
    weight = model.model.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    opt = optimizers.build(model, training_args(tmp_path, weight_decay=0.0), FinetuningArguments(use_muon=True), [])
    # a full-rank gradient: bf16 rounding would dominate the near-zero singular directions of a real one
    grad = weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    opt.step()
    update = (before - weight.detach()) / (1e-2 * 0.2 * max(weight.shape) ** 0.5)
    expected = newton_schulz(grad.double()).float()
    error = (update - expected).abs().max() / expected.abs().max()
    assert error < 0.05, error  # torch runs Newton-Schulz in bf16


def test_lf_train_with_muon_lowers_the_loss(tmp_path):
    losses = lf_train(tmp_path, use_muon=True)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1
