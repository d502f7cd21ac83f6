"""`lf api` over the batched engine (lf.serve.batch, max_batch 16): 16 concurrent greedy clients, streamed and
whole, get token for token what transformers' generate writes for each alone; replies that join a running batch are
prefilled together, one forward pass for their different prompts; a request's `n` replies are n rows of the batch
(greedy: n equal choices; sampled with a seed: the same choices again), streamed or not; stop strings and seeded sampling per
request inside a batch; the sampling filters equal transformers' logits processors; a full queue gets a 429, a body
over the limit a 413; a client that disconnects frees its slot at once; a failing step fails its rows, a failing
prefill its joiners only."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from lf import cli
from lf.config import parse_infer_args
from lf.serve import Engine
from lf.serve.app import create_app
from lf.serve.batch import Row, processed
from test_serve_api import live_server
from test_serve_engine import lf_home, one_thread, options, tiny_engine

__all__ = ["lf_home", "one_thread"]  # the engine tests' module fixtures, used here too (autouse)

CHAT = "/v1/chat/completions"
# 16 different prompts (lengths 1 to 8 words past the template's), so the batch's rows are left-padded differently
QUESTIONS = [[{"role": "user", "content": f"Question {i}: " + "where is it? " * (i % 8)}] for i in range(16)]


@pytest.fixture(scope="module")
def locked():
    return tiny_engine()  # max_batch 1: each reply by transformers' generate


def batched_engine(max_batch: int) -> Engine:
    return Engine(parse_infer_args(options(), "chat"), max_batch=max_batch)


@pytest.fixture(scope="module")
def batched():
    return batched_engine(16)


@pytest.fixture(scope="module")
def url(batched):
    with live_server(create_app(batched)) as base:
        yield base


def test_sixteen_concurrent_greedy_clients_get_what_each_gets_alone(url, locked, batched):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    tokens = [6 + 2 * i for i in range(16)]  # rows end at different steps, and new ones join meanwhile

    def ask(i: int) -> tuple[str, int | None]:
        settings = {"model": "any", "messages": QUESTIONS[i], "temperature": 0, "max_tokens": tokens[i]}
        if i % 2:
            chunks = list(client.chat.completions.create(**settings, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks), None
        completion = client.chat.completions.create(**settings)
        return completion.choices[0].message.content, completion.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    alone = [locked.generate(q, temperature=0, max_new_tokens=n)[0] for q, n in zip(QUESTIONS, tokens)]
    assert [text for text, _ in replies] == [reply.text for reply in alone]
    assert [count for _, count in replies[::2]] == [reply.completion_tokens for reply in alone[::2]]
    assert batched.batcher.active == 0


def forwards(monkeypatch, engine: Engine) -> list[tuple[int, int]]:
    """The (rows, tokens) shape of every forward pass the engine's model makes from now on."""
    shapes, forward = [], engine.model.forward

    def recording(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", recording)
    return shapes


def test_joiners_are_prefilled_together_and_merged_into_the_running_batch(batched, locked, monkeypatch):
    shapes = forwards(monkeypatch, batched)
    asked = [(0, 12), (5, 6), (2, 9), (5, 6), (7, 8)]  # (question, new tokens): two rows share a prompt
    replies = [[] for _ in asked]
    ended = [threading.Event() for _ in asked]

    def row(i: int) -> Row:
        question, tokens = asked[i]
        ids = batched.prompt_ids(QUESTIONS[question])
        return Row(ids, {**batched._generate_kwargs({"temperature": 0, "max_new_tokens": tokens}), "temperature": 1.0,
                         "top_p": 1.0, "top_k": 0}, None, threading.Event(),
                   lambda token: replies[i].append(token) or token in batched.stop_ids,
                   lambda error: ended[i].set())

    with batched._lock:  # the first row is taken and waits for the model; the others queue meanwhile
        batched.batcher.submit(row(0))
        deadline = time.monotonic() + 10
        while batched.batcher.active != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for i in range(1, len(asked)):
            batched.batcher.submit(row(i))
    for event in ended:
        assert event.wait(60)
    # the first row alone (its prefill, a step), then the 4 joiners' 3 prompts in one pass, then 5 rows a step
    assert shapes[0][0] == 1 and shapes[1] == (1, 1) and shapes[2][0] == 3 and shapes[3] == (5, 1)
    alone = [locked.generate(QUESTIONS[q], temperature=0, max_new_tokens=n)[0] for q, n in asked]
    assert [batched.tokenizer.decode(ids, skip_special_tokens=True) for ids in replies] == [r.text for r in alone]


def test_n_replies_are_rows_of_the_batch_streamed_or_not(url, batched, monkeypatch):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    shapes = forwards(monkeypatch, batched)
    ask = {"model": "any", "messages": QUESTIONS[4], "max_tokens": 10, "n": 3}

    def texts(completion) -> list[str]:
        assert [c.index for c in completion.choices] == [0, 1, 2]
        return [c.message.content for c in completion.choices]

    def streamed(**settings) -> list[str]:
        pieces = ["", "", ""]
        for chunk in client.chat.completions.create(**ask, **settings, stream=True):
            for choice in chunk.choices:
                pieces[choice.index] += choice.delta.content or ""
        return pieces

    greedy = texts(client.chat.completions.create(**ask, temperature=0))
    assert shapes[0][0] == 1 and (3, 1) in shapes  # one prefill for the 3 rows, then steps of all 3
    assert greedy == [batched.generate(QUESTIONS[4], temperature=0, max_new_tokens=10)[0].text] * 3
    assert streamed(temperature=0) == greedy
    sampled = texts(client.chat.completions.create(**ask, temperature=1.0, seed=7))
    assert len(set(sampled)) > 1  # each row draws with its own seed: 7, 8, 9
    assert texts(client.chat.completions.create(**ask, temperature=1.0, seed=7)) == sampled
    assert streamed(temperature=1.0, seed=7) == sampled


def test_stop_strings_and_seeded_sampling_are_each_requests_own(batched):
    whole = batched.generate(QUESTIONS[3], temperature=0, max_new_tokens=24)[0].text
    stop = whole[9:12]
    cut = whole[:whole.find(stop)]

    def ask(i: int):
        if i % 3 == 0:
            return batched.generate(QUESTIONS[3], temperature=0, max_new_tokens=24, stop=[stop])[0]
        return batched.generate(QUESTIONS[i], temperature=1.0, top_p=0.9, max_new_tokens=10, seed=i)[0]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    for i, reply in enumerate(together):
        if i % 3 == 0:
            assert (reply.text, reply.finish_reason) == (cut, "stop")
        else:  # the same draws alone as in a batch: each row samples with its own seeded generator
            [alone] = batched.generate(QUESTIONS[i], temperature=1.0, top_p=0.9, max_new_tokens=10, seed=i)
            assert reply.text == alone.text
    seeded = [batched.generate(QUESTIONS[1], temperature=1.0, max_new_tokens=10, seed=s)[0].text for s in range(4)]
    assert len(set(seeded)) > 1  # the seed decides the draws
    # n replies draw with seed, seed + 1, ...
    assert [r.text for r in batched.generate(QUESTIONS[1], n=2, temperature=1.0, max_new_tokens=10, seed=2)] == \
        seeded[2:4]


def test_api_max_batch_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("API_MAX_BATCH", "2000")
    assert cli.main(["api", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err == "lf api: API_MAX_BATCH='2000' is not a whole number from 1 to 1024: set it " \
                                      "to one (default 16)\n"


@pytest.mark.parametrize("settings", [
    {"do_sample": False, "repetition_penalty": 1.3, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"do_sample": True, "repetition_penalty": 1.0, "temperature": 0.7, "top_k": 0, "top_p": 0.8},
    {"do_sample": True, "repetition_penalty": 1.2, "temperature": 1.5, "top_k": 20, "top_p": 0.5},
])
def test_sampling_filters_equal_transformers_logits_processors(settings):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 500, generator=generator) * 3
    seen = torch.randint(0, 500, (1, 30), generator=generator)
    expected = RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"])(seen, scores.clone())
    if settings["do_sample"]:
        for warper in (TemperatureLogitsWarper(settings["temperature"]),
                       *([TopKLogitsWarper(settings["top_k"])] if settings["top_k"] else []),
                       TopPLogitsWarper(settings["top_p"])):
            expected = warper(seen, expected)
    got = processed(scores[0].clone(), settings, seen[0].tolist())
    assert torch.equal(got.isinf(), expected[0].isinf()) and (~got.isinf()).sum() > 1
    torch.testing.assert_close(got[~got.isinf()], expected[0][~got.isinf()])


async def long_stream(http: httpx.AsyncClient):
    body = {"messages": QUESTIONS[0], "temperature": 0, "max_tokens": 2000, "stream": True}
    response = await http.send(http.build_request("POST", CHAT, json=body), stream=True)
    lines = response.aiter_lines()  # kept: an iterator dropped unfinished closes its connection
    assert (await anext(lines)).startswith("data: ")
    return response, lines


async def until(condition, seconds: float = 10) -> float:
    """Waits for `condition()`; returns how long it took (fails after `seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_limits_full_queue_429_big_body_413_and_a_disconnect_frees_its_slot():
    engine = batched_engine(2)

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            (first, kept), (second, also_kept) = await long_stream(http), await long_stream(http)  # both slots
            await until(lambda: engine.batcher.active == 2)
            waiting = asyncio.ensure_future(http.post(CHAT, json={"messages": QUESTIONS[1], "max_tokens": 3}))
            await asyncio.sleep(0.2)
            full = await http.post(CHAT, json={"messages": QUESTIONS[1], "max_tokens": 3})
            assert full.status_code == 429 and full.headers["Retry-After"] == "1"
            assert "1 requests already wait for the model (API_MAX_QUEUE)" in full.json()["error"]["message"]
            beyond = await http.post(CHAT, json={"messages": QUESTIONS[1], "max_tokens": 5000})
            assert beyond.status_code == 400 and "the model's context is 2048 tokens" in beyond.json()["error"]["message"]
            big = await http.post(CHAT, content=b"{" + b" " * 2000 + b"}")
            assert big.status_code == 413 and "larger than 1000 bytes" in big.json()["error"]["message"]
            await first.aclose()  # the client leaves: its row leaves the batch, the waiting request takes the slot
            assert (await waiting).json()["usage"]["completion_tokens"] == 3
            await second.aclose()
            await until(lambda: engine.batcher.active == 0)

    with live_server(create_app(engine, max_queue=1, max_body_bytes=1000)) as base:
        asyncio.run(asyncio.wait_for(scenario(base), 60))


def test_a_failing_step_fails_its_requests_with_a_500_and_the_batch_goes_on(url, batched, monkeypatch):
    def forward(*args, **kwargs):
        raise RuntimeError("out of memory in /home/someone/models")

    monkeypatch.setattr(batched.model, "forward", forward)
    response = httpx.post(url + CHAT, json={"messages": QUESTIONS[0], "max_tokens": 4}, timeout=60)
    assert response.status_code == 500 and "/home" not in response.text
    monkeypatch.undo()
    response = httpx.post(url + CHAT, json={"messages": QUESTIONS[0], "max_tokens": 4}, timeout=60)
    assert response.json()["usage"]["completion_tokens"] == 4


def test_a_failing_prefill_fails_its_joiners_only_and_the_rows_decoding_go_on(batched, locked, monkeypatch):
    forward = batched.model.forward

    def failing(**kwargs):  # the prefill of a prompt holding "Boom" fails, as a request's bad media input would
        if kwargs["input_ids"].shape[1] > 1 and batched.tokenizer.encode("Boom")[0] in kwargs["input_ids"].tolist()[0]:
            raise RuntimeError("no room for this one's features")
        return forward(**kwargs)

    monkeypatch.setattr(batched.model, "forward", failing)
    pieces = iter(batched.stream(QUESTIONS[3], temperature=0, max_new_tokens=300))
    first = next(pieces)  # its row decodes (300 steps: it is still decoding at the next line)
    with ThreadPoolExecutor(1) as pool:
        with batched._lock:  # the batch waits at its next step until the failing request has come: it joins there
            boom = pool.submit(batched.generate, [{"role": "user", "content": "Boom"}], temperature=0,
                               max_new_tokens=4)
            deadline = time.monotonic() + 30
            while not batched.batcher._waiting:
                assert time.monotonic() < deadline and batched.batcher.active == 1, "the batch took it early"
                time.sleep(0.01)
        with pytest.raises(RuntimeError, match="no room for this one's features"):
            boom.result(timeout=60)
    rest = "".join(pieces)
    assert first + rest == locked.generate(QUESTIONS[3], temperature=0, max_new_tokens=300)[0].text
