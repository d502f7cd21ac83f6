"""QLoRA over hqq (quantization_method: hqq) on the CPU: the quantized layers compute x @ dequantized W.T, `lf
train` on the tiny Llama lowers the loss and saves an adapter that loads back over the quantized model, `lf export`
merges it into the unquantized base, and bit counts and methods lf does not build are refused in one line."""

import json
import functools
import logging
import shutil

import pytest
import torch
from hqq.core.quantize import HQQLinear
from peft.tuners.lora.hqq import HqqLoraLinear
from safetensors.torch import load_file
from support import check_export_merges_onto_the_full_base, load_quantized
from test_train import lf_home, losses, options  # noqa: F401 (lf_home: the module's tiny model)
from transformers import AutoModelForCausalLM

from lf.config import parse_train_args
from lf.errors import ConfigError, ModelError
from lf.model.hqq import quantize_linears
from lf.tiny import tiny_path
from lf.train import run


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_linear_is_x_times_dequantized_weight(bits):
    torch.manual_seed(bits)
    net = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40),
                              torch.nn.Linear(40, 7))
    weights = [m.weight.detach().clone() for m in (net[0], net[2])]
    done, ragged = quantize_linears(net, bits, torch.float32, "cpu", kept=lambda path: path == "2")
    assert done == 1 and ragged == ["3"]  # "2" kept by name; "3": 7 x 40 weights are not whole groups of 64
    assert isinstance(net[0], HQQLinear) and type(net[2]) is type(net[3]) is torch.nn.Linear
    x = torch.randn(5, 128, requires_grad=True)
    w = net[0].dequantize()
    assert w.shape == weights[0].shape and net[0].W_q.dtype in (torch.uint8, torch.int32)
    # hqq's codes fit the bits, and the weights it gives back are as close as its measured error (this CPU)
    assert net[0].unpack().max() < 2 ** bits
    error = (w - weights[0]).abs().mean() / weights[0].abs().mean()
    assert error < {2: 0.35, 3: 0.16, 4: 0.08, 8: 0.005}[bits]
    y = net[0](x)
    assert torch.equal(y, x @ w.T + net[0].bias)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 96) @ w)


_load = functools.partial(load_quantized, method="hqq")


def test_lf_train_hqq_4bit_then_reload_and_export(tmp_path, caplog):
    out = tmp_path / "hqq4"
    with caplog.at_level(logging.INFO, logger="lf"):
        run(parse_train_args(options(out, quantization_method="hqq", quantization_bit=4, max_steps=6, save_steps=10,
                                     learning_rate=5e-3)))
    # the kernel report says the LoRA layers stay PEFT's, over hqq's kernel
    assert ("not lora_linear: 28 LoRA layers over HQQLinear (e.g. model.layers.0.self_attn.q_proj) left to PEFT and "
            "their quantization's kernel") in caplog.text
    loss = losses(out)
    assert len(loss) == 6 and sum(loss[-2:]) < sum(loss[:2])
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())

    model, lines = _load(tiny_path("lf-tiny-llama"), quantization_bit=4, adapter_name_or_path=str(out))
    assert any(line.startswith("quantization: 4-bit by hqq") and "28 linear layers" in line for line in lines)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, HqqLoraLinear) and isinstance(q_proj.base_layer, HQQLinear)
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # the output head keeps its weights
    total = int(lines[-1].split(" of ")[1].split(" ")[0].replace(",", ""))  # quantized weights counted as values
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert total == lora + sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"))
                               .parameters())
    key = next(k for k in adapter if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    assert torch.equal(q_proj.lora_B["default"].weight, adapter[key])
    ids = torch.randint(3, 1000, (1, 16))
    x = torch.randn(1, 3, q_proj.in_features)
    lora = q_proj.lora_B["default"](q_proj.lora_A["default"](x)) * q_proj.scaling["default"]
    torch.testing.assert_close(q_proj(x), x @ q_proj.base_layer.dequantize().T + lora, rtol=1e-5, atol=1e-6)

    merged = check_export_merges_onto_the_full_base(out, tmp_path / "merged", adapter, key)
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_refusals(tmp_path):
    for bits in (7, 16):
        with pytest.raises(ConfigError, match=rf"^quantization_bit: {bits} is not one of null, 1, 2, 3, 4, 5, 6, 8"):
            parse_train_args(options("out", quantization_method="hqq", quantization_bit=bits))
    with pytest.raises(ConfigError, match=r"^quantization_bit: 3 is not taken by quantization_method: bnb \(bnb "
                                          r"takes 4, 8; hqq takes 1, 2, 3, 4, 5, 6, 8; quanto takes 2, 4, 8\): change "
                                          r"one of the two$"):
        parse_train_args(options("out", quantization_bit=3))
    with pytest.raises(ConfigError, match=r"^quantization_method: eetq is not supported: the eetq package"):
        parse_train_args(options("out", quantization_method="eetq", quantization_bit=8))
    with pytest.raises(ModelError, match="quantization_device_map: auto spreads a model as bitsandbytes loads it"):
        _load(tiny_path("lf-tiny-llama"), quantization_bit=4, quantization_device_map="auto")
    # checkpoints quantized by a method lf loads with lf[gptq] only, which lives in a venv of its own (tests_gptq/):
    # refused with the fix, before loading
    for method, refusal in (("gptq", r"gptq is quantized by GPTQ, which needs gptqmodel, optimum.gptq: pip install "
                                     r"'lf\[gptq\]' \(in a venv without swanlab"),
                            ("awq", r"awq is quantized by AWQ, which needs gptqmodel: pip install 'lf\[gptq\]'")):
        checkpoint = tmp_path / method
        shutil.copytree(tiny_path("lf-tiny-llama"), checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        (checkpoint / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method,
                                                                                              "bits": 4}}))
        with pytest.raises(ModelError, match=refusal):
            _load(checkpoint)
