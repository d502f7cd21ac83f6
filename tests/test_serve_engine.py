"""lf.serve's Engine and `lf chat` on the quickstart's tiny Llama (built in a temporary LF_HOME): greedy replies equal
transformers' own generate on the template's prompt, an adapter as peft applies it, stop strings, settings and their
errors, tool calls, cancelling a stream (plain and asynchronous), the model's context (a reply stops at its end, a
prompt too long is refused), and the terminal chat driven through a fake stdin."""

import asyncio
import io
import json
import os
import sys

import pytest
import torch
import yaml
from support import one_thread, random_lora_adapter  # noqa: F401 (one_thread: autouse, generations on one thread)
from test_train import lf_home  # noqa: F401 (autouse: the module's tiny model in a temporary LF_HOME)

from lf import cli
from lf.config import parse_infer_args
from lf.data.tools import parse_tools
from lf.errors import DataError
from lf.serve import Engine, RequestError
from lf.serve.chat import chat
from lf.tiny import tiny_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"name": "get_weather", "description": "the weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOL_CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def options(**overrides) -> dict:
    # fp32 (pinned: "auto" is bf16 on CPUs with AVX512-BF16/AMX): greedy choices compared across runs agree
    return {"model_name_or_path": "lf-tiny-llama", "template": "qwen", "infer_dtype": "float32", **overrides}


def tiny_engine(**overrides) -> Engine:
    return Engine(parse_infer_args(options(**overrides), "chat"))


def script(monkeypatch, engine: Engine, text: str) -> list:
    """Makes the engine's model "generate" the tokens of `text`, then the end-of-turn marker, through transformers'
    streamer protocol (the worker, lock and decoding run as usual); returns the prompts it is given."""
    prompts = []
    marker = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(input_ids, streamer, **kwargs):
        prompts.append(input_ids[0].tolist())
        streamer.put(input_ids)
        for token in engine.tokenizer(text, add_special_tokens=False).input_ids + [marker]:
            streamer.put(torch.tensor([token]))
        streamer.end()

    monkeypatch.setattr(engine.model, "generate", generate)
    return prompts


def recorded(monkeypatch, engine: Engine) -> list[list[int]]:
    """The tokens each of the engine's generate() calls writes, from now on (filled as each call ends)."""
    generated = []
    original = engine.model.generate

    def generate(input_ids, **kwargs):
        out = original(input_ids=input_ids, **kwargs)
        generated.append(out[0, input_ids.shape[1]:].tolist())
        return out

    monkeypatch.setattr(engine.model, "generate", generate)
    return generated


def leaving(engine: Engine, room: int) -> list[dict]:
    """A conversation whose prompt leaves `room` tokens of the model's context, or a few more (the longest run of
    "ab " that does)."""
    def prompt(count: int) -> list[dict]:
        return [{"role": "user", "content": "ab " * count}]

    low, high = 0, engine.context_length
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if len(engine.prompt_ids(prompt(middle))) <= engine.context_length - room else (
            low, middle - 1)
    return prompt(low)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="module")
def adapter(lf_home) -> str:
    return random_lora_adapter(os.path.join(lf_home, "adapter"))


def hf_greedy(model, tokenizer, prompt_ids: list[int], stop_ids, max_new_tokens: int) -> tuple[str, int]:
    """transformers' own greedy generate: the reply's text and token count."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt_ids):]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_greedy_reply_equals_transformers_generate_on_the_template_prompt(engine):
    from transformers import AutoModelForCausalLM

    # transformers' code without lf's kernels, on the engine's device
    plain = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama")).to(engine.device)
    conversation = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": "How are you?"}]
    for messages, system in ((QUESTION, None), (conversation, "Be brief.")):
        prompt = engine.prompt_ids(messages, system)
        text = engine.template.render(messages, system, add_generation_prompt=True, tokenizer=engine.tokenizer)
        assert engine.tokenizer.decode(prompt) == text and text.endswith("<|im_start|>assistant\n")
        [reply] = engine.generate(messages, system, temperature=0, max_new_tokens=16)
        expected, count = hf_greedy(plain, engine.tokenizer, prompt, engine.stop_ids, 16)
        assert reply.text == expected and reply.text
        assert (reply.prompt_tokens, reply.completion_tokens) == (len(prompt), count)
        assert reply.finish_reason == ("stop" if count < 16 else "length") and reply.tool_calls == ()
        pieces = list(engine.stream(messages, system, temperature=0, max_new_tokens=16))
        assert "".join(pieces) == expected and len(pieces) > 1  # streamed as it is generated, not at the end


def test_adapter_gives_the_text_of_peft_unmerged_adapter(engine, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = tiny_engine(adapter_name_or_path=adapter, finetuning_type="lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"))
    unmerged = PeftModel.from_pretrained(base, adapter).to(adapted.device)
    prompt = adapted.prompt_ids(QUESTION)
    expected, _ = hf_greedy(unmerged, adapted.tokenizer, prompt, adapted.stop_ids, 12)
    [reply] = adapted.generate(QUESTION, temperature=0, max_new_tokens=12)
    assert reply.text == expected
    assert reply.text != engine.generate(QUESTION, temperature=0, max_new_tokens=12)[0].text  # the adapter counts


def test_stop_strings_cut_the_reply_and_a_partial_match_is_flushed(engine):
    [whole] = engine.generate(QUESTION, temperature=0, max_new_tokens=24)
    stop = whole.text[6:9]
    cut = whole.text.index(stop)
    for stops in (stop, [stop, "never written"]):
        [reply] = engine.generate(QUESTION, temperature=0, max_new_tokens=24, stop=stops)
        assert (reply.text, reply.finish_reason) == (whole.text[:cut], "stop")
        assert "".join(engine.stream(QUESTION, temperature=0, max_new_tokens=24, stop=stops)) == whole.text[:cut]
    # the reply ends with the start of a stop string that never completes: held back while generating, then sent
    unfinished = whole.text[-2:] + "\x00never"
    pieces = list(engine.stream(QUESTION, temperature=0, max_new_tokens=24, stop=unfinished))
    assert "".join(pieces) == whole.text and not pieces[-2].endswith(whole.text[-2:])


def test_settings_n_and_what_is_refused(engine):
    replies = engine.generate(QUESTION, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5)
    assert len(replies) == 3
    assert all(r.completion_tokens == 5 and r.finish_reason == "length" for r in replies)
    for settings, says in (({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 0}, "top_p must be in"),
                           ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"), ({"n": 0}, "n must be"),
                           ({"beams": 2}, "unknown generation setting(s) beams")):
        with pytest.raises(RequestError, match=says.replace("(", r"\(").replace(")", r"\)")):
            engine.generate(QUESTION, **settings)
    with pytest.raises(DataError, match="ends with a 'assistant' message: it must end with a user or observation"):
        engine.stream(QUESTION + [{"role": "assistant", "content": "Paris"}])


def test_end_of_turn_marker_ends_the_reply_and_tool_calls_are_parsed(engine, monkeypatch):
    prompts = script(monkeypatch, engine, "Paris is the capital.")
    [reply] = engine.generate(QUESTION)
    tokens = len(engine.tokenizer("Paris is the capital.", add_special_tokens=False).input_ids)
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("Paris is the capital.", "stop", tokens + 1)
    assert reply.tool_calls == ()  # no tools given: the text is never read as a call
    script(monkeypatch, engine, TOOL_CALL_TEXT)
    [reply] = engine.generate(QUESTION, tools=[WEATHER_TOOL])
    assert reply.tool_calls == (("get_weather", '{"city": "Paris"}'),) and reply.finish_reason == "tool_calls"
    assert "<tools>" in engine.tokenizer.decode(engine.prompt_ids(QUESTION, tools=[WEATHER_TOOL]))
    assert prompts[0] == engine.prompt_ids(QUESTION)


def test_leaving_a_stream_early_stops_it_and_frees_the_model(engine):
    generation = engine.stream(QUESTION, temperature=0, max_new_tokens=500)
    pieces = iter(generation)
    first = next(pieces)
    pieces.close()  # what a client that disconnects, or Ctrl-C in the chat, does
    assert first and generation.reply is None and not engine._lock.locked()
    [reply] = engine.generate(QUESTION, temperature=0, max_new_tokens=3)
    assert reply.completion_tokens == 3


def test_async_iteration_gives_the_same_pieces_and_cancelling_it_stops_the_generation(engine, monkeypatch):
    async def pieces() -> list[str]:
        return [piece async for piece in engine.stream(QUESTION, temperature=0, max_new_tokens=16)]

    assert asyncio.run(pieces()) == list(engine.stream(QUESTION, temperature=0, max_new_tokens=16))

    generated = recorded(monkeypatch, engine)

    async def cancelled() -> None:  # what the API does when its client leaves
        reading = asyncio.ensure_future(engine.stream(QUESTION, temperature=0, max_new_tokens=1000).afinish())
        while not engine._lock.locked():
            await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading

    asyncio.run(asyncio.wait_for(cancelled(), 60))
    [reply] = engine.generate(QUESTION, temperature=0, max_new_tokens=3)  # waits for the worker to let go
    assert reply.completion_tokens == 3
    assert len(generated[0]) < 1000 and generated[0][-1] not in engine.stop_ids  # cut short, not ended by itself


def test_a_reply_stops_at_the_context_end_and_prompts_too_long_are_refused(engine, monkeypatch):
    assert engine.context_length == 2048  # the tiny Llama's max_position_embeddings
    messages = leaving(engine, 3)
    for settings in ({}, {"max_new_tokens": 100}):  # the config's 1024, and a request's
        [reply] = engine.generate(messages, temperature=0, **settings)
        assert reply.prompt_tokens + reply.completion_tokens == 2048 and reply.finish_reason == "length"

    too_many_tokens = [{"role": "user", "content": "ab " * 3000}]
    prompt = len(engine.prompt_ids(too_many_tokens))
    with pytest.raises(RequestError, match=f"^the prompt is {prompt} tokens, but the model's context is 2048 tokens, "
                                           f"the reply included: shorten the conversation$"):
        engine.stream(too_many_tokens)
    monkeypatch.setattr(engine, "prompt_ids", None)  # refused by its length alone, not tokenized
    too_many_chars = [{"role": "user", "content": "a" * engine.max_chars}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]
    with pytest.raises(RequestError, match=f"^the conversation is {engine.max_chars + 2} characters, more than the "
                                           f"model's context of 2048 tokens can hold \\(at most {engine.max_chars} "
                                           f"characters\\): shorten it$"):
        engine.generate(too_many_chars)


# ---- lf chat ----

def run_chat(tmp_path, monkeypatch, capsys, typed: str, *overrides: str) -> tuple[int, str, str]:
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(yaml.safe_dump(options(do_sample=False, max_new_tokens=8)))
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    code = cli.main(["chat", str(cfg), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_streams_replies_keeps_history_until_clear_and_quits(tmp_path, monkeypatch, capsys, engine):
    first = engine.generate([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=8)[0].text
    seen = []
    stream = Engine.stream
    monkeypatch.setattr(Engine, "stream", lambda self, messages, *a, **k: seen.append(messages) or stream(
        self, messages, *a, **k))
    code, out, _ = run_chat(tmp_path, monkeypatch, capsys, "hello\nHow are you?\nclear\nbye\n")  # then EOF
    assert code == 0
    assert seen == [[{"role": "user", "content": "hello"}],
                    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "How are you?"}],
                    [{"role": "user", "content": "bye"}]]
    assert f"Assistant: {first}\n" in out and "History cleared." in out and out.count("Assistant: ") == 3

    seen.clear()
    code, out, _ = run_chat(tmp_path, monkeypatch, capsys, "hello\nexit\nnot read\n")
    assert code == 0 and len(seen) == 1 and out.count("Assistant: ") == 1


def test_chat_gives_the_model_tools_shows_its_calls_and_takes_their_results(tmp_path, monkeypatch, capsys, engine):
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER_TOOL]))
    (tmp_path / "bad.json").write_text('{"name": ')
    prompts = script(monkeypatch, engine, TOOL_CALL_TEXT)
    seen = []
    stream = Engine.stream
    monkeypatch.setattr(Engine, "stream", lambda self, messages, *a, **k: seen.append((messages, k["tools"])) or stream(
        self, messages, *a, **k))
    typed = [f"/tools {tmp_path / 'tools.json'}", "Weather in Paris?", '{"sky": "sunny"}', "/tools",
             f"/tools {tmp_path / 'bad.json'}", f"/tools {tmp_path / 'none.json'}"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(typed) + "\n"))
    assert chat(engine) == 0
    out = capsys.readouterr().out
    assert "The model has 1 tool(s): get_weather." in out
    assert out.count('[tool call] get_weather({"city": "Paris"})') == 2  # the scripted model calls it again
    # the calls kept in the history as a function message, the next message as their results
    call = {"role": "function", "content": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'}
    assert seen[1] == ([{"role": "user", "content": "Weather in Paris?"}, call,
                        {"role": "observation", "content": '{"sky": "sunny"}'}], parse_tools([WEATHER_TOOL]))
    second = engine.tokenizer.decode(prompts[1])
    assert "<tools>" in second and '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in second
    assert "the command needs a JSON file of tool definitions" in out
    assert "tools not read: tools are not valid JSON" in out and "tools not read: cannot read" in out


def test_chat_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_chat(tmp_path, monkeypatch, capsys, "", "temprature=0.5")
    assert code == 2 and err.startswith("lf chat: unknown key 'temprature'") and "temperature" in err
    code, out, err = run_chat(tmp_path, monkeypatch, capsys, "", "top_p=1.5")  # refused before the model loads
    assert (code, err) == (2, "lf chat: top_p must be in (0, 1], got 1.5 (a generation key of the config)\n")
    assert cli.main(["chat", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"lf chat: config file not found: {tmp_path / 'missing.yaml'}\n"
    assert cli.main(["chat"]) == 2 and "usage: lf chat" in capsys.readouterr().out
    code, out, err = run_chat(tmp_path, monkeypatch, capsys, "", "template=qwne")
    assert code == 1 and err.startswith("lf chat: unknown template 'qwne'") and len(err.splitlines()) == 1
