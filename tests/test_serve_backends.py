"""infer_backend in lf's main environment, where vLLM is not installed (its tests run in a venv of their own:
tests_vllm/): the keys parse as LLaMA-Factory's, vLLM's engine arguments are built from them, and a backend that
cannot serve here is refused in one line naming its fix, before any model loads."""

import importlib.util
import json

import pytest

from lf.config import parse_infer_args, parse_train_args
from lf.errors import ConfigError
from lf.serve.backends import SGLANG_REFUSAL, VLLM_INSTALL, open_engine
from lf.serve.vllm_engine import engine_args
from lf.tiny import tiny_path

VLLM_KEYS = {"infer_backend": "vllm", "vllm_maxlen": 512, "vllm_gpu_util": 0.5, "vllm_enforce_eager": True,
             "vllm_max_lora_rank": 16, "vllm_config": {"max_num_seqs": 4}}
MODEL = {"model_name_or_path": "lf-tiny-llama", "template": "qwen"}


def test_vllm_keys_parse_as_llama_factorys_with_its_defaults():
    cfg = parse_infer_args({**MODEL, **VLLM_KEYS}, "api").model
    assert (cfg.infer_backend, cfg.vllm_maxlen, cfg.vllm_gpu_util, cfg.vllm_enforce_eager, cfg.vllm_max_lora_rank,
            cfg.vllm_config) == ("vllm", 512, 0.5, True, 16, {"max_num_seqs": 4})
    default = parse_infer_args(MODEL, "chat").model
    assert (default.infer_backend, default.vllm_maxlen, default.vllm_gpu_util, default.vllm_enforce_eager,
            default.vllm_max_lora_rank, default.vllm_config) == ("huggingface", 4096, 0.7, False, 32, None)


def test_engine_arguments_map_the_keys_and_vllm_config_comes_last(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    given = {**VLLM_KEYS, "vllm_config": json.dumps({"max_num_seqs": 4, "enforce_eager": False}),
             "adapter_name_or_path": str(adapter), "infer_dtype": "bfloat16"}
    args = engine_args(parse_infer_args({**MODEL, **given}, "api").model, max_num_seqs=8)
    assert args == {"model": str(tiny_path("lf-tiny-llama")), "trust_remote_code": False, "download_dir": None,
                    "dtype": "bfloat16", "max_model_len": 512, "gpu_memory_utilization": 0.5,
                    "enforce_eager": False, "skip_tokenizer_init": True, "disable_log_stats": True,
                    "enable_lora": True, "max_lora_rank": 16, "max_loras": 1, "max_num_seqs": 4}


@pytest.mark.parametrize("given, problem", [
    ({"vllm_config": "{max_num_seqs: 4"}, "vllm_config is not JSON"),
    ({"vllm_config": "[1]"}, "vllm_config must be a mapping of vLLM engine arguments, got [1]"),
    ({"adapter_name_or_path": "a,b"}, "adapter_name_or_path names 2 adapters, but infer_backend: vllm serves one"),
])
def test_engine_arguments_refuse_what_vllm_cannot_take(given, problem):
    with pytest.raises(ConfigError, match="^" + problem.replace("[", r"\[").replace("]", r"\]")):
        engine_args(parse_infer_args({**MODEL, **VLLM_KEYS, **given}, "api").model)


def test_vllm_without_vllm_installed_is_refused_in_one_line_before_the_model_loads():
    assert importlib.util.find_spec("vllm") is None  # lf's main environment: vLLM lives in its own venv
    with pytest.raises(ConfigError) as info:
        open_engine(parse_infer_args({**MODEL, "infer_backend": "vllm", "model_name_or_path": "/no/such/model"},
                                     "api"))
    assert str(info.value) == f"infer_backend: vllm needs vLLM, which is not installed here: {VLLM_INSTALL}"
    assert VLLM_INSTALL == "pip install lf[vllm]"


def test_do_predict_with_a_backend_that_cannot_serve_is_refused_before_training():
    train = {**MODEL, "dataset": "demo", "eval_dataset": "demo", "output_dir": "saves/t", "do_train": True, "do_predict": True,
             "predict_with_generate": True}
    with pytest.raises(ConfigError) as info:
        parse_train_args({**train, "infer_backend": "vllm"})
    assert "pip install lf[vllm]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_train_args({**train, "infer_backend": "sglang"})
    assert SGLANG_REFUSAL in str(info.value)
    # training alone reads no inference engine
    assert parse_train_args({**train, "do_predict": False, "infer_backend": "vllm"}).model.infer_backend == "vllm"


def test_sglang_and_unknown_backends_are_refused_with_the_reason():
    with pytest.raises(ConfigError) as info:
        open_engine(parse_infer_args({**MODEL, "infer_backend": "sglang"}, "chat"))
    assert str(info.value) == SGLANG_REFUSAL and "torch 2.14.1" in SGLANG_REFUSAL
    with pytest.raises(ConfigError, match="^infer_backend: 'tgi' is not one of huggingface, vllm, sglang$"):
        open_engine(parse_infer_args({**MODEL, "infer_backend": "tgi"}, "chat"))
