"""QLoRA over quanto (quantization_method: quanto) on the CPU: the quantized layers compute x @ dequantized W.T,
`lf train` on the tiny Llama lowers the loss and saves an adapter that loads back over the quantized model, `lf
export` merges it into the unquantized base, and bit counts quanto does not take are refused in one line."""

import functools
import logging

import pytest
import torch
from optimum.quanto import QTensor
from optimum.quanto.nn import QLinear
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file
from support import check_export_merges_onto_the_full_base, load_quantized
from test_train import lf_home, losses, options  # noqa: F401 (lf_home: the module's tiny model)

from lf.config import parse_train_args
from lf.errors import ConfigError, ModelError
from lf.model.quanto import quantize_linears
from lf.tiny import tiny_path
from lf.train import run


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_linear_is_x_times_dequantized_weight(bits):
    torch.manual_seed(bits)
    net = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40),
                              torch.nn.Linear(40, 7))
    weights = [m.weight.detach().clone() for m in (net[0], net[3])]
    assert quantize_linears(net, bits, kept=lambda path: path == "2") == 2  # "2" kept by name
    assert type(net[0]) is type(net[3]) is QLinear and type(net[2]) is torch.nn.Linear
    x = torch.randn(5, 256, requires_grad=True)
    for layer, weight in zip((net[0], net[3]), weights):
        w = layer.weight.dequantize()
        assert isinstance(layer.weight, QTensor) and not layer.weight.requires_grad and w.shape == weight.shape
        # the codes fit the bits, and the weights quanto gives back are as close as its measured error (this CPU)
        error = (w - weight).abs().mean() / weight.abs().mean()
        assert error < {2: 0.4, 4: 0.08, 8: 0.01}[bits], error
    w = net[0].weight.dequantize()
    y = net[0](x)
    torch.testing.assert_close(y, x @ w.T + net[0].bias, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 96) @ w, rtol=1e-5, atol=1e-6)


_load = functools.partial(load_quantized, method="quanto")


def test_lf_train_quanto_4bit_then_reload_and_export(tmp_path, caplog):
    out = tmp_path / "quanto4"
    with caplog.at_level(logging.INFO, logger="lf"):
        run(parse_train_args(options(out, quantization_method="quanto", quantization_bit=4, max_steps=6,
                                     save_steps=10, learning_rate=5e-3)))
    # the kernel report says the LoRA layers stay PEFT's, over quanto's layer
    assert ("28 of 28 LoRA linear layers (e.g. model.layers.0.self_attn.q_proj) left to PEFT: the base layer is a "
            "QLinear, not a plain nn.Linear") in caplog.text
    loss = losses(out)
    assert len(loss) == 6 and sum(loss[-2:]) < sum(loss[:2])
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())

    model, lines = _load(tiny_path("lf-tiny-llama"), quantization_bit=4, adapter_name_or_path=str(out))
    assert any(line.startswith("quantization: 4-bit by quanto (int4 in groups of up to 128 inputs)")
               and "28 linear layers" in line for line in lines)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj) is LoraLinear and type(q_proj.base_layer) is QLinear
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # the output head keeps its weights
    key = next(k for k in adapter if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    assert torch.equal(q_proj.lora_B["default"].weight, adapter[key])
    x = torch.randn(1, 3, q_proj.in_features)
    lora = q_proj.lora_B["default"](q_proj.lora_A["default"](x)) * q_proj.scaling["default"]
    torch.testing.assert_close(q_proj(x), x @ q_proj.base_layer.weight.dequantize().T + lora, rtol=1e-5, atol=1e-6)

    check_export_merges_onto_the_full_base(out, tmp_path / "merged", adapter, key)


def test_refusals():
    with pytest.raises(ConfigError, match=r"^quantization_bit: 3 is not taken by quantization_method: quanto \(bnb "
                                          r"takes 4, 8; hqq takes 1, 2, 3, 4, 5, 6, 8; quanto takes 2, 4, 8\)"):
        parse_train_args(options("out", quantization_method="quanto", quantization_bit=3))
    with pytest.raises(ModelError, match="quantization_device_map: auto spreads a model as bitsandbytes loads it; "
                                         "quanto quantizes on this process's device"):
        _load(tiny_path("lf-tiny-llama"), quantization_bit=8, quantization_device_map="auto")
