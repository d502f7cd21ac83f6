"""trust_remote_code: true lets transformers import the Python files a model ships; lf.model.loader, where every
command (train, chat, api, export, eval, the web UI) loads a model, says so in a WARNING line before each load."""

import logging

import pytest
from test_train import lf_home  # noqa: F401  (the tiny model, built once in a temporary LF_HOME)

from lf.config.finetuning import FinetuningArguments
from lf.config.model import ModelArguments
from lf.model import load_model, load_tokenizer


@pytest.mark.parametrize("trusted", [False, True])
def test_loading_with_remote_code_trusted_is_a_warning(trusted, caplog):
    model_args = ModelArguments(model_name_or_path="lf-tiny-llama", trust_remote_code=trusted)
    with caplog.at_level(logging.INFO, logger="lf"):
        tokenizer = load_tokenizer(model_args)
        load_model(tokenizer, model_args, FinetuningArguments(), is_trainable=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "trust_remote_code" in
                r.getMessage()]
    assert warnings == ([f"WARNING: trust_remote_code: true: code from lf-tiny-llama will run (the Python files its "
                         f"{part} ships, with this process's rights): keep it only for a model you trust"
                         for part in ("tokenizer", "config and model")] if trusted else [])
