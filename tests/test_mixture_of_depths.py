"""mixture_of_depths (lf/model/mixture_of_depths.py): a routed layer computes x + score * (layer(x) - x) on the
tokens it chooses (checked against the plain layer run over the whole row under a mask written here), leaves the
others as they were, routes causally at evaluation, trains its router, and survives save and `load`; what it
cannot run is refused in one line."""

import copy
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from lf.config import parse_infer_args, parse_train_args
from lf.config.finetuning import FinetuningArguments
from lf.config.model import ModelArguments
from lf.errors import ConfigError, ModelError
from lf.export import export
from lf.kernels import patch, unpatch
from lf.model import load_model, load_tokenizer, mixture_of_depths
from lf.model.mixture_of_depths import ROUTER
from tests.test_train import lf_home, losses, options, train  # noqa: F401 (lf_home: the module's LF_HOME fixture)

HIDDEN, VOCAB = 32, 97


@pytest.fixture(autouse=True)
def plain_transformers():
    """lf's kernels patch a family's classes for the whole process (lf train does): each test starts from
    transformers' own code."""
    yield
    unpatch("llama")


def tiny(family: str = "llama", layers: int = 4):
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def randomize(model, bias: float = 0.5, seed: int = 1) -> None:
    """Routers whose scores differ from token to token (a new router scores every token 1)."""
    generator = torch.Generator().manual_seed(seed)
    for router in mixture_of_depths.routers(model):
        with torch.no_grad():
            router.mod_score.weight.copy_(torch.randn(router.mod_score.weight.shape, generator=generator) * 0.2)
            router.mod_score.bias.fill_(bias)


def score(layer, x):
    router = getattr(layer, ROUTER).mod_score
    return x @ router.weight.T + router.bias  # (B, L, 1)


def embeddings(model, x, positions):
    return model.model.rotary_emb(x, positions)


@pytest.mark.parametrize("family, kernels", [("llama", False), ("llama", True), ("mistral", False),
                                             ("qwen2", False), ("qwen3", False), ("gemma", False), ("phi", False),
                                             ("starcoder2", False)])
def test_a_routed_layer_with_room_for_every_token_adds_its_contribution_times_the_score(family, kernels):
    """capacity 1: every token goes through; the output is the input plus the original layer's contribution
    (its output minus its input) times the router's score: the paper's x + r * f(x)."""
    model = tiny(family)
    if kernels:
        patch(model)  # lf's RMSNorm, SwiGLU and packed attention inside the layer
    plain = copy.deepcopy(model)
    assert "routers on decoder layers 1, 3" in mixture_of_depths.convert(model)
    randomize(model)
    model.train()
    layer, original = model.model.layers[1], plain.model.layers[1]
    layer.mod_capacity = 1.0
    x = torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(12).expand(2, -1)
    kwargs = {"attention_mask": None, "position_ids": positions, "position_embeddings": embeddings(plain, x, positions)}
    expected = x + score(layer, x) * (original(x, **kwargs) - x)
    torch.testing.assert_close(layer(x, **kwargs), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(layer, x), torch.ones(1))  # the scores differ: the check above can fail


def test_a_converted_model_computes_what_the_original_did():
    """New routers score every token 1, and until training sets a threshold every token routes at evaluation."""
    model = tiny()
    plain = copy.deepcopy(model).eval()
    mixture_of_depths.convert(model)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_chosen_tokens_attend_to_the_earlier_chosen_tokens_of_their_example_at_their_own_positions():
    """capacity 1/4 over a packed row (two examples of 8) and a padded row (10 tokens, 6 pads): the routed layer's
    output equals the plain layer run over the whole row under a mask that lets each token see only the chosen
    tokens before it in its example (and itself), at the chosen tokens; every other token is its input, exactly.
    Padding is never chosen while a row has real tokens left."""
    model = tiny()
    plain = copy.deepcopy(model)
    mixture_of_depths.convert(model)
    randomize(model)
    model.train()
    layer, original = model.model.layers[1], plain.model.layers[1]
    layer.mod_capacity = 0.25
    length, k = 16, 4
    x = torch.randn(2, length, HIDDEN, generator=torch.Generator().manual_seed(4))
    w = getattr(layer, ROUTER).mod_score.weight.detach()[0]
    x[0, [2, 5, 9, 14]] += 4 * w / w.norm()  # row 0's top 4: two in each packed example
    positions = torch.stack([torch.arange(length) % 8, torch.arange(length)])
    example = torch.stack([torch.arange(length) // 8, torch.zeros(length, dtype=torch.long)])
    real = torch.ones(2, length, dtype=torch.bool)
    real[1, 10:] = False
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & (example[:, :, None] == example[:, None, :]) & real[:, None, :]  # what the model builds
    pe = embeddings(plain, x, positions)
    routed = layer(x, attention_mask=mask[:, None], position_ids=positions, position_embeddings=pe)

    scores = score(layer, x).squeeze(-1).masked_fill(~real, -math.inf)
    chosen = torch.zeros(2, length, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)
    assert not (chosen & ~real).any()
    eye = torch.eye(length, dtype=torch.bool)
    seen = (mask & chosen[:, None, :]) | eye
    dense = original(x, attention_mask=seen[:, None], position_ids=positions, position_embeddings=pe)
    expected = x + score(layer, x) * (dense - x)
    assert torch.equal(routed[~chosen], x[~chosen])
    torch.testing.assert_close(routed[chosen], expected[chosen], rtol=1e-5, atol=1e-5)
    # the chosen tokens of row 0 fall in both examples: the mask above keeps them apart
    assert chosen[0, :8].any() and chosen[0, 8:].any()


def test_evaluation_routes_each_token_by_its_own_score_so_a_prefix_computes_the_same():
    """Causal at evaluation: a token routes when its score reaches the threshold, whatever follows it; the logits
    of a prefix equal the whole row's over that prefix. (Training's top-k looks at the whole row.)"""
    model = tiny()
    mixture_of_depths.convert(model)
    randomize(model, bias=0.0)
    for router in mixture_of_depths.routers(model):
        router.threshold.fill_(0.0)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        full = model(ids).logits
        hook.remove()
        routes = score(model.model.layers[1], seen[0]).squeeze(-1) >= 0
        assert 0 < int(routes.sum()) < routes.numel()  # some tokens route, some skip: the check below can fail
        for length in (1, 7, 13, 23):
            torch.testing.assert_close(model(ids[:, :length]).logits, full[:, :length], rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_router_and_training_tracks_the_threshold():
    model = tiny()
    mixture_of_depths.convert(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(6))
    model(input_ids=ids, labels=ids).loss.backward()
    for router in mixture_of_depths.routers(model):
        assert router.mod_score.weight.grad.abs().sum() > 0 and router.mod_score.bias.grad.abs().sum() > 0
        # a new router scores every token 1: the top-k cut-off, and so the first threshold, is 1
        assert router.threshold.item() == 1.0


def test_convert_trains_and_the_saved_model_loads_with_the_same_logits(tmp_path, caplog):
    """lf train (full) with mixture_of_depths: convert lowers the loss and saves the routers beside their
    layers; mixture_of_depths: load rebuilds them, and the loaded model's logits are the trained model's."""
    kept = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            kept["model"] = model

    caplog.set_level(logging.INFO, logger="lf")
    out = tmp_path / "run"
    train(out, callbacks=(Keep(),), finetuning_type="full", mixture_of_depths="convert", max_steps=8,
          save_steps=100, learning_rate=5e-4)
    assert "mixture_of_depths: convert: new routers on decoder layers 1, 3" in caplog.text
    curve = losses(out)
    assert curve[-1] < curve[0], curve
    saved = load_file(out / "model.safetensors")
    bias = saved["model.layers.1.mod_router.mod_score.bias"]
    assert bias.item() != 1.0 and math.isfinite(saved["model.layers.3.mod_router.threshold"].item())  # trained
    assert not any(f"layers.{i}.{ROUTER}" in key for key in saved for i in (0, 2))

    trained = kept["model"].eval()
    args = ModelArguments(model_name_or_path=str(out), mixture_of_depths="load", infer_dtype="float32")
    loaded, lines = load_model(load_tokenizer(args), args, FinetuningArguments(finetuning_type="full"),
                               is_trainable=False)
    assert any(line.startswith("mixture_of_depths: load: routers on decoder layers 1, 3") for line in lines)
    loaded.eval()
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_a_lora_runs_routers_travel_with_its_adapter_into_lf_export(tmp_path):
    """LoRA with convert: the adapter saves the trained routers; lf export (convert + the adapter) merges them into
    a model that `load` reads back with the trained model's logits."""
    kept = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            kept["model"] = model

    out = tmp_path / "run"
    train(out, callbacks=(Keep(),), mixture_of_depths="convert", save_steps=100)
    assert any(ROUTER in key for key in load_file(out / "adapter_model.safetensors"))
    merged = export(parse_infer_args({"model_name_or_path": "lf-tiny-llama", "template": "qwen",
                                      "adapter_name_or_path": str(out), "mixture_of_depths": "convert",
                                      "export_dir": str(tmp_path / "merged"), "export_dtype": "float32"},
                                     "export"))["export_dir"]
    args = ModelArguments(model_name_or_path=merged, mixture_of_depths="load", infer_dtype="float32")
    loaded, _ = load_model(load_tokenizer(args), args, FinetuningArguments(finetuning_type="full"),
                           is_trainable=False)
    trained = kept["model"].eval()
    assert all(math.isfinite(router.threshold.item()) for router in mixture_of_depths.routers(loaded))
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, trained(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_moves_the_threshold_once_a_step(reentrant):
    """Checkpointing runs a routed layer's forward twice a step (reentrant: first without gradients); the
    threshold moves as the gradient passes, once, so it ends where it does without checkpointing."""
    ends = []
    for checkpointing in (False, True):
        model = tiny()
        mixture_of_depths.convert(model)
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        for seed in (9, 10):  # two batches, two cut-offs: a second update on the same step would show
            ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
            model(input_ids=ids, labels=ids).loss.backward()
        ends.append(torch.stack([router.threshold for router in mixture_of_depths.routers(model)]))
    assert torch.isfinite(ends[0]).all()
    torch.testing.assert_close(ends[1], ends[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "freeze"])
def test_routers_train_whole_beside_lora_and_freeze(kind):
    args = ModelArguments(model_name_or_path="lf-tiny-llama", mixture_of_depths="convert", infer_dtype="float32")
    model, lines = load_model(load_tokenizer(args), args,
                              FinetuningArguments(finetuning_type=kind, lora_target="all", lora_rank=4,
                                                  freeze_trainable_layers=1), is_trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and ROUTER in name]
    assert len(trainable) == 4 and not any("lora_" in name for name in trainable), trainable
    if kind == "lora":  # PEFT's modules to save: written with the adapter
        assert all("modules_to_save" in name for name in trainable)
    assert any(ROUTER in line for line in lines)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if p.requires_grad and ROUTER in name]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_what_mixture_of_depths_cannot_run_is_refused(tmp_path):
    mixtral = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    with pytest.raises(ModelError, match="model_type 'mixtral' is not one lf routes"):
        mixture_of_depths.convert(mixtral)
    model = tiny()
    with pytest.raises(ModelError, match="load: .* has no routers .* set mixture_of_depths: convert"):
        mixture_of_depths.load(model, str(tmp_path))
    mixture_of_depths.convert(model)
    with pytest.raises(ModelError, match="converted already .* set mixture_of_depths: load"):
        mixture_of_depths.convert(model)
    with pytest.raises(ModelError, match="called with a KV cache"):
        model(torch.zeros(1, 4, dtype=torch.long), use_cache=True)
    for command in ("chat", "api", "webchat"):
        with pytest.raises(ConfigError, match=f"mixture_of_depths: convert .* lf train, export, eval do and lf "
                                              f"{command} does not: remove it"):
            parse_infer_args({"model_name_or_path": "m", "mixture_of_depths": "convert"}, command)
    assert parse_infer_args({"model_name_or_path": "m", "mixture_of_depths": "load"}, "eval").model.mixture_of_depths
    for extra, said in (({"stage": "ppo", "reward_model": "r"}, "stage: ppo, which generates"),
                        ({"do_predict": True, "eval_dataset": "lf_demo_en"}, "do_predict: true, which generates"),
                        ({"shift_attn": True}, "S²-Attn"), ({}, None)):
        if said is None:
            assert parse_train_args(options(tmp_path, mixture_of_depths="load")).model.mixture_of_depths == "load"
            continue
        with pytest.raises(ConfigError, match=said):
            parse_train_args(options(tmp_path, mixture_of_depths="convert", **extra))
