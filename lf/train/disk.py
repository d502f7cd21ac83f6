"""A disk that fills up while a run writes: recognised however the writer says it, and said in one line (the file,
the space, the last good checkpoint, what to do).

Writers say it differently: Python's files raise OSError(ENOSPC) (or EDQUOT over a quota), safetensors a
SafetensorError whose text ends "No space left on device (os error 28)", and torch.save (optimizer.pt, ...) only
that its zip writer's position went wrong ("[enforce fail at inline_container.cc:...] . unexpected pos ..."), with
no errno: that one counts as a full disk when the filesystem has less than LOW bytes left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import traceback
from pathlib import Path

from lf.errors import TrainError
from lf.train.checkpoints import STAGING, last

LOW = 1 << 20  # a write that failed with less than this left failed for want of space
FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # the errno's words, where only the text is left
TORCH_WRITER = "inline_container.cc"  # where torch.save's zip writer reports a failed write


def is_full(exc: BaseException, folder: str) -> bool:
    """Whether `exc` (or an exception it came from) says a write into `folder` ran out of space."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in FULL_TEXTS):
            return True
        if TORCH_WRITER in str(exc) and _free(folder) < LOW:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def full_disk_in_one_line(output_dir: str):
    """A full disk while the block writes becomes a TrainError in one line; a checkpoint it was writing is removed
    (its space given back; the checkpoints before it are intact)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, TrainError) or not is_full(exc, output_dir):
            raise
        file = getattr(exc, "filename", None) or _file_written(exc, output_dir)
        staging = os.path.join(output_dir, STAGING)
        in_checkpoint = file is not None and _under(file, staging)
        message = _message(output_dir, file, in_checkpoint)
        if in_checkpoint:
            shutil.rmtree(staging, ignore_errors=True)
        raise TrainError(message) from None


def _message(output_dir: str, file: str | None, in_checkpoint: bool) -> str:
    latest = last(output_dir)
    free = _size(_free(output_dir))
    said = f"the disk is full: writing {file or output_dir} failed with {free} left on its filesystem"
    if in_checkpoint and latest:
        said += f", a checkpoint needs about {_size(_bytes_under(latest))} (as {os.path.basename(latest)} took)"
    if in_checkpoint:
        said += " (the partly written checkpoint was removed)"
    if not latest:
        return f"{said}; no checkpoint was saved before it: free some space and run the same command again"
    return (f"{said}; the checkpoints saved before are intact, the last good one is {latest}: free some space (or keep "
            f"fewer checkpoints with save_total_limit) and run the same command again to resume from it")


def _free(folder: str) -> int:
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _file_written(exc: BaseException, folder: str) -> str | None:
    """The file under `folder` a failed write was into, for writers whose errors name none: the innermost frame of
    the traceback that holds its path (torch.save's `f`, safetensors' `filename`) or its open file."""
    for frame, _line in reversed(list(traceback.walk_tb(exc.__traceback__))):
        for value in frame.f_locals.values():
            path = getattr(value, "name", value)
            if isinstance(path, (str, os.PathLike)) and _under(path, folder) and not os.path.isdir(path):
                return os.path.abspath(path)
    return None


def _under(path, folder: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


def _bytes_under(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
