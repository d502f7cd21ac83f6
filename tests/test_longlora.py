"""shift_attn (LongLoRA's S²-Attn, lf/model/longlora.py): the loss and every gradient of a tiny model equal those
of a plain reference that attends group by group, head by head; evaluation keeps full attention; what it cannot
run is refused."""

import logging

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, PhiConfig, Qwen3Config

from lf.config import parse_infer_args, parse_train_args
from lf.errors import ConfigError, ModelError
from lf.kernels import patch
from lf.model import longlora
from lf.train import run
from tests.test_train import lf_home, options  # noqa: F401 (lf_home: the module's LF_HOME fixture)

LENGTH, GROUP = 32, 8  # 4 groups of 8 tokens


def reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """S²-Attn written out: for each row and query head, the token order (rolled by half a group for the second
    half of the heads), then causal softmax attention inside each group of GROUP tokens of that order."""
    batch, heads, length, dim = query.shape
    out = torch.zeros_like(query)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // key.shape[1])
            order = torch.arange(length) if h < heads // 2 else (torch.arange(length) + GROUP // 2) % length
            for start in range(0, length, GROUP):
                idx = order[start:start + GROUP]
                scores = query[b, h, idx] @ key[b, kv, idx].T * scaling
                scores = scores.masked_fill(torch.ones(GROUP, GROUP).triu(1).bool(), float("-inf"))
                out[b, h, idx] = scores.softmax(-1) @ value[b, kv, idx]
    return out.transpose(1, 2), None


AttentionInterface.register("s2_reference", reference)


def tiny(family: str, kv_heads: int):
    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[family]
    config = cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family, kv_heads, kernels", [("llama", 2, True), ("llama", 1, False), ("qwen3", 4, True)])
def test_gradients_equal_the_reference_groups(family, kv_heads, kernels):
    ids = torch.randint(0, 97, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    model = tiny(family, kv_heads)
    if kernels:
        patch(model)  # S²-Attn then wraps lf's lf_packed attention
    full_loss, _ = loss_and_grads(model, ids)
    line = longlora.apply(model)
    assert f"{'lf_packed' if kernels else 'sdpa'} attention at evaluation" in line
    loss, grads = loss_and_grads(model, ids)
    model.set_attn_implementation("s2_reference")
    ref_loss, ref_grads = loss_and_grads(model, ids)
    assert abs(loss - full_loss) > 1e-4  # the groups change the loss: the comparison below can fail
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_attends_over_the_whole_row():
    ids = torch.randint(0, 97, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    model = tiny("llama", 2).eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        longlora.apply(model)
        torch.testing.assert_close(model(input_ids=ids).logits, full, rtol=0, atol=0)


def test_what_s2_attn_cannot_run_is_refused(tmp_path):
    with pytest.raises(ModelError, match="does not split into 4 groups"):
        longlora.shifted_groups(*torch.zeros(3, 1, 2, 10, 4).unbind(0))
    eager = AutoModelForCausalLM.from_config(tiny("llama", 2).config, attn_implementation="eager")
    with pytest.raises(ModelError, match="set flash_attn: sdpa"):
        longlora.apply(eager)
    phi = AutoModelForCausalLM.from_config(PhiConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4),
                                           attn_implementation="sdpa")
    with pytest.raises(ModelError, match="model_type 'phi' is not one lf runs"):
        longlora.apply(phi)
    for packed in ({"packing": True}, {"neat_packing": True}, {"stage": "pt"}):
        with pytest.raises(ConfigError, match="would mix a packed row's examples"):
            parse_train_args(options(tmp_path, shift_attn=True, **packed))
    with pytest.raises(ConfigError, match="ppo also generates"):
        parse_train_args(options(tmp_path, shift_attn=True, stage="ppo", reward_model="r"))
    with pytest.raises(ConfigError, match="shift_attn: true .* which only training runs"):
        parse_infer_args({"model_name_or_path": "m", "shift_attn": True}, "chat")


def test_lf_train_runs_s2_attn(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lf")
    run(parse_train_args(options(tmp_path / "out", shift_attn=True, max_steps=2, max_samples=4, save_steps=10)))
    assert "shift_attn: LongLoRA's shifted sparse attention in training" in caplog.text
