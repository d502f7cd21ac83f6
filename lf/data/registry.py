"""dataset_info.json -> DatasetAttr: where each named dataset is and how its columns map to canonical rows.

The file follows LLaMA-Factory's schema unchanged: a JSON object from dataset names to entries with keys
  file_name | hf_hub_url | ms_hub_url  where the data is (a hub url wins over file_name; ms_hub_url is used when
                                       it is the only one, or when USE_MODELSCOPE_HUB is set);
  formatting  alpaca (default) | sharegpt | openai;     ranking  preference data (chosen/rejected);
  subset, split (default train), folder                 a hub dataset's config, split and data folder;
  num_samples  rows to draw from the dataset;           columns, tags  see below.
`columns` maps canonical keys (prompt, query, response, history, messages, system, tools, chosen, rejected, kto_tag,
images, videos, audios) to the data's column names. Without `columns` an entry gets its formatting's defaults
(alpaca: instruction, input, output; sharegpt: conversations; openai: messages); with `columns` it gets exactly the
columns named there, plus the formatting's main column (prompt or messages) when it is not named. Ranking entries
default chosen/rejected to "chosen"/"rejected". `tags` (sharegpt/openai) name the message keys and role values;
unnamed ones keep the formatting's defaults (openai: role/content, user/assistant/system, "tool" for results).
`dataset_dir` "ONLINE" (no file) makes every name a Hugging Face hub id read with alpaca defaults.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from lf.errors import DataError, did_you_mean

INFO_FILE = "dataset_info.json"
ONLINE = "ONLINE"

SOURCE_KEYS = {"hf_hub_url": "hf_hub", "ms_hub_url": "ms_hub", "file_name": "file"}
# Keys LLaMA-Factory knows that lf cannot load from: named in the error instead of "unknown key".
UNSUPPORTED_SOURCES = {"script_url": "dataset loading scripts", "cloud_file_name": "cloud storage (s3/gcs) files",
                       "om_hub_url": "the Modelers (openMind) hub"}
ENTRY_KEYS = (*SOURCE_KEYS, *UNSUPPORTED_SOURCES, "formatting", "ranking", "subset", "split", "folder", "num_samples",
              "columns", "tags")
IMAGES = "images"  # image paths (relative to media_dir) or in-memory images
MEDIA_COLUMNS = (IMAGES, "videos", "audios")  # videos, audios: file paths (relative to media_dir)
_SHARED_COLUMNS = ("system", "tools", "chosen", "rejected", "kto_tag", *MEDIA_COLUMNS)
# The column keys each formatting reads: one of the other family's means a mistaken `formatting`.
READ_COLUMNS = {"alpaca": ("prompt", "query", "response", "history", *_SHARED_COLUMNS),
                "sharegpt": ("messages", *_SHARED_COLUMNS), "openai": ("messages", *_SHARED_COLUMNS)}
COLUMN_KEYS = (*READ_COLUMNS["alpaca"], "messages")
DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                   "sharegpt": {"messages": "conversations"}, "openai": {"messages": "messages"}}
DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"},
}
TAG_KEYS = tuple(DEFAULT_TAGS["sharegpt"])
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class DatasetAttr:
    """One dataset_info.json entry, checked, with its defaults filled in."""

    name: str
    source: str  # "file" | "hf_hub" | "ms_hub"
    path: str  # file_name (a file or folder, relative to dataset_dir) or the hub id
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: Mapping[str, str] = field(default_factory=dict)  # canonical key -> the data's column name
    tags: Mapping[str, str] = field(default_factory=dict)  # sharegpt/openai message keys and role values

    def __post_init__(self):  # read-only, whatever mapping was passed
        object.__setattr__(self, "columns", MappingProxyType(dict(self.columns)))
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))

    def __hash__(self):  # a mappingproxy is unhashable; equal attrs share these three
        return hash((self.name, self.source, self.path))

    def __reduce__(self):  # a mappingproxy does not pickle (spawned DataLoader workers pickle dataset maps)
        values = (getattr(self, f.name) for f in fields(self))
        return DatasetAttr, tuple(dict(v) if isinstance(v, Mapping) else v for v in values)


def dataset_attrs(names: str | list[str] | None, dataset_dir: str) -> list[DatasetAttr]:
    """The entries for `names` ("a,b" or a list; None or empty: none) from `dataset_dir`/dataset_info.json."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names or ())]
    names = [n for n in names if n]
    if not names:
        return []
    if dataset_dir == ONLINE:
        return [_online(name) for name in names]
    info_path = os.path.join(dataset_dir, INFO_FILE)
    info = _read_info(info_path, dataset_dir)
    attrs = []
    for name in names:
        if name not in info:
            raise DataError(f"dataset {name!r} is not in {info_path}.{did_you_mean(name, info)} "
                            f"Add an entry for it there, or set `dataset_dir` to the folder that has one.")
        attrs.append(_parse_entry(name, info[name], info_path))
    return attrs


def _online(name: str) -> DatasetAttr:
    source = "ms_hub" if env_flag("USE_MODELSCOPE_HUB") else "hf_hub"
    return DatasetAttr(name, source, name, columns=DEFAULT_COLUMNS["alpaca"])


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is on (1, true, yes or on)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def _read_info(info_path: str, dataset_dir: str) -> dict:
    if not os.path.isfile(info_path):
        raise DataError(f"{info_path} does not exist: `dataset_dir` ({dataset_dir!r}) must be the folder holding "
                        f"{INFO_FILE} (or {ONLINE!r} to read every dataset name as a Hugging Face hub id).")
    with open(info_path, encoding="utf-8") as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{info_path}, line {err.lineno} column {err.colno}: {err.msg}.") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path} must hold a JSON object mapping dataset names to entries, "
                        f"not a {type(info).__name__}.")
    return info


def _parse_entry(name: str, entry, info_path: str) -> DatasetAttr:
    where = f"dataset {name!r} in {info_path}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: the entry must be a JSON object, not {entry!r}.")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise DataError(f"{where}: unknown key {key!r}.{did_you_mean(key, ENTRY_KEYS)}")
    source, path = _source(entry, where)
    formatting = _get(entry, "formatting", str, "alpaca", where)
    if formatting not in DEFAULT_COLUMNS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {', '.join(DEFAULT_COLUMNS)}."
                        f"{did_you_mean(formatting, DEFAULT_COLUMNS)}")
    ranking = _get(entry, "ranking", bool, False, where)
    num_samples = _get(entry, "num_samples", int, None, where)
    if num_samples is not None and num_samples < 1:
        raise DataError(f"{where}: num_samples must be at least 1, not {num_samples}.")
    split = _get(entry, "split", str, "train", where)
    if source == "file" and split != "train":
        raise DataError(f"{where}: a local file has a single split (train), so split {split!r} cannot be read; "
                        f"remove \"split\" or register the split's own file.")
    return DatasetAttr(name, source, path, formatting, ranking, _get(entry, "subset", str, None, where), split,
                       _get(entry, "folder", str, None, where), num_samples,
                       _columns(entry, formatting, ranking, where), _tags(entry, formatting, where))


def _source(entry: dict, where: str) -> tuple[str, str]:
    """(source, path) in LLaMA-Factory's order: a hub url, then the sources lf lacks, then file_name."""
    given = {key: value for key in SOURCE_KEYS if (value := _get(entry, key, str, None, where))}
    modelscope = "ms_hub_url" in given and (env_flag("USE_MODELSCOPE_HUB") or "hf_hub_url" not in given)
    hub = "ms_hub_url" if modelscope else "hf_hub_url"
    if hub in given:
        return SOURCE_KEYS[hub], given[hub]
    unsupported = [key for key in UNSUPPORTED_SOURCES if key in entry]
    if unsupported:
        raise DataError(f"{where}: lf cannot read {UNSUPPORTED_SOURCES[unsupported[0]]} ({unsupported[0]}); "
                        f"download the data and register it with \"file_name\" alone, or use \"hf_hub_url\".")
    if "file_name" in given:
        return "file", given["file_name"]
    raise DataError(f"{where}: the entry says nowhere to read the data from: give \"file_name\" (a file or folder "
                    f"in dataset_dir), \"hf_hub_url\" or \"ms_hub_url\".")


def _get(entry: dict, key: str, kind: type, default, where: str):
    value = entry.get(key, default)
    # bool is an int to Python: `"num_samples": true` must not pass as 1
    if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        wanted = {str: "a string", bool: "true or false", int: "a whole number"}[kind]
        raise DataError(f"{where}: {key} must be {wanted}, not {value!r}.")
    return value


def _names(mapping, allowed: tuple[str, ...], what: str, where: str) -> dict:
    """`mapping` checked as a JSON object from keys in `allowed` to non-empty strings."""
    if not isinstance(mapping, dict):
        raise DataError(f"{where}: {what} must be a JSON object, not {mapping!r}.")
    for key, value in mapping.items():
        if key not in allowed:
            raise DataError(f"{where}: unknown key {key!r} in {what}.{did_you_mean(key, allowed)} "
                            f"Known: {', '.join(allowed)}.")
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: {what}.{key} must be a non-empty string, not {value!r}.")
    return mapping


def _columns(entry: dict, formatting: str, ranking: bool, where: str) -> dict:
    if "columns" in entry:
        main = "prompt" if formatting == "alpaca" else "messages"
        columns = {main: DEFAULT_COLUMNS[formatting][main], **_names(entry["columns"], COLUMN_KEYS, "columns", where)}
    else:
        columns = dict(DEFAULT_COLUMNS[formatting])
        if ranking:  # ranking rows answer with chosen/rejected, not the default output column
            del columns["response"]
    wrong = [key for key in columns if key not in READ_COLUMNS[formatting]]
    if wrong:
        hint = 'set "formatting": "sharegpt" (or "openai")' if formatting == "alpaca" else "use alpaca formatting"
        raise DataError(f"{where}: column key {wrong[0]!r} is not read by {formatting} formatting; {hint}, or "
                        f"remove it.")
    if ranking:
        if "kto_tag" in columns or "response" in columns:
            key = "kto_tag" if "kto_tag" in columns else "response"
            raise DataError(f"{where}: ranking data answers with chosen/rejected and cannot also have {key!r}.")
        columns.setdefault("chosen", "chosen")
        columns.setdefault("rejected", "rejected")
    elif "chosen" in columns or "rejected" in columns:
        raise DataError(f"{where}: chosen/rejected columns need \"ranking\": true.")
    return columns


def _tags(entry: dict, formatting: str, where: str) -> dict:
    if formatting == "alpaca":
        if "tags" in entry:
            raise DataError(f"{where}: tags describe sharegpt/openai messages, but the formatting is alpaca; "
                            f"set \"formatting\" or remove \"tags\".")
        return {}
    tags = {**DEFAULT_TAGS[formatting], **_names(entry.get("tags", {}), TAG_KEYS, "tags", where)}
    roles = [tags[key] for key in TAG_KEYS if key not in ("role_tag", "content_tag")]
    if len(set(roles)) < len(roles):
        raise DataError(f"{where}: two roles share one tag value in {roles}; each role needs its own.")
    return tags
