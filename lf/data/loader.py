"""Several datasets -> one canonical dataset: read, sample (num_samples, max_samples), convert, mix; eval split.

Sampling happens on the raw rows, before conversion, so a large dataset cut by max_samples is not converted whole
(rows skipped as unusable are not replaced). num_samples draws that many rows at random (seeded): all rows once,
then random repeats when it is larger than the dataset. Streams cannot be sampled at random or counted, so a
streamed dataset takes its first num_samples rows. max_samples keeps each dataset's first rows.
"""

import logging
import math

import datasets
import numpy as np

from lf.config.data import DataArguments
from lf.data.converters import to_canonical
from lf.data.readers import read_raw
from lf.data.registry import DatasetAttr, dataset_attrs
from lf.errors import DataError, did_you_mean

logger = logging.getLogger(__name__)

# mix_strategy -> the stopping strategy of `datasets.interleave_datasets` (None: concatenate)
MIX_STRATEGIES = {"concat": None, "interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


def load_canonical(names, data_args: DataArguments, *, seed: int = 42):
    """The canonical rows of the datasets `names` ("a,b" or a list) mixed by `data_args.mix_strategy`, or None
    when there are no names. A Dataset, or an IterableDataset when `data_args.streaming`."""
    attrs = dataset_attrs(names, data_args.dataset_dir)
    if not attrs:
        return None
    # every option is checked before any dataset is read: a typo should not cost a long conversion first
    probabilities = _probabilities(data_args, attrs)
    if data_args.max_samples is not None and data_args.max_samples < 1:
        raise DataError(f"max_samples must be at least 1, not {data_args.max_samples}.")
    parts = [_load_one(attr, data_args, seed) for attr in attrs]
    if len(parts) == 1:
        return parts[0]
    stopping = MIX_STRATEGIES[data_args.mix_strategy]
    if stopping is None:
        return datasets.concatenate_datasets(parts)
    return datasets.interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy=stopping)


def _load_one(attr: DatasetAttr, data_args: DataArguments, seed: int):
    logger.info("loading dataset %s from %s", attr.name, attr.path)
    raw = read_raw(attr, data_args.dataset_dir, streaming=data_args.streaming)
    if attr.num_samples is not None:
        raw = _sample(raw, attr.num_samples, seed)
    if data_args.max_samples is not None:
        raw = _first(raw, data_args.max_samples)
    return to_canonical(raw, attr, num_proc=data_args.preprocessing_num_workers,
                        batch_size=data_args.preprocessing_batch_size)


def _sample(raw, n: int, seed: int):
    if isinstance(raw, datasets.IterableDataset):
        return raw.take(n)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(raw))[:n]
    if n > len(raw):  # every row once, then random repeats
        picked = np.concatenate([picked, rng.choice(len(raw), n - len(raw))])
    return raw.select(picked)


def _first(raw, n: int):
    if isinstance(raw, datasets.IterableDataset):
        return raw.take(n)
    return raw.select(range(min(n, len(raw))))


def _probabilities(data_args: DataArguments, attrs: list[DatasetAttr]) -> list[float] | None:
    """Checks mix_strategy; interleave_probs as floats, one per dataset summing to 1 (None when not given)."""
    strategy, given = data_args.mix_strategy, data_args.interleave_probs
    if strategy not in MIX_STRATEGIES:
        raise DataError(f"mix_strategy {strategy!r} is not one of {', '.join(MIX_STRATEGIES)}."
                        f"{did_you_mean(strategy, MIX_STRATEGIES)}")
    if given is None:
        return None
    if MIX_STRATEGIES[strategy] is None:
        raise DataError(f"interleave_probs ({given!r}) only applies to mix_strategy interleave_under or "
                        f"interleave_over, not {strategy!r}.")
    try:
        probabilities = [float(p) for p in (given.split(",") if isinstance(given, str) else given)]
    except ValueError:
        raise DataError(f"interleave_probs must be numbers separated by commas, not {given!r}.") from None
    if len(probabilities) != len(attrs):
        raise DataError(f"interleave_probs gives {len(probabilities)} probabilities for {len(attrs)} datasets "
                        f"({', '.join(a.name for a in attrs)}): give one per dataset.")
    if min(probabilities) < 0 or not math.isclose(sum(probabilities), 1.0, abs_tol=1e-6):
        raise DataError(f"interleave_probs {given!r} must be non-negative and sum to 1 (they sum to "
                        f"{sum(probabilities):g}).")
    return probabilities


def split_eval(dataset, val_size: float, *, seed: int = 42):
    """(train, eval) from `dataset`: val_size is a fraction in (0, 1) or a count >= 1 of eval rows (eval None when
    val_size is 0). A stream gives its first val_size rows (a count) to eval and the rest to train."""
    if dataset is None or not val_size:
        return dataset, None
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise DataError(f"val_size must be a fraction in (0, 1) or a whole count of rows, not {val_size}.")
    if isinstance(dataset, datasets.IterableDataset):
        if val_size < 1:
            raise DataError(f"val_size {val_size} is a fraction, but a stream's length is unknown: give a count of "
                            f"rows (e.g. 1000) with streaming.")
        return dataset.skip(int(val_size)), dataset.take(int(val_size))
    test_size = int(val_size) if val_size >= 1 else val_size
    eval_rows = test_size if val_size >= 1 else math.ceil(test_size * len(dataset))
    if not 1 <= eval_rows < len(dataset):
        raise DataError(f"val_size {val_size} gives {eval_rows} eval rows of the dataset's {len(dataset)}: both "
                        f"train and eval need at least one.")
    parts = dataset.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]
