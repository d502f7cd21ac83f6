"""What a training config may not say, as data: each rule is a name, a test over the TrainConfig that is true when
the config breaks the rule, and the message (what is wrong, then what to do).

The rules run on the values as given (after lf's renames, before lf's dependent defaults such as lora_alpha) and
before transformers builds its TrainingArguments, which sets up devices: a config is refused before anything
expensive. At that point `cfg.training` is a plain namespace of the training values (HF's defaults filled in).

The numeric keys' ranges are a table (RANGES), one rule each; every other float key must be a finite number. A key
typed with a Literal (its choices, declared once on the field) gets a rule naming them (`choice_rules`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lf import stages
from lf.config.data import DataArguments
from lf.config.finetuning import (APOLLO_OPTIMS, GALORE_CLASSES, OPTIMIZER_KEYS, PEFT_TYPES, FinetuningArguments,
                                  ReferenceFreeLoss)
from lf.config.generation import GeneratingArguments
from lf.config.model import QUANTIZATION_BITS, QUANTIZATION_REFUSED, ModelArguments
from lf.errors import ConfigError, did_you_mean

GROUPS = (("model", ModelArguments), ("data", DataArguments), ("finetuning", FinetuningArguments),
          ("generating", GeneratingArguments))  # lf's groups of a TrainConfig, by attribute
REFERENCE_FREE = typing.get_args(ReferenceFreeLoss)
SMOOTHED = ("sigmoid", "simpo")  # the logistic losses, which dpo_label_smoothing softens


def show(value) -> str:
    """A value as a YAML file would spell it: true, null, 0.0001, dpo."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, type(None), dict, list)):
        return json.dumps(value, default=str)
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[str(value)]
    return str(value)


@dataclass(frozen=True)
class Rule:
    name: str
    broken: Callable[[Any], bool]  # true when the config breaks the rule
    message: str | Callable[[Any], str]  # a str is formatted with the groups: m, d, f, g, t

    def explain(self, cfg) -> str:
        if callable(self.message):
            return self.message(cfg)
        return self.message.format(m=cfg.model, d=cfg.data, f=cfg.finetuning, g=cfg.generating, t=cfg.training)


def _getter(group: str, key: str) -> Callable[[Any], Any]:
    return lambda cfg: getattr(getattr(cfg, group), key)


def literal_values(annotation) -> tuple:
    """The values a Literal annotation allows, null first where it also takes None; () for any other annotation."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    values = tuple(v for arg in args if typing.get_origin(arg) is typing.Literal for v in typing.get_args(arg))
    return ((None,) if values and type(None) in args else ()) + values


# a Literal key -> what its choice message adds after the choices
CHOICE_NOTES = types.MappingProxyType({"quantization_bit": " (bnb quantizes to 4 or 8 bits, hqq to 1-6 or 8, quanto "
                                                           "to 2, 4 or 8)",
                                       "reward_model_quantization_bit": " (bitsandbytes quantizes to 4 or 8 bits)",
                                       "ref_model_quantization_bit": " (bitsandbytes quantizes to 4 or 8 bits)",
                                       "quantization_method": " (LLaMA-Factory's names; bnb, hqq and quanto are "
                                                              "built)"})


def choice_rules() -> tuple[Rule, ...]:
    """One rule per key of lf's groups typed with a Literal: its value must be one of the Literal's."""
    rules = []
    for group, cls in GROUPS:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            values = literal_values(hints[field.name])
            if values:
                rules.append(_one_of(group, field.name, values, CHOICE_NOTES.get(field.name, "")))
    return tuple(rules)


def accelerator() -> str:
    """lf.device's accelerator kind (cpu, cuda, npu, ...); imported here only, as it imports torch."""
    from lf import device

    return device.current().kind


def fsdp_version(fsdp_config) -> int:
    """The FSDP version HF's TrainingArguments takes from fsdp_config (a dict, or a JSON file's path): 2 unless it
    says otherwise (as `fsdp_version` or `version`)."""
    if isinstance(fsdp_config, str):
        if not os.path.isfile(fsdp_config):
            return 2  # HF names the missing file
        with open(fsdp_config) as f:
            fsdp_config = json.load(f)
    fsdp_config = fsdp_config or {}
    return int(fsdp_config.get("fsdp_version", fsdp_config.get("version", 2)))


def _bits_of() -> str:
    """The bits each quantization method takes: "bnb takes 4, 8; hqq takes 1, 2, 3, 4, 5, 6, 8"."""
    return "; ".join(f"{method} takes {', '.join(map(str, bits))}" for method, bits in QUANTIZATION_BITS.items()
                     if method != "bitsandbytes")  # bnb's other name


def _one_of(group: str, key: str, choices: tuple, why: str = "") -> Rule:
    """A key whose value must be one of `choices` (None allowed where listed)."""
    value = _getter(group, key)
    names = [show(c) for c in choices]
    return Rule(f"{key}_choice", lambda cfg: value(cfg) not in choices,
                lambda cfg: f"{key}: {show(value(cfg))} is not one of {', '.join(names)}{why}."
                            f"{did_you_mean(show(value(cfg)), [c for c in choices if isinstance(c, str)])}")


@dataclass(frozen=True)
class Interval:
    """The numbers a key may take: from low to high, each end open or closed. nan is in no interval."""
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {opening}{self.low:g}, {self.high:g}{closing}"


POSITIVE, AT_LEAST_0, AT_LEAST_1, FRACTION = Interval(0, low_open=True), Interval(0), Interval(1), Interval(0, 1)

# key -> (its group, the numbers it may take, what it sets and a usual value). A key left unset (None) passes.
RANGES = types.MappingProxyType({
    "learning_rate": ("training", POSITIVE, "the optimizer's step size (1e-4 is usual for LoRA, 1e-5 for full "
                                            "fine-tuning)"),
    "per_device_train_batch_size": ("training", AT_LEAST_1, "the examples each device trains on in a step"),
    "per_device_eval_batch_size": ("training", AT_LEAST_1, "the examples each device evaluates or predicts at once"),
    "gradient_accumulation_steps": ("training", AT_LEAST_1, "the batches added up into one optimizer step (1: none)"),
    "num_train_epochs": ("training", POSITIVE, "the passes over the training data (fractions count)"),
    "warmup_steps": ("training", AT_LEAST_0, "the steps the learning rate warms up over, below 1 a fraction of them "
                                             "(0: no warmup)"),
    "weight_decay": ("training", AT_LEAST_0, "the weight decay (0: none; 0.01 to 0.1 is usual)"),
    "max_grad_norm": ("training", AT_LEAST_0, "the gradient norm clipped to (0: no clipping; 1.0 is usual)"),
    "adam_beta1": ("training", FRACTION, "the decay of Adam's gradient average (0.9 is usual)"),
    "adam_beta2": ("training", FRACTION, "the decay of Adam's squared-gradient average (0.999 is usual)"),
    "adam_epsilon": ("training", AT_LEAST_0, "Adam's denominator floor (1e-8 is usual)"),
    "label_smoothing_factor": ("training", FRACTION, "the share of each label spread over the vocabulary (0: none)"),
    "logging_steps": ("training", POSITIVE, "the steps between log lines, below 1 a fraction of the run"),
    "save_steps": ("training", POSITIVE, "the steps between checkpoints, below 1 a fraction of the run"),
    "eval_steps": ("training", POSITIVE, "the steps between evaluations, below 1 a fraction of the run (unset: "
                                         "logging_steps)"),
    "dataloader_num_workers": ("training", AT_LEAST_0, "the processes loading batches (0: the training process)"),
    "seed": ("training", AT_LEAST_0, "the random seed (e.g. 42)"),
    "cutoff_len": ("data", AT_LEAST_1, "the tokens an example keeps (e.g. 2048)"),
    "image_max_pixels": ("data", AT_LEAST_1, "the most pixels an image keeps; larger ones are scaled down (768*768 = "
                                             "589824 is usual)"),
    "image_min_pixels": ("data", AT_LEAST_1, "the fewest pixels an image has; smaller ones are scaled up (32*32 = "
                                             "1024 is usual)"),
    "video_max_pixels": ("data", AT_LEAST_1, "the most pixels a video frame keeps (256*256 = 65536 is usual)"),
    "video_min_pixels": ("data", AT_LEAST_1, "the fewest pixels a video frame has (16*16 = 256 is usual)"),
    "video_fps": ("data", POSITIVE, "the frames kept per second of video (2.0 is usual)"),
    "video_maxlen": ("data", AT_LEAST_1, "the most frames kept of a video (128 is usual)"),
    "audio_sampling_rate": ("data", AT_LEAST_1, "the rate audio is resampled to (16000: the Whisper-style "
                                                "encoders')"),
    "max_samples": ("data", AT_LEAST_1, "the examples read from each dataset (remove it to read them all)"),
    "val_size": ("data", AT_LEAST_0, "the eval split: a fraction below 1 or a count of examples (0: none)"),
    "preprocessing_batch_size": ("data", AT_LEAST_1, "the examples tokenized together"),
    "preprocessing_num_workers": ("data", AT_LEAST_1, "the processes tokenizing (remove it to tokenize in this one)"),
    "buffer_size": ("data", AT_LEAST_1, "the examples a stream is shuffled among"),
    "lora_rank": ("finetuning", AT_LEAST_1, "the adapters' rank (8 to 64 is usual)"),
    "ray_num_workers": ("finetuning", AT_LEAST_1, "the Ray workers, one rank each (USE_RAY=1)"),
    "lora_alpha": ("finetuning", POSITIVE, "the adapters' scale, over the rank (remove it: 2 x lora_rank)"),
    "moe_aux_loss_coef": ("model", AT_LEAST_0, "the weight of a mixture-of-experts router's load-balancing loss (0.001 "
                                               "is usual; 0: none)"),
    "asft_alpha": ("finetuning", POSITIVE, "the weight of ASFT's KL divergence from the reference (0.1 is "
                                           "LLaMA-Factory's)"),
    "eaft_alpha": ("finetuning", AT_LEAST_0, "the power of EAFT's entropy weight (1.0 is LLaMA-Factory's; 0: plain "
                                             "cross-entropy)"),
    "lora_dropout": ("finetuning", FRACTION, "the chance an adapter input is dropped in training (e.g. 0.05; 0: none)"),
    "oft_rank": ("finetuning", AT_LEAST_0, "OFT's blocks per layer (0: sized by oft_block_size instead)"),
    "oft_block_size": ("finetuning", AT_LEAST_0, "the size of OFT's blocks (32 is LLaMA-Factory's; 0: counted by "
                                                 "oft_rank instead)"),
    "module_dropout": ("finetuning", FRACTION, "the chance an OFT block is left out in a training step (0: none)"),
    "loraplus_lr_ratio": ("finetuning", POSITIVE, "how many times faster LoRA+ trains the B matrices (16 is usual; "
                                                  "remove it for plain LoRA)"),
    "loraplus_lr_embedding": ("finetuning", POSITIVE, "LoRA+'s learning rate for embedding adapters (1e-6 is usual)"),
    **{key: spec for prefix, name, scale in (("galore", "GaLore", "2.0"), ("apollo", "APOLLO", "32.0"))
       for key, spec in {
        f"{prefix}_rank": ("finetuning", AT_LEAST_1, f"the rank {name} projects gradients to (16 is "
                                                     "LLaMA-Factory's)"),
        f"{prefix}_update_interval": ("finetuning", AT_LEAST_1, f"the steps between {name}'s projections (200 is "
                                                                "usual)"),
        f"{prefix}_scale": ("finetuning", POSITIVE, f"the scale of {name}'s update ({scale} is LLaMA-Factory's)"),
    }.items()},
    "badam_update_ratio": ("finetuning", Interval(0, 1, low_open=True, high_open=False),
                           "the share of each matrix's entries ratio-mode BAdam updates (0.05 is LLaMA-Factory's)"),
    "pref_beta": ("finetuning", POSITIVE, "the preference loss's scale (0.1 is usual, about 2 for simpo)"),
    "pref_ftx": ("finetuning", AT_LEAST_0, "the weight of an sft loss on the chosen replies (0: none; a negative one "
                                           "would train away from them)"),
    "dpo_label_smoothing": ("finetuning", Interval(0, 0.5), "the chance a pair is labelled the wrong way round (0.5 "
                                                            "would say the labels carry nothing)"),
    "pref_bco_weight": ("finetuning", AT_LEAST_0, "the weight of BCO's loss beside dpo's (0: none)"),
    "ld_alpha": ("finetuning", Interval(0, 1, high_open=False), "LD-DPO's weight of the tokens beyond the shorter "
                                                                "reply's length (1: plain dpo; remove it for none)"),
    "kto_chosen_weight": ("finetuning", POSITIVE, "the desirable replies' loss weight (1.0; raise the rarer kind's so "
                                                  "that weight x count is about even)"),
    "kto_rejected_weight": ("finetuning", POSITIVE, "the undesirable replies' loss weight (1.0; raise the rarer "
                                                    "kind's so that weight x count is about even)"),
    "ppo_buffer_size": ("finetuning", AT_LEAST_1, "the batches of rollouts a ppo step trains on (1 is usual)"),
    "ppo_epochs": ("finetuning", AT_LEAST_1, "the passes over a ppo step's rollouts (4 is usual)"),
    "ppo_target": ("finetuning", POSITIVE, "the KL the adaptive coefficient steers to (6.0 is usual; null: a fixed "
                                           "coefficient)"),
    "gradient_checkpointing_every": ("model", AT_LEAST_1, "checkpoints one decoder layer in k (1: every layer; "
                                                          "disable_gradient_checkpointing: true for none)"),
    "temperature": ("generating", AT_LEAST_0, "the sampling temperature (0: greedy)"),
    "top_p": ("generating", Interval(0, 1, low_open=True, high_open=False), "the probability mass sampled from "
                                                                            "(1: all of it)"),
    "top_k": ("generating", AT_LEAST_0, "the likeliest tokens sampled from (0: all)"),
    "num_beams": ("generating", AT_LEAST_1, "the beams of beam search (1: none)"),
    "max_length": ("generating", AT_LEAST_1, "the longest prompt and answer together, in tokens"),
    "max_new_tokens": ("generating", AT_LEAST_1, "the longest answer, in tokens"),
    "repetition_penalty": ("generating", POSITIVE, "the penalty on repeated tokens (1.0: none)"),
})


def _in_range(key: str, group: str, allowed: Interval, what: str) -> Rule:
    value = _getter(group, key)

    def message(cfg) -> str:
        finite = "a finite number " if not math.isfinite(value(cfg)) else ""
        return f"{key}: {show(value(cfg))} must be {finite}{allowed}: {what}"

    return Rule(key, lambda cfg: value(cfg) is not None and value(cfg) not in allowed, message)


def _not_finite(cfg) -> list[str]:
    """The float values that are nan or inf, but RANGES' (their own rules say so)."""
    groups = (cfg.model, cfg.data, cfg.finetuning, cfg.generating, cfg.training)
    return [f"{key}: {show(value)}" for group in groups for key, value in vars(group).items()
            if isinstance(value, float) and not math.isfinite(value) and key not in RANGES]


def _optimizers(cfg) -> list[str]:
    return [key for key in OPTIMIZER_KEYS if getattr(cfg.finetuning, key)]


LAYERWISE = ("galore", "apollo")  # the optimizers with a layer-wise variant (their keys' prefix)


def _full_only(cfg) -> list[str]:
    """The chosen optimizers that LLaMA-Factory refuses with LoRA (they project or pick whole weight matrices)."""
    return [key for key in _optimizers(cfg) if key in ("use_galore", "use_apollo", "use_badam")]


def _distributed() -> bool:
    """Several processes train (torchrun, or lf train with NPROC_PER_NODE, sets WORLD_SIZE in each)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _zero_stage(t) -> int | None:
    """The ZeRO stage of the `deepspeed` config (a JSON file or a mapping); None without DeepSpeed."""
    if not t.deepspeed:
        return None
    config = t.deepspeed
    if not isinstance(config, dict):
        try:
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return 0  # transformers names the unreadable file when it loads it
    return int(config.get("zero_optimization", {}).get("stage", 0))


# the optimizers that need whole weight matrices, which DeepSpeed's flattened shards are not: why (GaLore and APOLLO
# as LLaMA-Factory 0.9.5 refuses them; Muon and Adam-mini measured: lf train with ds_z2.json, one process, CPU)
NO_DEEPSPEED = types.MappingProxyType({
    "use_galore": "GaLore projects each weight matrix's gradient",
    "use_apollo": "APOLLO projects each weight matrix's gradient",
    "use_muon": "Muon orthogonalises each weight matrix's update (torch's Muon stops at the first ZeRO-2 step)",
    "use_adam_mini": "Adam-mini splits each weight by its attention heads and neurons (it stops at the first "
                     "ZeRO-2 or ZeRO-3 step)"})


def _no_deepspeed(cfg) -> list[str]:
    return [key for key in NO_DEEPSPEED if getattr(cfg.finetuning, key)]


def _optim(t) -> str:
    return str(getattr(t.optim, "value", t.optim))


ADAPTER_NAMES = types.MappingProxyType({"lora": "LoRA", "oft": "OFT"})  # PEFT_TYPES, as written
OFT_KEYS = ("oft_rank", "oft_block_size", "oft_target", "module_dropout")


def _oft_options(cfg) -> list[str]:
    """The OFT keys given away from their defaults."""
    defaults = FinetuningArguments()
    return [key for key in OFT_KEYS if getattr(cfg.finetuning, key) != getattr(defaults, key)]


def _oft_sizes_clash(f) -> bool:
    """PEFT's OFT takes its blocks' count or their size, exactly one of them."""
    both, neither = f.oft_rank > 0 and f.oft_block_size > 0, f.oft_rank == 0 and f.oft_block_size == 0
    return f.finetuning_type == "oft" and (both or neither)  # (a negative one: its range rule says so)


def _lora_only_options(cfg) -> list[str]:
    f = cfg.finetuning
    given = {"use_dora": f.use_dora, "use_rslora": f.use_rslora, "loraplus_lr_ratio": f.loraplus_lr_ratio is not None,
             "pissa_init": f.pissa_init}
    return [key for key, on in given.items() if on]


# report_to value -> the packages HF's callback for it can use (any one)
TRACKERS = types.MappingProxyType({"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                                   "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "swanlab": ("swanlab",),
                                   "trackio": ("trackio",)})


def _ref_model_options(cfg) -> list[str]:
    return [key for key in ("ref_model_adapters", "ref_model_quantization_bit") if getattr(cfg.finetuning, key)]


def _stage(cfg, field: str) -> bool:
    """The config's stage record's `field` (False for a name that is no stage: stage_known says so)."""
    stage = stages.STAGES.get(cfg.finetuning.stage)
    return stage is not None and bool(getattr(stage, field))


def _packs(cfg) -> bool:
    """Whether the data will be packed (packing left unset packs where the stage does by default)."""
    packing = cfg.data.packing if cfg.data.packing is not None else _stage(cfg, "packs_by_default")
    return bool(packing or cfg.data.neat_packing)


def _given_stage_keys(cfg) -> list[str]:
    """The stage-specific keys (lf.stages' `keys`) given away from their defaults."""
    defaults = type(cfg.finetuning)()
    return [key for key in stages.key_stages() if getattr(cfg.finetuning, key) != getattr(defaults, key)]


def _reads(cfg, key: str) -> bool:
    """Whether the config's stage reads the stage-specific `key`, given away from its default."""
    return key in _given_stage_keys(cfg) and cfg.finetuning.stage in stages.key_stages()[key]


def _stray_options(cfg) -> list[str]:
    """The stage-specific keys given that the config's stage does not read."""
    readers = stages.key_stages()
    return [key for key in _given_stage_keys(cfg) if cfg.finetuning.stage not in readers[key]]


def _stray_message(cfg) -> str:
    keys = _stray_options(cfg)
    wanted = sorted({stage for key in keys for stage in stages.key_stages()[key]})
    return (f"{', '.join(keys)} tune(s) {' and '.join(wanted)} training, but stage is {show(cfg.finetuning.stage)}: "
            f"set stage: {wanted[0]}, or remove them")


RAY_KEYS = ("ray_num_workers", "ray_init_kwargs", "resources_per_worker", "placement_strategy", "master_addr",
            "master_port")


def _ray_keys(cfg) -> list[str]:
    """The Ray keys given away from their defaults, when USE_RAY is off (they would do nothing)."""
    if os.environ.get("USE_RAY", "").strip().lower() in ("1", "true", "y", "yes"):
        return []
    defaults = FinetuningArguments()
    return [key for key in RAY_KEYS if getattr(cfg.finetuning, key) != getattr(defaults, key)]


def _token_weightings(cfg) -> list[str]:
    """The keys that weight each token's loss, given true."""
    return [key for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss") if getattr(cfg.finetuning, key)]


def _asft_options(cfg) -> list[str]:
    return [key for key in ("asft_alpha", "ref_model", "ref_model_adapters", "ref_model_quantization_bit")
            if key in _given_stage_keys(cfg)]


def _trackers(t) -> list[str]:
    return [t.report_to] if isinstance(t.report_to, str) else list(t.report_to or [])


def _missing_trackers(t) -> list[str]:
    return [name for name in _trackers(t) if name in TRACKERS
            and not any(importlib.util.find_spec(package) for package in TRACKERS[name])]


def _backend_refusal(cfg) -> str | None:
    """Why do_predict cannot generate with infer_backend (lf.serve.backends), or None."""
    from lf.serve.backends import backend_refusal

    return backend_refusal(cfg.model)


def _evaluates(t) -> bool:
    return bool(t.do_eval) or t.eval_strategy != "no"  # transformers turns do_eval on with an eval_strategy


RULES: tuple[Rule, ...] = (
    Rule("model_name_or_path", lambda c: not c.model.model_name_or_path,
         "model_name_or_path is missing: name the model to train (a local folder or a hub id such as "
         "Qwen/Qwen2.5-0.5B-Instruct, or lf-tiny-llama to try lf out)"),
    Rule("output_dir", lambda c: not c.training.output_dir,
         "output_dir is missing: name the folder for checkpoints, the trained model and the logs "
         "(e.g. output_dir: saves/my-run)"),
    Rule("nothing_to_do", lambda c: not (c.training.do_train or c.training.do_predict or _evaluates(c.training)),
         "do_train, do_eval and do_predict are all false: nothing to run. Set do_train: true (or do_eval: true)"),
    Rule("predict_needs_eval_dataset", lambda c: c.training.do_predict and not c.data.eval_dataset,
         "do_predict: true generates answers to the prompts of eval_dataset, but eval_dataset is not set: name the "
         "datasets to predict on (eval_dataset: names from dataset_info.json, comma-separated)"),
    Rule("predict_with_generate", lambda c: c.training.do_predict and not c.training.predict_with_generate,
         "do_predict: true with predict_with_generate: false: lf predicts by generating answers (written to "
         "generated_predictions.jsonl, scored with BLEU and ROUGE): set predict_with_generate: true, or use "
         "do_eval: true for the eval loss alone"),
    Rule("predict_stage", lambda c: c.training.do_predict and not _stage(c, "predicts"),
         "do_predict: true generates answers with stage: sft (or pt), not stage: {f.stage}: predict in a run of its "
         "own with stage: sft and the trained adapter as adapter_name_or_path (or the saved model as "
         "model_name_or_path)"),
    Rule("infer_backend", lambda c: c.training.do_predict and _backend_refusal(c) is not None, _backend_refusal),
    Rule("stage_known", lambda c: stages.unknown(c.finetuning.stage) is not None,
         lambda c: stages.unknown(c.finetuning.stage)),
    Rule("preference_options_need_their_stage", lambda c: bool(_stray_options(c)), _stray_message),
    *choice_rules(),
    Rule("smoothing_needs_logistic_loss",
         lambda c: _reads(c, "dpo_label_smoothing") and c.finetuning.pref_loss not in SMOOTHED,
         "dpo_label_smoothing softens the sigmoid and simpo losses, not pref_loss: {f.pref_loss}: set pref_loss: "
         "sigmoid (or simpo), or remove dpo_label_smoothing"),
    Rule("simpo_gamma_needs_simpo", lambda c: _reads(c, "simpo_gamma") and c.finetuning.pref_loss != "simpo",
         "simpo_gamma is the margin of the simpo loss, but pref_loss is {f.pref_loss}: set pref_loss: simpo, or "
         "remove simpo_gamma"),
    Rule("reference_free_loss", lambda c: _reads(c, "pref_loss") and _reads(c, "ref_model")
         and c.finetuning.pref_loss in REFERENCE_FREE,
         "pref_loss: {f.pref_loss} compares the trained model's replies with each other and uses no reference "
         "model, but ref_model is {f.ref_model}: remove ref_model, or use pref_loss: sigmoid (hinge, ipo, "
         "kto_pair) with it"),
    Rule("bco_needs_reference", lambda c: _reads(c, "pref_bco_weight") and c.finetuning.pref_loss in REFERENCE_FREE,
         "pref_bco_weight mixes BCO's loss, over log-ratios to the reference, into the dpo loss, but pref_loss: "
         "{f.pref_loss} uses no reference: set pref_loss: sigmoid (hinge, ipo, kto_pair), or remove pref_bco_weight"),
    Rule("ref_model_options_need_ref_model", lambda c: c.finetuning.ref_model is None and bool(_ref_model_options(c)),
         lambda c: f"{', '.join(_ref_model_options(c))} shape(s) the reference model that ref_model names, but "
                   "ref_model is not set (the reference is the model being trained, as it starts): set ref_model, "
                   "or remove them"),
    Rule("reward_model_adapters", lambda c: _stage(c, "value_head") and c.model.adapter_name_or_path is not None,
         "stage: {f.stage} puts a value head on the model, onto which lf cannot load adapters trained for generation "
         "yet: merge adapter_name_or_path into the model and name that in model_name_or_path"),
    Rule("reward_model_head", lambda c: _stage(c, "value_head") and c.model.upcast_lmhead_output,
         "upcast_lmhead_output upcasts the LM head's logits, but stage: {f.stage} replaces the LM head with a value "
         "head (its score is float32 in the loss anyway): remove upcast_lmhead_output"),
    Rule("ppo_needs_reward_model", lambda c: c.finetuning.stage == "ppo" and not c.finetuning.reward_model,
         "stage: ppo trains on the scores a reward model gives the policy's replies, but reward_model is not set: name "
         "an lf rm run's output_dir (reward_model_type: lora for its adapter, full for a whole model), or a scoring "
         "URL with reward_model_type: api"),
    Rule("ppo_evaluates", lambda c: c.finetuning.stage == "ppo" and _evaluates(c.training),
         "stage: ppo does not evaluate (each step logs its rollouts' rewards instead): remove do_eval, eval_strategy, "
         "val_size and eval_dataset"),
    Rule("lora_options_need_lora", lambda c: c.finetuning.finetuning_type != "lora" and bool(_lora_only_options(c)),
         lambda c: f"{', '.join(_lora_only_options(c))} shape(s) LoRA adapters, but finetuning_type is "
                   f"{show(c.finetuning.finetuning_type)}: set finetuning_type: lora, or remove them"),
    Rule("oft_options_need_oft", lambda c: c.finetuning.finetuning_type != "oft" and bool(_oft_options(c)),
         lambda c: f"{', '.join(_oft_options(c))} shape(s) OFT adapters, but finetuning_type is "
                   f"{show(c.finetuning.finetuning_type)}: set finetuning_type: oft, or remove them"),
    Rule("oft_rank_or_block_size", lambda c: _oft_sizes_clash(c.finetuning),
         "oft_rank: {f.oft_rank} and oft_block_size: {f.oft_block_size}: OFT's blocks are given by their count or "
         "their size, exactly one: set the other to 0 (oft_rank: 0 with oft_block_size: 32 is LLaMA-Factory's "
         "default)"),
    Rule("pissa_convert_needs_init", lambda c: c.finetuning.pissa_convert and not c.finetuning.pissa_init,
         "pissa_convert converts a PiSSA adapter, but pissa_init is false: set pissa_init: true, or remove "
         "pissa_convert"),
    Rule("pissa_iter_range", lambda c: c.finetuning.pissa_init and not (c.finetuning.pissa_iter == -1
                                                                       or c.finetuning.pissa_iter >= 1),
         "pissa_iter is {f.pissa_iter}: it counts randomized SVD iterations (at least 1; 16 is the default), or is "
         "-1 for the exact SVD"),
    Rule("early_stopping_needs_best_model",
         lambda c: c.finetuning.early_stopping_steps is not None and not c.training.load_best_model_at_end,
         "early_stopping_steps counts evaluations that did not beat the best one, but load_best_model_at_end is "
         "false: set load_best_model_at_end: true with eval_strategy (and save_strategy) steps or epoch"),
    Rule("adapter_needs_lora",
         lambda c: c.model.adapter_name_or_path is not None and c.finetuning.finetuning_type not in PEFT_TYPES,
         "adapter_name_or_path loads LoRA adapters, but finetuning_type is {f.finetuning_type}: set "
         "finetuning_type: lora (or oft for OFT adapters; or merge the adapters into the model first and train that)"),
    Rule("scratch_with_adapter", lambda c: c.model.train_from_scratch and c.model.adapter_name_or_path is not None,
         "train_from_scratch starts from random weights, which adapter_name_or_path's adapters were not trained "
         "on: remove one of the two"),
    Rule("new_adapter_needs_adapter",
         lambda c: c.finetuning.create_new_adapter and c.model.adapter_name_or_path is None,
         "create_new_adapter: true trains a new adapter over existing ones, but adapter_name_or_path names none: "
         "set adapter_name_or_path, or remove create_new_adapter (a fresh adapter is the default)"),
    Rule("quantization_method_refused",
         lambda c: c.model.quantization_bit is not None and c.model.quantization_method in QUANTIZATION_REFUSED,
         lambda c: f"quantization_method: {c.model.quantization_method} is not supported: "
                   f"{QUANTIZATION_REFUSED[c.model.quantization_method]}; quantize with bnb, hqq or quanto"),
    Rule("quantization_bit_for_method",
         lambda c: c.model.quantization_method in QUANTIZATION_BITS  # a bit count no method takes: its choice rule
         and c.model.quantization_bit in {b for bits in QUANTIZATION_BITS.values() for b in bits}
         - set(QUANTIZATION_BITS[c.model.quantization_method]),
         lambda c: f"quantization_bit: {c.model.quantization_bit} is not taken by quantization_method: "
                   f"{c.model.quantization_method} ({_bits_of()}): change one of the two"),
    Rule("quantization_needs_lora",
         lambda c: c.model.quantization_bit is not None and c.finetuning.finetuning_type != "lora",
         "quantization_bit: {m.quantization_bit} with finetuning_type: {f.finetuning_type}: quantized weights do "
         "not train. QLoRA trains LoRA adapters over a quantized base: set finetuning_type: lora"),
    Rule("quantized_adapters",
         lambda c: c.model.quantization_bit is not None and c.model.adapter_name_or_path is not None
         and ("," in c.model.adapter_name_or_path or c.finetuning.create_new_adapter),
         "adapters cannot be merged into a quantized model (quantization_bit: {m.quantization_bit}): give one "
         "adapter to train further, without create_new_adapter, or merge them into the model first"),
    Rule("npu_double_quantization",
         lambda c: c.model.quantization_bit == 4 and c.model.double_quantization and accelerator() == "npu",
         "double_quantization: true on an Ascend NPU: bitsandbytes' NPU backend does not quantize the 4-bit "
         "scales a second time; set double_quantization: false"),
    Rule("fsdp1_on_cpu", lambda c: bool(c.training.fsdp) and (c.training.use_cpu or accelerator() == "cpu")
         and fsdp_version(c.training.fsdp_config) == 1,
         # checked with accelerate 1.15: FullyShardedDataParallelPlugin(fsdp_version=1) raises in __post_init__
         "fsdp_config's fsdp_version: 1 on the CPU: accelerate's FSDP1 plugin needs an accelerator (\"There are "
         "currently no available devices found, must be one of 'XPU', 'CUDA', ...\"); on the CPU lf runs FSDP2 "
         "(fully_shard over gloo): set fsdp_version: 2, HF's default"),
    Rule("video_pixel_limits", lambda c: c.data.video_min_pixels > c.data.video_max_pixels >= 1,
         "video_min_pixels: {d.video_min_pixels} is above video_max_pixels: {d.video_max_pixels}: no frame size fits "
         "both; lower video_min_pixels or raise video_max_pixels"),
    Rule("image_pixel_limits", lambda c: c.data.image_min_pixels > c.data.image_max_pixels >= 1,  # else: RANGES
         "image_min_pixels: {d.image_min_pixels} is above image_max_pixels: {d.image_max_pixels}: no image size fits "
         "both; lower image_min_pixels or raise image_max_pixels"),
    Rule("mm_proj_only_needs_full", lambda c: c.finetuning.train_mm_proj_only and c.finetuning.finetuning_type != "full",
         "train_mm_proj_only: true trains the multimodal projector alone, in full, but finetuning_type is "
         "{f.finetuning_type}: set finetuning_type: full, or use freeze_multi_modal_projector: false beside LoRA"),
    *(Rule(f"{key}_or_lf_kernels", lambda c, key=key: getattr(c.model, key) and not c.model.use_lf_kernels,
           f"{key}: true asks for {name}'s fused kernels, which lf answers with its own, but use_lf_kernels: false "
           f"turns them off: remove one of the two")
      for key, name in (("enable_liger_kernel", "Liger"), ("use_unsloth", "Unsloth"))),
    Rule("unsloth_gc_needs_checkpointing",
         lambda c: c.model.use_unsloth_gc and c.model.disable_gradient_checkpointing is True,
         "use_unsloth_gc: true offloads the inputs gradient checkpointing keeps, but disable_gradient_checkpointing: "
         "true turns checkpointing off: remove one of the two"),
    Rule("descriptions_for_init", lambda c: str(c.model.init_special_tokens).startswith("desc_init")
         and not c.model.new_special_tokens_config,
         "init_special_tokens: {m.init_special_tokens} starts new tokens from their descriptions, but there are none: "
         "set new_special_tokens_config (a YAML mapping each new token to its description), or remove "
         "init_special_tokens"),
    Rule("special_tokens_once", lambda c: bool(c.model.new_special_tokens_config and c.model.add_special_tokens),
         "new_special_tokens_config and add_special_tokens both name special tokens to add: keep one (the config's "
         "tokens are its keys)"),
    Rule("shift_attn_not_packed", lambda c: c.model.shift_attn and _packs(c),
         "shift_attn: true cuts each row into 4 groups of its tokens, which would mix a packed row's examples: set "
         "packing: false (and neat_packing: false), or remove shift_attn"),
    Rule("shift_attn_not_in_ppo", lambda c: c.model.shift_attn and c.finetuning.stage == "ppo",
         "shift_attn: true is for the training forward, but ppo also generates with the model in training: remove "
         "shift_attn (LLaMA-Factory refuses it with ppo too)"),
    Rule("mixture_of_depths_does_not_generate",
         lambda c: bool(c.model.mixture_of_depths) and (c.training.do_predict or c.finetuning.stage == "ppo"),
         lambda c: f"mixture_of_depths: {c.model.mixture_of_depths} and "
                   f"{'do_predict: true' if c.training.do_predict else 'stage: ppo'}, which generates: a routed "
                   f"layer's skipped tokens would leave holes in its KV cache, so lf does not generate with "
                   f"routed layers; remove one of the two (lf eval scores a routed model)"),
    Rule("mixture_of_depths_without_shift_attn", lambda c: bool(c.model.mixture_of_depths) and c.model.shift_attn,
         "mixture_of_depths: {m.mixture_of_depths} runs a routed layer on the few tokens it chooses, which S²-Attn "
         "(shift_attn: true) would cut into groups of its own: remove one of the two"),
    Rule("accuracy_needs_evaluation", lambda c: c.finetuning.compute_accuracy and not _evaluates(c.training),
         "compute_accuracy: true measures token accuracy at evaluation, but evaluation is off: set do_eval: true "
         "with val_size or eval_dataset (and eval_strategy: steps to measure during training), or remove "
         "compute_accuracy"),
    *(Rule(f"{name}_needs_lf_kernels", lambda c, name=name: getattr(c.finetuning, f"use_{name}_loss")
           and not c.model.use_lf_kernels,
           f"use_{name}_loss: true weights the tokens inside lf's fused loss, but use_lf_kernels: false turns it off: "
           f"remove one of the two") for name in ("dft", "eaft", "asft")),
    Rule("ray_keys_need_use_ray", lambda c: bool(_ray_keys(c)),
         lambda c: f"{', '.join(_ray_keys(c))} set(s) up training on Ray, which USE_RAY=1 turns on: run with USE_RAY=1 "
                   f"(pip install lf[ray]), or remove them (NPROC_PER_NODE=2 runs several processes with torchrun)"),
    Rule("one_token_weighting", lambda c: len(_token_weightings(c)) > 1,
         lambda c: f"{' and '.join(_token_weightings(c))} each weight every token's loss, differently (use_asft_loss "
                   f"is DFT's loss plus a KL term): keep one"),
    Rule("asft_options_need_asft", lambda c: c.finetuning.stage == "sft" and not c.finetuning.use_asft_loss
         and bool(_asft_options(c)),
         lambda c: f"{', '.join(_asft_options(c))} shape(s) use_asft_loss's KL term from a reference model, but "
                   f"use_asft_loss is off: set use_asft_loss: true, or remove them"),
    Rule("pure_bf16_without_amp", lambda c: c.finetuning.pure_bf16 and (c.training.bf16 or c.training.fp16),
         lambda c: f"pure_bf16: true trains the bf16 weights as they are, without autocast, but "
                   f"{'bf16' if c.training.bf16 else 'fp16'}: true turns autocast on: remove one of the two"),
    Rule("pure_bf16_dtype", lambda c: c.finetuning.pure_bf16 and c.model.infer_dtype not in ("auto", "bfloat16"),
         "pure_bf16: true loads the weights in bfloat16, but infer_dtype is {m.infer_dtype}: remove infer_dtype (or "
         "set it to bfloat16), or remove pure_bf16"),
    Rule("fp16_and_bf16", lambda c: c.training.fp16 and c.training.bf16,
         "fp16 and bf16 are both true: choose one (bf16 where the GPU has it: Ampere or newer; else fp16)"),
    Rule("train_needs_data",
         lambda c: c.training.do_train and not c.data.dataset and not c.data.tokenized_path,
         "do_train needs training data: set dataset (names from dataset_info.json, comma-separated)"),
    Rule("eval_needs_data", lambda c: _evaluates(c.training) and not c.data.eval_dataset and not c.data.val_size
         and not c.data.tokenized_path,
         "evaluation is on (do_eval or eval_strategy) but there is no eval data: set val_size (e.g. 0.1) or "
         "eval_dataset"),
    Rule("streaming_needs_max_steps", lambda c: c.data.streaming and c.training.do_train and c.training.max_steps <= 0,
         "streaming: true reads the data as a stream, and a stream has no length, so epochs cannot be counted: "
         "set max_steps (the number of optimizer steps to train)"),
    Rule("report_to_installed", lambda c: bool(_missing_trackers(c.training)),
         lambda c: f"report_to: {', '.join(_missing_trackers(c.training))} needs its package: pip install "
                   f"{' '.join(TRACKERS[n][0] for n in _missing_trackers(c.training))} (or remove it from report_to)"),
    Rule("swanlab_installed", lambda c: c.finetuning.use_swanlab and importlib.util.find_spec("swanlab") is None,
         "use_swanlab: true tracks the run with SwanLab, which is not installed: pip install 'lf[swanlab]' (or "
         "remove use_swanlab)"),
    Rule("swanlab_once", lambda c: c.finetuning.use_swanlab and "swanlab" in _trackers(c.training),
         "use_swanlab: true and report_to: swanlab would both log the run to SwanLab: keep one (use_swanlab reads the "
         "swanlab_* keys)"),
    Rule("streaming_val_size", lambda c: c.data.streaming and 0 < c.data.val_size < 1,
         "val_size: {d.val_size} is a fraction, but a stream's length is unknown: give a count of rows with "
         "streaming (e.g. val_size: 1000)"),
    Rule("max_steps", lambda c: c.training.max_steps == 0,
         "max_steps: 0 would train no step (transformers trains one and reports success): set the number of "
         "optimizer steps to train, or remove max_steps (-1, the default) to train num_train_epochs epochs"),
    Rule("one_optimizer", lambda c: len(_optimizers(c)) > 1,
         lambda c: f"{', '.join(_optimizers(c))} each choose the optimizer: keep one of them"),
    Rule("optimizer_not_in_ppo", lambda c: c.finetuning.stage == "ppo" and bool(_optimizers(c)),
         lambda c: f"{_optimizers(c)[0]}: true, but stage: ppo steps the policy and value head with its own AdamW: "
                   "remove it"),
    Rule("optimizer_not_with_lora", lambda c: c.finetuning.finetuning_type in PEFT_TYPES and bool(_full_only(c)),
         lambda c: f"{_full_only(c)[0]} trains whole weight matrices, not "
                   f"{ADAPTER_NAMES[c.finetuning.finetuning_type]} adapters: set finetuning_type: full (or freeze), "
                   "or remove it"),
    Rule("galore_optim", lambda c: c.finetuning.use_galore and _optim(c.training) not in GALORE_CLASSES,
         lambda c: f"use_galore: true with optim: {_optim(c.training)}: GaLore comes in the AdamW, 8-bit AdamW and "
                   f"Adafactor kinds: set optim to one of {', '.join(GALORE_CLASSES)}"),
    Rule("apollo_optim", lambda c: c.finetuning.use_apollo and _optim(c.training) not in APOLLO_OPTIMS,
         lambda c: f"use_apollo: true with optim: {_optim(c.training)}: APOLLO is an AdamW: set optim: adamw_torch"),
    *(Rule(f"{name}_layerwise_accumulation", lambda c, name=name: getattr(c.finetuning, f"use_{name}")
           and getattr(c.finetuning, f"{name}_layerwise") and c.training.gradient_accumulation_steps != 1,
           f"{name}_layerwise: true steps each weight as soon as its gradient is ready, so gradients cannot be "
           f"accumulated: set gradient_accumulation_steps: 1 (raise per_device_train_batch_size instead), or "
           f"{name}_layerwise: false") for name in LAYERWISE),
    # LLaMA-Factory 0.9.5's limits of the optimizers in distributed training
    *(Rule(f"{name}_layerwise_distributed", lambda c, name=name: getattr(c.finetuning, f"use_{name}")
           and getattr(c.finetuning, f"{name}_layerwise") and _distributed(),
           f"{name}_layerwise: true steps each weight in its own gradient hook, before the processes have averaged "
           f"the gradients (WORLD_SIZE > 1): set {name}_layerwise: false, or train in one process")
      for name in LAYERWISE),
    Rule("optimizer_not_with_deepspeed", lambda c: _zero_stage(c.training) is not None and bool(_no_deepspeed(c)),
         lambda c: f"{_no_deepspeed(c)[0]}: true with deepspeed: DeepSpeed gives the optimizer flattened shards of "
                   f"the weights, but {NO_DEEPSPEED[_no_deepspeed(c)[0]]}: remove deepspeed (several processes train "
                   f"with plain DDP), or {_no_deepspeed(c)[0]}"),
    Rule("badam_ratio_distributed", lambda c: c.finetuning.use_badam and c.finetuning.badam_mode == "ratio"
         and _distributed(),
         "badam_mode: ratio runs in one process only, not in several (WORLD_SIZE > 1): set badam_mode: layer with "
         "deepspeed: configs/deepspeed/ds_z3.json, or train in one process"),
    Rule("badam_layer_needs_zero3", lambda c: c.finetuning.use_badam and c.finetuning.badam_mode == "layer"
         and _distributed() and _zero_stage(c.training) != 3,
         "use_badam: true (badam_mode: layer) in several processes (WORLD_SIZE > 1) runs under DeepSpeed ZeRO-3 "
         "only: set deepspeed: configs/deepspeed/ds_z3.json, or train in one process"),
    Rule("llama_pro_not_full", lambda c: c.finetuning.use_llama_pro and c.finetuning.finetuning_type == "full",
         "use_llama_pro: true trains the blocks `lf expand` added, but finetuning_type: full trains every weight: "
         "set finetuning_type: freeze (or lora), with freeze_trainable_layers: the num_expand of `lf expand`"),
    *(_in_range(key, *spec) for key, spec in RANGES.items()),
    Rule("finite_numbers", lambda c: bool(_not_finite(c)),
         lambda c: f"{', '.join(_not_finite(c))}: not a finite number: give a number (nan and inf are refused)"),
)


def check(cfg) -> None:
    """Raises one ConfigError listing every rule the config breaks."""
    problems = [rule.explain(cfg) for rule in RULES if rule.broken(cfg)]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        where = f" in {cfg.source}" if cfg.source else ""
        raise ConfigError(f"{len(problems)} problems{where}:\n" + "\n".join(f"  - {p}" for p in problems))
