"""`python -m bench quant-linear`'s GPTQ and AWQ layers (bench/quant_linear.py, which runs them in this venv): the
kernel layers lf trains over, and PEFT's LoRA layer over them computing what the 16-bit layer computes, within
4-bit's error, with its gradients."""

import pytest
import torch

from bench.quant_linear import build, quantized_layer


@pytest.mark.parametrize("method, kernel", [("gptq4", "TorchAtenLinear"), ("awq4", "TorchAtenAwqLinear")])
def test_layer_computes_the_dense_layer_within_4_bit_error(method, kernel):
    # the class transformers gives a GPTQ / AWQ checkpoint's layers on the CPU (tests_gptq/test_gptq.py: METHODS)
    assert type(quantized_layer(method, torch.randn(128, 256), torch.Generator(), 16)).__name__ == kernel
    forward, leaves, dy = build(method, 256, 128, 16, torch.float32)
    dense_forward, dense_leaves, dense_dy = build("dense", 256, 128, 16, torch.float32)
    assert torch.equal(dy, dense_dy) and torch.equal(leaves[0], dense_leaves[0])  # the same seeded x and dy
    y, want = forward(), dense_forward()
    error = ((y - want).abs().max() / want.abs().max()).item()
    assert 1e-3 < error < 0.1  # quantized, and close: 4 bits in groups of 128 inputs
    torch.autograd.backward(y, dy)
    torch.autograd.backward(want, dy)
    # the adapters' gradients depend on x, dy and each other alone; x's goes back through the 4-bit weight
    for grad, dense_grad in zip((leaves[1].grad, leaves[2].grad), (dense_leaves[1].grad, dense_leaves[2].grad)):
        torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-4 * dense_grad.abs().max().item())
    x_error = ((leaves[0].grad - dense_leaves[0].grad).abs().max() / dense_leaves[0].grad.abs().max()).item()
    assert 1e-3 < x_error < 0.1
