"""The OpenAI-compatible HTTP API over an Engine (FastAPI), and the uvicorn server it runs in: `GET /v1/models` and
`POST /v1/chat/completions`, whole or streamed as server-sent events (`data: {chunk}` lines, then `data: [DONE]`),
with n, stop, temperature, top_p, max_tokens and tools / tool_calls. A reward model (lf.serve.scores.Scorer) is
served on LLaMA-Factory's `POST /v1/score/evaluation` instead ({"model", "messages": [texts], "max_length"} answered
by {"id", "object": "score.evaluation", "model", "scores"}); each route refuses the other kind of model (400).

OpenAI messages map onto lf's canonical conversation: system (or developer) messages lead and become the system
prompt; an assistant message with tool_calls is a `function` reply; consecutive `tool` messages are one
`observation` (the results of one turn of calls). A user message's content may be a list of parts: text, and
images (`image_url` with a data: URL, or a file: URL under API_MEDIA_ROOT), which lf.serve.media decodes, within
the request's image limits, into `<image>` placeholders and the images in order; video (`video_url`) and audio
(`input_audio`) parts into `<video>`/`<audio>` placeholders and files checked by their containers (lf.serve.media).
A model that takes no media of a kind refuses them before any is decoded. The model is named to clients by
`model_name`, else by its folder's base name (no local path is ever sent back).

Every error is an OpenAI-style JSON body, {"error": {"message", "type"}}, the message saying what to fix:
401 without the API key (checked before the body is read), 413 for a body over `max_body_bytes`, 400 for a request
that is not JSON (NaN, Infinity and lone surrogates included), not a chat completion request, too long for the
model's context, or asking for more tokens (max_tokens) than the context leaves after the prompt (as OpenAI and
vLLM refuse it; left out, the reply may run to the context's end), 503 with Retry-After when `max_queue` requests
already wait, 500 for a fault of the server (its message names no detail; the log has the traceback). With an API
key the /docs, /redoc and /openapi.json pages are off (a browser could not send the key they would need).

Concurrency: one model, so generating requests take turns, in arrival order. Endpoints are coroutines: a request
waits for its turn, and for its tokens, on the event loop, holding no thread; only the request whose turn it is
has a thread, the Engine's worker, so any number of waiting or slow clients leave the server answering. A client
that disconnects, streaming or not, cancels its request at once (its place in the queue, or its generation at the
next token). The server closes connections idle for `timeout_keep_alive` seconds (also before a first request),
and on SIGTERM or Ctrl-C stops taking connections, gives requests in flight SHUTDOWN_GRACE_S seconds, cancels them
and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Coroutine
from typing import Annotated, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from lf.data.conversation import ASSISTANT, FUNCTION, OBSERVATION, USER
from lf.data.registry import IMAGES, MEDIA_COLUMNS
from lf.errors import DataError
from lf.serve.api import KEEP_ALIVE_S, MAX_BODY_BYTES, MAX_QUEUE, SHUTDOWN_GRACE_S
from lf.serve.engine import Engine, Generation, Reply, RequestError
from lf.serve.media import Images, Limits, MediaError, conversation_content
from lf.serve.scores import Scorer

log = logging.getLogger("lf")
T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)

MAX_N = 128  # choices per request, OpenAI's cap
RETRY_AFTER_S = 1  # what a 503 tells clients to wait: a turn is often short
# A fault of the server, to its client: the exception's text may name local paths or internals, so it goes to the log
SERVER_FAULT = "the server failed on this request (its log says why): retry, or report it if it persists"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint: the model's processor decides


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: ImageURL


class InputAudio(BaseModel):
    data: str  # base64
    format: Literal["wav", "mp3"]


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | VideoPart | AudioPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ScoreEvaluationRequest(BaseModel):  # LLaMA-Factory's
    model: str
    messages: list[str] = Field(min_length=1)  # the texts to score
    max_length: int | None = Field(None, ge=1)  # each text's first max_length tokens are scored


class ChatCompletionRequest(BaseModel):
    model: str | None = None  # one model is served: any name is answered by it
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False


def create_app(engine: Engine | Scorer, api_key: str | None = None, *, model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE, media: Limits = Limits()) -> FastAPI:
    """The app serving `engine`. `api_key`: requests must carry `Authorization: Bearer <api_key>` (none or empty:
    no authentication); `model_name`: the model's id for clients (default: public_name of its path); `media`: what
    a request's images may cost and where file: URLs may point (default: no file: URLs); the limits as the module
    docstring says."""
    model_id = model_name or public_name(engine.name)
    pages = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="lf API", description=f"OpenAI-compatible API serving {model_id}", **pages)
    app.add_middleware(_Guard, api_key=api_key or None, max_body_bytes=max_body_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's, and routing's 404 and 405
    app.add_exception_handler(Exception, _server_error)
    turns = _Turns(max_queue)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                                            "owned_by": "lf"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if not engine.generates:
            raise HTTPException(400, f"{model_id} is a reward model: it scores texts (POST /v1/score/evaluation) and "
                                     f"writes no replies; serve a chat model for chat completions")
        body = await request.body()
        # parsing and tokenizing a long prompt take a while: not on the event loop, which answers everyone
        chat, generations = await run_in_threadpool(_prepare, engine, body, media)
        job = turns.enter(generations)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if chat.stream:
            return _EventStream(_events(job, head, streamed=not chat.tools), job)
        try:
            replies = await _unless_disconnected(request, _replies(job))
        finally:  # also when the client left before _replies began, which then never enters the job
            job.close()
        if replies is None:
            return Response()  # the client left: nobody reads this
        prompt, completion = replies[0].prompt_tokens, sum(r.completion_tokens for r in replies)
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [{"index": i, "message": _message(r), "finish_reason": r.finish_reason}
                                         for i, r in enumerate(replies)],
                             "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                       "total_tokens": prompt + completion}})

    @app.post("/v1/score/evaluation")
    async def score_evaluation(request: Request) -> JSONResponse:
        if engine.generates:
            raise HTTPException(400, f"{model_id} is not a reward model (it has no value head): serve an lf rm run's "
                                     f"output (its adapter, or the whole model) to score texts")
        score = _parse(await request.body(), ScoreEvaluationRequest)
        try:
            sequences = await run_in_threadpool(engine.encode, score.messages, score.max_length)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None
        async with turns.enter([]):  # the model's turn, as generating requests take it
            scores = await run_in_threadpool(engine.scores, sequences)
        return JSONResponse({"id": f"scoreval-{uuid.uuid4().hex}", "object": "score.evaluation", "model": score.model,
                             "scores": scores})

    return app


def server(app, host: str, port: int, **options) -> uvicorn.Server:
    """The uvicorn server of `lf api` for `app`: idle connections closed after KEEP_ALIVE_S (also before a first
    request), SHUTDOWN_GRACE_S for requests in flight on SIGTERM / Ctrl-C. `options`: more uvicorn.Config ones."""
    options = {"timeout_keep_alive": KEEP_ALIVE_S, "timeout_graceful_shutdown": SHUTDOWN_GRACE_S, **options}
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, http=_Http, **options))


def public_name(path: str) -> str:
    """A model's id for clients: a local folder's base name (the rest of its path stays private), a hub id as is."""
    local = os.path.expanduser(path)
    return os.path.basename(os.path.normpath(local)) if os.path.isabs(local) or os.path.exists(local) else path


class _Http(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, also closing a connection that sends nothing for timeout_keep_alive seconds
    after it opens: uvicorn arms that timer only after a response, so silent connections would pile up."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def _error_body(status: int, message: str) -> dict:
    """An OpenAI-style error."""
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind}}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message), status, headers)


# The handlers are coroutines: Starlette would run plain functions in its thread pool, which may be busy or, when the
# server shuts down, refuse a request it cancels.
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail, exc.headers)


async def _server_error(_request: Request, _exc: Exception) -> JSONResponse:
    return _error(500, SERVER_FAULT)


def _too_large(limit: int) -> str:
    return (f"the request body is larger than {limit} bytes, the server's limit: send less, or start the server "
            f"with a larger API_MAX_BODY_BYTES")


class _Guard:
    """ASGI middleware that runs before any route reads the body: the API key (401) and the body's size (413, by
    its Content-Length, and as it arrives for a body sent without one)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(Headers(scope=scope))
            if refusal:
                return await refusal(scope, receive, send)
            receive = self._bounded(receive)
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers) -> JSONResponse | None:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if self.api_key and not (scheme.lower() == "bearer"
                                 and secrets.compare_digest(key.strip().encode(), self.api_key.encode())):
            return _error(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` with the key "
                               "the server was started with (API_KEY)", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return _error(413, _too_large(self.max_body_bytes))
        return None

    def _bounded(self, receive):
        received = 0

        async def bounded():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # raised in the route reading the body: answered as a 413
                raise HTTPException(413, _too_large(self.max_body_bytes))
            return message

        return bounded


def _finite(number: str) -> float:
    """json's hook for numbers with a fraction or exponent, and for NaN and Infinity, which it would accept."""
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"{number} is not a finite number: JSON numbers must be finite (no NaN or Infinity, "
                         f"nothing beyond a double's range)")
    return value


def _parse(body: bytes, kind: type[R] = ChatCompletionRequest) -> R:
    """The request of `kind` in `body`, refused (400) unless it is JSON holding finite numbers and text."""
    try:
        data = json.loads(body, parse_float=_finite, parse_constant=_finite)
    except ValueError as exc:  # not JSON, not UTF-8, or a number refused above
        raise HTTPException(400, f"the request body is not JSON as the API takes it: {exc}") from None
    try:  # a lone surrogate (an escape such as "\ud800") parses but is no text: the tokenizer would fail on it
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise HTTPException(400, f"the request holds a lone UTF-16 surrogate ({exc.object[exc.start:exc.end]!r}), "
                                 f"which is no character: escape a character beyond U+FFFF as a pair of them") from None
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise HTTPException(400, f"invalid request: {problems}") from None


def _prepare(engine: Engine, body: bytes, media: Limits) -> tuple[ChatCompletionRequest, list[Generation]]:
    """The request and its generations, its images decoded, encoded and checked (400 for what the client must
    change, 413 for images over the limits)."""
    chat = _parse(body)
    messages, system, urls = _conversation(chat.messages)
    tools = [tool.model_dump(exclude_none=True) for tool in chat.tools or ()] or None
    asked = chat.max_completion_tokens or chat.max_tokens
    # a temperature in the request decides sampling as in OpenAI's API (0: greedy), whatever the config's do_sample
    sample = None if chat.temperature is None else chat.temperature > 0
    settings = {"temperature": chat.temperature, "do_sample": sample, "top_p": chat.top_p, "stop": chat.stop,
                "max_new_tokens": asked}
    try:
        for column in dict(urls):  # before decoding what would be thrown away
            if engine.refusal(column):
                raise RequestError(engine.refusal(column))
        decoder = Images(media)
        images = [decoder.load(url) for column, url in urls if column == IMAGES]
        with tempfile.TemporaryDirectory(prefix="lf-media-") as folder:  # videos and clips decode within streams()
            files = {c: [decoder.save(c, value, folder) for column, value in urls if column == c]
                     for c in MEDIA_COLUMNS if c != IMAGES}
            generations = engine.streams(messages, system, tools, images=images, files=files, n=chat.n, **settings)
    except MediaError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except (DataError, RequestError) as exc:
        raise HTTPException(400, str(exc)) from None
    prompt, context = generations[0].prompt_tokens, engine.context_length
    if asked and context and prompt + asked > context:
        raise HTTPException(400, f"max_tokens is {asked}, but the model's context is {context} tokens and the prompt "
                                 f"takes {prompt}: ask for at most {context - prompt}, or leave max_tokens out to let "
                                 f"the reply run to the context's end")
    return chat, generations


def _content(message: Message, index: int) -> tuple[str, list[tuple[str, object]]]:
    """A message's text, with a placeholder where each media part was, and its media parts ((column, value))."""
    if message.content is None and not message.tool_calls:
        raise HTTPException(400, f"messages[{index}] ({message.role}) has no content")
    if not isinstance(message.content, list):
        return message.content or "", []
    try:
        text, urls = conversation_content([part.model_dump() for part in message.content], f"messages[{index}]")
    except MediaError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    if urls and message.role != "user":
        kind = urls[0][0][:-1]
        raise HTTPException(400, f"messages[{index}] ({message.role}) has {'an' if kind[0] in 'aeiou' else 'a'} "
                                 f"{kind}: {kind}s go in user messages")
    return text, urls


def _conversation(messages: list[Message]) -> tuple[list[dict], str | None, list[tuple[str, object]]]:
    """(lf's canonical messages, the system prompt, the media parts in order) of an OpenAI request's messages."""
    system, canonical, urls = [], [], []
    for i, message in enumerate(messages):
        text, images = _content(message, i)
        urls += images
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
    return canonical, "\n\n".join(system) or None, urls


def _tool_calls(reply: Reply) -> list[dict]:
    return [{"index": i, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(reply.tool_calls)]


def _message(reply: Reply) -> dict:
    """The assistant message of a whole reply: its text, or its tool calls."""
    if reply.tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": _tool_calls(reply)}
    return {"role": "assistant", "content": reply.text}


class _Turns:
    """The model's turns: generating requests take it one at a time, in arrival order, and wait for it on the event
    loop (a waiting request holds no thread); a request that finds `size` waiting is refused (503)."""

    def __init__(self, size: int):
        self.size, self.waiting, self.model = size, 0, asyncio.Lock()

    def enter(self, generations: list[Generation]) -> _Job:
        if self.waiting >= self.size:
            raise HTTPException(503, f"the server is busy: {self.size} requests already wait for the model "
                                     f"(API_MAX_QUEUE): retry in a while", {"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        return _Job(self, generations)


class _Job:
    """A request's generations, waiting in the queue from the start: `async with job` waits for the model's turn
    and holds it. close() ends the job in whatever state, once: it cancels the generations and leaves the queue or
    hands the model on."""

    def __init__(self, turns: _Turns, generations: list[Generation]):
        self._turns, self.generations, self._state = turns, generations, "waiting"

    async def __aenter__(self) -> list[Generation]:
        try:
            await self._turns.model.acquire()
        except BaseException:  # cancelled while waiting: the client left, or the server is shutting down
            self.close()
            raise
        self._turns.waiting -= 1
        self._state = "generating"
        return self.generations

    async def __aexit__(self, *_exc_info) -> None:
        self.close()

    def close(self) -> None:
        for generation in self.generations:
            generation.cancel()
        if self._state == "waiting":
            self._turns.waiting -= 1
        elif self._state == "generating":
            self._turns.model.release()
        self._state = "closed"


async def _replies(job: _Job) -> list[Reply]:
    async with job as generations:
        return [await generation.afinish() for generation in generations]


async def _unless_disconnected(request: Request, work: Coroutine[object, object, T]) -> T | None:
    """`work`'s result, or None when the client disconnects first, which cancels it."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(disconnected())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server cancels the requests still in flight as it shuts down: say so
        asyncio.current_task().uncancel()
        raise HTTPException(503, "the server is shutting down: retry in a while") from None
    finally:
        for task in tasks:
            task.cancel()
    return tasks[0].result() if tasks[0].done() else None


class _EventStream(StreamingResponse):
    """A job's server-sent events. The response closes the job when it ends, however it ends: a client that
    disconnects cancels the events' generator wherever it is, or before it ever starts."""

    def __init__(self, events, job: _Job):
        super().__init__(events, media_type="text/event-stream")
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.close()


async def _events(job: _Job, head: dict, streamed: bool):
    """Server-sent events of the job's replies, one after another, once its turn comes. With tools (`streamed`
    False) each reply is sent whole: whether it is a tool call is only known at its end. A failure after the
    response has begun is sent as an error event, as OpenAI streams them."""
    def event(index: int, delta: dict, finish_reason: str | None = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async with job as generations:
        try:
            for index, generation in enumerate(generations):
                yield event(index, {"role": "assistant", "content": ""})
                if streamed:
                    async for piece in generation:
                        yield event(index, {"content": piece})
                else:
                    message = _message(await generation.afinish())
                    yield event(index, {k: v for k, v in message.items() if k != "role"})
                yield event(index, {}, generation.reply.finish_reason)
            yield "data: [DONE]\n\n"
        except Exception:
            log.exception("lf api: a streamed reply failed")
            yield f"data: {json.dumps(_error_body(500, SERVER_FAULT))}\n\n"
