"""use_unsloth_gc (lf/model/offloaded_checkpoint.py): a checkpointed layer keeps a copy of its input in CPU memory
and nothing else; its recomputation replays the forward's dropout, so the gradients are plain backprop's. On the
CPU it is transformers' checkpointing, said in one line; use_unsloth maps onto lf's kernels."""

import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lf.config import parse_train_args
from lf.model import offloaded_checkpoint
from lf.model.offloaded_checkpoint import OffloadedCheckpoint
from lf.train import run
from tests.test_train import lf_home, options  # noqa: F401 (lf_home: the module's LF_HOME fixture)

INTERMEDIATE = 48  # the MLP's width: a saved tensor this wide is an MLP activation


def tiny():
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_dropout=0.3)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).train()


def grads_and_saved(model, ids):
    """Every parameter's gradient after one backward pass, and the shapes autograd saved in the forward."""
    saved = []
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks for every run
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, saved


def test_offloaded_layers_keep_a_cpu_copy_of_their_input_and_give_plain_gradients(monkeypatch):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    model = tiny()
    plain, plain_saved = grads_and_saved(model, ids)
    assert any(shape[-1:] == (INTERMEDIATE,) for shape in plain_saved)  # without checkpointing the MLPs keep theirs

    kept = []

    def to_store(hidden):
        copy = store(hidden)
        kept.append((hidden, copy))
        return copy

    store = offloaded_checkpoint._to_store
    monkeypatch.setattr(offloaded_checkpoint, "_to_store", to_store)
    model.activation_checkpointing_enable()
    for module in model.modules():  # the offloading Function itself (on the CPU lf routes to plain checkpointing)
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = OffloadedCheckpoint.apply
    grads, saved = grads_and_saved(model, ids)

    assert len(kept) == 3  # one input per decoder layer
    for hidden, copy in kept:
        assert copy.device.type == "cpu" and copy.data_ptr() != hidden.data_ptr() and torch.equal(copy, hidden)
    assert not any(shape[-1:] == (INTERMEDIATE,) for shape in saved)  # the layers saved nothing on the graph
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lf_train_with_use_unsloth_gc_and_use_unsloth_on_the_cpu(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lf")
    cfg = parse_train_args(options(tmp_path / "out", use_unsloth_gc=True, use_unsloth=True, max_steps=1,
                                   disable_gradient_checkpointing=False, max_samples=4, save_steps=10))
    run(cfg)
    assert "use_unsloth_gc: training on the CPU, where the activations already are: nothing to offload" in caplog.text
    assert "use_unsloth: lf's own fused kernels take Unsloth's place" in caplog.text


def test_the_checkpointing_function_is_replaced_in_every_checkpointed_layer():
    model = tiny()
    model.activation_checkpointing_enable()
    offloaded_checkpoint.apply(model)
    funcs = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert len(funcs) == 4 and all(f is offloaded_checkpoint.offloaded_checkpoint for f in funcs)  # model + 3 layers
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()  # CPU tensors: transformers' reentrant checkpointing
    assert all(p.grad is not None for p in model.parameters())
