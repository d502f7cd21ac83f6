"""One dataset's raw rows, from local files or a hub, as a `datasets.Dataset` (or `IterableDataset` when streaming).

Local files: json (a list of objects, or JSON lines), jsonl, csv, parquet, arrow, txt (one row per line, column
"text"), or a folder of such files of one type. `datasets`' builders read them into its Arrow cache, so a later
run maps the cache instead of parsing again; streamed, they are read from that cache too (the same rows either
way, and a malformed file fails before training starts). When a builder fails, the file is parsed again here to
name the line that is wrong. Hubs: Hugging Face through `datasets.load_dataset`, ModelScope through `modelscope`.
"""

import csv
import io
import json
import os
from types import MappingProxyType

import datasets

from lf.data.registry import DatasetAttr, env_flag
from lf.errors import DataError

FILE_TYPES = MappingProxyType({"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet",
                               "arrow": "arrow", "txt": "text"})  # file extension -> `datasets` builder
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def read_raw(attr: DatasetAttr, dataset_dir: str, *, streaming: bool = False, cache_dir: str | None = None):
    """`attr`'s rows as the data has them (use `converters.to_canonical` next)."""
    if attr.source == "file":
        dataset = _read_files(attr, dataset_dir, cache_dir)
        return dataset.to_iterable_dataset() if streaming else dataset
    read = _read_hf_hub if attr.source == "hf_hub" else _read_ms_hub
    return read(attr, streaming, cache_dir)


def _read_files(attr: DatasetAttr, dataset_dir: str, cache_dir: str | None) -> datasets.Dataset:
    builder, files = _data_files(attr, dataset_dir)
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        dataset.data.validate(full=True)  # pyarrow's JSON reader lets bad UTF-8 through, to fail mid-conversion
        return dataset
    except Exception as err:  # builders raise many types (DatasetGenerationError, ArrowInvalid, ParserError...)
        problem = next(filter(None, (_diagnose(builder, path) for path in files)), None)
        if problem is None:
            root = err
            while root.__cause__ or root.__context__:
                root = root.__cause__ or root.__context__
            problem = f"cannot read {files[0] if len(files) == 1 else os.path.dirname(files[0])}: {root}"
        raise DataError(f"dataset {attr.name!r}: {problem}") from err


def _data_files(attr: DatasetAttr, dataset_dir: str) -> tuple[str, list[str]]:
    """(builder, files) for a file_name that is a file or a folder of files of one type."""
    path = os.path.join(dataset_dir, attr.path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if not name.startswith(".") and os.path.isfile(os.path.join(path, name)))
        if not files:
            raise DataError(f"dataset {attr.name!r}: folder {path} holds no data files.")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"dataset {attr.name!r}: {path} does not exist (its file_name {attr.path!r} is relative to "
                        f"dataset_dir {dataset_dir!r}).")
    builders = {}
    for file in files:
        extension = os.path.splitext(file)[1].lstrip(".").lower()
        if extension not in FILE_TYPES:
            raise DataError(f"dataset {attr.name!r}: cannot read {file}: lf reads "
                            f"{', '.join('.' + e for e in FILE_TYPES)} files.")
        builders.setdefault(FILE_TYPES[extension], os.path.basename(file))
    if len(builders) > 1:
        raise DataError(f"dataset {attr.name!r}: folder {path} mixes file types "
                        f"({', '.join(f'{b}: {f}' for b, f in builders.items())}); give each type its own folder "
                        f"and entry.")
    return next(iter(builders)), files


def _diagnose(builder: str, path: str) -> str | None:
    """'file, line N: what is wrong' for a text file the builder failed on, or None when this finds nothing."""
    if builder not in _TEXT_CHECKS:
        return None  # binary formats: the builder's own message is all there is
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"{path}, line {line}: bytes that are not UTF-8 text ({err.reason})"
    found = _TEXT_CHECKS[builder](text) if text.strip() else (None, "the file is empty")
    if found is None:
        return None
    line, what = found
    return f"{path}, line {line}: {what}" if line else f"{path}: {what}"


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def _json_problem(text: str) -> tuple[int | None, str] | None:
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # one JSON document: a list of rows
            return err.lineno, f"{err.msg} (column {err.colno})"
    else:
        rows = whole if isinstance(whole, list) else [whole]
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            return None, f"item {bad} is {_kind(rows[bad])}, not an object (a row)"
        return None if rows else (None, "an empty list: no rows")
    for number, line in enumerate(text.splitlines(), 1):  # JSON lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return number, f"{err.msg} (column {err.colno})"
        if not isinstance(row, dict):
            return number, f"{_kind(row)}, not a JSON object (a row)"
    return None


def _csv_problem(text: str) -> tuple[int, str] | None:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1  # the line a record starts on (a quoted field may span lines)
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):
                return start, f"{len(row)} fields where the header has {len(header)}"
            start = reader.line_num + 1
    except csv.Error as err:
        if "end of data" in str(err):
            return start, "a quoted field starting here is never closed"
        return reader.line_num, str(err)
    return None if reader.line_num > 1 else (None, "no rows under the header")


_TEXT_CHECKS = {"json": _json_problem, "csv": _csv_problem, "text": lambda text: None}


def _read_hf_hub(attr: DatasetAttr, streaming: bool, cache_dir: str | None):
    if any(map(env_flag, OFFLINE_FLAGS)) and not datasets.config.HF_HUB_OFFLINE:
        # `datasets` reads the flag when imported: asked now, it would still go online
        raise _hub_error(attr, "offline mode was set after `datasets` was imported; set it before starting Python "
                               "to read datasets' cache")
    try:
        return datasets.load_dataset(attr.path, name=attr.subset, data_dir=attr.folder, split=attr.split,
                                     cache_dir=cache_dir, streaming=streaming)
    except (ConnectionError, FileNotFoundError) as err:
        raise _hub_error(attr, "offline mode, and it is not in the cache" if datasets.config.HF_HUB_OFFLINE
                         else str(err)) from err


def _hub_error(attr: DatasetAttr, why: str) -> DataError:
    return DataError(f"dataset {attr.name!r}: cannot load {attr.path!r} from the Hugging Face hub ({why}). Download "
                     f"it beforehand where the hub can be reached (it is then read from the cache, offline too), or "
                     f"put its files in dataset_dir and register them with \"file_name\".")


def _read_ms_hub(attr: DatasetAttr, streaming: bool, cache_dir: str | None):
    try:
        from modelscope import MsDataset
    except ImportError:
        raise DataError(f"dataset {attr.name!r} is read from the ModelScope hub ({attr.path!r}), which needs the "
                        f"modelscope package: pip install modelscope (or give the entry an \"hf_hub_url\", used "
                        f"unless USE_MODELSCOPE_HUB is set).") from None
    dataset = MsDataset.load(attr.path, subset_name=attr.subset, data_dir=attr.folder, split=attr.split,
                             cache_dir=cache_dir, use_streaming=streaming)
    return dataset.to_hf_dataset() if isinstance(dataset, MsDataset) else dataset
