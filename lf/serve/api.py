"""`lf api cfg.yaml [key=value ...]`: serves the model behind an OpenAI-compatible HTTP API (lf/serve/app.py) with
uvicorn, configured by environment variables (USAGE lists them), which are checked before the model loads."""

from __future__ import annotations

import importlib.util
import os

from lf.config import parse_infer_args
from lf.errors import ConfigError
from lf.serve.backends import open_engine
from lf.serve.media import MAX_BYTES, MAX_PIXELS, Limits

# Defaults, and the server's fixed settings (lf/serve/app.py serves with them).
MAX_BODY_BYTES = 4 * 2**20  # room for a long context's prompt, JSON-escaped, but not for a flood
MAX_QUEUE = 64  # requests that may wait for the model (each holds its prompt meanwhile)
MAX_BATCH = 16  # replies decoded together (lf.serve.batch): on 2 CPU cores 16 give ~5x the tokens/s of 1
KEEP_ALIVE_S = 5  # idle connections are closed after this long
BODY_TIMEOUT_S = 30  # a request body not whole this long after its request began gets a 408 (4 MiB at ~140 KB/s)
SHUTDOWN_GRACE_S = 3  # on SIGTERM / Ctrl-C: how long requests in flight may finish before they are cancelled

USAGE = f"""usage: [API_HOST=0.0.0.0] [API_PORT=8000] [API_KEY=...] lf api cfg.yaml [key=value ...]

Serves the model that cfg.yaml names (model_name_or_path, adapter_name_or_path, template, generation keys) at
http://API_HOST:API_PORT/v1 for OpenAI clients: GET /v1/models, POST /v1/chat/completions (streamed or not); a
reward model (an lf rm run's output: its adapter, or the whole model) on POST /v1/score/evaluation instead, as
LLaMA-Factory serves it ({{"model": ..., "messages": [texts], "max_length": ...}} -> {{"scores": [...]}}), which
ppo's reward_model_type: api can name as its reward_model.

Environment:
  API_HOST              the address to listen on (default 127.0.0.1: this machine only)
  API_PORT              the port (default 8000)
  API_KEY               requests must send `Authorization: Bearer <key>`; the /docs pages are off (default:
                        no key)
  API_MODEL_NAME        the model's id for clients (default: the base name of model_name_or_path)
  API_MAX_BODY_BYTES    larger request bodies get a 413 (default {MAX_BODY_BYTES}, {MAX_BODY_BYTES // 2**20} MiB)
  API_BODY_TIMEOUT      seconds a request's body may take to arrive, from its request's start; a slower one gets a
                        408 and its connection closed (default {BODY_TIMEOUT_S})
  API_MAX_BATCH         requests generating at once, their replies decoded together a token at a time;
                        1: one request at a time, by transformers' generate (default {MAX_BATCH})
  API_MAX_QUEUE         requests that may wait for a slot beyond those; more get a 429 with Retry-After
                        (default {MAX_QUEUE})
  API_MEDIA_ROOT        the folder whose images and videos requests may name as file:///absolute/path URLs (symlinks
                        and .. followed must stay in it); unset (the default), no local file is read: images
                        come as data:image/...;base64, URLs (http(s) URLs are always refused: the server
                        fetches nothing)
  API_MAX_IMAGE_BYTES   a request's images, videos and audio together, encoded (data: URLs and input_audio decoded,
                        files by size); more get a 413
                        (default {MAX_BYTES}, {MAX_BYTES // 2**20} MiB)
  API_MAX_IMAGE_PIXELS  a request's images together, decoded; more get a 413, read from the images' headers
                        before any pixel is decoded (default {MAX_PIXELS}, 4096 x 4096)

A prompt longer than the model's context, or max_tokens beyond the room it leaves, gets a 400 (without max_tokens
the reply may run to the context's end). Idle connections close after {KEEP_ALIVE_S} s. On SIGTERM or Ctrl-C the
server stops taking connections, gives requests in flight {SHUTDOWN_GRACE_S} s, cancels them and exits."""

# The numeric environment variables: (default, largest allowed); each is a whole number from 1.
NUMBERS = {"API_PORT": (8000, 65535), "API_MAX_BODY_BYTES": (MAX_BODY_BYTES, None), "API_MAX_QUEUE": (MAX_QUEUE, None),
           "API_BODY_TIMEOUT": (BODY_TIMEOUT_S, 3600),
           "API_MAX_BATCH": (MAX_BATCH, 1024),
           "API_MAX_IMAGE_BYTES": (MAX_BYTES, None), "API_MAX_IMAGE_PIXELS": (MAX_PIXELS, None)}


def _numbers() -> dict[str, int]:
    """NUMBERS' values in this environment; ConfigError for one that is not a whole number in its range."""
    return {name: _number(name) for name in NUMBERS}


def _number(name: str) -> int:
    default, largest = NUMBERS[name]
    text = os.environ.get(name, str(default))
    if not (text.isdigit() and int(text) >= 1 and (largest is None or int(text) <= largest)):
        bound = f"from 1 to {largest}" if largest else "from 1"
        raise ConfigError(f"{name}={text!r} is not a whole number {bound}: set it to one (default {default})")
    return int(text)


def upload_limits() -> Limits:
    """What images uploaded to `lf webui`/`lf webchat` may cost, per message: the API's image variables (no
    file: URLs there: the browser sends the files)."""
    return Limits(None, _number("API_MAX_IMAGE_BYTES"), _number("API_MAX_IMAGE_PIXELS"))


def _media(numbers: dict[str, int]) -> Limits:
    """The image limits and API_MEDIA_ROOT, which must be a folder (ConfigError)."""
    root = os.environ.get("API_MEDIA_ROOT") or None
    if root and not os.path.isdir(root):
        raise ConfigError(f"API_MEDIA_ROOT={root!r} is not a folder: name the folder whose images clients may send "
                          f"as file: URLs, or unset it (images then come only as data: URLs)")
    return Limits(root, numbers["API_MAX_IMAGE_BYTES"], numbers["API_MAX_IMAGE_PIXELS"])


def _check_installed() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the API server needs {' and '.join(missing)}, not installed here: "
                          f"pip install fastapi uvicorn")


def serve(engine, numbers: dict[str, int], media: Limits) -> int:
    from lf.serve.app import create_app, server

    host, api_key = os.environ.get("API_HOST", "127.0.0.1"), os.environ.get("API_KEY") or None
    app = create_app(engine, api_key, model_name=os.environ.get("API_MODEL_NAME") or None,
                     max_body_bytes=numbers["API_MAX_BODY_BYTES"], max_queue=numbers["API_MAX_QUEUE"], media=media,
                     body_timeout=numbers["API_BODY_TIMEOUT"])
    auth = "bearer API_KEY required" if api_key else "no authentication (API_KEY is not set)"
    files = f"file: images under {media.root}" if media.root else "no file: images (API_MEDIA_ROOT is not set)"
    print(f"lf api: serving {engine.name} at http://{host}:{numbers['API_PORT']}/v1 ({auth}; {files})", flush=True)
    try:
        server(app, host, numbers["API_PORT"]).run()
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again
        pass
    if engine.generates:
        engine.wait_idle()  # the requests were cancelled: their generation ends at its next token
    return 0


def command(argv: list[str]) -> int:
    """`lf api cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors). What keeps
    the server from starting is refused before the model loads."""
    _check_installed()
    numbers = _numbers()
    media = _media(numbers)
    return serve(_engine(parse_infer_args(argv, "api"), numbers["API_MAX_BATCH"]), numbers, media)


def _engine(cfg, max_batch: int = 1):
    """A reward model is served for its scores, any other model for chat."""
    from lf.serve.scores import Scorer
    from lf.train.rewards import reward_type

    return Scorer(cfg) if reward_type(cfg.model) else open_engine(cfg, max_batch=max_batch)
