"""`lf api cfg.yaml [key=value ...]`: serves the model behind an OpenAI-compatible HTTP API (lf/serve/app.py) with
uvicorn, on API_HOST (default 127.0.0.1: this machine only) and API_PORT (default 8000); API_KEY turns on bearer
authentication."""

from __future__ import annotations

import importlib.util
import os

from lf.config import parse_infer_args
from lf.errors import ConfigError
from lf.serve import Engine

USAGE = """usage: [API_HOST=0.0.0.0] [API_PORT=8000] [API_KEY=...] lf api cfg.yaml [key=value ...]

Serves the model that cfg.yaml names (model_name_or_path, adapter_name_or_path, template, generation keys) at
http://API_HOST:API_PORT/v1 for OpenAI clients: GET /v1/models, POST /v1/chat/completions (streamed or not)."""


def _problem() -> str | None:
    """What keeps the server from starting, checked before the model loads."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        return f"the API server needs {' and '.join(missing)}, not installed here: pip install fastapi uvicorn"
    port = os.environ.get("API_PORT", "8000")
    if not (port.isdigit() and 0 < int(port) < 65536):
        return f"API_PORT={port!r} is not a port number: set it to a number from 1 to 65535 (default 8000)"
    return None


def serve(engine: Engine) -> int:
    import uvicorn

    from lf.serve.app import create_app

    host, port = os.environ.get("API_HOST", "127.0.0.1"), int(os.environ.get("API_PORT", "8000"))
    auth = "bearer API_KEY required" if os.environ.get("API_KEY") else "no authentication (API_KEY is not set)"
    print(f"lf api: serving {engine.name} at http://{host}:{port}/v1 ({auth})", flush=True)
    uvicorn.run(create_app(engine), host=host, port=port)
    return 0


def command(argv: list[str]) -> int:
    """`lf api cfg.yaml [key=value ...]` (lf.cli prints USAGE, sets up the log and reports user errors). What keeps
    the server from starting is refused before the model loads."""
    problem = _problem()
    if problem:
        raise ConfigError(problem)
    return serve(Engine(parse_infer_args(argv, "api")))
