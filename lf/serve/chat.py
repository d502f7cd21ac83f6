"""`lf chat cfg.yaml [key=value ...]`: a conversation with the model in the terminal, the reply streamed as it is
generated. The history is kept until `clear`; `exit` or Ctrl-D quits; Ctrl-C stops a reply being written; a line
`/image PATH` (`/video PATH`, `/audio PATH`) attaches an image (a video, an audio clip) to the next message (for
models that take them); `/tools FILE` gives the model the tool definitions in a JSON file: a reply that calls tools
(read with the template's tool format) is shown as its calls, and the next message is their results."""

from __future__ import annotations

import json
import os

from lf.data.conversation import ASSISTANT, FUNCTION, OBSERVATION, USER
from lf.data.registry import IMAGES
from lf.data.tools import parse_tools
from lf.config import parse_infer_args
from lf.errors import DataError, RequestError
from lf.serve import Engine
from lf.serve.backends import open_engine
from lf.serve.media import marks, open_image

USAGE = """usage: lf chat cfg.yaml [key=value ...]

Chats with the model that cfg.yaml names (model_name_or_path, adapter_name_or_path for a LoRA adapter, template,
and the generation keys: temperature, top_p, max_new_tokens, ...); key=value overrides the file. In the chat, type
`clear` to start a new conversation and `exit` (or Ctrl-D) to quit; a line `/image PATH` (repeatable) attaches the
image file PATH to your next message, for a model that takes images (`/video PATH`, `/audio PATH`: a video or an
audio clip, for a model that takes them); `/tools FILE` gives the model the tools defined in the JSON file FILE
(a list of {"name", "description", "parameters"}) until `clear`: when it calls them, type their results."""

HELP = ("Type a message; `/image PATH` on a line of its own attaches an image to the next message (`/video PATH`, "
        "`/audio PATH`: a video, an audio clip; repeatable); `/tools FILE` gives the model the tools in a JSON "
        "file; `clear` starts a new conversation, `exit` or Ctrl-D quits, Ctrl-C stops a reply.")
COMMANDS = {"/image": IMAGES, "/video": "videos", "/audio": "audios"}  # command -> the media column it fills
EXAMPLES = {IMAGES: "path/to/picture.jpg", "videos": "path/to/clip.mp4", "audios": "path/to/clip.wav"}


def command(argv: list[str]) -> int:
    """`lf chat cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors)."""
    return chat(open_engine(parse_infer_args(argv, "chat")))


def chat(engine: Engine) -> int:
    """The read-reply loop over stdin/stdout. The media of the whole conversation are kept with its history, as
    its placeholders are."""
    print(f"Chatting with {engine.name}. {HELP}")
    history, media, attached, tools = [], _no_media(), _no_media(), None
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query == "exit":
            return 0
        if query == "clear":
            history, media, attached, tools = [], _no_media(), _no_media(), None
            print("History cleared.")
            continue
        name = query.split(maxsplit=1)[:1]
        if name and name[0] in COMMANDS:
            column = COMMANDS[name[0]]
            problem = attach(engine, query[len(name[0]):].strip(), attached[column], column)
            print(problem or f"Attached {len(attached[column])} {column[:-1]}(s) to your next message.")
            continue
        if name == ["/tools"]:
            tools, said = read_tools(query[len("/tools"):].strip(), tools)
            print(said)
            continue
        if not query:
            continue
        # after the model's tool calls, the message is their results
        role = OBSERVATION if history and history[-1]["role"] == FUNCTION else USER
        content = marks({column: len(items) for column, items in attached.items()}) + query
        messages = history + [{"role": role, "content": content}]
        now = {column: media[column] + attached[column] for column in media}
        print("Assistant: ", end="", flush=True)
        pieces = []
        try:
            generation = engine.stream(messages, tools=tools, images=now[IMAGES],
                                       files={c: items for c, items in now.items() if c != IMAGES})
            for piece in generation:
                print(piece, end="", flush=True)
                pieces.append(piece)
        except KeyboardInterrupt:  # the reply is dropped, the conversation goes on without it
            print(" [stopped]")
            continue
        except (DataError, RequestError) as exc:  # this message cannot be answered; the conversation goes on
            print(f"\n{exc}")
            continue
        print()
        history = messages + [_reply_message("".join(pieces), generation.reply.tool_calls)]
        media, attached = now, _no_media()


def _reply_message(text: str, calls) -> dict:
    """The reply as the history keeps it: its tool calls (shown, the user types their results next) or its text."""
    if not calls:
        return {"role": ASSISTANT, "content": text}
    for name, arguments in calls:
        print(f"[tool call] {name}({arguments})")
    print("Type the results of the call(s) as your next message.")
    return {"role": FUNCTION, "content": json.dumps([{"name": name, "arguments": json.loads(arguments)}
                                                     for name, arguments in calls], ensure_ascii=False)}


def read_tools(path: str, tools):
    """(the tools for the conversation, the line that says what happened): the JSON file's definitions, or the
    tools unchanged and why the file was not taken."""
    if not path:
        return tools, ("the command needs a JSON file of tool definitions: /tools tools.json "
                       '([{"name": ..., "description": ..., "parameters": {...}}])')
    path = os.path.expanduser(path.strip("'\""))
    try:
        with open(path, encoding="utf-8") as f:
            definitions = parse_tools(f.read())
    except OSError as exc:
        return tools, f"tools not read: cannot read {path!r}: {exc.strerror}"
    except DataError as exc:
        return tools, f"tools not read: {exc}"
    names = ", ".join(t["function"].get("name", "?") for t in definitions)
    return definitions or None, f"The model has {len(definitions)} tool(s): {names}."


def _no_media() -> dict[str, list]:
    return {column: [] for column in COMMANDS.values()}


def attach(engine: Engine, path: str, attached: list, column: str = IMAGES) -> str | None:
    """Adds the image (or, for another column, the video or audio file's path) at `path` to `attached`; else the one
    line saying why not."""
    command = next(name for name, of in COMMANDS.items() if of == column)
    if not path:
        return f"{command} needs a file: {command} {EXAMPLES[column]}"
    if engine.refusal(column):
        return engine.refusal(column)
    path = os.path.expanduser(path.strip("'\""))  # quoted as terminals paste paths
    if column != IMAGES:  # decoded with the prompt; its header is read as it is encoded
        if not os.path.isfile(path):
            return f"not attached: cannot read {path!r}: no such file"
        attached.append(path)
        return None
    try:
        attached.append(open_image(path))
    except RequestError as exc:
        return f"not attached: {exc}"
    return None
