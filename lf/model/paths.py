"""Where a model or adapter comes from: a local directory, a Hugging Face Hub id, or one of lf's tiny models."""

from __future__ import annotations

import os
import re

from lf.errors import ModelError

# "name" or "owner/name": what the Hub accepts; "./x", "/abs/x" and "a/b/c" can only be local paths
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None


def resolve_model_path(model_args) -> str:
    """model_name_or_path as from_pretrained takes it: a tiny model's built directory, an existing local path, or
    a hub id (downloaded, or found in the cache, by transformers)."""
    from lf.tiny import TINY_MODELS, tiny_path

    name = model_args.model_name_or_path
    if not name:
        raise ModelError("model_name_or_path is not set: give a local model directory, a Hugging Face Hub id, or "
                         f"one of lf's tiny models ({', '.join(TINY_MODELS)})")
    if name in TINY_MODELS:
        return str(tiny_path(name))
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    if not is_hub_id(name):
        raise ModelError(f"model_name_or_path: {name}: no such directory")
    return name


def check_adapter_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ModelError(f"adapter_name_or_path: {path} has no adapter_config.json; it is not a LoRA adapter")
    if not os.path.exists(path) and not is_hub_id(path):
        raise ModelError(f"adapter_name_or_path: {path}: no such directory")


def download_error(name: str, exc: Exception) -> ModelError:
    """The error for a model that from_pretrained could not read: a hub id that is not available offline, or a
    local directory that is not a model."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.path.exists(os.path.expanduser(name)):
        return ModelError(f"model_name_or_path: {name} cannot be loaded: {reason}")
    return ModelError(f"model_name_or_path: {name!r} is not a local directory, and it could not be downloaded "
                      f"from the Hugging Face Hub ({reason}). Without internet access it must be downloaded first, "
                      f"on a connected machine (`hf download {name} --local-dir DIR`), and model_name_or_path set "
                      f"to that directory")
