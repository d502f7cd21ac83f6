"""GPTQ and AWQ on the CPU: `lf export` with export_quantization_bit: 4 writes a GPTQ checkpoint of a tiny Llama
(first trained here on lf's demo texts, so that it has something to lose) that plain transformers loads and
generates with, its perplexity on held-out demo texts close to the unquantized model's; `lf train` trains LoRA over
that checkpoint and over an AWQ one GPTQModel makes (the loss falls), the adapter loads back over it, and `lf export`
refuses to merge into it, naming the method."""

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from gptqmodel import BACKEND, AWQConfig, GPTQModel
from gptqmodel.nn_modules.qlinear import BaseQuantLinear
from peft.tuners.lora.awq import AwqLoraLinear
from peft.tuners.lora.gptq import GPTQLoraLinear
from safetensors.torch import load_file
from test_multimodal import TEMPLATE, gemma3, llava, picture, plain_inputs, qwen2_vl  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lf.config import parse_train_args
from lf.config.finetuning import FinetuningArguments
from lf.config.model import ModelArguments
from lf.config.parser import parse_infer_args
from lf.errors import ConfigError, ModelError
from lf.export import export
from lf.model import load_model, load_tokenizer
from lf.tiny import tiny_path
from lf.train import run

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 12  # the demo records kept out of training and calibration, for perplexity


def demo_texts() -> list[str]:
    records = json.loads((REPO / "data" / "lf_demo_en.json").read_text())
    return [f"{r['instruction']}\n{r['output']}" for r in records]


def perplexity(model, tokenizer, texts) -> float:
    """exp of the mean next-token loss over every token of `texts` (each on its own)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Llama fully trained 30 steps on the demo texts but the held-out ones, which lowers its held-out
    perplexity about threefold (its random weights give every token about the same probability, quantized or not;
    more steps overfit the 48 texts)."""
    path = tmp_path_factory.mktemp("trained")
    source = tiny_path("lf-tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    stream = [i for text in demo_texts()[:-HELD_OUT] for i in tokenizer(text).input_ids]
    blocks = torch.tensor(stream[:len(stream) // 64 * 64]).view(-1, 64)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        ids = blocks[torch.randint(0, len(blocks), (8,))]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calibration") / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in demo_texts()[:-HELD_OUT]))
    return str(path)


def export_options(model, export_dir, **overrides) -> dict:
    return {"model_name_or_path": str(model), "template": "qwen", "export_dir": str(export_dir),
            "export_dtype": "float32", **overrides}


@pytest.fixture(scope="module")
def exported(trained, calibration_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq4")
    export(parse_infer_args(export_options(trained, out, export_quantization_bit=4,
                                           export_quantization_dataset=calibration_file,
                                           export_quantization_nsamples=16, export_quantization_maxlen=48),
                            "export"))
    return out


@pytest.fixture(scope="module")
def awq(trained, tmp_path_factory):
    """The trained tiny Llama AWQ-quantized by GPTQModel (4 bits, groups of 64 inputs; its portable torch kernel, as
    its default AWQ kernel needs CUDA), calibrated on 16 demo texts."""
    out = tmp_path_factory.mktemp("awq4")
    model = GPTQModel.load(str(trained), AWQConfig(bits=4, group_size=64), device="cpu")
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("awq_logs"))  # GPTQModel writes its quantization log to ./logs
    try:
        model.quantize(demo_texts()[:16], backend=BACKEND.AWQ_TORCH)
    finally:
        os.chdir(here)
    model.save(str(out))
    AutoTokenizer.from_pretrained(trained).save_pretrained(out)
    return out


def test_export_4bit_loads_in_transformers_generates_and_keeps_perplexity(trained, exported):
    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["format"] == "gptq"
    assert config["group_size"] == 64  # the tiny Llama's 704 MLP inputs are not a multiple of 128
    assert "dataset" not in config  # the calibration samples are not saved in the config
    quantized = AutoModelForCausalLM.from_pretrained(exported)
    full = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)
    layers = [m for m in quantized.modules() if isinstance(m, BaseQuantLinear)]
    assert len(layers) == 28 and type(quantized.lm_head) is torch.nn.Linear  # 4 layers x 7; the head keeps its weights
    # a quantized layer: its weights 4-bit GPTQ's distance from the unquantized ones, and its CPU kernel (int4 codes,
    # bfloat16 activations) computes x @ those weights
    q_proj, weight = quantized.model.layers[0].self_attn.q_proj, full.model.layers[0].self_attn.q_proj.weight
    dequantized = q_proj.dequantize_weight().T.float()  # (GPTQModel's is inputs x outputs)
    assert (dequantized - weight).abs().mean() / weight.abs().mean() < 0.15
    x = torch.randn(4, 256)
    with torch.no_grad():
        torch.testing.assert_close(q_proj(x), x @ dequantized.T, rtol=2e-2, atol=2e-2 * (x @ dequantized.T).abs().max())
    tokenizer = AutoTokenizer.from_pretrained(exported)
    held_out = demo_texts()[-HELD_OUT:]
    untrained = perplexity(AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama")), tokenizer, held_out)
    full_ppl, quantized_ppl = perplexity(full, tokenizer, held_out), perplexity(quantized, tokenizer, held_out)
    print(f"held-out perplexity: untrained {untrained:.1f}, trained {full_ppl:.1f}, GPTQ 4-bit {quantized_ppl:.1f}")
    assert full_ppl < untrained / 2  # the training taught it something to keep
    assert quantized_ppl < full_ppl * 1.1  # GPTQ 4-bit keeps it: within 10% of the unquantized perplexity
    ids = tokenizer("What causes the seasons on Earth?", return_tensors="pt").input_ids
    generated = quantized.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 8)


# method: (the quantized layer class the kernel report names, PEFT's LoRA layer over it)
METHODS = {"gptq": ("TorchAtenLinear", GPTQLoraLinear), "awq": ("TorchAtenAwqLinear", AwqLoraLinear)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lora_trains_over_the_checkpoint_reloads_and_refuses_to_merge(method, request, tmp_path, caplog):
    checkpoint = request.getfixturevalue("exported" if method == "gptq" else "awq")
    kernel, lora_layer = METHODS[method]
    out = tmp_path / "lora"
    options = {"model_name_or_path": str(checkpoint), "dataset": "lf_demo_en", "dataset_dir": str(REPO / "data"),
               "template": "qwen", "cutoff_len": 128, "max_samples": 2, "output_dir": str(out), "max_steps": 6,
               "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 10, "learning_rate": 5e-3,
               "lora_rank": 4, "seed": 7, "infer_dtype": "float32"}
    with caplog.at_level(logging.INFO, logger="lf"):
        run(parse_train_args(options))
    article = "a" if method == "gptq" else "an"
    assert (f"quantization: {article} {method.upper()} checkpoint (4-bit in groups of 64 inputs), by GPTQModel's "
            f"kernels") in caplog.text
    assert f"28 LoRA layers over {kernel}" in caplog.text  # the kernel report: left to PEFT and GPTQModel
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1  # one batch of 2 examples, seen 6 times
    adapter = load_file(out / "adapter_model.safetensors")
    key = next(k for k in adapter if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    assert adapter[key].abs().sum() > 0

    model_args = ModelArguments(model_name_or_path=str(checkpoint), adapter_name_or_path=str(out),
                                infer_dtype="float32")
    model, _ = load_model(load_tokenizer(model_args), model_args, FinetuningArguments(finetuning_type="lora"),
                          is_trainable=False)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, lora_layer) and isinstance(q_proj.base_layer, BaseQuantLinear)
    assert torch.equal(q_proj.lora_B["default"].weight, adapter[key])
    x = torch.randn(1, 3, q_proj.in_features)
    with torch.no_grad():
        lora = q_proj.lora_B["default"](q_proj.lora_A["default"](x)) * q_proj.scaling["default"]
        torch.testing.assert_close(q_proj(x), q_proj.base_layer(x) + lora)

    with pytest.raises(ModelError, match=rf"is quantized by {method}, and lf export merges adapters into "
                                         rf"full-precision weights only"):
        export(parse_infer_args(export_options(checkpoint, tmp_path / "merged", adapter_name_or_path=str(out)),
                                "export"))
    with pytest.raises(ModelError, match=rf"quantized weights cannot train: .* is quantized by {method.upper()}; "
                                         rf"set finetuning_type: lora, not full"):
        run(parse_train_args({**options, "finetuning_type": "full", "output_dir": str(tmp_path / "full")}))


def test_export_refusals(trained, calibration_file, tmp_path):
    def refused(error, pattern, **keys):
        with pytest.raises(error, match=pattern):
            export(parse_infer_args(export_options(trained, tmp_path / "out", **keys), "export"))
        assert not (tmp_path / "out").exists()

    refused(ConfigError, r"^export_quantization_bit: 4 calibrates GPTQ on data, and export_quantization_dataset is "
                         r"missing", export_quantization_bit=4)
    refused(ConfigError, r"^export_quantization_maxlen: 0 must be a positive number", export_quantization_bit=4,
            export_quantization_dataset=calibration_file, export_quantization_maxlen=0)
    refused(ConfigError, r"^export_gguf: q8_0 converts full-precision weights, and export_quantization_bit: 8",
            export_quantization_bit=8, export_quantization_dataset=calibration_file, export_gguf="q8_0")
    refused(ConfigError, r"^export_quantization_dataset: none of the 48 texts of .* has export_quantization_maxlen: "
                         r"5000 tokens \(the longest has \d+\): lower export_quantization_maxlen",
            export_quantization_bit=4, export_quantization_dataset=calibration_file, export_quantization_maxlen=5000)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"prompt": "a"}\n')
    refused(ConfigError, r"^export_quantization_dataset: .*no_text.jsonl has no \"text\" column \(it has prompt\)",
            export_quantization_bit=4, export_quantization_dataset=str(no_text))
    refused(ConfigError, r"^export_quantization_dataset: dataset 'no/such/data': cannot load 'no/such/data' from the "
                         r"Hugging Face hub \(offline mode",
            export_quantization_bit=4, export_quantization_dataset="no/such/data")


# the tiny vision-language models of tests/test_multimodal.py (2 language layers of 7 linear layers each)
VL_FAMILIES = ("qwen2_vl", "gemma3", "llava")


def packable(source: Path, folder: Path) -> Path:
    """`source`'s tiny model with 2 key/value heads rather than 1, fresh weights: its key and value layers then have
    32 outputs, which GPTQModel packs (check_model refuses 16), its other files as they are."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    shutil.copytree(source, folder)
    config = AutoConfig.from_pretrained(folder)
    config.get_text_config().num_key_value_heads = 2
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # Gemma 3's projector starts at zeros, which would hide every image from the model
        for weight in (p for p in model.parameters() if p.dim() == 2 and not p.any()):
            weight.normal_(std=0.02)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_vl_export_quantizes_the_language_model_alone_and_generates_from_an_image(request, family, calibration_file,
                                                                                  tmp_path):
    from PIL import ImageOps
    from transformers import AutoModelForImageTextToText

    source, out = packable(request.getfixturevalue(family), tmp_path / "model"), tmp_path / "gptq4"
    export(parse_infer_args({"model_name_or_path": str(source), "template": TEMPLATE[family], "export_dir": str(out),
                             "export_dtype": "float32", "export_quantization_bit": 4,
                             "export_quantization_dataset": calibration_file, "export_quantization_nsamples": 8,
                             "export_quantization_maxlen": 32}, "export"))
    quantized = AutoModelForImageTextToText.from_pretrained(out).eval()
    full = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    names = [name for name, m in quantized.named_modules() if isinstance(m, BaseQuantLinear)]
    assert len(names) == 14 and all(name.startswith("model.language_model.layers.") for name in names)
    # the vision tower and the projector keep their weights, as the lm_head and embeddings do
    reloaded = dict(quantized.named_parameters())
    kept = {name: p for name, p in full.named_parameters() if ".layers." not in name or "language_model" not in name}
    assert any("vision" in name or "visual" in name for name in kept)
    assert all(torch.equal(reloaded[name], p) for name, p in kept.items() if name in reloaded)
    inputs = plain_inputs(family, out, picture())  # an image prompt, with transformers and the export's files alone
    with torch.inference_mode():
        generated = quantized.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits, want = quantized(**inputs).logits[0], full(**inputs).logits[0]
        mirrored = quantized(**plain_inputs(family, out, ImageOps.mirror(picture()))).logits[0]
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.nn.functional.cosine_similarity(logits[-1], want[-1], dim=0) > 0.9  # 4-bit keeps the next scores
    # the image reaches the quantized language model (at every position: Gemma 3's tiny model attends to the last 8
    # tokens alone, and its image is further back than that from the last)
    assert not torch.allclose(logits, mirrored)


def write_config(folder: Path, model_type: str, **settings) -> Path:
    """A model folder holding only config.json: every refusal below comes before anything else is read."""
    from transformers import AutoConfig

    folder.mkdir()
    AutoConfig.for_model(model_type, **settings).save_pretrained(folder)
    return folder


def chatglm(folder: Path) -> Path:
    """A ChatGLM folder as THUDM's: model_type chatglm, its config class in the folder's own code."""
    folder.mkdir()
    (folder / "configuration_chatglm.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass ChatGLMConfig(PretrainedConfig):\n"
        "    model_type = 'chatglm'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 64,
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    return folder


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=128)
OTHER_WAY = r"export it without export_quantization_bit, then quantize that folder with GPTQModel itself"


@pytest.mark.parametrize("make, says", [
    (chatglm, rf"a chatglm model: ChatGLM's own code \(trust_remote_code\) keeps its decoder layers at "
              rf"transformer.encoder.layers, where optimum's GPTQ quantizer does not look for them: {OTHER_WAY}"),
    (lambda folder: write_config(folder, "qwen3_moe", **SMALL, moe_intermediate_size=32, num_experts=4,
                                 num_experts_per_tok=2, head_dim=32),
     rf"a qwen3_moe model: GPTQ quantizes linear layers, and \d\d% of its decoder layers' weights are not in one "
     rf"\(.*mlp.experts.gate_up_proj.*\): they would stay unquantized; {OTHER_WAY}"),
    (lambda folder: write_config(folder, "mpt", d_model=64, n_heads=2, n_layers=2, vocab_size=128),
     rf"a mpt model: optimum's GPTQ quantizer finds no decoder layers in it \(it looks for model.layers, "
     rf"model.language_model.layers, transformer.h and a few more\): {OTHER_WAY}"),
    (lambda folder: write_config(folder, "llama", **{**SMALL, "hidden_size": 40, "intermediate_size": 88}),
     r"a llama model: its decoder layers' linear layers have 20, 40, 88 inputs or outputs, and GPTQModel packs 32 "
     r"inputs and 32 outputs at a time: only layers whose sizes are multiples of 32 can be GPTQ-quantized$"),
], ids=["chatglm", "moe", "no_layers_found", "sizes"])
def test_families_gptq_cannot_take_are_refused_before_anything_loads(make, says, calibration_file, tmp_path):
    model = make(tmp_path / "model")
    with pytest.raises(ModelError, match=says):
        export(parse_infer_args(export_options(model, tmp_path / "out", export_quantization_bit=4,
                                               export_quantization_dataset=calibration_file,
                                               trust_remote_code=True), "export"))
    assert not (tmp_path / "out").exists()
