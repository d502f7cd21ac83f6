"""A model built from lf's ops still runs under torch.compile (the ops are opaque custom ops)."""
import torch
from transformers import LlamaConfig

from lf.kernels import LFRMSNorm, LFSwiGLUMLP, cross_entropy, fused_linear_cross_entropy, rope


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        cfg = LlamaConfig(hidden_size=32, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1)
        self.norm = LFRMSNorm(32)
        self.mlp = LFSwiGLUMLP(cfg)

    def forward(self, x, q, k, cos, sin):
        qe, ke = rope(q, k, cos, sin)
        return self.mlp(self.norm(x)).sum() + (qe * 2).sum() + ke.square().sum()


def test_compiled_matches_eager():
    block = _Block()
    inputs = [torch.randn(2, 5, 32), torch.randn(2, 2, 5, 16), torch.randn(2, 1, 5, 16)]
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: no silent graph break around lf's ops
    results = []
    for fn in (block, compiled):
        leaves = [t.clone().requires_grad_() for t in inputs]
        block.zero_grad()
        loss = fn(*leaves, cos, sin)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in block.parameters()])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


def test_losses_compile_without_graph_breaks():
    """Label checks, counts and the chunk loop run inside the custom ops, so the losses trace in one graph."""
    def losses(hidden, weight, labels):
        return (fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(7))
                + cross_entropy(hidden @ weight.T, labels, label_smoothing=0.1))

    inputs = [torch.randn(2, 6, 16), torch.randn(50, 16)]
    labels = torch.randint(0, 50, (2, 6))
    labels[0, :3] = -100
    results = []
    for fn in (losses, torch.compile(losses, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves, labels)
        results.append([loss.detach(), *torch.autograd.grad(loss * 2, leaves)])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
