"""new_special_tokens_config + init_special_tokens (lf/model/special_tokens.py): the described tokens are added as
special tokens, and their embedding rows (and an untied head's) start as the mean of their descriptions' rows."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lf.config import parse_train_args
from lf.model import load_model, load_tokenizer
from lf.tiny import tiny_path
from tests.test_train import lf_home, options  # noqa: F401 (lf_home: the module's LF_HOME fixture)

DESCRIPTIONS = {"<think>": "the start of a reasoning", "<answer>": "the final answer follows"}


@pytest.mark.parametrize("init", ["desc_init", "desc_init_w_noise"])
def test_described_tokens_start_from_their_descriptions(tmp_path, init):
    config = tmp_path / "tokens.yaml"
    config.write_text("".join(f"'{token}': {text}\n" for token, text in DESCRIPTIONS.items()))
    cfg = parse_train_args(options(tmp_path / "out", new_special_tokens_config=str(config), init_special_tokens=init,
                                   resize_vocab=True, finetuning_type="full"))
    tokenizer = load_tokenizer(cfg.model)
    model, lines = load_model(tokenizer, cfg.model, cfg.finetuning, is_trainable=True)
    assert any(line.startswith("init_special_tokens: 2 special tokens") for line in lines)
    base = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    pairs = [(model.get_input_embeddings().weight, base.get_input_embeddings().weight)]
    if not base.config.tie_word_embeddings:
        pairs.append((model.get_output_embeddings().weight, base.get_output_embeddings().weight))
    for token, text in DESCRIPTIONS.items():
        row = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer.added_tokens_decoder[row].special and row >= len(tokenizer) - len(DESCRIPTIONS)  # added
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for weight, original in pairs:
            gap = (weight[row] - original[ids].mean(0)).detach()
            if init == "desc_init":
                torch.testing.assert_close(gap, torch.zeros_like(gap))
            else:  # noise of std 1/sqrt(hidden): its norm is about 1
                assert 0.5 < gap.norm() < 1.5, gap.norm()
                assert abs(gap.std() * math.sqrt(weight.shape[1]) - 1) < 0.5
