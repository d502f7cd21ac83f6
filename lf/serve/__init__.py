"""lf.serve: using a trained model. `Engine` (engine.py) generates replies; `lf chat` (chat.py) talks with it in a
terminal, `lf api` (api.py) serves it behind an OpenAI-compatible HTTP API (a reward model: `Scorer`, scores.py,
on the scoring route)."""

from __future__ import annotations

from lf.serve.engine import Engine, Generation, Reply, RequestError

__all__ = ["Engine", "Generation", "Reply", "RequestError"]
