"""`lf train`'s config layer: reading files and overrides, groups and types, LLaMA-Factory's keys, rules, defaults."""

import importlib.util
import json
import logging
import math
import types
import typing
from pathlib import Path

import pytest
import transformers.training_args

from lf.config import RULES, parse_train_args, read_config
from lf.config.parser import UNSUPPORTED, _owners
from lf.config import rules
from lf.config.rules import NO_DEEPSPEED, OFT_KEYS, RANGES, show
from lf.errors import ConfigError
from lf.stages import key_stages

REPO = Path(__file__).resolve().parent.parent
# Like LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, bf16 off: this machine has no bf16 GPU.
LLAMA3_LORA_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

BASE = {"model_name_or_path": "lf-tiny-llama", "dataset": "demo", "output_dir": "saves/test"}


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(LLAMA3_LORA_SFT)
    return str(path)


@pytest.fixture
def logs(caplog):
    """lf.config's log lines (the CLI stops the "lf" logger from propagating, so listen to it directly)."""
    logger = logging.getLogger("lf.config")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lf.config")
    yield caplog
    logger.removeHandler(caplog.handler)


def refused(config) -> str:
    with pytest.raises(ConfigError) as info:
        parse_train_args(config)
    return str(info.value)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- a LLaMA-Factory YAML ---------------------------------------------------------------------------------------

def test_llama_factory_example_parses_into_typed_groups(example):
    cfg = parse_train_args([example])
    assert cfg.source == example
    assert cfg.raw["warmup_ratio"] == 0.1 and cfg.raw["report_to"] == "none"  # as given, before lf's renames
    assert cfg.model.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct" and cfg.model.trust_remote_code
    f = cfg.finetuning
    assert (f.stage, f.finetuning_type, f.lora_rank, f.lora_alpha, f.lora_target) == ("sft", "lora", 8, 16, "all")
    assert f.plot_loss is True and f.overwrite_output_dir is True
    d = cfg.data
    assert (d.dataset, d.template, d.cutoff_len, d.max_samples) == ("identity,alpaca_en_demo", "llama3", 2048, 1000)
    assert d.overwrite_cache is True and d.preprocessing_num_workers == 16 and d.packing is None
    t = cfg.training
    assert isinstance(t, transformers.Seq2SeqTrainingArguments)
    assert t.output_dir == "saves/llama3-8b/lora/sft" and t.do_train and not t.do_eval
    assert (t.logging_steps, t.save_steps, t.dataloader_num_workers) == (10, 500, 4)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1, 8)
    assert isinstance(t.learning_rate, float) and t.learning_rate == 1e-4
    assert t.num_train_epochs == 3.0 and t.lr_scheduler_type == "cosine"
    assert t.warmup_steps == 0.1  # warmup_ratio: transformers 5 reads warmup_steps < 1 as a fraction
    assert t.bf16 is False and t.ddp_timeout == 180000000 and t.resume_from_checkpoint is None
    assert t.report_to == [] and t.save_only_model is False
    assert t.remove_unused_columns is False
    assert t.activation_checkpointing is False and t.gradient_checkpointing is False
    assert cfg.generating.max_new_tokens == 1024


def test_bf16_on_a_machine_without_it_is_a_config_error_naming_the_key(example, monkeypatch):
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: False)
    message = refused([example, "bf16=true"])
    assert message.startswith("bf16: true (on the command line): transformers refuses this: ")
    assert "use_cpu" in message
    assert parse_train_args([example, "bf16=true", "use_cpu=true"]).training.bf16 is True


def test_transformers_own_checks_name_the_key():
    message = refused({**BASE, "logging_steps": 10.5})
    assert message.startswith("logging_steps: 10.5 (in the config): transformers refuses this: ")


# ---- reading -----------------------------------------------------------------------------------------------------

def test_overrides_win_over_the_file(example):
    cfg = parse_train_args([example, "learning_rate=5e-5", "--lora_rank", "16", "--num_train_epochs=1",
                            "--do_eval", "val_size=0.1", "--template", "null"])
    assert cfg.training.learning_rate == 5e-5 and cfg.finetuning.lora_rank == 16 and cfg.finetuning.lora_alpha == 32
    assert cfg.training.num_train_epochs == 1 and cfg.training.do_eval is True and cfg.data.val_size == 0.1
    assert cfg.data.template is None
    assert cfg.raw["lora_rank"] == 16


def test_read_config_types_overrides_as_yaml_scalars(example):
    values, source = read_config([example, "a=true", "b=1e-4", "c=null", "--d", "7", "--e", "f=x,y", "--g=-1",
                                  "--h", "--report-to", "[wandb, tensorboard]"])
    assert source == example and values["stage"] == "sft"
    assert {k: values[k] for k in "abcdefgh"} == {"a": True, "b": 1e-4, "c": None, "d": 7, "e": True, "f": "x,y",
                                                  "g": -1, "h": True}
    assert values["report_to"] == ["wandb", "tensorboard"]
    assert read_config(["lora_rank=4"]) == ({"lora_rank": 4}, None)
    assert read_config({"lora_rank": 4}) == ({"lora_rank": 4}, None)


def test_an_unreadable_override_is_refused(example):
    assert "cannot read 'oops' on the command line: give overrides as key=value" in refused([example, "oops"])


def test_missing_file(tmp_path):
    path = tmp_path / "none.yaml"
    assert refused([str(path)]) == f"config file not found: {path}"


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "model_name_or_path: x\nstage: sft: lora\nlora_rank: 8\n")
    message = refused([path])
    assert message.startswith(f"{path}:2: malformed YAML: ")


def test_a_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, "twice.yaml", "lora_rank: 8\nstage: sft\nlora_rank: 16\n")
    assert refused([path]) == f"{path}:3: lora_rank is given twice (first on line 1): keep one"


def test_the_file_must_be_a_mapping(tmp_path):
    assert "must be a mapping of `key: value` lines, not a list" in refused([write(tmp_path, "l.yaml", "- a\n")])


def test_json_config(tmp_path):
    path = write(tmp_path, "cfg.json", json.dumps({**BASE, "lora_rank": 4, "learning_rate": 2e-4}))
    cfg = parse_train_args([path, "lora_dropout=0.1"])
    assert cfg.source == path and cfg.finetuning.lora_rank == 4 and cfg.training.learning_rate == 2e-4
    assert cfg.finetuning.lora_dropout == 0.1
    bad = write(tmp_path, "bad.json", '{\n  "lora_rank": 4,\n}\n')
    assert refused([bad]).startswith(f"{bad}:3: malformed JSON: ")


def test_an_empty_file_lists_what_is_missing(tmp_path):
    message = refused([write(tmp_path, "empty.yaml", "# nothing yet\n")])
    assert "problems in" in message
    assert "model_name_or_path is missing" in message and "output_dir is missing" in message


# ---- keys --------------------------------------------------------------------------------------------------------

def test_unknown_key_in_the_yaml_names_its_line_and_the_closest_keys(tmp_path):
    path = write(tmp_path, "cfg.yaml", "model_name_or_path: x\noutput_dir: o\nlearing_rate: 1.0e-4\n")
    assert refused([path]) == f"unknown key 'learing_rate' in {path}:3. Did you mean: learning_rate?"


def test_unknown_key_in_an_override(example):
    assert refused([example, "lora_rnak=4"]) == "unknown key 'lora_rnak' on the command line. Did you mean: lora_rank?"


def test_every_unknown_key_is_listed_at_once():
    message = refused({**BASE, "lora_rnak": 4, "quantisation_bit": 4, "zzz": 1})
    assert message.splitlines() == ["unknown key 'lora_rnak' in the config. Did you mean: lora_rank?",
                                    "unknown key 'quantisation_bit' in the config. Did you mean: quantization_bit?",
                                    "unknown key 'zzz' in the config."]


def test_unknown_unsupported_and_mistyped_keys_are_reported_together(tmp_path):
    path = write(tmp_path, "cfg.yaml", "model_name_or_path: x\nuse_kt: true\nlora_rnak: 4\nlora_rank: big\n")
    assert refused([path]).splitlines() == [
        f"use_kt: true (in {path}:2) asks for KTransformers, which lf does not support yet: remove the key: "
        "KTransformers' kernels need a CUDA GPU (beside an AMX or AVX-512 CPU), which lf has not been built and "
        "tested on",
        f"unknown key 'lora_rnak' in {path}:3. Did you mean: lora_rank?",
        f"lora_rank: big (in {path}:4) is a string; expected a whole number"]


@pytest.mark.parametrize("key, value, feature", [
    ("use_mca", True, "Megatron-Core training"),
    ("visual_inputs", True, "LLaMA-Factory's old switch for vision models"),
    ("save_safetensors", False, "pickled checkpoints"),
])
def test_unsupported_llama_factory_keys_are_refused_when_they_ask_for_something(key, value, feature):
    message = refused({**BASE, key: value})
    assert message.startswith(f"{key}: ")
    assert f"(in the config) asks for {feature}" in message and "which lf does not support yet" in message


def test_adapter_folder_is_joined_onto_each_adapter(tmp_path):
    cfg = parse_train_args({**BASE, "adapter_name_or_path": "a, b", "adapter_folder": "run/checkpoint-9"})
    assert cfg.model.adapter_name_or_path == "a/run/checkpoint-9,b/run/checkpoint-9"
    assert cfg.model.adapter_folder is None  # joined once: a copy of the arguments does not join it again
    for folder in ("../elsewhere", "/etc", "x/../../y"):
        assert "must be a relative folder inside each adapter" in refused({**BASE, "adapter_name_or_path": "a",
                                                                           "adapter_folder": folder})
    assert refused({**BASE, "adapter_folder": "x"}).startswith("adapter_folder: x names a subfolder of each adapter")


def test_video_and_audio_keys_are_read_with_llama_factorys_defaults():
    cfg = parse_train_args({**BASE, "video_fps": 1.0, "video_maxlen": 8, "audio_sampling_rate": 8000,
                            "use_audio_in_video": True})
    assert (cfg.data.video_fps, cfg.data.video_maxlen, cfg.data.audio_sampling_rate, cfg.data.use_audio_in_video) == (
        1.0, 8, 8000, True)
    defaults = parse_train_args(BASE).data
    assert (defaults.video_max_pixels, defaults.video_min_pixels, defaults.video_fps, defaults.video_maxlen,
            defaults.audio_sampling_rate, defaults.use_audio_in_video) == (256 * 256, 16 * 16, 2.0, 128, 16000, False)


def test_unsupported_keys_at_their_defaults_are_accepted(logs):
    inert = {"use_mca": False, "video_fps": 2.0, "infer_backend": "huggingface", "video_max_pixels": 65536,
             "save_safetensors": True, "sglang_maxlen": 4096}
    cfg = parse_train_args({**BASE, **inert})
    assert cfg.raw["sglang_maxlen"] == 4096
    assert "sglang_maxlen is ignored: it tunes SGLang" in logs.text


@pytest.mark.parametrize("key, value, expected", [
    ("lora_rank", "eight", "lora_rank: eight (in the config) is a string; expected a whole number"),
    ("learning_rate", "fast", "learning_rate: fast (in the config) is a string; expected a number"),
    ("do_train", "yes", "do_train: yes (in the config) is a string; expected true or false"),
    ("lora_rank", 8.5, "lora_rank: 8.5 (in the config) is a number; expected a whole number"),
    ("template", 3, "template: 3 (in the config) is a whole number; expected a string or null"),
    ("stage", None, "stage: null (in the config) is null; expected a string"),
    ("lr_scheduler_type", "cosinee", "lr_scheduler_type: cosinee (in the config) is not one of linear, cosine"),
    ("report_to", 5, "report_to: 5 (in the config) is a whole number; expected null or a string or a list"),
])
def test_values_of_the_wrong_type_name_key_value_and_type(key, value, expected):
    assert refused({**BASE, key: value}).startswith(expected)


def test_a_misspelt_choice_gets_suggestions():
    assert refused({**BASE, "lr_scheduler_type": "cosinee"}).endswith("Did you mean: cosine, cosine_with_restarts?")


def test_comma_separated_keys_take_lists():
    cfg = parse_train_args({**BASE, "dataset": ["alpaca_en_demo", "identity"], "lora_target": ["q_proj", "v_proj"]})
    assert cfg.data.dataset == "alpaca_en_demo,identity" and cfg.finetuning.lora_target == "q_proj,v_proj"


def test_use_cache_is_the_model_groups():
    cfg = parse_train_args({**BASE, "use_cache": False})
    assert cfg.model.use_cache is False and cfg.training.use_cache is False


# ---- rules -------------------------------------------------------------------------------------------------------

RULE_CASES = {
    "model_name_or_path": ({"model_name_or_path": None}, "model_name_or_path is missing"),
    "output_dir": ({"output_dir": None}, "output_dir is missing"),
    "nothing_to_do": ({"do_train": False}, "do_train, do_eval and do_predict are all false: nothing to run"),
    "predict_needs_eval_dataset": ({"do_predict": True, "predict_with_generate": True},
                                   "do_predict: true generates answers to the prompts of eval_dataset, but "
                                   "eval_dataset is not set"),
    "predict_with_generate": ({"do_predict": True, "eval_dataset": "demo"},
                              "do_predict: true with predict_with_generate: false: lf predicts by generating answers"
                              " (written to generated_predictions.jsonl, scored with BLEU and ROUGE): set "
                              "predict_with_generate: true"),
    "predict_stage": ({"do_predict": True, "predict_with_generate": True, "eval_dataset": "demo", "stage": "dpo"},
                      "do_predict: true generates answers with stage: sft (or pt), not stage: dpo"),
    "stage_known": ({"stage": "sfft"}, "stage: sfft is not a training stage"),
    "ppo_needs_reward_model": ({"stage": "ppo"}, "stage: ppo trains on the scores a reward model gives the policy's "
                                                 "replies, but reward_model is not set"),
    "ppo_evaluates": ({"stage": "ppo", "reward_model": "saves/rm", "do_eval": True, "val_size": 0.1},
                      "stage: ppo does not evaluate"),
    "preference_options_need_their_stage": ({"stage": "pt", "pref_loss": "ipo", "ref_model": "saves/ref"},
                                            "ref_model, pref_loss tune(s) dpo and kto and ppo and sft training, but "
                                            "stage is pt: set stage: dpo"),
    "pref_loss_choice": ({"stage": "dpo", "pref_loss": "dpo"}, "pref_loss: dpo is not one of sigmoid, hinge, ipo, "
                                                               "kto_pair, orpo, simpo."),
    "smoothing_needs_logistic_loss": ({"stage": "dpo", "pref_loss": "ipo", "dpo_label_smoothing": 0.1},
                                      "dpo_label_smoothing softens the sigmoid and simpo losses, not pref_loss: ipo"),
    "simpo_gamma_needs_simpo": ({"stage": "dpo", "simpo_gamma": 1.0}, "simpo_gamma is the margin of the simpo loss, "
                                                                      "but pref_loss is sigmoid"),
    "ref_model_options_need_ref_model": ({"stage": "kto", "ref_model_quantization_bit": 4},
                                         "ref_model_quantization_bit shape(s) the reference model that ref_model "
                                         "names, but ref_model is not set"),
    "ref_model_quantization_bit_choice": ({"stage": "dpo", "ref_model": "saves/ref", "ref_model_quantization_bit": 2},
                                          "ref_model_quantization_bit: 2 is not one of null, 4, 8"),
    "reference_free_loss": ({"stage": "dpo", "pref_loss": "simpo", "ref_model": "saves/ref"},
                            "pref_loss: simpo compares the trained model's replies with each other"),
    "bco_needs_reference": ({"stage": "dpo", "pref_loss": "orpo", "pref_bco_weight": 0.5},
                            "pref_bco_weight mixes BCO's loss, over log-ratios to the reference, into the dpo loss, but "
                            "pref_loss: orpo uses no reference"),
    "reward_model_adapters": ({"stage": "rm", "adapter_name_or_path": "saves/sft"},
                              "stage: rm puts a value head on the model"),
    "reward_model_head": ({"stage": "rm", "upcast_lmhead_output": True},
                          "upcast_lmhead_output upcasts the LM head's logits, but stage: rm replaces the LM head"),
    "finetuning_type_choice": ({"finetuning_type": "loha"}, "finetuning_type: loha is not one of full, freeze, lora, "
                                                            "oft."),
    "oft_options_need_oft": ({"oft_rank": 4, "oft_block_size": 0},
                             "oft_rank, oft_block_size shape(s) OFT adapters, but finetuning_type is lora: set "
                             "finetuning_type: oft"),
    "oft_rank_or_block_size": ({"finetuning_type": "oft", "oft_rank": 4},
                               "oft_rank: 4 and oft_block_size: 32: OFT's blocks are given by their count or their "
                               "size, exactly one: set the other to 0"),
    "cpu_allocator_choice": ({"cpu_allocator": "jemalloc"}, "cpu_allocator: jemalloc is not one of tuned, default."),
    "lora_options_need_lora": ({"finetuning_type": "full", "use_dora": True, "use_rslora": True},
                               "use_dora, use_rslora shape(s) LoRA adapters, but finetuning_type is full"),
    "pissa_iter_range": ({"pissa_init": True, "pissa_iter": 0}, "pissa_iter is 0: it counts randomized SVD iterations"),
    "pissa_convert_needs_init": ({"pissa_convert": True},
                                 "pissa_convert converts a PiSSA adapter, but pissa_init is false"),
    "early_stopping_needs_best_model": ({"early_stopping_steps": 2},
                                        "early_stopping_steps counts evaluations that did not beat the best one"),
    "adapter_needs_lora": ({"adapter_name_or_path": "saves/a", "finetuning_type": "freeze"},
                           "adapter_name_or_path loads LoRA adapters, but finetuning_type is freeze"),
    "scratch_with_adapter": ({"train_from_scratch": True, "adapter_name_or_path": "saves/a"},
                             "train_from_scratch starts from random weights"),
    "new_adapter_needs_adapter": ({"create_new_adapter": True}, "adapter_name_or_path names none"),
    "quantization_bit_choice": ({"quantization_bit": 7}, "quantization_bit: 7 is not one of null, 1, 2, 3, 4, 5, 6, 8 "
                                                         "(bnb quantizes to 4 or 8 bits, hqq to 1-6 or 8, quanto to "
                                                         "2, 4 or 8)"),
    "quantization_bit_for_method": ({"quantization_bit": 3}, "quantization_bit: 3 is not taken by "
                                                             "quantization_method: bnb (bnb takes 4, 8; hqq takes"),
    "quantization_method_refused": ({"quantization_method": "eetq", "quantization_bit": 8},
                                    "quantization_method: eetq is not supported: the eetq package has no"),
    "reward_model_quantization_bit_choice": ({"stage": "ppo", "reward_model": "saves/rm",
                                              "reward_model_quantization_bit": 2},
                                             "reward_model_quantization_bit: 2 is not one of null, 4, 8"),
    "reward_model_type_choice": ({"stage": "ppo", "reward_model": "saves/rm", "reward_model_type": "oft"},
                                 "reward_model_type: oft is not one of lora, full, api."),
    "quantization_needs_lora": ({"quantization_bit": 4, "finetuning_type": "full"},
                                "QLoRA trains LoRA adapters over a quantized base: set finetuning_type: lora"),
    "quantized_adapters": ({"quantization_bit": 4, "adapter_name_or_path": "saves/a,saves/b"},
                           "adapters cannot be merged into a quantized model"),
    "npu_double_quantization": ({"quantization_bit": 4}, "double_quantization: true on an Ascend NPU"),
    "fsdp1_on_cpu": ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 1}},
                     "fsdp_config's fsdp_version: 1 on the CPU: accelerate's FSDP1 plugin needs an accelerator"),
    "quantization_method_choice": ({"quantization_method": "gguf"}, "quantization_method: gguf is not one of bnb, "
                                                                    "bitsandbytes, hqq"),
    "quantization_type_choice": ({"quantization_type": "nf8"}, "quantization_type: nf8 is not one of nf4, fp4."
                                                                " Did you mean: nf4?"),
    "flash_attn_choice": ({"flash_attn": "fa3"}, "flash_attn: fa3 is not one of auto, disabled, sdpa, fa2."
                                                 " Did you mean: fa2?"),
    "rope_scaling_choice": ({"rope_scaling": "ntk"}, "rope_scaling: ntk is not one of null, linear, dynamic"),
    "infer_backend": ({"do_predict": True, "predict_with_generate": True, "eval_dataset": "demo",
                       "infer_backend": "sglang"}, "infer_backend: sglang is not supported by lf yet"),
    "infer_backend_choice": ({"infer_backend": "tgi"}, "infer_backend: tgi is not one of huggingface, vllm, sglang"),
    "infer_dtype_choice": ({"infer_dtype": "float8"}, "infer_dtype: float8 is not one of auto, float16"),
    "video_pixel_limits": ({"video_min_pixels": 4096, "video_max_pixels": 1024},
                           "video_min_pixels: 4096 is above video_max_pixels: 1024: no frame size fits both"),
    "image_pixel_limits": ({"image_min_pixels": 4096, "image_max_pixels": 1024},
                           "image_min_pixels: 4096 is above image_max_pixels: 1024: no image size fits both"),
    "mm_proj_only_needs_full": ({"train_mm_proj_only": True}, "train_mm_proj_only: true trains the multimodal "
                                                              "projector alone, in full, but finetuning_type is lora"),
    "enable_liger_kernel_or_lf_kernels": ({"enable_liger_kernel": True, "use_lf_kernels": False},
                                          "enable_liger_kernel: true asks for Liger's fused kernels, which lf answers "
                                          "with its own, but use_lf_kernels: false turns them off"),
    "use_unsloth_or_lf_kernels": ({"use_unsloth": True, "use_lf_kernels": False},
                                  "use_unsloth: true asks for Unsloth's fused kernels"),
    "unsloth_gc_needs_checkpointing": ({"use_unsloth_gc": True, "disable_gradient_checkpointing": True},
                                       "use_unsloth_gc: true offloads the inputs gradient checkpointing keeps, but "
                                       "disable_gradient_checkpointing: true turns checkpointing off"),
    "descriptions_for_init": ({"init_special_tokens": "desc_init"},
                              "init_special_tokens: desc_init starts new tokens from their descriptions, but there "
                              "are none: set new_special_tokens_config"),
    "special_tokens_once": ({"new_special_tokens_config": "t.yaml", "add_special_tokens": "<a>"},
                            "new_special_tokens_config and add_special_tokens both name special tokens to add"),
    "init_special_tokens_choice": ({"init_special_tokens": "mean"},
                                   "init_special_tokens: mean is not one of noise_init, desc_init, desc_init_w_noise"),
    "shift_attn_not_packed": ({"shift_attn": True, "packing": True},
                              "shift_attn: true cuts each row into 4 groups of its tokens, which would mix a packed "
                              "row's examples: set packing: false"),
    "shift_attn_not_in_ppo": ({"shift_attn": True, "stage": "ppo", "reward_model": "saves/rm"},
                              "shift_attn: true is for the training forward, but ppo also generates"),
    "mixture_of_depths_choice": ({"mixture_of_depths": "yes"},
                                 "mixture_of_depths: yes is not one of null, convert, load."),
    "mixture_of_depths_does_not_generate": ({"mixture_of_depths": "convert", "stage": "ppo",
                                             "reward_model": "saves/rm"},
                                            "mixture_of_depths: convert and stage: ppo, which generates: a routed "
                                            "layer's skipped tokens would leave holes in its KV cache"),
    "mixture_of_depths_without_shift_attn": ({"mixture_of_depths": "load", "shift_attn": True},
                                             "mixture_of_depths: load runs a routed layer on the few tokens it "
                                             "chooses, which S²-Attn (shift_attn: true) would cut"),
    "swanlab_installed": ({"use_swanlab": True}, "use_swanlab: true tracks the run with SwanLab, which is not "
                                                 "installed: pip install 'lf[swanlab]'"),
    "swanlab_mode_choice": ({"use_swanlab": True, "swanlab_mode": "online"},
                            "swanlab_mode: online is not one of cloud, local, offline, disabled"),
    "swanlab_once": ({"use_swanlab": True, "report_to": "swanlab"},
                     "use_swanlab: true and report_to: swanlab would both log the run to SwanLab: keep one"),
    "fp16_and_bf16": ({"fp16": True, "bf16": True}, "fp16 and bf16 are both true: choose one"),
    "train_needs_data": ({"dataset": None}, "do_train needs training data: set dataset"),
    "eval_needs_data": ({"eval_strategy": "steps"}, "there is no eval data: set val_size"),
    "streaming_needs_max_steps": ({"streaming": True}, "a stream has no length, so epochs cannot be counted: set "
                                                       "max_steps"),
    "report_to_installed": ({"report_to": "wandb"}, "report_to: wandb needs its package: pip install wandb"),
    "streaming_val_size": ({"streaming": True, "max_steps": 100, "val_size": 0.1},
                           "val_size: 0.1 is a fraction, but a stream's length is unknown"),
    "max_steps": ({"max_steps": 0}, "max_steps: 0 would train no step (transformers trains one and reports success): "
                                    "set the number of optimizer steps to train, or remove max_steps (-1, the "
                                    "default) to train num_train_epochs epochs"),
    "optimizer_not_in_ppo": ({"use_muon": True, "stage": "ppo", "reward_model": "saves/rm"},
                             "use_muon: true, but stage: ppo steps the policy and value head with its own AdamW"),
    "one_optimizer": ({"finetuning_type": "full", "use_galore": True, "use_muon": True},
                      "use_galore, use_muon each choose the optimizer: keep one of them"),
    "optimizer_not_with_lora": ({"use_badam": True}, "use_badam trains whole weight matrices, not LoRA adapters: set "
                                                     "finetuning_type: full"),
    "galore_optim": ({"finetuning_type": "full", "use_galore": True, "optim": "sgd"},
                     "use_galore: true with optim: sgd: GaLore comes in the AdamW, 8-bit AdamW and Adafactor kinds"),
    "apollo_optim": ({"finetuning_type": "full", "use_apollo": True, "optim": "adafactor"},
                     "use_apollo: true with optim: adafactor: APOLLO is an AdamW: set optim: adamw_torch"),
    "galore_layerwise_accumulation": ({"finetuning_type": "full", "use_galore": True, "galore_layerwise": True,
                                       "gradient_accumulation_steps": 2},
                                      "galore_layerwise: true steps each weight as soon as its gradient is ready, so "
                                      "gradients cannot be accumulated: set gradient_accumulation_steps: 1"),
    "apollo_layerwise_accumulation": ({"finetuning_type": "full", "use_apollo": True, "apollo_layerwise": True,
                                       "gradient_accumulation_steps": 4}, "apollo_layerwise: true steps each weight"),
    # (overrides, message, environment): WORLD_SIZE=2 is what torchrun sets in each of two processes
    "galore_layerwise_distributed": ({"finetuning_type": "full", "use_galore": True, "galore_layerwise": True},
                                     "galore_layerwise: true steps each weight in its own gradient hook, before the "
                                     "processes have averaged the gradients", {"WORLD_SIZE": "2"}),
    "apollo_layerwise_distributed": ({"finetuning_type": "full", "use_apollo": True, "apollo_layerwise": True},
                                     "apollo_layerwise: true steps each weight", {"WORLD_SIZE": "2"}),
    "optimizer_not_with_deepspeed": ({"finetuning_type": "full", "use_apollo": True,
                                      "deepspeed": str(REPO / "configs/deepspeed/ds_z2.json")},
                                     "use_apollo: true with deepspeed: DeepSpeed gives the optimizer flattened shards "
                                     "of the weights, but APOLLO projects"),
    "badam_ratio_distributed": ({"finetuning_type": "full", "use_badam": True, "badam_mode": "ratio",
                                 "deepspeed": str(REPO / "configs/deepspeed/ds_z3.json")},
                                "badam_mode: ratio runs in one process only", {"WORLD_SIZE": "2"}),
    "badam_layer_needs_zero3": ({"finetuning_type": "full", "use_badam": True,
                                 "deepspeed": str(REPO / "configs/deepspeed/ds_z2.json")},
                                "use_badam: true (badam_mode: layer) in several processes (WORLD_SIZE > 1) runs "
                                "under DeepSpeed ZeRO-3 only", {"WORLD_SIZE": "2"}),
    "llama_pro_not_full": ({"finetuning_type": "full", "use_llama_pro": True},
                           "use_llama_pro: true trains the blocks `lf expand` added, but finetuning_type: full"),
    "galore_proj_type_choice": ({"galore_proj_type": "up"}, "galore_proj_type: up is not one of std, reverse_std, "
                                                            "right, left, full."),
    "apollo_proj_choice": ({"apollo_proj": "qr"}, "apollo_proj: qr is not one of svd, random."),
    "apollo_proj_type_choice": ({"apollo_proj_type": "full"}, "apollo_proj_type: full is not one of std, right, "
                                                              "left."),
    "apollo_scale_type_choice": ({"apollo_scale_type": "row"}, "apollo_scale_type: row is not one of channel, "
                                                               "tensor."),
    "badam_mode_choice": ({"badam_mode": "block"}, "badam_mode: block is not one of layer, ratio."),
    "badam_switch_mode_choice": ({"badam_switch_mode": "up"}, "badam_switch_mode: up is not one of ascending, "
                                                              "descending, random, fixed."),
    "badam_mask_mode_choice": ({"badam_mask_mode": "all"}, "badam_mask_mode: all is not one of adjacent, scatter."),
    "accuracy_needs_evaluation": ({"compute_accuracy": True},
                                  "compute_accuracy: true measures token accuracy at evaluation, but evaluation is "
                                  "off: set do_eval: true"),
    "pure_bf16_without_amp": ({"pure_bf16": True, "bf16": True},
                              "pure_bf16: true trains the bf16 weights as they are, without autocast, but bf16: true "
                              "turns autocast on: remove one of the two"),
    "pure_bf16_dtype": ({"pure_bf16": True, "infer_dtype": "float16"},
                        "pure_bf16: true loads the weights in bfloat16, but infer_dtype is float16"),
    **{f"{name}_needs_lf_kernels": ({f"use_{name}_loss": True, "use_lf_kernels": False},
                                    f"use_{name}_loss: true weights the tokens inside lf's fused loss, but "
                                    f"use_lf_kernels: false turns it off") for name in ("dft", "eaft", "asft")},
    "placement_strategy_choice": ({"placement_strategy": "RANDOM"}, "placement_strategy: RANDOM is not one of PACK, "
                                                                    "SPREAD, STRICT_PACK, STRICT_SPREAD.",
                                  {"USE_RAY": "1"}),
    "ray_keys_need_use_ray": ({"ray_num_workers": 2, "master_port": 29500},
                              "ray_num_workers, master_port set(s) up training on Ray, which USE_RAY=1 turns on: run "
                              "with USE_RAY=1 (pip install lf[ray]), or remove them"),
    "one_token_weighting": ({"use_dft_loss": True, "use_asft_loss": True},
                            "use_dft_loss and use_asft_loss each weight every token's loss, differently (use_asft_loss "
                            "is DFT's loss plus a KL term): keep one"),
    "asft_options_need_asft": ({"ref_model": "lf-tiny-llama", "asft_alpha": 0.5},
                               "asft_alpha, ref_model shape(s) use_asft_loss's KL term from a reference model, but "
                               "use_asft_loss is off: set use_asft_loss: true, or remove them"),
    "finite_numbers": ({"length_penalty": float("inf"), "eval_delay": float("nan")},
                       "length_penalty: .inf, eval_delay: .nan: not a finite number: give a number"),
}


def test_every_rule_has_a_case():
    assert sorted([*RULE_CASES, *RANGES]) == sorted(rule.name for rule in RULES)


def outside(allowed, whole: bool):
    """Values just outside an interval, and (for a float key; a whole-number key's type check refuses them) nan
    and inf."""
    below = allowed.low if allowed.low_open else allowed.low - 1
    beyond = [] if allowed.high == math.inf else [allowed.high if allowed.high_open else allowed.high + 1]
    return [below, *beyond] if whole else [below, *beyond, math.inf, math.nan]


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_numeric_key_refuses_values_outside_its_range(key, monkeypatch):
    group, allowed, what = RANGES[key]
    annotation = _owners()[key][1]
    assert _owners()[key][0] == group
    stage = key_stages().get(key, ("sft",))[0]  # preference keys are read by their stage only
    for value in outside(allowed, whole=float not in (typing.get_args(annotation) or (annotation,))):
        needed = {"reward_model": "saves/rm"} if stage == "ppo" else {}  # ppo's one required key
        if key in OFT_KEYS:  # read with finetuning_type: oft only
            needed["finetuning_type"] = "oft"
        if key == "asft_alpha":  # read with use_asft_loss only
            needed["use_asft_loss"] = True
        if key == "ray_num_workers":  # read with USE_RAY=1 only
            monkeypatch.setenv("USE_RAY", "1")
        message = refused({**BASE, "stage": stage, **needed, key: value})
        finite = "a finite number " if not math.isfinite(value) else ""
        assert message == f"{key}: {show(value)} must be {finite}{allowed}: {what}"


@pytest.mark.parametrize("config, expected", [
    ({"learning_rate": -1}, "learning_rate: -1 must be above 0: the optimizer's step size (1e-4 is usual for LoRA, "
                            "1e-5 for full fine-tuning)"),
    ({"learning_rate": math.nan}, "learning_rate: .nan must be a finite number above 0: the optimizer's step size"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size: 0 must be at least 1: the examples each "
                                         "device trains on in a step"),
    ({"lora_dropout": 1.0}, "lora_dropout: 1.0 must be in [0, 1): the chance an adapter input is dropped"),
    ({"stage": "dpo", "dpo_label_smoothing": 0.5}, "dpo_label_smoothing: 0.5 must be in [0, 0.5): the chance a "
                                                   "pair is labelled"),
    ({"top_p": 0}, "top_p: 0 must be in (0, 1]: the probability mass sampled from"),
])
def test_numeric_messages_read_well(config, expected):
    assert refused({**BASE, **config}).startswith(expected)


def test_numbers_at_the_edges_of_their_ranges_pass():
    cfg = parse_train_args({**BASE, "warmup_steps": 0, "max_grad_norm": 0, "lora_dropout": 0, "top_p": 1,
                            "temperature": 0, "max_steps": -1, "val_size": 0, "learning_rate": 1e-9})
    assert cfg.generating.top_p == 1 and cfg.training.max_steps == -1


ON_DEVICE = {"npu_double_quantization": "npu"}  # rules that apply on one accelerator: the kind their case fakes
NOT_INSTALLED = {"swanlab_installed": "swanlab"}  # rules about a missing package: the package their case hides


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_each_rule_refuses_its_case_alone(name, monkeypatch):
    overrides, expected, *environment = RULE_CASES[name]
    for key, value in (environment or [{}])[0].items():
        monkeypatch.setenv(key, value)
    if name in ON_DEVICE:  # a fake device kind (lf.device is tested in test_device.py)
        monkeypatch.setattr(rules, "accelerator", lambda: ON_DEVICE[name])
    if name in NOT_INSTALLED:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == NOT_INSTALLED[name] else
                            find_spec(n, *a))
    message = refused({**BASE, **overrides})
    assert expected in message
    assert "problems" not in message  # this rule alone


@pytest.mark.parametrize("key", sorted(NO_DEEPSPEED))
def test_each_optimizer_that_needs_whole_matrices_is_refused_with_deepspeed(key):
    message = refused({**BASE, "finetuning_type": "full", key: True,
                       "deepspeed": str(REPO / "configs/deepspeed/ds_z3.json")})
    assert message == (f"{key}: true with deepspeed: DeepSpeed gives the optimizer flattened shards of the weights, "
                       f"but {NO_DEEPSPEED[key]}: remove deepspeed (several processes train with plain DDP), or {key}")


def test_rules_report_every_problem_at_once(example):
    message = refused([example, "stage=ppo", "lora_rank=0"])
    assert message.startswith(f"2 problems in {example}:\n  - ")
    assert "reward_model is not set" in message and "lora_rank: 0 must be at least 1" in message


def test_rules_pass_where_the_combination_is_fine():
    cfg = parse_train_args({**BASE, "quantization_bit": 4, "adapter_name_or_path": "saves/a", "use_dora": True,
                            "streaming": True, "max_steps": 10, "val_size": 100, "do_eval": True, "stage": "pt"})
    assert cfg.model.quantization_bit == 4 and cfg.data.val_size == 100


def test_fsdp_version_is_read_as_hf_reads_it(tmp_path):
    """fsdp_config as a dict or a JSON file's path, `fsdp_version` or `version`; FSDP2 unless it says 1."""
    (tmp_path / "fsdp.json").write_text('{"fsdp_version": 1}')
    assert rules.fsdp_version(str(tmp_path / "fsdp.json")) == 1 and rules.fsdp_version({"version": 1}) == 1
    assert rules.fsdp_version(None) == rules.fsdp_version({}) == rules.fsdp_version(str(tmp_path / "no.json")) == 2
    cfg = parse_train_args({**BASE, "fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}})
    assert cfg.training.fsdp  # FSDP2 on the CPU: trained by tests/test_train.py


# ---- renames and defaults ----------------------------------------------------------------------------------------

def test_lora_alpha_defaults_to_twice_the_rank():
    assert parse_train_args({**BASE, "lora_rank": 32}).finetuning.lora_alpha == 64
    assert parse_train_args({**BASE, "lora_rank": 32, "lora_alpha": 8}).finetuning.lora_alpha == 8


@pytest.mark.parametrize("key", ["enable_liger_kernel", "use_liger_kernel", "use_v1_kernels"])
def test_fused_kernel_switches_map_onto_lfs_kernels(key, logs):
    cfg = parse_train_args({**BASE, key: True})
    assert cfg.model.use_lf_kernels is True and cfg.model.enable_liger_kernel is True
    assert cfg.training.use_liger_kernel is False  # HF would import Liger's
    assert "enable_liger_kernel maps onto lf's kernels" in logs.text


def test_renamed_keys_are_read_under_their_new_names_and_logged(logs):
    cfg = parse_train_args({**BASE, "evaluation_strategy": "steps", "eval_steps": 50, "val_size": 0.1,
                            "new_special_tokens": "<think>,</think>", "use_kv_cache": False, "no_cuda": True,
                            "group_by_length": True})
    assert cfg.training.eval_strategy == "steps" and cfg.training.do_eval is True
    assert cfg.model.add_special_tokens == "<think>,</think>" and cfg.model.use_cache is False
    assert cfg.training.use_cpu is True and cfg.training.train_sampling_strategy == "group_by_length"
    assert "evaluation_strategy: steps is read as eval_strategy: steps (transformers renamed it)" in logs.text
    assert "new_special_tokens: <think>,</think> is read as add_special_tokens" in logs.text
    assert parse_train_args({**BASE, "disable_shuffling": True}).training.train_sampling_strategy == "sequential"
    assert parse_train_args({**BASE, "disable_shuffling": False}).training.train_sampling_strategy == "random"


def test_warmup_ratio_becomes_a_fractional_warmup_steps():
    assert parse_train_args({**BASE, "warmup_ratio": 0.03}).training.warmup_steps == 0.03
    assert refused({**BASE, "warmup_ratio": 1.5}) == ("warmup_ratio: 1.5 (in the config) cannot be read: expected a "
                                                      "fraction of the training steps in [0, 1)")
    assert "both set warmup_steps, differently: keep one" in refused({**BASE, "warmup_ratio": 0.1, "warmup_steps": 10})


def test_gradient_checkpointing_is_the_model_layers_switch():
    off = parse_train_args({**BASE, "gradient_checkpointing": False,
                            "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    assert off.model.disable_gradient_checkpointing is True and off.model.use_reentrant_gc is False
    assert off.training.gradient_checkpointing is False and off.training.activation_checkpointing is False
    on = parse_train_args({**BASE, "activation_checkpointing": True})
    assert on.model.disable_gradient_checkpointing is False
    assert on.training.gradient_checkpointing is False and on.training.activation_checkpointing is False
    assert "both set disable_gradient_checkpointing" in refused({**BASE, "gradient_checkpointing": True,
                                                                 "disable_gradient_checkpointing": True})
    assert "a mapping with use_reentrant only" in refused({**BASE, "gradient_checkpointing_kwargs": {"x": 1}})


def test_remove_unused_columns_is_always_off(logs):
    assert parse_train_args(BASE).training.remove_unused_columns is False
    assert parse_train_args({**BASE, "remove_unused_columns": True}).training.remove_unused_columns is False
    assert "remove_unused_columns: true is ignored" in logs.text


def test_report_to_and_logging_steps_defaults():
    cfg = parse_train_args(BASE)
    assert cfg.training.report_to == [] and cfg.training.logging_steps == 10
    cfg = parse_train_args({**BASE, "report_to": "tensorboard", "logging_steps": 5})
    assert cfg.training.report_to == ["tensorboard"] and cfg.training.logging_steps == 5


def test_do_train_is_assumed_only_when_no_mode_is_given(logs):
    assert parse_train_args(BASE).training.do_train is True
    assert "lf trains (do_train: true)" in logs.text
    cfg = parse_train_args({**BASE, "do_eval": True, "val_size": 0.1})
    assert cfg.training.do_train is False and cfg.training.do_eval is True


def test_keys_transformers_5_dropped_live_in_the_finetuning_group(logs):
    cfg = parse_train_args({**BASE, "overwrite_output_dir": True, "logging_dir": "runs/x"})
    assert cfg.finetuning.overwrite_output_dir is True and cfg.finetuning.logging_dir == "runs/x"
    assert "logging_dir is kept as finetuning.logging_dir" in logs.text


def test_pinned_memory_is_off_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_train_args({**BASE, "dataloader_pin_memory": True}).training.dataloader_pin_memory is False


def test_packing_stays_unresolved_for_the_data_layer():
    assert parse_train_args(BASE).data.packing is None
    assert parse_train_args({**BASE, "packing": True}).data.packing is True


def test_each_choice_is_declared_once_as_a_literal_and_read_from_it():
    """The Literal on a field is the key's choices: its rule names them, the parser checks only their type, and
    the modules that read the key take the values from it."""
    from lf.config.export import ExportDevice, GgufType
    from lf.config.finetuning import FinetuningType
    from lf.config.model import (QUANTIZATION_BITS, QUANTIZATION_REFUSED, AnyQuantizationBit, Dtype, FlashAttn,
                                 QuantizationBit, QuantizationMethod, QuantizationType, RopeScaling)
    from lf.export import DEVICES, DTYPES
    from lf.export.to_gguf import GGUF_TYPES
    from lf.model import adapters, options, quantization

    assert set(options.DTYPES) | {"auto"} == set(typing.get_args(Dtype)) == set(DTYPES)
    assert set(options.ATTENTION) | {"auto"} == set(typing.get_args(FlashAttn))
    assert options.ROPE_TYPES == typing.get_args(RopeScaling)
    assert adapters.FINETUNING_TYPES == typing.get_args(FinetuningType)
    assert (QUANTIZATION_BITS["bnb"], quantization.TYPES) == (typing.get_args(QuantizationBit),
                                                              typing.get_args(QuantizationType))
    # each method is built (its bits) or refused (its reason), and every bit count is some method's
    assert set(QUANTIZATION_BITS) | set(QUANTIZATION_REFUSED) == set(typing.get_args(QuantizationMethod))
    assert not set(QUANTIZATION_BITS) & set(QUANTIZATION_REFUSED)
    assert {b for bits in QUANTIZATION_BITS.values() for b in bits} == set(typing.get_args(AnyQuantizationBit))
    assert (DEVICES, GGUF_TYPES) == (typing.get_args(ExportDevice), typing.get_args(GgufType))
    from lf.config import ExportArguments, ModelArguments
    from lf.export import _check

    with pytest.raises(ConfigError, match="export_dtype: 'float8' is not one of auto, float16, bfloat16, float32"):
        _check(types.SimpleNamespace(export=ExportArguments(export_dir="out", export_dtype="float8"),
                                     model=ModelArguments(model_name_or_path="lf-tiny-llama")))
    assert refused({**BASE, "infer_dtype": 16}).startswith("infer_dtype: 16 (in the config) is a whole number; "
                                                           "expected a string")


def test_readme_names_every_refused_key():
    readme = (REPO / "README.md").read_text()
    table = readme.split("### LLaMA-Factory keys lf refuses", 1)[1].split("\n### ", 1)[0]
    assert f"These {len(UNSUPPORTED)} are refused" in table
    assert [key for key in UNSUPPORTED if f"`{key}`" not in table] == []
