"""LoRA over an AQLM checkpoint on the CPU (aqlm's numba kernels): a tiny Llama whose linear layers are AQLM codes
(one 16-bit codebook over groups of 8 inputs, random codes: AQLM's own quantizer is not a package), written as
AQLM's checkpoints are (the head named by its weight in linear_weights_not_to_quantize). The quantized layer computes
x @ dequantized W.T; `lf train` lowers the loss and saves an adapter; `lf export` refuses the quantized base."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import lf_home, losses, options  # noqa: F401 (lf_home: the module's tiny model)

from lf.config import parse_train_args
from lf.config.parser import parse_infer_args
from lf.errors import ModelError
from lf.export import export
from lf.tiny import tiny_path
from lf.train import run

AQLM = {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1,
        "nbits_per_codebook": 16, "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"]}


@pytest.fixture(scope="module")
def aqlm_llama(tmp_path_factory, lf_home):
    from aqlm import QuantizedLinear

    src, dst = tiny_path("lf-tiny-llama"), tmp_path_factory.mktemp("aqlm") / "model"
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in [k for k in weights if k.endswith("_proj.weight")]:
        out_features, in_features = weights.pop(name).shape
        layer = QuantizedLinear(in_features, out_features, in_group_size=8, out_group_size=1, num_codebooks=1,
                                nbits_per_codebook=16, bias=False)
        codes = torch.randint(-2 ** 15, 2 ** 15, layer.codes.shape, generator=generator, dtype=layer.codes.dtype)
        codebooks = torch.randn(layer.codebooks.shape, generator=generator) * 0.05
        prefix = name.removesuffix(".weight")
        weights.update({f"{prefix}.codes": codes, f"{prefix}.codebooks": codebooks,
                        f"{prefix}.scales": torch.ones(layer.scales.shape)})
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": AQLM}))
    return dst


def test_aqlm_layer_is_x_times_dequantized_weight():
    from aqlm import QuantizedLinear
    from aqlm.utils import _dequantize_weight, unpack_int_data

    layer = QuantizedLinear(64, 24, in_group_size=8, out_group_size=1, num_codebooks=1, nbits_per_codebook=16,
                            bias=False)
    with torch.no_grad():
        layer.codes.copy_(torch.randint(-2 ** 15, 2 ** 15, layer.codes.shape, dtype=layer.codes.dtype))
        layer.codebooks.normal_()
        layer.scales.uniform_(0.5, 2)
    x = torch.randn(3, 64, requires_grad=True)
    w = _dequantize_weight(unpack_int_data(layer.codes, 16), layer.codebooks, layer.scales)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.T)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 24) @ w)


def test_lf_train_lora_over_an_aqlm_checkpoint(aqlm_llama, tmp_path, caplog):
    out = tmp_path / "aqlm"
    with caplog.at_level(logging.INFO, logger="lf"):
        run(parse_train_args(options(out, model_name_or_path=str(aqlm_llama), max_steps=6, save_steps=10,
                                     learning_rate=5e-3)))
    # the head, named by its weight in the checkpoint, stays a plain linear layer (else: uninitialised, nan)
    assert "quantization: an AQLM checkpoint (1 codebook(s) of 16 bits over groups of 8 inputs)" in caplog.text
    assert "not lora_linear: 28 LoRA layers over QuantizedLinear" in caplog.text
    loss = losses(out)
    assert len(loss) == 6 and all(value == value for value in loss) and sum(loss[-2:]) < sum(loss[:2])
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("q_proj.lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    with pytest.raises(ModelError, match="is quantized by aqlm, and lf export merges adapters into"):
        export(parse_infer_args({"model_name_or_path": str(aqlm_llama), "template": "qwen",
                                 "adapter_name_or_path": str(out), "export_dir": str(tmp_path / "merged")}, "export"))
