"""`lf api`'s OpenAI-compatible server, live on loopback (uvicorn in a thread), driven by the official `openai`
client and by raw HTTP: models, whole and streamed completions equal to the engine's greedy text, n, stop, the API
key, malformed requests, 32 concurrent requests, a client leaving mid-stream or a whole request (either cancels its
generation), and tool calls. Limits and errors: test_serve_api_limits.py; load and shutdown: test_serve_api_load.py."""

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest

from lf import cli
from lf.serve.app import create_app, server
from test_serve_engine import (QUESTION, TOOL_CALL_TEXT, WEATHER_TOOL, adapter, lf_home, one_thread, recorded, script,
                               tiny_engine)

__all__ = ["adapter", "lf_home", "one_thread"]  # the engine tests' module fixtures, used here too


@contextlib.contextmanager
def live_server(app, **options):
    """`app` served as `lf api` serves it (uvicorn.Config `options` changed) on a free loopback port, in a thread;
    yields the base URL."""
    running = server(app, "127.0.0.1", 0, log_level="warning", **options)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = running.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def url(engine):
    with live_server(create_app(engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(engine, messages=QUESTION, max_new_tokens=12, **settings) -> str:
    return engine.generate(messages, temperature=0, max_new_tokens=max_new_tokens, **settings)[0].text


def test_models_lists_the_served_model(client, engine):
    assert [m.id for m in client.models.list()] == [engine.name] == ["lf-tiny-llama"]


def test_completion_whole_and_streamed_equal_the_engine_greedy_text(client, engine):
    expected = greedy(engine)
    completion = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=12)
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected, "length")
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == len(engine.prompt_ids(QUESTION))
    assert completion.object == "chat.completion" and completion.model == "lf-tiny-llama"

    chunks = list(client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=12,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_system_prompt_n_and_stop(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    expected = greedy(engine, QUESTION, system="Be brief.")
    completion = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=12, n=2)
    assert [(c.index, c.message.content) for c in completion.choices] == [(0, expected), (1, expected)]
    chunks = list(client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=12, n=2,
                                                 stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == expected and mine[-1].finish_reason == "length"

    stop = expected[5:8]
    completion = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=12,
                                                stop=[stop])
    [choice] = completion.choices
    assert (choice.message.content, choice.finish_reason) == (expected[:expected.index(stop)], "stop")


def test_a_lora_adapter_serves_its_own_replies(engine, adapter):
    adapted = tiny_engine(adapter_name_or_path=adapter, finetuning_type="lora")
    expected = greedy(adapted)  # the engine's reply with the adapter (test_serve_engine: peft's, unmerged)
    assert expected != greedy(engine)
    with live_server(create_app(adapted)) as base:
        served = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        completion = served.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=12)
    assert completion.choices[0].message.content == expected


def test_api_key_is_required_when_set(engine):
    with live_server(create_app(engine, "s3cret")) as base:
        for key in ("wrong", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
                openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0).models.list()
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(f"{base}/v1/models", headers=headers)
            assert response.status_code == 401 and "API_KEY" in response.json()["error"]["message"]
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
        assert response.status_code == 401
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["lf-tiny-llama"]
        assert good.chat.completions.create(model="any", messages=QUESTION, max_tokens=2).choices[0].message.content


@pytest.mark.parametrize("body, says", [
    ({}, "messages: Field required"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role: Input should be 'system'"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role: Field required"),
    ({"messages": QUESTION, "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"messages": QUESTION, "temperature": -0.5}, "temperature: Input should be greater than or equal to 0"),
    ({"messages": QUESTION, "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"messages": QUESTION, "stream": "often"}, "stream: Input should be a valid boolean"),
    ({"messages": [{"role": "user"}]}, "messages[0] (user) has no content"),
    ({"messages": [*QUESTION, {"role": "system", "content": "late"}]}, "a system message must come before"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": "Paris"}]}, "it must end with a user or observation"),
    ({"messages": [*QUESTION, *QUESTION]}, "message 2 has role 'user' where assistant or function is expected"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {}}]}, "tools.0.function.name: Field required"),
])
def test_malformed_requests_get_400_saying_what_is_wrong(url, body, says):
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_or_a_wrong_path_get_openai_style_errors(url):
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not JSON as the API takes it: Expecting " \
                                                  "property name enclosed in double quotes: line 1 column 2 (char 1)"
    response = httpx.get(f"{url}/v1/completions")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"


def test_32_concurrent_requests_streamed_and_whole_are_all_answered(client, engine):
    questions = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(4)]
    expected = [greedy(engine, q, max_new_tokens=4) for q in questions]

    def ask(i: int) -> str:
        messages, stream = questions[i % 4], i % 2 == 1
        reply = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=4,
                                               stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in reply)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == [expected[i % 4] for i in range(32)]


def assert_cut_short(generated: list, engine, max_tokens: int) -> None:
    """One generation ran, and stopped early: not by an end of turn or max_tokens."""
    deadline = time.monotonic() + 60
    while not generated and time.monotonic() < deadline:
        time.sleep(0.05)
    [tokens] = generated
    assert len(tokens) < max_tokens and tokens[-1] not in engine.stop_ids


def test_a_client_leaving_mid_stream_cancels_its_generation(url, client, engine, monkeypatch):
    generated = recorded(monkeypatch, engine)
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert_cut_short(generated, engine, 1000)
    completion = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=3)
    assert completion.choices[0].message.content == greedy(engine, max_new_tokens=3)


def test_a_client_leaving_a_whole_request_cancels_its_generation(url, client, engine, monkeypatch):
    # as a client whose timeout ran out: the server used to generate on, holding the model from everyone
    generated = recorded(monkeypatch, engine)
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 2000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert_cut_short(generated, engine, 2000)
    completion = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=3,
                                                timeout=10)
    assert completion.choices[0].message.content == greedy(engine, max_new_tokens=3)


def test_tool_calls_are_parsed_and_tool_results_reach_the_prompt(client, engine, monkeypatch):
    script(monkeypatch, engine, TOOL_CALL_TEXT)
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    completion = client.chat.completions.create(model="any", messages=QUESTION, tools=tools)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris"})
    assert call.id.startswith("call_")

    chunks = list(client.chat.completions.create(model="any", messages=QUESTION, tools=tools, stream=True))
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or ()]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the call and its results go back in: qwen's template writes them as <tool_call> and <tool_response>
    prompts = script(monkeypatch, engine, "It is sunny in Paris.")
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    completion = client.chat.completions.create(model="any", messages=history, tools=tools)
    assert completion.choices[0].message.content == "It is sunny in Paris."
    [prompt] = [engine.tokenizer.decode(ids) for ids in prompts]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt and "<tools>" in prompt


def test_main_refuses_bad_settings_and_config_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("API_PORT", "eighty")
    assert cli.main(["api", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err == "lf api: API_PORT='eighty' is not a whole number from 1 to 65535: set it to " \
                                      "one (default 8000)\n"
    monkeypatch.setenv("API_PORT", "8123")
    monkeypatch.setenv("API_MAX_QUEUE", "0")
    assert cli.main(["api", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err == "lf api: API_MAX_QUEUE='0' is not a whole number from 1: set it to one " \
                                      "(default 64)\n"
    monkeypatch.delenv("API_MAX_QUEUE")
    assert cli.main(["api", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err == f"lf api: config file not found: {tmp_path / 'cfg.yaml'}\n"
    assert cli.main(["api", "--help"]) == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, call_text, result_text", [
    ("qwen3_5", "<tool_call>\n<function=get_weather>\n<parameter=city>\n東京\n</parameter>\n</function>\n</tool_call>",
     "<tool_response>\n{\"sky\": \"sunny\"}\n</tool_response>"),
    ("glm4_moe", "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>東京</arg_value>\n</tool_call>",
     '{"sky": "sunny"}'),
    ("lfm2", '<|tool_call_start|>[get_weather(city="東京")]<|tool_call_end|>',
     '<|tool_response_start|>{"sky": "sunny"}<|tool_response_end|>'),
    ("default", 'Action: get_weather\nAction Input: {"city": "東京"}', '{"sky": "sunny"}')])
def test_tool_calls_in_the_templates_own_format(client, engine, monkeypatch, fmt, call_text, result_text):
    # the server reads calls with the parser of the template's tool format and writes them back in it
    monkeypatch.setattr(engine, "template", replace(engine.template, tool_format=fmt))
    script(monkeypatch, engine, call_text)
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    completion = client.chat.completions.create(model="any", messages=QUESTION, tools=tools)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "東京"})

    prompts = script(monkeypatch, engine, "It is sunny in 東京.")
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    completion = client.chat.completions.create(model="any", messages=history, tools=tools)
    assert completion.choices[0].message.content == "It is sunny in 東京."
    [prompt] = [engine.tokenizer.decode(ids) for ids in prompts]
    assert call_text in prompt and result_text in prompt
