"""Lists of features -> padded tensors for a training batch (right padding).

Every feature group is padded the same way: `<prefix>input_ids` with the pad token, `<prefix>labels` with -100,
for the prefixes "" (sft/pt), "chosen_"/"rejected_" (pairwise) and "kl_" (kto). A group with position_ids (neat
packing) gets no attention mask: its padding continues as one more example whose positions restart at 0, so that
position-restart boundaries alone keep examples apart. Other groups get an attention mask. Plain values (kto
flags) become a tensor. Lengths are rounded up to `pad_to_multiple_of` (friendlier shapes for the kernels).
Examples with media (images, videos, audios columns of references) get them decoded here, a batch at a time, into the
model's media inputs by `media` (lf.data.mm_plugins.MMProcessor), for each forward the batch is run in: a batch of
one group (sft, predict) gets them beside input_ids, as the model's keyword arguments (a neat-packed one also
its family's position_ids for packed rows, e.g. Qwen2-VL's 3-D ones); a preference batch gets each forward's
under `<forward>media` (MEDIA): "media" for the chosen rows followed by the rejected ones (padded to one length,
as lf.train.preference concatenates them, so each example's media come twice) and for kto's rows, "kl_media"
for kto's mismatched pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lf.data.registry import MEDIA_COLUMNS
from lf.labels import IGNORE_INDEX

PREFIXES = ("", "chosen_", "rejected_", "kl_")
PAIRED = ("chosen_", "rejected_")  # run as one forward, chosen rows first: padded to one length
MEDIA = "media"  # a preference batch's image inputs of one forward: f"{prefix}{MEDIA}" (kl_media for kto's kl_ rows)
TOKENS_KEY = "lf_num_tokens"  # with count_tokens: the batch's real (non-padding) tokens, for lf's trainer


@dataclass
class Collator:
    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    count_tokens: bool = False  # add TOKENS_KEY (lf's trainer removes it before the model sees the batch)
    media: object = None  # an MMProcessor: turns the batch's media into pixel_values (and the like)
    # Rounding up stops here (cutoff_len): a model with learned positions may have no position past it.
    max_length: int | None = None

    def _length(self, rows) -> int:
        longest = max(len(row) for row in rows)
        m = self.pad_to_multiple_of
        n = -(-longest // m) * m if m else longest
        return max(longest, min(n, self.max_length)) if self.max_length else n

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        refs = [{k: v for k, v in f.items() if k in MEDIA_COLUMNS} for f in features]
        features = [{k: v for k, v in f.items() if k not in MEDIA_COLUMNS} for f in features]
        batch = {}
        groups = [prefix for prefix in PREFIXES if f"{prefix}input_ids" in features[0]]
        paired = [f[f"{p}input_ids"] for f in features for p in PAIRED if p in groups]
        for prefix in groups:
            key = f"{prefix}input_ids"
            rows = [f[key] for f in features]
            n = self._length(paired if prefix in PAIRED else rows)
            pads = [n - len(row) for row in rows]
            batch[key] = torch.tensor([list(r) + [self.pad_token_id] * p for r, p in zip(rows, pads)])
            if f"{prefix}labels" in features[0]:
                batch[f"{prefix}labels"] = torch.tensor(
                    [list(f[f"{prefix}labels"]) + [IGNORE_INDEX] * p for f, p in zip(features, pads)])
            if f"{prefix}position_ids" in features[0]:
                batch[f"{prefix}position_ids"] = torch.tensor(
                    [list(f[f"{prefix}position_ids"]) + list(range(p)) for f, p in zip(features, pads)])
            else:
                batch[f"{prefix}attention_mask"] = torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pads)])
        if self.count_tokens:
            batch[TOKENS_KEY] = torch.tensor(sum(len(f[key]) for f in features for key in f
                                                 if key.endswith("input_ids")))
        grouped = {f"{prefix}{name}" for prefix in PREFIXES for name in ("input_ids", "labels", "position_ids")}
        for key in features[0].keys() - grouped:
            batch[key] = torch.tensor([f[key] for f in features])
        if self.media is not None:
            self._add_media(batch, groups, refs)
        return batch

    def _add_media(self, batch: dict, groups: list[str], refs: list) -> None:
        """The media inputs of each forward of the batch (the module docstring says where they go); `refs`: each
        row's {column: refs}."""
        if groups == [""]:
            batch.update(self.media.features(self.media.batch_refs(refs), batch["input_ids"]))
            if "position_ids" in batch:
                batch["position_ids"] = self.media.packed_positions(batch["input_ids"], batch["position_ids"], batch)
            return
        if PAIRED[0] in groups:
            batch[MEDIA] = self.media.features(self.media.batch_refs(refs * 2), torch.cat([batch[f"{p}input_ids"] for p in PAIRED]))
        for prefix in (p for p in groups if p not in PAIRED):
            batch[f"{prefix}{MEDIA}"] = self.media.features(self.media.batch_refs(refs), batch[f"{prefix}input_ids"])


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left to the longest: batches to generate from (or to
    score the next token of), each prompt ending at the last column."""
    return _padded(prompts, pad_id, left=True)


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows padded on the right to the longest, each starting at column 0."""
    return _padded(rows, pad_id, left=False)


def _padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        columns = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        ids[row, columns] = torch.tensor(tokens, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask
