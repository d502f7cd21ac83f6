"""data_shared_file_system: on several machines sharing a filesystem, only the first machine's main process
prepares the datasets (transformers' main_process_first(local=False)); otherwise each machine's main process."""

import pytest
import transformers

from lf.config import parse_train_args
from lf.train.recipe import prepare
from tests.test_train import lf_home, options  # noqa: F401 (lf_home: the module's LF_HOME fixture)


class Stop(Exception):
    """Raised where the datasets would be prepared: nothing after it needs to run."""


def test_data_shared_file_system_picks_which_main_process_prepares_the_data(tmp_path, monkeypatch):
    seen = []

    def main_process_first(self, local=True, desc="work"):
        seen.append(local)
        raise Stop

    monkeypatch.setattr(transformers.TrainingArguments, "main_process_first", main_process_first)
    for shared in (False, True):
        with pytest.raises(Stop):
            prepare(parse_train_args(options(tmp_path, data_shared_file_system=shared)))
    assert seen == [True, False]
