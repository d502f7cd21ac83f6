"""use_swanlab (lf/train/tracking.py): lf train logs to SwanLab through its transformers callback; in offline mode
SwanLab writes the run, its config and its metrics to swanlab_logdir."""

import struct

import pytest
import yaml

from lf.config import parse_train_args
from lf.errors import ConfigError
from lf.train import run
from tests.test_train import lf_home, options, records  # noqa: F401 (lf_home: the module's LF_HOME fixture)


def test_lf_train_writes_a_swanlab_offline_run(tmp_path):
    logdir, out = tmp_path / "swanlog", tmp_path / "out"
    run(parse_train_args(options(out, use_swanlab=True, swanlab_mode="offline", swanlab_logdir=str(logdir),
                                 swanlab_project="lf-test", swanlab_run_name="tiny", max_steps=2, max_samples=4,
                                 save_steps=10, learning_rate=3e-3)))
    [run_dir] = logdir.glob("run-*")
    config = yaml.safe_load((run_dir / "files" / "config.yaml").read_text())
    assert config["learning_rate"]["value"] == 3e-3  # the trainer's arguments, as SwanLab's callback records them
    [data] = run_dir.glob("run-*.swanlab")
    written = data.read_bytes()
    assert b"train/loss" in written
    for record in records(out):  # each logged loss, as a double, in SwanLab's records
        assert struct.pack("<d", record["loss"]) in written


def test_swanlab_mode_takes_llama_factorys_and_swanlabs_names(tmp_path):
    with pytest.raises(ConfigError, match="swanlab_mode: online is not one of cloud, local, offline, disabled"):
        parse_train_args(options(tmp_path, use_swanlab=True, swanlab_mode="online"))
