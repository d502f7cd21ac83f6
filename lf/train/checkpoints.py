"""Where a run writes and where it resumes: the output_dir check before any expensive work, which checkpoint a run
continues from, and an output_dir left as it was found by a run refused before writing anything.

A checkpoint folder is complete when it exists at all: lf's trainer writes each one into a staging folder and
renames it into place at the end (see :class:`lf.train.trainer.LFTrainer`), so a run killed while saving leaves the
previous checkpoints as they were and at most a stale staging folder, which the next save replaces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

from transformers.trainer_utils import get_last_checkpoint

from lf.errors import TrainError
from lf.train import plot
from lf.train.callbacks import LOG_FILE
from lf.train.predict import PREDICTIONS

log = logging.getLogger("lf")
STAGING = ".lf-saving"  # checkpoints are written here, then renamed into output_dir
RUN_CONFIG = "lf_run_config.json"  # the run's settings, beside the model
# What a run writes that records it rather than holds a model: never a reason to refuse a run in output_dir (a run
# killed before its first checkpoint leaves some of these; the next one starts afresh and replaces them).
RECORDS = frozenset({LOG_FILE, *map(plot.file_name, plot.KEYS), RUN_CONFIG, STAGING, PREDICTIONS,
                     "runs",  # TensorBoard's (report_to: tensorboard)
                     "trainer_state.json", "all_results.json",  # HF's, as are the results of each split
                     *(f"{split}_results.json" for split in ("train", "eval", "predict"))})


def resume_point(output_dir: str, resume_from_checkpoint, overwrite_output_dir: bool, do_train: bool):
    """The checkpoint to resume from (a path), or None to start afresh. Raises TrainError when output_dir holds
    something else that training would overwrite (anything but checkpoints and RECORDS)."""
    if resume_from_checkpoint not in (None, False, "", "false", "False"):
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
            latest = last(output_dir)
            if latest is None:
                raise TrainError(f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N folder: "
                                 f"remove the key to start afresh, or give a checkpoint's path")
            return latest
        if not os.path.isdir(resume_from_checkpoint):
            raise TrainError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a folder: give a "
                             f"checkpoint-N folder of an earlier run (or true for the last one in output_dir)")
        return str(resume_from_checkpoint)
    if not do_train or overwrite_output_dir or not os.path.isdir(output_dir):
        return None
    latest = last(output_dir)
    if latest is not None:
        log.info("resuming from %s, the last checkpoint in output_dir (overwrite_output_dir: true starts afresh)",
                 latest)
        return latest
    found = sorted(set(os.listdir(output_dir)) - RECORDS)
    if found:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise TrainError(f"output_dir {output_dir} already holds files ({shown}) and no checkpoint to resume "
                         f"from: set overwrite_output_dir: true to write over them, or choose another output_dir")
    return None


def last(output_dir: str) -> str | None:
    """output_dir's last complete checkpoint, if any."""
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


@contextlib.contextmanager
def no_empty_folder_left(output_dir: str):
    """A run that fails before writing anything removes the output_dir it created (HF's Trainer creates it when
    built, before steps such as its optimizer's own checks), with the parents it created: a refused run leaves no
    new empty folder."""
    created = None  # the outermost folder of output_dir that does not exist yet
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        created, path = path, os.path.dirname(path)
    try:
        yield
    except BaseException:
        if created and os.path.isdir(created) and not any(files for _, _, files in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)
        raise
