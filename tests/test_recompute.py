"""lf.kernels._recompute: an lf RMSNorm's output feeding lf's LoRA ops is not kept for the backward pass but
computed again there, once for all its consumers, bit for bit; the gradients and a LoRA model's training losses are
those of keeping it."""

import copy
import gc
import importlib
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from lf.kernels import _recompute, lora_linear, patch, rms_norm

rms_module = importlib.import_module("lf.kernels.rms_norm")


@pytest.fixture
def recomputed(monkeypatch):
    """Counts the norm outputs computed again."""
    calls, again = [], rms_module._forward_again
    monkeypatch.setattr(rms_module, "_forward_again", lambda *a, **k: calls.append(1) or again(*a, **k))
    return calls


def _keep_norm_outputs(monkeypatch):
    """The path before this: nothing marked, every consumer keeps its input."""
    monkeypatch.setattr(_recompute, "mark", lambda out, *args, **kwargs: out)


def _norm_then_loras(x, weight, adapters, dy, changed=False):
    """rms_norm(x) into one lora_linear per (W, A, B) of ``adapters``; the gradients of x, the norm weight and
    every A and B for the outputs' gradients ``dy``."""
    h = rms_norm(x, weight, 1e-6)
    if changed:
        h.mul_(2)  # an in-place change after the mark: the norm's output is no longer what the recipe computes
    ys = [lora_linear(h, w, a, b, 2.0) for w, a, b in adapters]
    leaves = [x, weight] + [t for _, a, b in adapters for t in (a, b)]
    return torch.autograd.grad(ys, leaves, dy)


def _adapters(hidden, outs, rank=4):
    return [(torch.randn(out, hidden) / hidden**0.5, torch.randn(rank, hidden).requires_grad_(),
             torch.randn(out, rank).requires_grad_()) for out in outs]


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 67),
                                          (torch.bfloat16, 67)])
@pytest.mark.parametrize("changed", [False, True])
def test_three_consumers_compute_it_once_and_the_same_gradients(changed, dtype, hidden, backend, recomputed,
                                                                monkeypatch):
    """q/k/v-like: three LoRA ops on one norm output compute it once in the backward pass, and every gradient has
    the bits of the path that keeps it (fp32 and bf16, an odd width too). Changed in place after the norm, the
    consumers keep it (nothing computed)."""
    x = torch.randn(3, 5, hidden, dtype=dtype, requires_grad=True)
    weight = (torch.randn(hidden) * 0.3 + 1).to(dtype).requires_grad_()
    adapters = [tuple(t.detach().to(dtype).requires_grad_(t.requires_grad) for t in ws)
                for ws in _adapters(hidden, (hidden, 32, 32))]
    dy = [torch.randn(3, 5, w.shape[0], dtype=dtype) for w, _, _ in adapters]
    grads = _norm_then_loras(x, weight, adapters, dy, changed)
    assert len(recomputed) == (0 if changed else 1)
    _keep_norm_outputs(monkeypatch)
    kept = _norm_then_loras(x, weight, adapters, dy, changed)
    assert len(recomputed) == (0 if changed else 1)
    for g, g_kept in zip(grads, kept):
        assert torch.equal(g, g_kept)


def test_a_graph_run_backward_twice_computes_it_each_time(recomputed):
    x = torch.randn(4, 32, requires_grad=True)
    weight = torch.ones(32)
    (w, a, b), = _adapters(32, (16,))
    y = lora_linear(rms_norm(x, weight, 1e-6), w, a, b, 2.0).square().sum()
    first = torch.autograd.grad(y, (x, a, b), retain_graph=True)
    second = torch.autograd.grad(y, (x, a, b))
    assert len(recomputed) == 2
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, second))


def test_not_marked_where_the_graph_keeps_nothing_or_hooks_decide():
    """A norm output without a graph (no_grad, nothing requiring grad) or under saved-tensor hooks (checkpointing)
    carries no recipe."""
    x, weight = torch.randn(4, 32), torch.ones(32)
    assert not hasattr(rms_norm(x, weight), _recompute._ATTR)
    x.requires_grad_()
    assert hasattr(rms_norm(x, weight), _recompute._ATTR)
    with torch.no_grad():
        assert not hasattr(rms_norm(x, weight), _recompute._ATTR)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not hasattr(rms_norm(x, weight), _recompute._ATTR)


def _lora_llama():
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora).train()


def _train(model, batches, steps=3):
    """Losses of ``steps`` AdamW steps, and the last step's gradients."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids, labels in batches[:steps]:
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointed", [False, True])
def test_lora_llama_keeps_no_norm_output_and_trains_the_same(checkpointed, recomputed, monkeypatch):
    """A patched PEFT LoRA Llama: after the forward pass nothing holds the norm outputs that LoRA projections
    take (all but the first layer's input norm, whose input, the frozen embeddings', has no graph); the
    backward pass computes each once; three AdamW steps give the losses and gradients of keeping them, exactly.
    Under gradient checkpointing the layers' own recomputation is left as it is: nothing marked."""
    model = _lora_llama()
    if checkpointed:
        model.activation_checkpointing_enable({"use_reentrant": False})
    kept_model = copy.deepcopy(model)
    patch(model)
    patch(kept_model)
    layers = model.config.num_hidden_layers
    batches = []
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 11))
        labels = ids.clone()
        labels[0, :4] = -100
        batches.append((ids, labels))

    outputs = []  # (norm, its output) of the first forward pass, weakly
    norms = [m for name, m in model.named_modules() if name.endswith("layernorm")]
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append((m, weakref.ref(o)))) for m in norms]
    loss = model(input_ids=batches[0][0], labels=batches[0][1]).loss
    for handle in handles:
        handle.remove()
    gc.collect()
    alive = [m for m, ref in outputs if ref() is not None]
    assert len(outputs) == 2 * layers
    first_input_norm = model.base_model.model.model.layers[0].input_layernorm
    assert alive == ([] if checkpointed else [first_input_norm])
    loss.backward()
    assert len(recomputed) == (0 if checkpointed else 2 * layers - 1)

    losses, grads = _train(model, batches)
    _keep_norm_outputs(monkeypatch)
    kept_losses, kept_grads = _train(kept_model, batches)
    assert losses == kept_losses
    assert grads.keys() == kept_grads.keys() and all(torch.equal(g, kept_grads[n]) for n, g in grads.items())
