"""Sequence packing: several tokenized examples per row of `cutoff_len` tokens, so that rows carry little padding.

Rows are filled best-fit decreasing: the longest example first, each into the row whose free space it fits most
tightly (a new row when none has room). Rows are packed within windows of `window` examples (a `datasets.map`
batch), which works streamed too and packs within a fraction of a percent of packing everything at once.

Neat packing (`neat=True`) keeps the examples of a row apart: position_ids restart at 0 for every example, and
lf's attention (and transformers' own mask builder) read those restarts as example boundaries. Without it the
examples of a row see each other, as in pretraining. Either way, the first token of each example gets no label:
run alone it would have none (nothing predicts it), so a packed row has exactly the labels of its examples.
"""

from __future__ import annotations

import bisect

from lf.data.processors import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin; every item must fit (length <= capacity)."""
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free space of the open bins
    by_free: dict[int, list[int]] = {}  # free space -> bins with that much left
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[i]
        if length > capacity:
            raise ValueError(f"an example of {length} tokens does not fit a row of {capacity}")
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


def pack(batch: dict, *, capacity: int, neat: bool) -> dict:
    """A batch of tokenized examples (input_ids, labels) -> packed rows (and position_ids when neat)."""
    lengths = [len(ids) for ids in batch["input_ids"]]
    out = {"input_ids": [], "labels": []}
    if neat:
        out["position_ids"] = []
    for members in best_fit_decreasing(lengths, capacity):
        input_ids, labels, positions = [], [], []
        for i in members:
            input_ids += batch["input_ids"][i]
            labels += [IGNORE_INDEX] + list(batch["labels"][i][1:])
            positions += range(lengths[i])
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        if neat:
            out["position_ids"].append(positions)
    return out


def padding_fraction(lengths: list[int], rows: int, row_length: int) -> float:
    """The share of `rows` x `row_length` token slots that hold padding."""
    return 1.0 - sum(lengths) / (rows * row_length) if rows else 0.0
