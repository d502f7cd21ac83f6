"""`lf webchat cfg.yaml [key=value ...]`: the chat of `lf webui` alone, in the browser, over the model the YAML
names (as `lf chat` loads it)."""

from __future__ import annotations

from lf.config import parse_infer_args
from lf.serve import Engine

USAGE = """usage: [GRADIO_SERVER_NAME=127.0.0.1] [GRADIO_SERVER_PORT=7860] lf webchat cfg.yaml [key=value ...]

Chats in the browser with the model that cfg.yaml names (model_name_or_path, adapter_name_or_path for a LoRA
adapter, template, and the generation keys: temperature, top_p, max_new_tokens, ...); key=value overrides the
file. The page is served at http://GRADIO_SERVER_NAME:GRADIO_SERVER_PORT (default 127.0.0.1:7860)."""


def command(argv: list[str]) -> int:
    """`lf webchat cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors)."""
    from lf.serve.webui import chat_app, launch

    launch(chat_app(Engine(parse_infer_args(argv, "webchat"))))
    return 0
