"""The OpenAI-compatible HTTP API over an Engine (FastAPI): `GET /v1/models` and `POST /v1/chat/completions`,
whole or streamed as server-sent events (`data: {chunk}` lines, then `data: [DONE]`), with n, stop, temperature,
top_p, max_tokens and tools / tool_calls.

OpenAI messages map onto lf's canonical conversation: system (or developer) messages lead and become the system
prompt; an assistant message with tool_calls is a `function` reply; consecutive `tool` messages are one
`observation` (the results of one turn of calls). A malformed request gets a 400 (a 401 without the API key)
with an OpenAI-style {"error": {"message": ...}} body saying what to fix.

Concurrency: endpoints are plain functions and streams plain iterators, run in FastAPI's thread pool; the Engine
serializes generation with a lock held by its own worker threads only (never by a reader), so streamed and whole
requests all get their turn, and a client that disconnects mid-stream cancels its generation.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lf.data.conversation import ASSISTANT, FUNCTION, OBSERVATION, USER
from lf.errors import DataError
from lf.serve.engine import Engine, Generation, RequestError


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(BaseModel):
    model: str | None = None  # one model is served: any name is answered by it
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The app serving `engine`. `api_key` (default: the API_KEY environment variable): requests must carry
    `Authorization: Bearer <api_key>`; none or empty: no authentication."""
    api_key = api_key or os.environ.get("API_KEY") or None
    app = FastAPI(title="lf API", description=f"OpenAI-compatible API serving {engine.name}")
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if api_key and not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` with "
                                     "the key the server was started with (API_KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and routing's 404 and 405
    def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return JSONResponse({"error": {"message": exc.detail, "type": kind}}, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"message": f"invalid request: {problems}", "type": "invalid_request_error"}},
                            400)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lf"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    def chat_completions(request: ChatCompletionRequest):
        messages, system = _conversation(request.messages)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()] or None
        # a temperature in the request decides sampling as in OpenAI's API (0: greedy), whatever the config's do_sample
        sample = None if request.temperature is None else request.temperature > 0
        settings = {"temperature": request.temperature, "do_sample": sample, "top_p": request.top_p,
                    "stop": request.stop, "max_new_tokens": request.max_completion_tokens or request.max_tokens}
        try:  # the prompts are encoded and the settings checked before anything is sent back
            generations = [engine.stream(messages, system, tools, **settings) for _ in range(request.n)]
        except (DataError, RequestError) as exc:
            raise HTTPException(400, str(exc)) from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
        if request.stream:
            return StreamingResponse(_stream(generations, head, streamed=not tools), media_type="text/event-stream")
        replies = [generation.finish() for generation in generations]
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": _message(r), "finish_reason": r.finish_reason}
                            for i, r in enumerate(replies)],
                "usage": {"prompt_tokens": replies[0].prompt_tokens,
                          "completion_tokens": sum(r.completion_tokens for r in replies),
                          "total_tokens": replies[0].prompt_tokens + sum(r.completion_tokens for r in replies)}}

    return app


def _text(message: Message, index: int) -> str:
    if message.content is None and not message.tool_calls:
        raise HTTPException(400, f"messages[{index}] ({message.role}) has no content")
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content or ""


def _conversation(messages: list[Message]) -> tuple[list[dict], str | None]:
    """(lf's canonical messages, the system prompt) of an OpenAI request's messages."""
    system, canonical = [], []
    for i, message in enumerate(messages):
        text = _text(message, i)
        if message.role in ("system", "developer"):
            if canonical:
                raise HTTPException(400, f"messages[{i}]: a {message.role} message must come before the conversation "
                                         f"(lf's templates place one system prompt at its start)")
            system.append(text)
        elif message.role == "tool" and canonical and canonical[-1]["role"] == OBSERVATION:
            canonical[-1]["content"] += "\n" + text
        elif message.role == "assistant" and message.tool_calls:
            calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
            canonical.append({"role": FUNCTION, "content": json.dumps(calls, ensure_ascii=False)})
        else:
            role = {"user": USER, "assistant": ASSISTANT, "tool": OBSERVATION}[message.role]
            canonical.append({"role": role, "content": text})
    return canonical, "\n\n".join(system) or None


def _tool_calls(reply) -> list[dict]:
    return [{"index": i, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(reply.tool_calls)]


def _message(reply) -> dict:
    """The assistant message of a whole reply: its text, or its tool calls."""
    if reply.tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": _tool_calls(reply)}
    return {"role": "assistant", "content": reply.text}


async def _stream(generations: list[Generation], head: dict, streamed: bool):
    """The events, read in the thread pool; a client that disconnects cancels what is still to be generated."""
    try:
        async for event in iterate_in_threadpool(_events(generations, head, streamed)):
            yield event
    finally:
        for generation in generations:
            generation.cancel()


def _events(generations: list[Generation], head: dict, streamed: bool):
    """Server-sent events of the replies, one after another. With tools (`streamed` False) each reply is sent
    whole: whether it is a tool call is only known at its end."""
    def event(index: int, delta: dict, finish_reason: str | None = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    for index, generation in enumerate(generations):
        yield event(index, {"role": "assistant", "content": ""})
        if streamed:
            for piece in generation:
                yield event(index, {"content": piece})
        else:
            message = _message(generation.finish())
            yield event(index, {k: v for k, v in message.items() if k != "role"})
        yield event(index, {}, generation.reply.finish_reason)
    yield "data: [DONE]\n\n"
