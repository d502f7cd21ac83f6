"""`lf chat cfg.yaml [key=value ...]`: a conversation with the model in the terminal, the reply streamed as it is
generated. The history is kept until `clear`; `exit` or Ctrl-D quits; Ctrl-C stops a reply being written; a line
`/image PATH` attaches an image to the next message (for models that take images)."""

from __future__ import annotations

import os

from lf.data.conversation import ASSISTANT, USER
from lf.config import parse_infer_args
from lf.errors import DataError, RequestError
from lf.serve import Engine
from lf.serve.media import IMAGE, open_image

USAGE = """usage: lf chat cfg.yaml [key=value ...]

Chats with the model that cfg.yaml names (model_name_or_path, adapter_name_or_path for a LoRA adapter, template,
and the generation keys: temperature, top_p, max_new_tokens, ...); key=value overrides the file. In the chat, type
`clear` to start a new conversation and `exit` (or Ctrl-D) to quit; a line `/image PATH` (repeatable) attaches the
image file PATH to your next message, for a model that takes images."""

HELP = ("Type a message; `/image PATH` on a line of its own attaches an image to the next message (repeatable); "
        "`clear` starts a new conversation, `exit` or Ctrl-D quits, Ctrl-C stops a reply.")
IMAGE_COMMAND = "/image"


def command(argv: list[str]) -> int:
    """`lf chat cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors)."""
    return chat(Engine(parse_infer_args(argv, "chat")))


def chat(engine: Engine) -> int:
    """The read-reply loop over stdin/stdout. The images of the whole conversation are kept with its history, as
    its placeholders are."""
    print(f"Chatting with {engine.name}. {HELP}")
    history, images, attached = [], [], []
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query == "exit":
            return 0
        if query == "clear":
            history, images, attached = [], [], []
            print("History cleared.")
            continue
        if query.split(maxsplit=1)[:1] == [IMAGE_COMMAND]:
            problem = attach(engine, query[len(IMAGE_COMMAND):].strip(), attached)
            print(problem or f"Attached {len(attached)} image(s) to your next message.")
            continue
        if not query:
            continue
        # placeholders before the text, where LLaMA-Factory's chat puts images a message does not place itself
        messages = history + [{"role": USER, "content": IMAGE * len(attached) + query}]
        print("Assistant: ", end="", flush=True)
        pieces = []
        try:
            for piece in engine.stream(messages, images=images + attached):
                print(piece, end="", flush=True)
                pieces.append(piece)
        except KeyboardInterrupt:  # the reply is dropped, the conversation goes on without it
            print(" [stopped]")
            continue
        except (DataError, RequestError) as exc:  # this message cannot be answered; the conversation goes on
            print(f"\n{exc}")
            continue
        print()
        history = messages + [{"role": ASSISTANT, "content": "".join(pieces)}]
        images, attached = images + attached, []


def attach(engine: Engine, path: str, attached: list) -> str | None:
    """Adds the image at `path` to `attached`; else the one line saying why not."""
    if not path:
        return f"{IMAGE_COMMAND} needs a file: {IMAGE_COMMAND} path/to/picture.jpg"
    if engine.image_refusal:
        return engine.image_refusal
    try:
        attached.append(open_image(os.path.expanduser(path.strip("'\""))))  # quoted as terminals paste paths
    except RequestError as exc:
        return f"not attached: {exc}"
    return None
