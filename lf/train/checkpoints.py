"""Where a run writes and where it resumes: the output_dir check before any expensive work, and which checkpoint a
run continues from.

A checkpoint folder is complete when it exists at all: lf's trainer writes each one into a staging folder and
renames it into place at the end (see :class:`lf.train.trainer.LFTrainer`), so a run killed while saving leaves the
previous checkpoints as they were and at most a stale staging folder, which the next save replaces.
"""

from __future__ import annotations

import logging
import os

from transformers.trainer_utils import get_last_checkpoint

from lf.errors import TrainError

log = logging.getLogger("lf")
STAGING = ".lf-saving"  # checkpoints are written here, then renamed into output_dir


def resume_point(output_dir: str, resume_from_checkpoint, overwrite_output_dir: bool, do_train: bool):
    """The checkpoint to resume from (a path), or None to start afresh. Raises TrainError when output_dir holds
    something else that training would overwrite."""
    if resume_from_checkpoint not in (None, False, "", "false", "False"):
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
            last = _last(output_dir)
            if last is None:
                raise TrainError(f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N folder: "
                                 f"remove the key to start afresh, or give a checkpoint's path")
            return last
        if not os.path.isdir(resume_from_checkpoint):
            raise TrainError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a folder: give a "
                             f"checkpoint-N folder of an earlier run (or true for the last one in output_dir)")
        return str(resume_from_checkpoint)
    if not do_train or overwrite_output_dir or not os.path.isdir(output_dir):
        return None
    last = _last(output_dir)
    if last is not None:
        log.info("resuming from %s, the last checkpoint in output_dir (overwrite_output_dir: true starts afresh)",
                 last)
        return last
    found = sorted(name for name in os.listdir(output_dir) if name != STAGING)
    if found:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise TrainError(f"output_dir {output_dir} already holds files ({shown}) and no checkpoint to resume "
                         f"from: set overwrite_output_dir: true to write over them, or choose another output_dir")
    return None


def _last(output_dir: str) -> str | None:
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
