"""Sequence packing: several tokenized examples per row of `cutoff_len` tokens, so that rows carry little padding.

Rows are filled best-fit decreasing: the longest example first, each into the row whose free space it fits most
tightly (a new row when none has room). Rows are packed within windows of `window` examples (a `datasets.map`
batch), which works streamed too and packs within a fraction of a percent of packing everything at once.

Examples with media (`images`, `videos`, `audios` columns of references) take them along: a packed row holds its
examples' media in the row's order, as their tokens come.

Neat packing (`neat=True`) keeps the examples of a row apart: position_ids restart at 0 for every example, and
lf's attention (and transformers' own mask builder) read those restarts as example boundaries. Without it the
examples of a row see each other, as in pretraining. Either way, the first token of each example gets no label:
run alone it would have none (nothing predicts it), so a packed row has exactly the labels of its examples.
"""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lf.data.registry import MEDIA_COLUMNS
from lf.errors import DataError
from lf.labels import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin; every item must fit (length <= capacity)."""
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free space of the open bins
    by_free: dict[int, list[int]] = {}  # free space -> bins with that much left
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[i]
        if length > capacity:
            raise DataError(f"an example of {length} tokens does not fit a row of {capacity}: cut the examples to "
                            f"the row length first (lf's processors cut them to cutoff_len)")
        at = bisect.bisect_left(free_sizes, length)
        if at < len(free_sizes):
            free = free_sizes[at]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free], free_sizes[at]
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = free - length
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_sizes, left)
            by_free[left].append(b)
    return bins


def pack(batch, *, capacity: int, neat: bool):
    """Tokenized examples (an Arrow table with input_ids and labels, and media columns if any, as `datasets.map`
    passes it in arrow format) -> an Arrow table of packed rows (with position_ids when neat). The token columns
    are moved by Arrow and numpy, never as Python lists: packing 100k examples takes a fraction of a second."""
    ids, labels = (batch.column(name).combine_chunks() for name in ("input_ids", "labels"))
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths))
    example_lengths = lengths[order]
    example_starts = np.cumsum(example_lengths) - example_lengths
    row_offsets = np.zeros(len(bins) + 1, dtype=np.int32)
    np.cumsum([lengths[members].sum() for members in bins], out=row_offsets[1:])
    new_labels = pc.list_flatten(labels.take(order)).to_numpy(zero_copy_only=False).astype(np.int32)
    new_labels[example_starts] = IGNORE_INDEX
    columns = {"input_ids": pc.list_flatten(ids.take(order)).cast(pa.int32()), "labels": pa.array(new_labels)}
    if neat:
        columns["position_ids"] = pa.array(
            (np.arange(int(row_offsets[-1])) - np.repeat(example_starts, example_lengths)).astype(np.int32))
    offsets = pa.array(row_offsets)
    table = {name: pa.ListArray.from_arrays(offsets, values) for name, values in columns.items()}
    ends = np.cumsum([len(members) for members in bins])
    for column in (c for c in MEDIA_COLUMNS if c in batch.column_names):
        media = batch.column(column).combine_chunks().take(order)
        counts = pc.list_value_length(media).to_numpy(zero_copy_only=False).astype(np.int64)
        media_offsets = np.zeros(len(bins) + 1, dtype=np.int32)
        media_offsets[1:] = np.cumsum(counts)[ends - 1] if len(counts) else 0
        table[column] = pa.ListArray.from_arrays(pa.array(media_offsets), pc.list_flatten(media))
    return pa.table(table)


def padding_fraction(lengths: list[int], rows: int, row_length: int) -> float:
    """The share of `rows` x `row_length` token slots that hold padding."""
    return 1.0 - sum(lengths) / (rows * row_length) if rows else 0.0
