"""`lf api`'s limits and errors, on a live loopback server: the API key checked before the body, the body's size,
JSON without NaN, Infinity or lone surrogates, n, the model's context (prompt and max_tokens), the queue of waiting
requests, a fault of the server, and what clients see of the model's local path (nothing)."""

import json

import httpx
import pytest

from lf.serve.app import MAX_N, SERVER_FAULT, create_app, public_name
from test_serve_api import engine, live_server, url
from test_serve_engine import QUESTION, leaving, lf_home, one_thread

__all__ = ["engine", "lf_home", "one_thread", "url"]  # fixtures of the API and engine tests, used here too

CHAT = "/v1/chat/completions"


def error(response: httpx.Response, status: int, kind: str = "invalid_request_error") -> str:
    """The message of an OpenAI-style error response, checked to have `status` and `kind`."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["type"] == kind
    return body["message"]


def test_the_key_is_checked_before_the_body_and_the_body_size_before_reading_it(engine):
    key = {"Authorization": "Bearer s3cret"}
    large = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    with live_server(create_app(engine, "s3cret", max_body_bytes=1000)) as base:
        for body in (b"{not json", large):
            assert "API_KEY" in error(httpx.post(base + CHAT, content=body), 401, "authentication_error")
        says = "the request body is larger than 1000 bytes, the server's limit: send less, or start the server with " \
               "a larger API_MAX_BODY_BYTES"
        assert error(httpx.post(base + CHAT, content=large, headers=key), 413) == says
        chunked = httpx.post(base + CHAT, content=iter([large[:600], large[600:]]), headers=key)  # no Content-Length
        assert error(chunked, 413) == says
        small = json.dumps({"messages": QUESTION, "max_tokens": 2}).encode()
        assert httpx.post(base + CHAT, content=small, headers=key).status_code == 200

        for page in ("/docs", "/redoc", "/openapi.json"):  # off with a key: a browser could not send it
            assert httpx.get(base + page).status_code == 401
            assert httpx.get(base + page, headers=key).status_code == 404


def test_clients_see_no_local_path(engine, monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "name", "/home/someone/models/lf-tiny-llama")
    with live_server(create_app(engine)) as base:
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "lf-tiny-llama"
        completion = httpx.post(base + CHAT, json={"messages": QUESTION, "max_tokens": 2}).json()
        assert completion["model"] == "lf-tiny-llama"
        pages = [httpx.get(base + page) for page in ("/docs", "/redoc", "/openapi.json")]
        assert all(page.status_code == 200 and "/home/someone" not in page.text for page in pages)
        assert "lf-tiny-llama" in pages[2].json()["info"]["description"]
    with live_server(create_app(engine, model_name="gpt-3.5-turbo")) as base:  # API_MODEL_NAME
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "gpt-3.5-turbo"
    (tmp_path / "my-model").mkdir()
    assert public_name(f"{tmp_path}/my-model/") == "my-model" and public_name("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"


NOT_JSON = "the request body is not JSON as the API takes it: "


@pytest.mark.parametrize("body, says", [
    (b'{"messages": [], "temperature": Infinity}', NOT_JSON + "Infinity is not a finite number: JSON numbers must be "
                                                              "finite (no NaN or Infinity, nothing beyond a double's "
                                                              "range)"),
    (b'{"messages": [], "top_p": NaN}', NOT_JSON + "NaN is not a finite number"),
    (b'{"messages": [], "temperature": -Infinity}', NOT_JSON + "-Infinity is not a finite number"),
    (b'{"messages": [], "max_tokens": 1e999}', NOT_JSON + "1e999 is not a finite number"),
    (b'{"messages": [], "tools": [{"function": {"name": "f", "parameters": {"x": [NaN]}}}]}',
     NOT_JSON + "NaN is not a finite number"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "the request holds a lone UTF-16 surrogate ('\\ud800'), which is no character: escape a character beyond "
     "U+FFFF as a pair of them"),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', NOT_JSON + "'utf-8' codec can't decode byte 0xff"),
    (b'[]', "invalid request: body: Input should be a valid dictionary or instance of ChatCompletionRequest"),
    (json.dumps({"messages": QUESTION, "n": MAX_N + 1}).encode(), "invalid request: n: Input should be less than or "
                                                                   "equal to 128"),
], ids=["Infinity", "NaN", "-Infinity", "1e999", "NaN-in-tools", "lone-surrogate", "not-utf-8", "array", "n"])
def test_what_is_not_json_as_the_api_takes_it_gets_a_400(url, body, says):
    assert error(httpx.post(url + CHAT, content=body, headers={"Content-Type": "application/json"}), 400).startswith(
        says)


def test_a_prompt_or_max_tokens_beyond_the_context_gets_a_400_naming_the_limit(url, engine):
    chars = {"messages": [{"role": "user", "content": "a" * (engine.max_chars + 1)}]}
    assert error(httpx.post(url + CHAT, json=chars), 400) == (
        f"the conversation is {engine.max_chars + 1} characters, more than the model's context of 2048 tokens can "
        f"hold (at most {engine.max_chars} characters): shorten it")
    tokens = {"messages": [{"role": "user", "content": "ab " * 3000}]}
    assert "but the model's context is 2048 tokens" in error(httpx.post(url + CHAT, json=tokens), 400)

    messages = leaving(engine, 3)
    prompt = len(engine.prompt_ids(messages))
    for key in ("max_tokens", "max_completion_tokens"):
        response = httpx.post(url + CHAT, json={"messages": messages, key: 2048 - prompt + 1})
        assert error(response, 400) == (f"max_tokens is {2048 - prompt + 1}, but the model's context is 2048 tokens "
                                        f"and the prompt takes {prompt}: ask for at most {2048 - prompt}, or leave "
                                        f"max_tokens out to let the reply run to the context's end")
    completion = httpx.post(url + CHAT, json={"messages": messages, "temperature": 0}, timeout=30).json()
    assert completion["usage"]["total_tokens"] == 2048 and completion["choices"][0]["finish_reason"] == "length"


def test_a_full_queue_gets_a_429_with_retry_after_and_empties_as_clients_leave(engine):
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 2000, "stream": True}
    with live_server(create_app(engine, max_queue=1)) as base, httpx.Client(base_url=base, timeout=30) as http:
        for _round in range(2):  # the second finds the queue as the first left it: empty
            with http.stream("POST", CHAT, json=body) as generating, http.stream("POST", CHAT, json=body) as waiting:
                events = generating.iter_lines()  # kept: an iterator dropped unfinished closes its connection
                assert next(events).startswith("data: ") and waiting.status_code == 200
                response = http.post(CHAT, json={"messages": QUESTION, "max_tokens": 2})
                assert response.headers["Retry-After"] == "1"
                assert error(response, 429) == "the server is busy: 1 requests already wait for the model " \
                                               "(API_MAX_QUEUE): retry in a while"
        assert http.post(CHAT, json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_a_fault_of_the_server_is_a_json_500_that_names_nothing_of_it(url, engine, monkeypatch):
    def generate(**kwargs):
        raise RuntimeError("out of memory in /home/someone/models")

    monkeypatch.setattr(engine.model, "generate", generate)
    response = httpx.post(url + CHAT, json={"messages": QUESTION})
    assert error(response, 500, "server_error") == SERVER_FAULT and "/home" not in response.text
    with httpx.stream("POST", url + CHAT, json={"messages": QUESTION, "stream": True}, timeout=30) as response:
        *_, last = [line for line in response.iter_lines() if line]
    assert json.loads(last.removeprefix("data: ")) == {"error": {"message": SERVER_FAULT, "type": "server_error"}}
