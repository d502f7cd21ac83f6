"""alpaca | sharegpt | openai rows -> canonical rows (lf.data.conversation), converted by batched `datasets.map`.

alpaca: prompt = the history column's [query, response] pairs as user/assistant turns, then one user turn: the
  prompt column's text and the query column's joined by a newline (an empty one is left out); response =
  [assistant: the response column], or [chosen, rejected] for ranking data.
  Plain text (pretraining data: an alpaca entry without a response column, such as a lone `prompt: text`):
  prompt = [user: the text], response = []. The canonical contract wants a prompt turn, so the text sits there;
  the pretraining processor concatenates the prompt and response contents into the document. Prompts to predict
  on (no response column) come out the same way.
sharegpt: the messages column holds {role_tag: role, content_tag: text} messages. A leading system-role message
  is the system prompt (a non-empty system column wins over it). The other turns must alternate a prompt role
  (user, observation) and a reply role (assistant, function) and end with a reply: the last reply is the
  response, the turns before it the prompt. Ranking rows end with a prompt turn instead, and their
  chosen/rejected columns hold one reply message each.
openai: sharegpt's rules on OpenAI chat messages. An assistant message with `tool_calls` (or the older
  `function_call`) is a function turn whose content is the call as JSON {"name", "arguments"} (a list of them
  for several calls; arguments given as a JSON string are parsed; text beside the calls is dropped, as the
  canonical function turn holds calls only). Consecutive tool-role messages are one observation turn: the
  result itself, or a JSON list of the results when there are several. Content given as a list of parts keeps
  its text parts (joined by newlines); a row with another kind of part (an image) is skipped.
Every formatting: an images column gives the row's images (a path, bytes, a {"bytes", "path"} dict as `datasets`
  stores an image, a PIL image, or a list of them), kept undecoded as {"bytes", "path"}; videos and audios columns
  give the row's video and audio files the same way. Each column's count must equal its placeholders ("<image>",
  "<video>", "<audio>") in the prompt and first reply, else the conversion stops with the file and row.
Every formatting: a kto_tag column gives the row's true/false label; a tools column is kept when it is text and
JSON-encoded (as a list) when it is structured; an empty one ("", "[]", null) becomes "". Non-text values of text
fields are JSON-encoded.
A row that cannot be converted (turns out of order, an unknown role, a null response...) is skipped, and the
count is logged once per dataset with the first such row (rows counted from 0, as `dataset[i]`); a dataset with
no usable row left is an error. Streams cannot be counted ahead: their first unusable row is logged, and only
their first batch is checked for usable rows.
"""

import io
import json
import logging
from collections import Counter
from itertools import groupby
from types import MappingProxyType

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lf.data import cache
from lf.data.conversation import (ASSISTANT, FUNCTION, OBSERVATION, PLACEHOLDERS, PROMPT_ROLES, REPLY_ROLES, USER,
                                  canonical_row)
from lf.data.registry import DEFAULT_COLUMNS, IMAGES, MEDIA_COLUMNS, DatasetAttr
from lf.errors import DataError

logger = logging.getLogger(__name__)

_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
IMAGE_REFS = datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})  # any media
FEATURES = datasets.Features({"prompt": _MESSAGES, "response": _MESSAGES, "system": datasets.Value("string"),
                              "tools": datasets.Value("string"), "kto_tag": datasets.Value("bool"),
                              **{column: IMAGE_REFS for column in MEDIA_COLUMNS}})
_SKIP = "_skip"  # while converting: why a row is skipped, None when it is usable
_CONVERTING = datasets.Features({**FEATURES, _SKIP: datasets.Value("string")})
_SCHEMA = _CONVERTING.arrow_schema
_EMPTY = canonical_row([], [])


class SkipRow(Exception):
    """Raised by a converter for a row it cannot convert; the message is the reason, shared by similar rows."""




def alpaca(row: dict, attr: DatasetAttr) -> dict:
    prompt = _history(row.get("history"))
    prompt.append(_message(USER, "\n".join(t for t in (_text(row.get("prompt")), _text(row.get("query"))) if t)))
    if attr.ranking:
        response = [_message(ASSISTANT, _required_text(row, key)) for key in ("chosen", "rejected")]
    elif "response" in row:
        response = [_message(ASSISTANT, _required_text(row, "response"))]
    else:  # pretraining text, or prompts to predict on
        response = []
    return canonical_row(prompt, response, _text(row.get("system")), _tools(row.get("tools")), _kto_tag(row),
                         **_media(row))


def sharegpt(row: dict, attr: DatasetAttr) -> dict:
    return _dialogue(row, attr, _sharegpt_turns)


def openai(row: dict, attr: DatasetAttr) -> dict:
    return _dialogue(row, attr, _openai_turns)


# formatting name -> converter(row keyed by the entry's column keys, DatasetAttr) -> canonical row, or SkipRow
CONVERTERS = MappingProxyType({"alpaca": alpaca, "sharegpt": sharegpt, "openai": openai})


def to_canonical(raw, attr: DatasetAttr, *, num_proc: int | None = None, batch_size: int = 1000):
    """`raw` (a Dataset or IterableDataset read for `attr`) as canonical rows: columns prompt, response, system,
    tools, kto_tag only; unusable rows skipped (see the module's docstring)."""
    names = _column_names(raw)
    _check_columns(attr, names)
    if IMAGES in attr.columns:
        raw = _undecoded(raw, attr.columns[IMAGES])
    if isinstance(raw, datasets.IterableDataset):
        return _convert_stream(raw, attr, batch_size, remove=names)
    convert = _BatchConverter(attr)
    converted = raw.map(convert.table, input_columns=list(convert.columns), batched=True, batch_size=batch_size,
                        with_indices=True, remove_columns=names, features=_CONVERTING, num_proc=num_proc,
                        desc=f"Converting {attr.name}")
    return _usable(converted, attr)


def _check_columns(attr: DatasetAttr, names: list[str]):
    missing = {key: column for key, column in attr.columns.items() if column not in names}
    if not missing:
        return
    defaults = DEFAULT_COLUMNS[attr.formatting]
    hint = (f" ({attr.formatting} formatting's defaults, used when an entry has no \"columns\": "
            f"{', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
            if all(defaults.get(key) == column for key, column in missing.items()) else "")
    raise DataError(f"dataset {attr.name!r}: column {', '.join(f'{c!r} ({k})' for k, c in missing.items())} not "
                    f"in the data, whose columns are {', '.join(map(repr, names)) or 'none'}{hint}. Name the "
                    f"data's columns in the \"columns\" of its dataset_info.json entry.")


class _BatchConverter:
    """Map functions: a batch of the entry's columns -> canonical columns."""

    def __init__(self, attr: DatasetAttr):
        self.attr = attr
        self.columns = tuple(dict.fromkeys(attr.columns.values()))  # two keys may name one column
        self.picks = tuple((key, self.columns.index(column)) for key, column in attr.columns.items())
        self.code = cache.SOURCE  # expires cached conversions when lf's data code changes
        self.logged = False

    def rows(self, columns, indices) -> dict:
        """Canonical columns, and _SKIP: each row's reason to be skipped (None for a usable row)."""
        convert, out = CONVERTERS[self.attr.formatting], {key: [] for key in _CONVERTING}
        for index, values in zip(indices, zip(*columns)):
            try:
                row, reason = convert({key: values[i] for key, i in self.picks}, self.attr), None
            except SkipRow as skip:
                row, reason = _EMPTY, str(skip)
            _check_placeholders(row, self.attr, index)
            for key, value in row.items():
                out[key].append(value)
            out[_SKIP].append(reason)
        return out

    def table(self, *columns_and_indices) -> pa.Table:
        """For a Dataset: all rows with their reasons, as Arrow (written as is, faster than encoding lists)."""
        *columns, indices = columns_and_indices
        return pa.Table.from_pydict(self.rows(columns, indices), schema=_SCHEMA)

    def usable(self, *columns_and_indices) -> dict:
        """For a stream: its usable rows only; logs its first unusable one (its total is unknown until its end).
        A stream's map drops them itself: chaining a filter costs `datasets` more than the conversion."""
        *columns, indices = columns_and_indices
        out = self.rows(columns, indices)
        reasons = out.pop(_SKIP)
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        if len(keep) == len(reasons):
            return out
        if not self.logged:
            first = next(i for i, reason in enumerate(reasons) if reason is not None)
            logger.warning("dataset %s: skipping row %d (%s) and any later unusable row of the stream",
                           self.attr.name, indices[first], reasons[first])
            self.logged = True
        return {key: [values[i] for i in keep] for key, values in out.items()}


def _convert_stream(raw: datasets.IterableDataset, attr: DatasetAttr, batch_size: int, remove: list[str]):
    convert = _BatchConverter(attr)
    head = list(raw.take(batch_size))  # a dataset none of whose first rows is usable fails now, not mid-training
    if not head:
        raise DataError(f"dataset {attr.name!r} has no rows.")
    reasons = convert.rows([[row[column] for row in head] for column in convert.columns], range(len(head)))[_SKIP]
    if all(reasons):
        raise _no_usable_row(attr, f"its first {len(head)} rows", reasons, 0)
    return raw.map(convert.usable, input_columns=list(convert.columns), batched=True, batch_size=batch_size,
                   with_indices=True, remove_columns=remove, features=FEATURES)


def _column_names(raw) -> list[str]:
    if raw.column_names is not None:
        return raw.column_names
    first = next(iter(raw), None)  # a stream whose features are unknown until read
    return list(first or ())


def _summary(reasons) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in Counter(reasons).most_common())


def _no_usable_row(attr: DatasetAttr, how_many: str, reasons, first: int) -> DataError:
    return DataError(f"dataset {attr.name!r}: no usable row: {how_many} were skipped ({_summary(reasons)}), e.g. "
                     f"row {first}. Check the \"formatting\", \"columns\" and \"tags\" of its dataset_info.json "
                     f"entry against the data.")


def _usable(converted: datasets.Dataset, attr: DatasetAttr) -> datasets.Dataset:
    reasons = converted.data.column(_SKIP)
    total, skipped = len(reasons), len(reasons) - reasons.null_count
    if total == 0:
        raise DataError(f"dataset {attr.name!r} has no rows.")
    if skipped == 0:
        return converted.remove_columns(_SKIP)
    bad = pc.is_valid(reasons).to_numpy()
    first, listed = int(np.argmax(bad)), reasons.drop_null().to_pylist()
    if skipped == total:
        raise _no_usable_row(attr, f"all {total} rows", listed, first)
    logger.warning("dataset %s: skipped %d of %d rows (%s), e.g. row %d", attr.name, skipped, total,
                   _summary(listed), first)
    return converted.select(np.flatnonzero(~bad)).remove_columns(_SKIP)


# -- rows


def _undecoded(raw, column: str):
    """`raw` with its image column kept as stored ({"bytes", "path"}): images decode later, one batch at a time."""
    feature = (raw.features or {}).get(column)
    inner = getattr(feature, "feature", feature)  # a list of images, or one image per row
    if not isinstance(inner, datasets.Image) or not inner.decode:
        return raw
    undecoded = datasets.Image(decode=False)
    return raw.cast_column(column, datasets.List(undecoded) if inner is not feature else undecoded)


def _media(row: dict) -> dict:
    """The row's media columns, each as a list of {"bytes", "path"}."""
    return {column: _refs(row.get(column), column) for column in MEDIA_COLUMNS}


def _refs(value, column: str) -> list[dict]:
    """A media column's value as a list of {"bytes", "path"}."""
    if value is None:
        return []
    refs = []
    for image in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(image, str):
            refs.append({"bytes": None, "path": image})
        elif isinstance(image, (bytes, bytearray)):
            refs.append({"bytes": bytes(image), "path": None})
        elif isinstance(image, dict) and (image.get("bytes") or image.get("path")):
            refs.append({"bytes": image.get("bytes"), "path": image.get("path")})
        elif hasattr(image, "save") and hasattr(image, "size"):  # a PIL image
            encoded = io.BytesIO()
            image.save(encoded, format=image.format or "PNG")
            refs.append({"bytes": encoded.getvalue(), "path": None})
        else:
            raise SkipRow(f"{column} item not a path, bytes or an image ({type(image).__name__})")
    return refs


def _check_placeholders(row: dict, attr: DatasetAttr, index: int) -> None:
    """A row of a dataset with a media column has one placeholder ("<image>", ...) per item in its prompt and first
    reply: any other count would feed the model media it cannot place (or placeholders with nothing behind them)."""
    messages = list(row["prompt"]) + list(row["response"][:1])
    for column in MEDIA_COLUMNS:
        if column not in attr.columns:
            continue
        mark = PLACEHOLDERS[column]
        placeholders = sum(m["content"].count(mark) for m in messages)
        if placeholders != len(row[column]):
            raise DataError(f"dataset {attr.name!r} ({attr.path}), row {index}: {placeholders} {mark} placeholder(s) "
                            f"in its messages but {len(row[column])} {column[:-1]}(s) in column "
                            f"{attr.columns[column]!r}: put one {mark} in the text where each of them goes")


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(_drop_nulls(value), ensure_ascii=False)


def _drop_nulls(value):
    """Structured data without null-valued keys: Arrow gives each struct every key that any row has."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return [_drop_nulls(v) for v in value] if isinstance(value, list) else value


def _required_text(row: dict, key: str) -> str:
    if row[key] is None:
        raise SkipRow(f"null {key}")
    return _text(row[key])


def _tools(value) -> str:
    if value is None or isinstance(value, str):  # "" is the one way to say none
        return "" if value is None or value.strip() in ("", "[]", "null") else value
    return _text(value if isinstance(value, list) else [value]) if value else ""


def _kto_tag(row: dict) -> bool | None:
    if "kto_tag" not in row:
        return None
    if not isinstance(row["kto_tag"], bool):
        raise SkipRow("kto_tag not true/false")
    return row["kto_tag"]


def _history(pairs) -> list[dict]:
    messages = []
    for pair in pairs or ():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise SkipRow("history not [query, response] pairs")
        messages += (_message(USER, _text(pair[0])), _message(ASSISTANT, _text(pair[1])))
    return messages


def _dialogue(row: dict, attr: DatasetAttr, read_turns) -> dict:
    tags, messages = attr.tags, row["messages"]
    if not isinstance(messages, list):
        raise SkipRow("no turns" if messages is None else "messages not a list")
    system = ""
    if messages and isinstance(messages[0], dict) and messages[0].get(tags["role_tag"]) == tags["system_tag"]:
        system, messages = _content(messages[0], tags), messages[1:]
    turns = read_turns(messages, tags)
    if not turns:
        raise SkipRow("no turns")
    for i, turn in enumerate(turns):
        if turn["role"] not in (REPLY_ROLES if i % 2 else PROMPT_ROLES):
            raise SkipRow("turns not alternating user/assistant")
    if attr.ranking:
        if len(turns) % 2 == 0:
            raise SkipRow("ranking row ending with a reply, not a prompt turn")
        prompt, response = turns, [_reply(row[key], key, tags, read_turns) for key in ("chosen", "rejected")]
    elif len(turns) % 2:
        raise SkipRow("no reply after the last prompt turn")
    else:
        prompt, response = turns[:-1], turns[-1:]
    system = _text(row.get("system")) or system
    return canonical_row(prompt, response, system, _tools(row.get("tools")), _kto_tag(row), **_media(row))


def _reply(message, key: str, tags, read_turns) -> dict:
    turns = read_turns([message], tags) if isinstance(message, dict) else []
    if len(turns) != 1 or turns[0]["role"] not in REPLY_ROLES:
        raise SkipRow(f"{key} not a reply message")
    return turns[0]


def _roles(tags) -> dict:
    return {tags["user_tag"]: USER, tags["assistant_tag"]: ASSISTANT, tags["observation_tag"]: OBSERVATION,
            tags["function_tag"]: FUNCTION}


def _role(message, tags, roles: dict):
    """The tag of a message whose role is known, or SkipRow saying what is wrong with it."""
    if not isinstance(message, dict):
        raise SkipRow("message not an object")
    tag = message.get(tags["role_tag"])
    if tag not in roles:
        raise SkipRow("system message after the first turn" if tag == tags["system_tag"] else f"unknown role {tag!r}")
    return tag


def _content(message: dict, tags) -> str:
    value = message.get(tags["content_tag"])
    if not isinstance(value, list):
        return _text(value)
    texts = []
    for part in value:  # OpenAI-style content parts
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise SkipRow(f"non-text content ({kind})")
        texts.append(_text(part.get("text")))
    return "\n".join(texts)


def _sharegpt_turns(messages: list, tags) -> list[dict]:
    roles = _roles(tags)
    return [_message(roles[_role(m, tags, roles)], _content(m, tags)) for m in messages]


def _openai_turns(messages: list, tags) -> list[dict]:
    roles = _roles(tags)
    turns = []
    for m in messages:
        tag = _role(m, tags, roles)
        calls = m.get("tool_calls") or m.get("function_call")
        turns.append((FUNCTION, _calls(calls)) if tag == tags["assistant_tag"] and calls
                     else (roles[tag], _content(m, tags)))
    merged = []
    for role, group in groupby(turns, key=lambda turn: turn[0]):
        contents = [content for _, content in group]
        if role == OBSERVATION:  # the results of one round of calls
            contents = [contents[0] if len(contents) == 1 else json.dumps(contents, ensure_ascii=False)]
        merged += (_message(role, content) for content in contents)
    return merged


def _calls(calls) -> str:
    calls = calls if isinstance(calls, list) else [calls]
    parsed = []
    for call in calls:
        if not isinstance(call, dict):
            raise SkipRow("tool call not an object")
        function = call.get("function") or call  # a tool call wraps its function; the older function_call is one
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # arguments that are not JSON stay the text they are
        parsed.append({"name": function.get("name"), "arguments": _drop_nulls(arguments)})
    return json.dumps(parsed[0] if len(parsed) == 1 else parsed, ensure_ascii=False)
