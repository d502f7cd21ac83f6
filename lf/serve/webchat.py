"""`lf webchat cfg.yaml [key=value ...] [--host HOST] [--port PORT] [--auth USER:PASSWORD | --auth-file PATH]`:
the chat of `lf webui` alone, in the browser, over the model the YAML names (as `lf chat` loads it); the address
and login options are lf webui's (webaccess.py)."""

from __future__ import annotations

import argparse

from lf.config import parse_infer_args
from lf.serve.backends import open_engine

USAGE = """usage: lf webchat cfg.yaml [key=value ...] [--host HOST] [--port PORT] [--auth USER:PASSWORD |
                  --auth-file PATH] [--lang en|zh]

Chats in the browser with the model that cfg.yaml names (model_name_or_path, adapter_name_or_path for a LoRA
adapter, template, and the generation keys: temperature, top_p, max_new_tokens, ...); key=value overrides the
file. The page is served at http://HOST:PORT (default 127.0.0.1:7860, or GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT). --auth USER:PASSWORD (repeatable) or --auth-file PATH (USER:PASSWORD lines) puts it behind
a login; without one it is open to whoever reaches HOST. Images, videos (MP4/MOV, Matroska/WebM, AVI) and
audio clips (WAV, FLAC, Ogg, MP3) uploaded with a message go to a model that takes them (others refuse them in one
line), checked as `lf api` checks its media; API_MAX_IMAGE_BYTES and API_MAX_IMAGE_PIXELS bound one message's
uploads (default 16 MiB together, and 4096 x 4096 pixels of images together or of one video frame). --lang zh (or
LF_WEBUI_LANG=zh) starts the page in Simplified Chinese; its switch changes that for one browser, which remembers it."""


def command(argv: list[str]) -> int:
    """`lf webchat cfg.yaml [key=value ...] [options]` (lf.cli prints USAGE, sets up the log and reports user
    errors); the options are taken out, the rest is the config's."""
    from lf.serve.api import upload_limits
    from lf.serve.webaccess import Access, add_server_args
    from lf.serve.webui import chat_app, launch
    from lf.serve.webui_text import server_lang

    parser = argparse.ArgumentParser(prog="lf webchat", usage=USAGE, add_help=False, allow_abbrev=False)
    add_server_args(parser)
    args, config = parser.parse_known_args(argv)
    access = Access.from_args(args)
    limits = upload_limits()  # a wrong variable is refused before the model loads
    lang = server_lang(args.lang)
    launch(chat_app(open_engine(parse_infer_args(config, "webchat")), login=access.login, limits=limits, lang=lang),
           access)
    return 0
