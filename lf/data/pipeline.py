"""The data pipeline of a run, top to bottom: `get_dataset(data_args, tokenizer=..., template=..., stage=...)`.

  the stage's plan (lf.stages: its kind of examples, packing) and its datasets checked to be that kind
  -> dataset_info.json names -> canonical rows (loader) -> eval split -> token ids and labels (processors)
  -> packed rows (packing: supervised examples) -> cached on disk (tokenized_path)

Each step is one call with plain values. The result is a `DatasetModule`; `collator(...)` pads its batches.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pyarrow as pa

from lf import stages
from lf.data import packing as packing_
from lf.data.cache import fingerprint
from lf.data.collator import Collator
from lf.data.converters import FEATURES
from lf.data.loader import load_canonical, split_eval
from lf.data.processors import PROCESSORS, Options
from lf.data.registry import MEDIA_COLUMNS, DatasetAttr, dataset_attrs
from lf.data.templates import image_templates
from lf.errors import DataError

log = logging.getLogger("lf")
CANONICAL_COLUMNS = ["prompt", "response", "system", "tools", "kto_tag", *MEDIA_COLUMNS]
MARKER = "lf_dataset.json"  # written last into tokenized_path: a folder without it was never completed
PACKING_WINDOW = 10_000  # examples packed together: large enough that rows come out nearly full


@dataclass
class DatasetModule:
    train_dataset: object = None  # datasets.Dataset | IterableDataset | None
    eval_dataset: object = None  # a dataset, or {name: dataset} with eval_on_each_dataset


ROWS = "supervised"  # the kind of examples packing puts whole into rows (neat_packing keeps them apart there)
WITH_IMAGES = (ROWS, "prompts", "pairs", "feedback")  # the kinds whose processors carry media (all but pt's texts)
CONCATENATED = "text"  # the kind packing concatenates and cuts into blocks


@dataclass(frozen=True)
class Plan:
    """How a stage's examples are made, cut and packed, resolved from the data arguments."""

    stage: str
    data: str  # the kind of examples (lf.stages' `data`): which processor makes them
    packing: bool
    neat: bool

    @classmethod
    def resolve(cls, data_args, name: str) -> "Plan":
        stage = stages.get(name)
        packing = data_args.packing if data_args.packing is not None else stage.packs_by_default
        if packing and not stage.packable:
            packable = " and ".join(s.name for s in stages.STAGES.values() if s.packable)
            raise DataError(f"packing: true is for the {packable} stages, not {name}: set packing: false")
        neat = data_args.neat_packing
        if neat and stage.data != ROWS:
            raise DataError("neat_packing keeps packed sft examples apart; pt concatenates its texts into blocks "
                            "(examples see each other by design): remove neat_packing or use stage: sft")
        if neat and not packing:
            raise DataError("neat_packing: true needs packing: true (it says how packed rows are built)")
        return cls(name, stage.data, bool(packing), bool(packing and stage.data == ROWS and neat is not False))


@dataclass(frozen=True)
class Needs:
    """What each dataset of a kind of examples must be, and the message when one is not (formatted with stage,
    names, info, has, it)."""

    holds: Callable[[DatasetAttr], bool]
    message: str


# the kinds of examples only some datasets hold -> what those datasets must be
KIND_NEEDS = MappingProxyType({
    "pairs": Needs(lambda attr: attr.ranking,
                   "stage {stage} learns from pairs of replies (chosen and rejected), but {names} in {info} {has} one "
                   "reply per prompt: name preference data instead (an entry with \"ranking\": true and "
                   "chosen/rejected columns, such as lf_pref_demo), or train {it} with stage: sft"),
    "feedback": Needs(lambda attr: "kto_tag" in attr.columns,
                      "stage {stage} learns from replies flagged desirable or not, but {names} in {info} {has} no "
                      "kto_tag column: map one (\"columns\": {{\"kto_tag\": \"label\"}}, as lf_kto_demo does), or "
                      "train pairs of replies with stage: dpo"),
})


def check_kind(data_args, plan: Plan) -> None:
    """A DataError naming the datasets (train and eval) that do not hold the plan's kind of examples (KIND_NEEDS),
    before any is read."""
    needs = KIND_NEEDS.get(plan.data)
    if needs is None:
        return
    wrong = [attr.name for names in (data_args.dataset, data_args.eval_dataset)
             for attr in dataset_attrs(names, data_args.dataset_dir) if not needs.holds(attr)]
    if wrong:
        one = len(wrong) == 1
        raise DataError(needs.message.format(stage=plan.stage, names=", ".join(wrong), has="has" if one else "have",
                                             info=os.path.join(data_args.dataset_dir, "dataset_info.json"),
                                             it="it" if one else "them"))


def check_images(data_args, plan: Plan, template, media) -> None:
    """A DataError when datasets with a media column (images, videos, audios; train or eval) meet a template,
    model or stage that cannot take them, before any is read. `media`: the model's
    lf.data.mm_plugins.MMProcessor, or None."""
    with_media = {attr.name: [c for c in MEDIA_COLUMNS if c in attr.columns]
                  for names in (data_args.dataset, data_args.eval_dataset)
                  for attr in dataset_attrs(names, data_args.dataset_dir) if set(MEDIA_COLUMNS) & set(attr.columns)}
    if not with_media:
        return
    names = ", ".join(with_media)
    columns = [c for c in MEDIA_COLUMNS if any(c in cs for cs in with_media.values())]
    what = "/".join(columns)  # images, videos/audios, ...
    if template.mm_plugin is None:
        raise DataError(f"template {template.name} does not take {columns[0][:-1]} input; templates that do: "
                        f"{', '.join(image_templates(columns[0]))} (the datasets with {what}: {names}): set template: "
                        f"to the one of your model's family")
    if media is None:
        raise DataError(f"template {template.name} puts {what} into prompts through the model's processor, but the "
                        f"model has none (no preprocessor_config.json): train {names} on the multimodal model the "
                        f"template is for")
    for name, have in with_media.items():
        if missing := [c for c in have if c not in media.columns]:
            takers = ", ".join(image_templates(missing[0])) or "none yet"
            raise DataError(f"template {template.name} does not take {missing[0]} (dataset {name} has them; it takes "
                            f"{', '.join(media.columns)}): templates that do: {takers}; use the template and model of "
                            f"such a family, or drop the column from the dataset's entry")
    if plan.data not in WITH_IMAGES or not stages.get(plan.stage).media:
        takes = ", ".join(stages.with_media(WITH_IMAGES))
        raise DataError(f"stage {plan.stage} does not read {what} ({names} have them): train them with one of "
                        f"the stages {takes}")


def get_dataset(data_args, *, tokenizer, template, stage: str, seed: int = 42, media=None) -> DatasetModule:
    """Train and eval datasets of token ids for `stage` (a name in lf.stages.STAGES: pt, sft, rm, dpo, kto, ppo,
    predict). `media`: the model's lf.data.mm_plugins.MMProcessor when the template takes images."""
    plan = Plan.resolve(data_args, stage)
    check_kind(data_args, plan)
    check_images(data_args, plan, template, media)
    path = data_args.tokenized_path
    if path and data_args.streaming:
        raise DataError("tokenized_path caches a tokenized dataset on disk, which a streamed dataset never is: "
                        "remove tokenized_path or set streaming: false")
    if path and os.path.exists(os.path.join(path, MARKER)) and not data_args.overwrite_cache:
        return _load_cached(path, plan)

    train = load_canonical(data_args.dataset, data_args, seed=seed)
    evals = _eval_sets(data_args, seed)
    if data_args.val_size and train is not None:
        if evals is not None:
            raise DataError("give either val_size (a share of the training data) or eval_dataset, not both")
        train, evals = split_eval(train, data_args.val_size, seed=seed)
    if train is None and evals is None:
        raise DataError("no dataset given: set `dataset:` (names from dataset_info.json) or `eval_dataset:`")
    module = DatasetModule(
        _prepare(train, "train", plan, data_args, tokenizer, template, media) if train is not None else None,
        _map_evals(evals, lambda d, name: _prepare(d, name, plan, data_args, tokenizer, template, media)))
    if path:
        _save(module, path, plan)
    return module


# Batches are padded to a multiple of this many tokens: few distinct shapes, so the allocator reuses the blocks of
# earlier steps and oneDNN (bf16 matmuls) compiles few kernels: unpacked training peaked 5% lower than with a
# multiple of 8 (README, "Batch shapes").
LENGTH_BUCKET = 64


def collator(tokenizer, count_tokens: bool = False, media=None, max_length: int | None = None) -> Collator:
    """The batch collator for datasets from `get_dataset` (pads with the tokenizer's pad token to a multiple of
    LENGTH_BUCKET, but not past `max_length`, the run's cutoff_len, unless a row is longer); `count_tokens` for lf's trainer, which reports tokens/s; `media` (the MMProcessor given to
    get_dataset) decodes the batch's images into the model's image inputs."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token: the template's prepare_tokenizer sets one")
    return Collator(pad_token_id=pad, pad_to_multiple_of=LENGTH_BUCKET, count_tokens=count_tokens, media=media,
                    max_length=max_length)


def _eval_sets(data_args, seed):
    if not data_args.eval_dataset:
        return None
    if data_args.eval_on_each_dataset:
        names = [n.strip() for n in data_args.eval_dataset.split(",") if n.strip()]
        return {name: load_canonical(name, data_args, seed=seed) for name in names}
    return load_canonical(data_args.eval_dataset, data_args, seed=seed)


def _map_evals(evals, fn):
    if evals is None:
        return None
    if isinstance(evals, dict):
        return {name: fn(d, f"eval {name}") for name, d in evals.items()}
    return fn(evals, "eval")


def _prepare(dataset, name: str, plan: Plan, data_args, tokenizer, template, media=None):
    """Canonical rows -> token ids and labels (-> packed rows), with progress bars where the size is known."""
    streaming = not hasattr(dataset, "__len__")
    kwargs = {} if streaming else {"num_proc": data_args.preprocessing_num_workers,
                                   "load_from_cache_file": not data_args.overwrite_cache,
                                   "desc": f"Tokenizing {name} ({plan.stage})"}
    process = functools.partial(PROCESSORS[plan.data], template=template, tokenizer=tokenizer,
                                options=Options.from_args(data_args))
    if plan.data == CONCATENATED:
        process = functools.partial(process, concatenate=plan.packing)
    if media is not None and plan.data in WITH_IMAGES:
        process = functools.partial(process, media=media)
    if not streaming:  # a stream's map takes Python batches back only
        process = functools.partial(_to_arrow, process=process)
    columns = [c for c in CANONICAL_COLUMNS if c in (dataset.column_names or CANONICAL_COLUMNS)]
    if not streaming:
        kwargs["new_fingerprint"] = fingerprint(dataset, process, kwargs["num_proc"])
    tokenized = dataset.map(process, batched=True, batch_size=data_args.preprocessing_batch_size,
                            remove_columns=columns, **kwargs)
    if not (plan.packing and plan.data == ROWS):
        _log_summary(name, tokenized, streaming)
        return tokenized
    if not streaming:  # one process: workers would pack their shards apart (and packing is cheap). A stream's
        # map would drop the packed columns of the same names too.
        kwargs.update(desc=f"Packing {name} into rows of {data_args.cutoff_len}", num_proc=None,
                      remove_columns=tokenized.column_names)
    pack = functools.partial(packing_.pack, capacity=data_args.cutoff_len, neat=plan.neat)
    if not streaming:
        kwargs["new_fingerprint"] = fingerprint(tokenized, pack, PACKING_WINDOW)
    packed = tokenized.with_format("arrow").map(pack, batched=True, batch_size=PACKING_WINDOW,
                                                **kwargs).with_format(None)
    if not streaming:
        share = packing_.padding_fraction(_lengths(tokenized), len(packed), data_args.cutoff_len)
        log.info("%s: %d examples packed into %d rows of %d tokens (%s; %.1f%% of the rows is padding)", name,
                 len(tokenized), len(packed), data_args.cutoff_len,
                 "each example sees only itself" if plan.neat else "examples in a row see each other", 100 * share)
    return packed


def _to_arrow(batch, *, process):
    """Runs a processor and hands its token columns to `datasets` as Arrow list<int32> arrays built in one C call
    each (datasets' own conversion of Python lists inspects every value: a fifth of the tokenizing time)."""
    out = process(batch)
    columns = {}
    for name, rows in out.items():
        if name.endswith(("input_ids", "labels", "position_ids")):
            offsets = np.zeros(len(rows) + 1, dtype=np.int32)
            np.cumsum([len(row) for row in rows], out=offsets[1:])
            values = pa.array(list(itertools.chain.from_iterable(rows)), type=pa.int32())
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
        elif name in MEDIA_COLUMNS:  # each example's media references, undecoded
            columns[name] = pa.array(rows, type=FEATURES.arrow_schema.field(name).type)
        else:  # kto's desirable flags
            columns[name] = pa.array(rows, type=pa.bool_())
    return pa.table(columns)


def _lengths(dataset, column: str = "input_ids") -> list[int]:
    """Token counts per row, read from the Arrow table (no Python lists of ids)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column(column)).to_pylist()


def _log_summary(name, dataset, streaming):
    if streaming:
        log.info("%s: tokenized as it streams", name)
    else:
        column = next(c for c in dataset.column_names if c.endswith("input_ids"))
        log.info("%s: %d examples, %d tokens", name, len(dataset), sum(_lengths(dataset, column)))


def _save(module: DatasetModule, path: str, plan: Plan) -> None:
    """Writes the datasets to `path` so that an error half way leaves the previous cache (or nothing) in place:
    everything goes to a sibling folder first, which replaces `path` only when complete."""
    from datasets import DatasetDict

    if module.train_dataset is not None and not hasattr(module.train_dataset, "save_to_disk"):
        raise DataError("a streamed dataset cannot be cached: remove tokenized_path")
    parts = {}
    if module.train_dataset is not None:
        parts["train"] = module.train_dataset
    evals = module.eval_dataset
    parts.update({f"eval_{n}": d for n, d in evals.items()} if isinstance(evals, dict)
                 else ({"eval": evals} if evals is not None else {}))
    staging = f"{path.rstrip(os.sep)}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    DatasetDict(parts).save_to_disk(staging)
    with open(os.path.join(staging, MARKER), "w") as f:
        json.dump({"stage": plan.stage, "packing": plan.packing, "neat_packing": plan.neat,
                   "eval_each": isinstance(evals, dict)}, f)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(staging, path)
    log.info("tokenized datasets saved to %s (the next run with tokenized_path loads them and skips tokenizing)",
             path)


def _load_cached(path: str, plan: Plan) -> DatasetModule:
    from datasets import load_from_disk

    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if (meta["stage"], meta["packing"], meta["neat_packing"]) != (plan.stage, plan.packing, plan.neat):
        raise DataError(f"{path} holds data tokenized for stage {meta['stage']} (packing {meta['packing']}, "
                        f"neat_packing {meta['neat_packing']}), not for this run's: set overwrite_cache: true "
                        f"or another tokenized_path")
    parts = load_from_disk(path)
    log.info("loaded tokenized datasets from %s (%s); set overwrite_cache: true to tokenize again", path,
             ", ".join(f"{k}: {len(v)} rows" for k, v in parts.items()))
    evals = {k.removeprefix("eval_"): v for k, v in parts.items() if k.startswith("eval_")} if meta["eval_each"] \
        else parts.get("eval")
    return DatasetModule(parts.get("train"), evals or None)
