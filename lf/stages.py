"""The stages lf knows, as data: one frozen record each (Stage) in one read-only table (STAGES), which lf.config's
rules, lf.data's plan, lf.model's loader and lf.train's recipe registry read.

A stage's name is checked here only, with one error type: `trainable(name)` for what a config may train, `get(name)`
for any entry (the data plan also builds ppo's prompts and the prediction prompts of do_predict); an unknown name
is a ConfigError naming the stages lf trains. lf.config's rules word the same messages (`unknown`).

Adding a stage: its entry below, its recipe (lf/train/<name>.py, a `run_<name>(cfg, callbacks)` like sft.py), and,
for a new kind of example, a processor in lf/data/processors.py under a new `data` name. `added(stage)` puts a
stage in the table for a with block (tests trying one out).

This module imports nothing heavy: lf.config reads it before anything loads.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

from lf.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # what it trains, in the words of the unknown-stage message; "" for a data-only entry
    data: str  # the kind of its examples: the key of its processor in lf.data.processors.PROCESSORS
    packable: bool = False  # packing: true may pack its examples (text concatenates, supervised packs rows)
    packs_by_default: bool = False  # packing left unset packs
    predicts: bool = False  # its model writes answers: do_predict may run with it
    reference: bool = False  # compares the policy with a reference model (unless its loss is reference-free)
    logps: bool = False  # trains on the replies' summed log-probabilities (lf.model.logps: fused or TRL's)
    value_head: bool = False  # the model gets a value head scoring each sequence (XForSequenceClassification)
    media: bool = True  # its examples may carry images, videos, audio (when its data kind's processor does)
    keys: tuple[str, ...] = ()  # finetuning keys that tune this stage (refused with a stage that lists none)
    recipe: str | None = None  # "module:function" that trains it; None: a data-only entry

    def run(self, cfg, callbacks=()) -> dict:
        """Runs the recipe (imported now: this module stays light)."""
        import importlib

        module, _, function = self.recipe.partition(":")
        return getattr(importlib.import_module(module), function)(cfg, callbacks)


_DPO_KEYS = ("pref_loss", "simpo_gamma", "dpo_label_smoothing", "ld_alpha", "pref_bco_weight")
_REFERENCE_KEYS = ("pref_beta", "pref_ftx", "ref_model", "ref_model_adapters", "ref_model_quantization_bit")
_PPO_KEYS = ("reward_model", "reward_model_type", "reward_model_adapters", "reward_model_quantization_bit",
             "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards")
_ENTRIES = {stage.name: stage for stage in (
    Stage("pt", "pre-training on raw text", "text", packable=True, packs_by_default=True, predicts=True,
          recipe="lf.train.sft:run_sft"),
    Stage("sft", "supervised fine-tuning", "supervised", packable=True, predicts=True, keys=("use_dft_loss", "use_eaft_loss", "eaft_alpha", "compute_accuracy", "use_asft_loss", "asft_alpha",
                *_REFERENCE_KEYS[2:]),
          recipe="lf.train.sft:run_sft"),
    Stage("rm", "a reward model", "pairs", value_head=True, recipe="lf.train.rm:run_rm"),
    Stage("dpo", "preference pairs", "pairs", reference=True, logps=True, keys=_DPO_KEYS + _REFERENCE_KEYS,
          recipe="lf.train.dpo:run_dpo"),
    Stage("kto", "replies flagged desirable or not", "feedback", reference=True, logps=True,
          keys=_REFERENCE_KEYS + ("kto_chosen_weight", "kto_rejected_weight"), recipe="lf.train.kto:run_kto"),
    Stage("ppo", "online RL from a reward model's scores", "prompts",  # prompts: the policy writes the replies
          reference=True, media=False, keys=_PPO_KEYS + _REFERENCE_KEYS[2:], recipe="lf.train.ppo:run_ppo"),
    Stage("predict", "", "prompts"),  # data only: eval_dataset's prompts for do_predict (lf.train.predict)
)}
STAGES = types.MappingProxyType(_ENTRIES)  # name -> Stage, read-only; a live view: `added` shows here


def trained() -> list[Stage]:
    """The stages lf trains, in the table's order."""
    return [stage for stage in STAGES.values() if stage.recipe]


def with_media(kinds) -> list[str]:
    """The trained stages whose examples may carry media: their data is of one of `kinds` (lf.data.pipeline's)."""
    return [stage.name for stage in trained() if stage.media and stage.data in kinds]


def unknown(name: str) -> str | None:
    """Why a config cannot name stage `name` (it is no stage, or a data-only entry), or None."""
    stage = STAGES.get(name)
    if stage is not None and stage.recipe:
        return None
    described = [f"{stage.name} ({stage.summary})" for stage in trained()]
    listed = f"{', '.join(described[:-1])} and {described[-1]}" if len(described) > 1 else described[0]
    return (f"stage: {name} is not a training stage: lf trains {listed}."
            f"{did_you_mean(name, [stage.name for stage in trained()])}")


def trainable(name: str) -> Stage:
    """The stage `name` if lf trains it; else a ConfigError saying why not."""
    problem = unknown(name)
    if problem:
        raise ConfigError(problem)
    return STAGES[name]


def get(name: str) -> Stage:
    """Any entry of the table (data-only ones too); a ConfigError for a name that is none."""
    if name not in STAGES:
        raise ConfigError(unknown(name))
    return STAGES[name]


def key_stages() -> dict[str, tuple[str, ...]]:
    """Each stage-specific finetuning key -> the stages it tunes, in the order the table names them."""
    readers: dict[str, tuple[str, ...]] = {}
    for stage in STAGES.values():
        for key in stage.keys:
            readers[key] = readers.get(key, ()) + (stage.name,)
    return readers


@contextlib.contextmanager
def added(stage: Stage) -> Iterator[Stage]:
    """`stage` in the table for the with block, removed after (a test trying a stage out): config rules, the
    data plan and the recipe registry see it as they see the built-in ones."""
    if stage.name in _ENTRIES:
        raise ConfigError(f"stage {stage.name} is already in lf.stages.STAGES: give the new stage another name")
    _ENTRIES[stage.name] = stage
    try:
        yield stage
    finally:
        del _ENTRIES[stage.name]
