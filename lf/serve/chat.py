"""`lf chat cfg.yaml [key=value ...]`: a conversation with the model in the terminal, the reply streamed as it is
generated. The history is kept until `clear`; `exit` or Ctrl-D quits; Ctrl-C stops a reply being written."""

from __future__ import annotations

from lf.data.conversation import ASSISTANT, USER
from lf.config import parse_infer_args
from lf.serve import Engine

USAGE = """usage: lf chat cfg.yaml [key=value ...]

Chats with the model that cfg.yaml names (model_name_or_path, adapter_name_or_path for a LoRA adapter, template,
and the generation keys: temperature, top_p, max_new_tokens, ...); key=value overrides the file. In the chat, type
`clear` to start a new conversation and `exit` (or Ctrl-D) to quit."""

HELP = "Type a message; `clear` starts a new conversation, `exit` or Ctrl-D quits, Ctrl-C stops a reply."


def command(argv: list[str]) -> int:
    """`lf chat cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors)."""
    return chat(Engine(parse_infer_args(argv, "chat")))


def chat(engine: Engine) -> int:
    """The read-reply loop over stdin/stdout."""
    print(f"Chatting with {engine.name}. {HELP}")
    history = []
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query == "exit":
            return 0
        if query == "clear":
            history = []
            print("History cleared.")
            continue
        if not query:
            continue
        messages = history + [{"role": USER, "content": query}]
        print("Assistant: ", end="", flush=True)
        pieces = []
        try:
            for piece in engine.stream(messages):
                print(piece, end="", flush=True)
                pieces.append(piece)
        except KeyboardInterrupt:  # the reply is dropped, the conversation goes on without it
            print(" [stopped]")
            continue
        print()
        history = messages + [{"role": ASSISTANT, "content": "".join(pieces)}]
