"""The OpenAI client against `lf api` with infer_backend: vllm (a real server process, vLLM's CPU build) serving
the tiny model with a LoRA adapter, unmerged: every reply is checked against lf's transformers engine on the same
model and adapter (greedy decoding: the same tokens), plain, streamed, cut at stop words, n choices, with tools and
tool results in the prompt, and 16 concurrent clients; images are refused in one line."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from openai import BadRequestError, OpenAI
from PIL import Image

from lf.config import parse_infer_args
from lf.serve.engine import Engine
from lf.serve.vllm_engine import TEXT_ONLY

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


def config(adapter: str, **overrides) -> dict:
    return {"model_name_or_path": "lf-tiny-llama", "template": "qwen", "infer_dtype": "float32",
            "adapter_name_or_path": adapter, "infer_backend": "vllm", "vllm_enforce_eager": True,
            "vllm_maxlen": 512, "vllm_max_lora_rank": 8, "temperature": 0, **overrides}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(adapter, tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "api.yaml"
    path.write_text(yaml.safe_dump(config(adapter)))
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "API_MAX_BATCH": "8"}
    server = subprocess.Popen([sys.executable, "-m", "lf.cli", "api", str(path)], env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, "lf api exited while starting (its output is above)"
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "lf api did not answer within 300 s"
            time.sleep(0.5)
        yield OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    finally:
        server.terminate()
        server.wait(60)


@pytest.fixture(scope="module")
def reference(adapter) -> Engine:
    """lf's transformers engine on the same model and adapter."""
    return Engine(parse_infer_args(config(adapter, infer_backend="huggingface"), "api"))


def greedy(reference: Engine, **settings):
    [reply] = reference.generate(QUESTION, temperature=0, max_new_tokens=MAX_TOKENS, **settings)
    return reply


def ask(client, **kwargs):
    return client.chat.completions.create(model="lf-tiny-llama", messages=QUESTION, max_tokens=MAX_TOKENS, **kwargs)


def test_plain_reply_is_the_transformers_engines_greedy_reply_with_the_adapter(client, reference):
    expected = greedy(reference)
    assert expected.completion_tokens == MAX_TOKENS and expected.text  # the adapter's model runs to the limit
    out = ask(client, temperature=0)
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (expected.prompt_tokens, MAX_TOKENS)
    # without the adapter the model writes something else: vLLM did serve it
    base = Engine(parse_infer_args(config(None, infer_backend="huggingface"), "api"))
    assert base.generate(QUESTION, temperature=0, max_new_tokens=MAX_TOKENS)[0].text != expected.text


def test_streamed_pieces_make_the_same_reply(client, reference):
    pieces, reasons = [], []
    for chunk in ask(client, temperature=0, stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == greedy(reference).text
    assert len([p for p in pieces if p]) > 1 and reasons[-1] == "length"


def test_stop_words_cut_the_reply_where_they_start(client, reference):
    text = greedy(reference).text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    out = ask(client, temperature=0, stop=[stop])
    assert out.choices[0].message.content == text[:text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_n_choices_greedy_and_seeded(client, reference):
    out = ask(client, temperature=0, n=2)
    assert [c.message.content for c in out.choices] == [greedy(reference).text] * 2
    first = ask(client, temperature=1.0, n=3, seed=7)
    again = ask(client, temperature=1.0, n=3, seed=7)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # choice i draws with seed 7 + i, both times
    assert len(set(texts)) > 1  # and the seeds differ


WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_tools_and_tool_results_prompt_vllm_as_the_transformers_engine(client, reference):
    # the template writes the tools, the call and its result into the prompt (the engine's, whichever backend); the
    # reply is read for calls by the template's tool format (tests/test_serve_api.py scripts a call on the same code)
    call = {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    history = [*QUESTION, {"role": "assistant", "content": None,
                           "tool_calls": [{"id": "call_1", "type": "function", "function": call}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    canonical = [*QUESTION, {"role": "function", "content": json.dumps([call])},
                 {"role": "observation", "content": '{"sky": "sunny"}'}]
    tools = [{"type": "function", "function": WEATHER}]
    for messages, lf_messages in ((QUESTION, QUESTION), (history, canonical)):
        [expected] = reference.generate(lf_messages, tools=tools, temperature=0, max_new_tokens=MAX_TOKENS)
        out = client.chat.completions.create(model="lf-tiny-llama", messages=messages, tools=tools,
                                             max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].message.content == expected.text and expected.text
        assert out.choices[0].finish_reason == expected.finish_reason
        assert out.usage.prompt_tokens == expected.prompt_tokens  # the tools are in the prompt, as lf writes them


def test_sixteen_concurrent_clients_get_what_each_gets_alone(client, reference):
    questions = [[{"role": "user", "content": f"Question {i}: " + "where is it? " * (i % 8)}] for i in range(16)]
    tokens = [6 + i for i in range(16)]  # rows end at different steps while others wait for a slot (8)

    def ask(i: int) -> str:
        out = client.chat.completions.create(model="lf-tiny-llama", messages=questions[i], temperature=0,
                                             max_tokens=tokens[i])
        return out.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    alone = [reference.generate(q, temperature=0, max_new_tokens=n)[0].text for q, n in zip(questions, tokens)]
    assert together == alone and len(set(alone)) > 1


def test_images_are_refused_in_one_line(client):
    image = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(image, "PNG")
    url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model="lf-tiny-llama", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}])
    assert caught.value.response.json()["error"]["message"] == TEXT_ONLY
    assert ask(client, temperature=0).choices[0].finish_reason == "length"  # and the server goes on
