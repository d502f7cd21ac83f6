"""`lf api` under load and at its end: crowds of streaming clients waiting and leaving mid-stream, connections left
idle, and SIGTERM to a real `lf api` process with requests in flight. Every client has a timeout: a server that
stops answering fails a test, never hangs it."""

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import yaml
from transformers import StoppingCriteria, StoppingCriteriaList

from lf.serve.app import SPARE_CONNECTIONS, create_app
from test_serve_api import engine, live_server
from test_serve_engine import QUESTION, lf_home, one_thread, options

__all__ = ["engine", "lf_home", "one_thread"]  # fixtures of the API and engine tests, used here too

CHAT = "/v1/chat/completions"


class Pause(StoppingCriteria):
    """A stopping criterion that never stops, but pauses: each token takes `seconds` longer."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def slowed(monkeypatch, engine, seconds: float) -> None:
    """Makes each token the engine generates take `seconds` longer (a long reply outlasts the test's timeouts)."""
    original = engine.model.generate

    def generate(stopping_criteria, **kwargs):
        return original(stopping_criteria=StoppingCriteriaList([*stopping_criteria, Pause(seconds)]), **kwargs)

    monkeypatch.setattr(engine.model, "generate", generate)


def stream(http: httpx.AsyncClient, max_tokens: int):
    """A streamed completion request; awaited, its response with the head read."""
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    return http.send(http.build_request("POST", CHAT, json=body), stream=True)


async def first_event(events) -> dict:
    """The first event of `events`, a response's aiter_lines(), which the caller keeps: an iterator dropped
    unfinished closes its connection."""
    return json.loads((await anext(events)).removeprefix("data: "))


async def crowd(base: str, clients: int) -> None:
    """`clients` streams wait for their turn behind a long one, while the server answers /v1/models; then half
    leave while waiting, the others after their first event."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=0)
    # each reader's first event comes after the turns of those before it (one model, one turn at a time): on a loaded
    # machine 128 turns may take over 20 s, which flaked crowd[256]; a server that stops answering still fails
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        generating = await stream(http, 2000)  # 2,000 slowed tokens: 20 s, unless its client leaves
        generated = generating.aiter_lines()
        await first_event(generated)
        streams = await asyncio.gather(*(stream(http, 4) for _ in range(clients)))
        try:
            assert [s.status_code for s in streams] == [200] * clients
            assert (await http.get("/v1/models", timeout=10)).status_code == 200
            await generating.aclose()
            for waiting in streams[::2]:
                await waiting.aclose()
            for reading in streams[1::2]:
                assert (await first_event(reading.aiter_lines()))["object"] == "chat.completion.chunk"
                await reading.aclose()
        finally:
            await asyncio.gather(generating.aclose(), *(s.aclose() for s in streams))


@pytest.mark.parametrize("clients", [64, 256])
def test_crowds_of_streams_waiting_and_leaving_leave_the_server_answering(engine, clients, monkeypatch):
    # each waiting stream used to block a worker-pool thread: from 40 on, nothing was answered any more
    slowed(monkeypatch, engine, 0.01)
    with live_server(create_app(engine, max_queue=clients)) as base:
        asyncio.run(asyncio.wait_for(crowd(base, clients), 300))
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200
        completion = httpx.post(base + CHAT, json={"messages": QUESTION, "max_tokens": 3}, timeout=30)
        assert completion.json()["usage"]["completion_tokens"] == 3


def test_a_connection_left_idle_is_closed(engine):
    with live_server(create_app(engine), timeout_keep_alive=1) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:  # sends nothing at all
            assert silent.recv(1) == b""  # closed by the server (a timeout here raises instead)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:  # one request, then nothing
            idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while chunk := idle.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")


def test_headers_sent_byte_by_byte_are_closed_as_idle_while_others_are_served(engine):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + b"X-Slow: a" * 40
    sent, failed = [], []

    def trickle(port: int) -> None:  # a byte every 20 ms: uvicorn used to keep such a connection open for ever
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            try:
                for byte in head:
                    slow.sendall(bytes([byte]))
                    sent.append(time.monotonic())
                    time.sleep(0.02)
            except OSError as exc:  # the server closed it: a send fails (reset, or broken pipe)
                failed.append(exc)

    with live_server(create_app(engine), timeout_keep_alive=1) as base:
        slow = threading.Thread(target=trickle, args=(int(base.rsplit(":", 1)[1]),))
        slow.start()
        completion = httpx.post(base + CHAT, json={"messages": QUESTION, "max_tokens": 3}, timeout=30)
        assert completion.json()["usage"]["completion_tokens"] == 3  # served while the slow head trickles in
        slow.join(30)
    # closed about a second after it opened, long before its head was whole
    assert failed and len(sent) < len(head) and sent[-1] - sent[0] < 5


def test_a_body_trickled_or_stalled_after_its_head_gets_a_408_and_is_closed_while_others_are_served(engine):
    body = json.dumps({"messages": QUESTION, "max_tokens": 2}).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    answers = {}

    def slow_body(port: int, name: str) -> None:
        """The head at once, then the body a byte each 50 ms (trickled: 5 s in all), or one byte and no more."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(head)
            opened, received = time.monotonic(), b""
            try:
                for byte in body if name == "trickled" else body[:1]:
                    if select.select([slow], [], [], 0)[0]:  # answered: read that, send no more
                        break
                    slow.sendall(bytes([byte]))
                    time.sleep(0.05)
            except OSError:  # the server closed it: a send fails (reset, or broken pipe)
                pass
            try:
                while chunk := slow.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            answers[name] = (received, time.monotonic() - opened)

    with live_server(create_app(engine, body_timeout=1)) as base:
        port = int(base.rsplit(":", 1)[1])
        slow = [threading.Thread(target=slow_body, args=(port, name)) for name in ("trickled", "stalled")]
        for thread in slow:
            thread.start()
        completion = httpx.post(base + CHAT, content=body, timeout=30)  # a body sent whole is served meanwhile
        assert completion.json()["usage"]["completion_tokens"] == 2
        for thread in slow:
            thread.join(30)
    for name, (received, seconds) in answers.items():
        # answered, then closed, about a second after the head: long before the trickled body was whole (5 s)
        assert received.startswith(b"HTTP/1.1 408") and b"connection: close" in received.lower(), (name, received)
        assert b"the request body did not arrive within 1 s, the server's limit" in received and seconds < 4.5
    assert set(answers) == {"trickled", "stalled"}


def test_connections_beyond_slots_queue_and_spare_get_a_503_and_an_endless_head_a_400(engine):
    app = create_app(engine, max_queue=2)
    assert app.state.max_connections == 2 + 1 + SPARE_CONNECTIONS
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        opened = [socket.create_connection(("127.0.0.1", port), timeout=10)
                  for _ in range(app.state.max_connections)]
        try:
            time.sleep(0.2)  # the server accepts them all
            assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 503
        finally:
            for connection in opened:
                connection.close()
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{base}/v1/models", timeout=10).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
        # h11 buffers at most 16 KiB of a request head that is not whole yet
        with socket.create_connection(("127.0.0.1", port), timeout=10) as endless:
            endless.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
            assert endless.recv(65536).startswith(b"HTTP/1.1 400")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_stops_lf_api_with_requests_in_flight_and_frees_the_port(tmp_path, lf_home):
    cfg = tmp_path / "api.yaml"
    cfg.write_text(yaml.safe_dump(options()))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "API_PORT": str(port), "API_MODEL_NAME": "served", "LF_HOME": lf_home}
    process = subprocess.Popen([sys.executable, "-m", "lf.cli", "api", str(cfg)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "lf api did not start"
            try:
                models = httpx.get(f"{base}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert models.json()["data"][0]["id"] == "served"  # API_MODEL_NAME

        # two replies of 2,000 tokens (many seconds each), one streaming, one whole and waiting for its turn
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": 2000}
        whole = []
        waiting = threading.Thread(target=lambda: whole.append(httpx.post(base + CHAT, json=body, timeout=60)))
        with httpx.stream("POST", base + CHAT, json={**body, "stream": True}, timeout=60) as streaming:
            events = streaming.iter_lines()
            assert next(events).startswith("data: ")
            waiting.start()
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            rest = []
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):  # cut by the server
                rest.extend(line for line in events if line)
        waiting.join(60)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert process.returncode == -signal.SIGTERM, output  # uvicorn ends by the signal, once it has shut down
    assert not any("finish_reason\": \"length" in line or "[DONE]" in line for line in rest)  # cut short
    [response] = whole
    assert response.status_code == 503 and response.json()["error"]["message"] == "the server is shutting down: " \
                                                                                   "retry in a while"
    with socket.socket() as again:  # the port is free: a server may listen on it again (as uvicorn would, reusing
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # it with connections still in TIME_WAIT)
        again.bind(("127.0.0.1", port))
        again.listen()
