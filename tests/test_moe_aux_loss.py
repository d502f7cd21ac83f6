"""moe_aux_loss_coef: a MoE model's training loss includes its router's load-balancing loss, that many times, with
lf's fused loss as in transformers' own forward; models without a router loss refuse the key."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen3MoeConfig

from lf.config import parse_train_args
from lf.errors import ConfigError, ModelError
from lf.kernels import patch
from lf.model.options import apply_moe_aux_loss
from tests.test_train import options

COEF = 0.5  # large, so that the term shows beside the cross-entropy


def tiny(cls, **sizes):
    """A tiny MoE model built, as lf's loader does, after apply_moe_aux_loss set its config."""
    config = cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, **sizes)
    assert "0.5 times" in apply_moe_aux_loss(config, COEF)
    assert config.output_router_logits and config.router_aux_loss_coef == COEF
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


@pytest.mark.parametrize("cls, sizes", [(MixtralConfig, {"num_local_experts": 4}),
                                        (Qwen3MoeConfig, {"num_experts": 4, "moe_intermediate_size": 16})])
def test_the_loss_includes_the_router_term(cls, sizes):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    model = tiny(cls, **sizes)
    plain = model(input_ids=ids, labels=ids, output_router_logits=False).loss  # the cross-entropy alone
    hf = model(input_ids=ids, labels=ids)  # transformers' forward: cross-entropy + COEF * aux_loss
    torch.testing.assert_close(hf.loss, plain + COEF * hf.aux_loss)
    assert hf.aux_loss > 0.1

    patch(model)
    lf = model(input_ids=ids, labels=ids)
    assert lf.logits is None  # lf's fused loss ran
    torch.testing.assert_close(lf.aux_loss, hf.aux_loss)
    torch.testing.assert_close(lf.loss, hf.loss, rtol=1e-5, atol=1e-5)
    lf.loss.backward()
    assert all(layer.mlp.gate.weight.grad.abs().sum() > 0 for layer in model.model.layers)  # the routers train


def test_models_without_a_router_loss_refuse_it(tmp_path):
    assert apply_moe_aux_loss(LlamaConfig(), None) is None and apply_moe_aux_loss(LlamaConfig(), 0) is None
    with pytest.raises(ModelError, match="model_type 'llama' has no router load-balancing loss"):
        apply_moe_aux_loss(LlamaConfig(), COEF)
    with pytest.raises(ConfigError, match="moe_aux_loss_coef: -1 must be at least 0"):
        parse_train_args(options(tmp_path, moe_aux_loss_coef=-1))
    assert parse_train_args(options(tmp_path, moe_aux_loss_coef=0.01)).model.moe_aux_loss_coef == 0.01
