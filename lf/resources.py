"""lf's own data folders (data/: the demo datasets the tiny model's tokenizer learns from; evaluation/: the demo
task): the repository's in a source checkout, the copies under lf/_share/ in an installed wheel."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The folder `name` (data or evaluation) that ships with lf."""
    installed = _PACKAGE / "_share" / name
    return installed if installed.is_dir() else _PACKAGE.parent / name
