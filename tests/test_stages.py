"""lf.stages: a stage is one entry of one read-only table that config rules, the data plan, the model loader and
the recipe registry all read. A toy stage added to the table (and removed) runs through all of them; an unknown
stage is one ConfigError naming the stages lf trains, wherever its name enters."""

import dataclasses
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lf import stages
from lf.config import DataArguments, parse_train_args
from lf.data import get_dataset, get_template, pipeline
from lf.data.processors import PROCESSORS
from lf.errors import ConfigError
from lf.stages import STAGES, Stage
from lf.tiny import train_tokenizer
from lf.train import run

DATA = Path(__file__).resolve().parent.parent / "data"
BASE = {"model_name_or_path": "lf-tiny-llama", "dataset": "lf_demo_en", "dataset_dir": str(DATA),
        "output_dir": "saves/test"}
UNKNOWN = (r"stage: {name} is not a training stage: lf trains pt \(pre-training on raw text\), sft \(supervised "
           r"fine-tuning\), rm \(a reward model\), dpo \(preference pairs\), kto \(replies flagged desirable or "
           r"not\) and ppo \(online RL from a reward model's scores\)")


def run_toy(cfg, callbacks=()) -> dict:
    """The toy stage's recipe: says what it was given."""
    return {"stage": cfg.finetuning.stage, "pref_beta": cfg.finetuning.pref_beta}


TOY = Stage("toy", "a toy stage", data="supervised", packable=True, keys=("pref_beta",),
            recipe=f"{__name__}:run_toy")


@pytest.fixture(scope="module")
def tokenizer():
    records = json.loads((DATA / "lf_demo_en.json").read_text())
    tokenizer = train_tokenizer([" ".join([r["instruction"], r["input"], r["output"]]) for r in records],
                                vocab_size=600, extra_special_tokens=("<|im_start|>", "<|im_end|>"))
    get_template("qwen").prepare_tokenizer(tokenizer)
    return tokenizer


def test_a_stage_added_to_the_table_is_checked_planned_and_run(tokenizer, tmp_path):
    with stages.added(TOY):
        # config: the stage and its key are accepted; the key is refused with a stage that does not read it
        cfg = parse_train_args({**BASE, "stage": "toy", "pref_beta": 0.2, "output_dir": str(tmp_path / "toy")})
        with pytest.raises(ConfigError, match="pref_beta tune.s. dpo and kto and toy training, but stage is sft"):
            parse_train_args({**BASE, "pref_beta": 0.2})
        with pytest.raises(ConfigError, match=r"ppo \(online RL from a reward model.s scores\) and toy \(a toy stage\)"):
            parse_train_args({**BASE, "stage": "tyo"})
        # data: its plan (packable rows of supervised examples, neat by default) and its examples
        plan = pipeline.Plan.resolve(DataArguments(packing=True), "toy")
        assert (plan.data, plan.packing, plan.neat) == ("supervised", True, True)
        data = get_dataset(DataArguments(dataset="lf_demo_en", dataset_dir=str(DATA), max_samples=4),
                           tokenizer=tokenizer, template=get_template("qwen"), stage="toy")
        assert len(data.train_dataset) == 4 and set(data.train_dataset.column_names) == {"input_ids", "labels"}
        # train: the table's recipe runs
        assert run(cfg) == {"stage": "toy", "pref_beta": 0.2}
    assert "toy" not in STAGES
    with pytest.raises(ConfigError, match=UNKNOWN.format(name="toy")):
        parse_train_args({**BASE, "stage": "toy"})


def test_an_unknown_stage_is_one_config_error_wherever_it_enters(tokenizer, tmp_path):
    expected = UNKNOWN.format(name="sfft") + r"\. Did you mean: sft\?$"
    with pytest.raises(ConfigError, match=expected):
        parse_train_args({**BASE, "stage": "sfft"})
    with pytest.raises(ConfigError, match=expected):
        get_dataset(DataArguments(dataset="lf_demo_en", dataset_dir=str(DATA)), tokenizer=tokenizer,
                    template=get_template("qwen"), stage="sfft")
    with pytest.raises(ConfigError, match=expected):
        run(SimpleNamespace(finetuning=SimpleNamespace(stage="sfft"), training=SimpleNamespace(output_dir=tmp_path)))
    with pytest.raises(ConfigError, match=UNKNOWN.format(name="predict")):  # data only: no config names it
        stages.trainable("predict")


def test_the_table_is_read_only_and_consistent():
    with pytest.raises(TypeError):
        STAGES["toy"] = TOY
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGES["sft"].packable = False
    with pytest.raises(ConfigError, match="stage sft is already in lf.stages.STAGES"):
        with stages.added(dataclasses.replace(TOY, name="sft")):
            pass
    assert STAGES["sft"].packable
    finetuning_keys = {field.name for field in dataclasses.fields(parse_train_args(BASE).finetuning)}
    for stage in STAGES.values():
        assert stage.data in PROCESSORS, stage.name
        assert set(stage.keys) <= finetuning_keys, stage.name
        if stage.recipe:
            module, _, function = stage.recipe.partition(":")
            assert callable(getattr(importlib.import_module(module), function)), stage.name
    assert [stage.name for stage in stages.trained()] == ["pt", "sft", "rm", "dpo", "kto", "ppo"]


def test_registries_are_read_only():
    """Looking an entry up gives an immutable value, and no caller can change a registry for the next one."""
    from lf.cli import MODEL_COMMANDS
    from lf.config.parser import ALIASES, UNSUPPORTED
    from lf.config.rules import RANGES

    for registry, name in ((PROCESSORS, "text"), (MODEL_COMMANDS, "chat"), (ALIASES, "no_cuda"),
                           (UNSUPPORTED, "use_mca"), (RANGES, "learning_rate"), (STAGES, "sft")):
        with pytest.raises(TypeError):
            registry[name] = None
        assert hash(registry[name]) is not None  # immutable: tuples, frozen records, functions
