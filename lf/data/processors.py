"""Canonical rows -> token ids and labels, one processor per kind of example a stage learns from (PROCESSORS,
keyed by lf.stages' `data`).

Every processor takes a batch of canonical rows (a dict of lists, as `datasets.map(batched=True)` passes it) and
returns a dict of lists of features. Prompt tokens get the label -100 (no loss) unless `train_on_prompt`.

Truncation to `cutoff_len` (LLaMA-Factory's rule, so that the same data gives the same examples): turns are taken
in order, each from the budget the earlier turns left. Within a turn of prompt length P and response length R
that does not fit the budget B, the response is what the model learns from, so it is cut last:
  - a response shorter than half the budget keeps all its tokens (2R < B) and the prompt gets the rest;
  - else a prompt shorter than half the budget keeps all its tokens (2P < B) and the response gets the rest;
  - else both are cut in proportion: the response gets B*R/(P+R) tokens (at least one), the prompt the rest.
Both keep their beginnings. A turn that gets no budget is dropped with the ones after it. With `mask_history`
the last turn is budgeted first (it alone carries labels) and the earlier ones fill what is left. An example
left with no label at all is dropped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lf.data.conversation import ASSISTANT
from lf.labels import IGNORE_INDEX
log = logging.getLogger("lf")


def split_budget(prompt_len: int, response_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response tokens of one turn fit in `budget` (the rule in the module docstring)."""
    if prompt_len + response_len <= budget:
        return prompt_len, response_len
    if 2 * response_len < budget:
        response = response_len
    elif 2 * prompt_len < budget:
        response = budget - prompt_len
    else:
        response = max(1, budget * response_len // (prompt_len + response_len))
    response = min(response, response_len, budget)
    return min(prompt_len, budget - response), response


@dataclass(frozen=True)
class Options:
    """What the processors read from the data arguments (picklable, for `num_proc` workers)."""

    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False

    @classmethod
    def from_args(cls, data_args) -> "Options":
        return cls(data_args.cutoff_len, data_args.train_on_prompt, data_args.mask_history)


def _conversations(batch, reply_index: int = 0):
    """(messages, system, tools) per row, the conversation ending with the row's reply number `reply_index`
    (an empty assistant reply where the row has none: prediction data)."""
    for prompt, response, system, tools in zip(batch["prompt"], batch["response"], batch["system"], batch["tools"]):
        reply = response[reply_index] if len(response) > reply_index else {"role": ASSISTANT, "content": ""}
        yield list(prompt) + [reply], system or None, tools or None


def _build(turns, options: Options) -> tuple[list[int], list[int]]:
    """input_ids and labels of one encoded conversation (a list of (prompt_ids, response_ids)), cut to fit."""
    order = list(range(len(turns)))
    if options.mask_history:
        order.reverse()
    budget, kept = options.cutoff_len, {}
    for i in order:
        if budget <= 0:
            break
        prompt_ids, response_ids = turns[i]
        p, r = split_budget(len(prompt_ids), len(response_ids), budget)
        kept[i] = prompt_ids[:p], response_ids[:r]
        budget -= p + r
    input_ids, labels = [], []
    last = len(turns) - 1
    for i in sorted(kept):
        prompt_ids, response_ids = kept[i]
        learn = not options.mask_history or i == last
        input_ids += prompt_ids + response_ids
        labels += (prompt_ids if options.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids))
        labels += response_ids if learn else [IGNORE_INDEX] * len(response_ids)
    return input_ids, labels


def _has_label(labels: list[int]) -> bool:
    return labels.count(IGNORE_INDEX) < len(labels)


def _note_dropped(kind: str, dropped: int, total: int) -> None:
    if dropped:
        log.warning("%s: dropped %d of %d examples with nothing to learn from (empty reply, or cut away by "
                    "cutoff_len)", kind, dropped, total)


def _with_images(conversations, batch, media):
    """The conversations with their media placeholders (images, videos, audios) expanded by `media` (an
    lf.data.mm_plugins.MMProcessor), each row's media references ({column: refs}, resolved) and its media token
    count."""
    expanded, refs, counts = [], [], []
    for i, (messages, system, tools) in enumerate(conversations):
        messages, row_refs, count = media.expand(messages, {c: batch[c][i] for c in media.columns if c in batch})
        expanded.append((messages, system, tools))
        refs.append(row_refs)
        counts.append(count)
    return expanded, refs, counts


def _media_columns(media) -> dict:
    """The output's media columns (empty lists to fill), none without `media`."""
    return {column: [] for column in media.columns} if media is not None else {}


def _keep_media(out: dict, row_refs: dict) -> None:
    for column, refs in row_refs.items():
        out[column].append(refs)


def _whole(ids: list[int], count: int, media) -> bool:
    """Whether `ids` hold all `count` media tokens of their example (the model needs every token of an item, or
    none of the item); always true without `media`."""
    return media is None or media.media_tokens(ids) == count


def _note_cut_images(kind: str, cut: int, total: int, options: Options) -> None:
    if cut:
        log.warning("%s: dropped %d of %d examples whose media tokens cutoff_len (%d) cuts into: raise cutoff_len, or "
                    "lower image_max_pixels / video_max_pixels / video_maxlen", kind, cut, total, options.cutoff_len)


def supervised(batch, *, template, tokenizer, options: Options, media=None) -> dict:
    """sft: input_ids and labels (the replies, every turn's or the last one's with `mask_history`); with `media`,
    also each example's media, its placeholders expanded into the model's media tokens."""
    out = {"input_ids": [], "labels": [], **_media_columns(media)}
    conversations = list(_conversations(batch))
    refs, counts = [{}] * len(conversations), [0] * len(conversations)
    if media is not None:
        conversations, refs, counts = _with_images(conversations, batch, media)
    encoded = template.encode_many(tokenizer, conversations)
    cut_images = 0
    for turns, row_refs, count in zip(encoded, refs, counts):
        input_ids, labels = _build(turns, options)
        if not _whole(input_ids, count, media):
            cut_images += 1
            continue
        if _has_label(labels):
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            _keep_media(out, row_refs)
    _note_cut_images("supervised", cut_images, len(encoded), options)
    _note_dropped("supervised", len(encoded) - len(out["input_ids"]) - cut_images, len(encoded))
    return out


def _encode_oneturn(template, tokenizer, conversations):
    """(prompt_ids, response_ids) per conversation, every turn before the last folded into the prompt."""
    pairs = []
    for turns in template.encode_many(tokenizer, conversations):
        prompt = [t for p, r in turns[:-1] for t in p + r] + turns[-1][0]
        pairs.append((prompt, turns[-1][1]))
    return pairs


def unsupervised(batch, *, template, tokenizer, options: Options, media=None) -> dict:
    """Prediction: input_ids end where the model's reply starts; labels hold the reference reply (if any); with
    `media`, also each example's media, as `supervised` expands them."""
    out = {"input_ids": [], "labels": [], **_media_columns(media)}
    conversations = list(_conversations(batch))
    refs, counts = [{}] * len(conversations), [0] * len(conversations)
    if media is not None:
        conversations, refs, counts = _with_images(conversations, batch, media)
    pairs = _encode_oneturn(template, tokenizer, conversations)
    for (prompt, response), row_refs, count in zip(pairs, refs, counts):
        p, r = split_budget(len(prompt), len(response), options.cutoff_len)
        if not _whole(prompt[:p], count, media):
            continue
        out["input_ids"].append(prompt[:p])
        out["labels"].append(response[:r])
        _keep_media(out, row_refs)
    _note_cut_images("prediction", len(pairs) - len(out["input_ids"]), len(pairs), options)
    return out


def _keep_whole(out: dict, made: dict, row_refs: dict, count: int, media) -> bool:
    """Append an example's rows (`made`: {prefix: (input_ids, labels)}) and its media to `out` when every row holds
    all `count` of its media tokens; whether it did."""
    if not all(_whole(ids, count, media) for ids, _ in made.values()):
        return False
    for prefix, (ids, labels) in made.items():
        out[f"{prefix}input_ids"].append(ids)
        out[f"{prefix}labels"].append(labels)
    _keep_media(out, row_refs)
    return True


def pairwise(batch, *, template, tokenizer, options: Options, media=None) -> dict:
    """rm/dpo/orpo/simpo: the prompt followed by the chosen reply, and by the rejected one (same prompt cut); with
    `media`, also each example's images (the prompt's: both replies are read with them)."""
    keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    out = {**{key: [] for key in keys}, **_media_columns(media)}
    rows = [i for i, response in enumerate(batch["response"]) if len(response) >= 2]
    sides = [list(_conversations(batch, 0)), list(_conversations(batch, 1))]
    refs, counts = [{}] * len(sides[0]), [0] * len(sides[0])
    if media is not None:
        (sides[0], refs, counts), (sides[1], _, _) = (_with_images(side, batch, media) for side in sides)
    chosen, rejected = (_encode_oneturn(template, tokenizer, side) for side in sides)
    cut_images = 0
    for i in rows:
        prompt = chosen[i][0]
        longest = max(len(chosen[i][1]), len(rejected[i][1]))
        p, r = split_budget(len(prompt), longest, options.cutoff_len)
        prompt_labels = prompt[:p] if options.train_on_prompt else [IGNORE_INDEX] * p
        made = {prefix: (prompt[:p] + reply[:r], prompt_labels + reply[:r])
                for prefix, (_, reply) in (("chosen_", chosen[i]), ("rejected_", rejected[i]))}
        cut_images += not _keep_whole(out, made, refs[i], counts[i], media)
    _note_cut_images("pairwise", cut_images, len(rows), options)
    _note_dropped("pairwise", len(batch["response"]) - len(rows), len(batch["response"]))
    return out


def feedback(batch, *, template, tokenizer, options: Options, media=None) -> dict:
    """kto: each example with its desirable flag, plus a mismatched pair (this prompt, the next row's reply) that
    KTO uses to estimate the KL term; with `media`, also each example's images (the prompt's: the mismatched pair
    is read with them too)."""
    out = {"input_ids": [], "labels": [], "kl_input_ids": [], "kl_labels": [], "kto_tags": [], **_media_columns(media)}
    conversations = list(_conversations(batch))
    refs, counts = [{}] * len(conversations), [0] * len(conversations)
    if media is not None:
        conversations, refs, counts = _with_images(conversations, batch, media)
    pairs = _encode_oneturn(template, tokenizer, conversations)
    cut_images = 0
    for i, ((prompt, reply), tag) in enumerate(zip(pairs, batch["kto_tag"])):
        if tag is None or not reply:
            continue
        other_reply = pairs[(i + 1) % len(pairs)][1]
        made = {}
        for prefix, response in (("", reply), ("kl_", other_reply)):
            p, r = split_budget(len(prompt), len(response), options.cutoff_len)
            prompt_labels = prompt[:p] if options.train_on_prompt else [IGNORE_INDEX] * p
            made[prefix] = prompt[:p] + response[:r], prompt_labels + response[:r]
        if _keep_whole(out, made, refs[i], counts[i], media):
            out["kto_tags"].append(bool(tag))
        else:
            cut_images += 1
    _note_cut_images("feedback", cut_images, len(pairs), options)
    _note_dropped("feedback (kto rows need a reply and a kto_tag)", len(pairs) - len(out["kto_tags"]) - cut_images,
                  len(pairs))
    return out


def pretrain(batch, *, template, tokenizer, options: Options, concatenate: bool = True) -> dict:
    """pt: each row's text (prompt and reply contents) ends with eos; with `concatenate`, all texts of the batch
    are joined and cut into `cutoff_len` blocks (the last partial block is dropped), else each is cut alone."""
    texts = [" ".join(m["content"] for m in list(prompt) + list(response))
             for prompt, response in zip(batch["prompt"], batch["response"])]
    eos = tokenizer.eos_token or ""
    ids = tokenizer([text + eos for text in texts], add_special_tokens=False)["input_ids"]
    n = options.cutoff_len
    if concatenate:
        stream = [t for row in ids for t in row]
        blocks = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    else:
        blocks = [row[:n] for row in ids if row]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


# a stage's kind of examples (lf.stages' `data`) -> its processor; read-only
PROCESSORS: Mapping[str, Callable] = MappingProxyType({
    "text": pretrain,
    "supervised": supervised,
    "pairs": pairwise,
    "feedback": feedback,
    "prompts": unsupervised,
})
