"""LLaMA Pro: `lf expand` writes a model whose zeroed new blocks leave its outputs exactly as they were (logits and
greedy generation with the KV cache), and use_llama_pro trains exactly those blocks (freeze) or puts LoRA adapters
on them alone; a num_expand that does not divide the layers is refused in one line."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lf import cli
from lf.config.finetuning import FinetuningArguments
from lf.config.model import ModelArguments
from lf.errors import ModelError
from lf.model import adapters, llama_pro
from lf.tiny import tiny_path
from tests.support import one_thread  # noqa: F401 (autouse: this module's runs on one thread)
from tests.test_train import losses, lf_home, train  # noqa: F401 (lf_home: the module's LF_HOME fixture)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> Path:
    """lf-tiny-llama (4 layers) expanded by 2: layers 2 and 5 are new."""
    out = tmp_path_factory.mktemp("expanded")
    assert cli.main(["expand", "--model_name_or_path", "lf-tiny-llama", "--output_dir", str(out),
                     "--num_expand", "2"]) == 0
    return out


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_expanded_model_computes_what_the_original_did(expanded):
    original, grown = load(tiny_path("lf-tiny-llama")), load(expanded)
    assert grown.config.num_hidden_layers == 6
    tokens = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grown(tokens).logits, original(tokens).logits)  # a zeroed block adds exactly 0
        # the cache holds one entry per layer: each new layer has its own index
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(grown.generate(tokens[:1], **kwargs), original.generate(tokens[:1], **kwargs))
    old, new = original.model.layers, grown.model.layers
    for i, source in enumerate([0, 1, 1, 2, 3, 3]):
        for (name, a), b in zip(new[i].named_parameters(), old[source].parameters(), strict=True):
            zeroed = i in (2, 5) and name.split(".")[1] in ("o_proj", "down_proj")
            assert torch.equal(a, torch.zeros_like(b) if zeroed else b), (i, name)
    assert AutoTokenizer.from_pretrained(expanded).get_vocab() == \
        AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama")).get_vocab()


def test_a_tied_qwen3_with_per_layer_attention_types_expands_exactly(tmp_path):
    """Tied embeddings, q/k norms and config.layer_types (one entry per layer, which must follow the copies)."""
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen3")
    AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama")).save_pretrained(tmp_path / "qwen3")
    assert cli.main(["expand", "--model_name_or_path", str(tmp_path / "qwen3"), "--output_dir",
                     str(tmp_path / "pro"), "--num_expand", "2"]) == 0
    original, grown = load(tmp_path / "qwen3"), load(tmp_path / "pro")
    types = original.config.layer_types
    assert grown.config.layer_types == [types[0], types[0], types[1], types[1]] and len(set(types)) == 2
    assert grown.lm_head.weight is grown.model.embed_tokens.weight
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(grown(tokens).logits, original(tokens).logits)


def test_a_model_whose_layers_differ_by_position_is_refused_in_one_line(tmp_path):
    """Qwen2-MoE's decoder_sparse_step makes every other layer mixture-of-experts: copies would land on the wrong
    kind of layer."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama")).save_pretrained(tmp_path / "moe")
    with pytest.raises(ModelError, match="lf expand: the expanded qwen2_moe model's layers do not take the copied "
                                         "weights .*models whose layers differ by their position") as info:
        llama_pro.expand(str(tmp_path / "moe"), str(tmp_path / "out"), 2)
    assert "\n" not in str(info.value)


def test_a_num_expand_that_does_not_divide_the_layers_is_refused(tmp_path, capsys):
    code = cli.main(["expand", "--model_name_or_path", "lf-tiny-llama", "--output_dir", str(tmp_path / "out"),
                     "--num_expand", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("lf expand: num_expand: 3 does not divide the model's 4 decoder layers")
    assert not (tmp_path / "out").exists()


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def attach(path, **finetuning):
    model = load(path)
    fin = FinetuningArguments(**{"use_llama_pro": True, "freeze_trainable_layers": 2, **finetuning})
    return adapters.attach(model, ModelArguments(model_name_or_path=str(path)), fin, is_trainable=True)


def test_freeze_trains_the_expanded_blocks_alone(expanded):
    model, lines = attach(expanded, finetuning_type="freeze")
    assert trainable(model) == {name for name, _ in model.named_parameters()
                                if name.startswith(("model.layers.2.", "model.layers.5."))}
    assert "the expanded (LLaMA Pro) decoder layers 2, 5" in lines[-1]


def test_lora_goes_on_the_expanded_blocks_alone(expanded):
    model, _ = attach(expanded, finetuning_type="lora", lora_target="q_proj,down_proj")
    names = trainable(model)
    assert len(names) == 8  # A and B of two modules in two layers
    assert all(".layers.2." in n or ".layers.5." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "down_proj"}


def test_freeze_trainable_layers_must_divide_the_layers(expanded):
    with pytest.raises(ModelError, match="freeze_trainable_layers: 4 does not divide the model's 6 decoder layers"):
        attach(expanded, finetuning_type="freeze", freeze_trainable_layers=4)


def test_lf_train_changes_the_expanded_blocks_alone(expanded, tmp_path):
    train(tmp_path, model_name_or_path=str(expanded), finetuning_type="freeze", freeze_trainable_layers=2,
          use_llama_pro=True, max_samples=4, per_device_train_batch_size=4, cutoff_len=64, max_steps=3,
          save_steps=100)
    before, after = dict(load(expanded).named_parameters()), dict(load(tmp_path).named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith(("model.layers.2.", "model.layers.5."))}
    assert losses(tmp_path)[-1] < losses(tmp_path)[0]
