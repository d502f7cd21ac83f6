"""Tool-call formats: how a model is shown its tools, writes its calls and reads the results.

A dataset gives tools as a JSON list of function definitions ({"name", "description", "parameters"}, or OpenAI's
{"type": "function", "function": {...}}), a `function` message as a JSON call {"name", "arguments"} or a list
of them, and an `observation` as the results' text. Each format turns those into its model's own text: the tool
definitions (placed by the template where `placement` says), the calls an assistant turn writes, and what a
tool-result turn holds inside the template's role markers. `extract_calls` reads the calls back out of generated
text (for `lf api`'s `tool_calls`): a list of (name, arguments as a JSON string), or None when the text holds no
call or a malformed one (then it is a plain reply).

The formats are LLaMA-Factory 0.9.5's thirteen (the same names, texts and placement in the system prompt), except
where the model's own template says otherwise or LLaMA-Factory's rendering cannot be read back by its own parser;
docs/tool_formats.md lists each one and every such difference.
"""

import ast
import json
import re
from types import MappingProxyType

from lf.errors import DataError, did_you_mean

# Where a format puts the tool definitions (the template reads this).
IN_SYSTEM, IN_FIRST_USER, BEFORE_LAST_USER = "system", "first_user", "before_last_user"

_CALL_SHAPE = 'a JSON object {"name": <tool name>, "arguments": {...}} or a JSON list of them'


def _dumps(value) -> str:
    # The separators and unescaped non-ASCII of the chat templates' `tojson`.
    return json.dumps(value, ensure_ascii=False)


def parse_tools(tools) -> list[dict]:
    """Tool definitions (a JSON string or already parsed) as OpenAI-style {"type": "function", "function": ...}."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"tools are not valid JSON ({e.msg} at character {e.pos}): expected a JSON list of tool "
                            'definitions such as [{"name": ..., "description": ..., "parameters": {...}}]') from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"tools must be a JSON list of tool definitions (objects), got {_dumps(tools)[:80]}")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]


def parse_calls(content) -> list[tuple[str, dict]]:
    """The (name, arguments) of each call in a `function` message; DataError saying what is expected."""
    try:
        calls = json.loads(content) if isinstance(content, str) else content
    except json.JSONDecodeError as e:
        raise DataError(f"a tool call must be {_CALL_SHAPE}; got text that is not JSON ({e.msg}): "
                        f"{content[:80]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise DataError(f"a tool call must be {_CALL_SHAPE}; got {_dumps(call)[:80]} (no tool name)")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI-style data keeps the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            raise DataError(f"the arguments of the call to {call['name']!r} must be a JSON object, "
                            f"got {_dumps(call.get('arguments'))[:80]}")
        parsed.append((call["name"], arguments))
    if not parsed:
        raise DataError(f"a tool call must be {_CALL_SHAPE}; got an empty list")
    return parsed


def _as_call(obj, *argument_keys) -> tuple[str, str] | None:
    """(name, arguments JSON) from a decoded call object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    return (obj["name"], _dumps(arguments)) if isinstance(arguments, dict) else None


def _loads(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _functions(tools: list[dict]) -> list[dict]:
    """The function definitions without OpenAI's {"type": "function"} wrapper."""
    return [t["function"] for t in tools]


def _value_text(value) -> str:
    """An argument as the XML-like formats write it: strings bare, anything else as JSON."""
    return value if isinstance(value, str) else _dumps(value)


def _text_value(text: str):
    """The inverse of `_value_text`: JSON when the text is JSON, else the text itself."""
    value = _loads(text.strip())
    return text if value is None and text.strip() != "null" else value


class ToolFormat:
    """One tool-call protocol. Subclasses write the definitions and calls and read the calls back."""

    name = ""
    placement = IN_SYSTEM
    system_joiner = "\n\n"  # between the system prompt and the tool definitions, when both are in the system turn
    argument_keys = ("arguments",)  # what a call's arguments are named in this format's text

    def format_tools(self, tools) -> str:
        """The tool definitions as the text the template places (see `placement`); '' for no tools."""
        tools = parse_tools(tools)
        return self._tools_text(tools) if tools else ""

    def format_calls(self, function_content) -> str:
        """A `function` message's call(s) as the text the assistant writes."""
        return self._calls_text(parse_calls(function_content))

    def format_observation(self, content: str) -> str:
        """A tool result as the text of its turn (inside the template's role markers)."""
        return content

    def extract_calls(self, text: str) -> list[tuple[str, str]] | None:
        """The calls written in generated text; None when it holds none, or one that does not parse."""
        calls = [_as_call(obj, *self.argument_keys) for obj in self._call_objects(text)]
        return calls if calls and all(calls) else None

    def _tools_text(self, tools: list[dict]) -> str:
        raise NotImplementedError

    def _calls_text(self, calls: list[tuple[str, dict]]) -> str:
        raise NotImplementedError

    def _call_objects(self, text: str) -> list:
        """The call objects ({"name", "arguments"}) in `text`; None for a call block that does not parse."""
        raise NotImplementedError


class QwenTools(ToolFormat):
    """Hermes style (Qwen2.5, Qwen3): JSON definitions in <tools>, JSON calls in <tool_call>."""

    name = "qwen"
    _call = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    _intro = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"

    def _tools_text(self, tools):
        # Qwen2.5/Qwen3's own instructions, word for word (the models were trained on them).
        return (self._intro + "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
                + "".join("\n" + _dumps(t) for t in tools)
                + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                  "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                  '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def _calls_text(self, calls):
        return "\n".join(f"<tool_call>\n{_dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)

    def format_observation(self, content):
        return f"<tool_response>\n{content}\n</tool_response>"

    def _call_objects(self, text):
        return [_loads(body.strip()) for body in self._call.findall(text)]


class LingTools(QwenTools):
    """Ling / Bailing v2: Qwen's protocol, its instructions joined to the system prompt without a blank line and
    followed by the model's thinking switch."""

    name = "ling"
    system_joiner = ""

    def _tools_text(self, tools):
        return super()._tools_text(tools) + "\ndetailed thinking off"


class Llama3Tools(ToolFormat):
    name = "llama3"
    placement = IN_FIRST_USER
    argument_keys = ("parameters", "arguments")

    def _tools_text(self, tools):
        # Llama 3.1's custom-tool instructions (its chat template's default, tools in the first user message).
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                'value}.Do not use variables.\n\n'
                + "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools))

    def _calls_text(self, calls):
        # Llama 3.1 defines one call per message; several are written one JSON object per line.
        return "\n".join(_dumps({"name": n, "parameters": a}) for n, a in calls)

    def _call_objects(self, text):
        whole = _loads(text.strip())
        if whole is not None:
            return whole if isinstance(whole, list) else [whole]
        return [_loads(line) for line in text.splitlines() if line.strip()]


class MistralTools(ToolFormat):
    name = "mistral"
    placement = BEFORE_LAST_USER

    def _tools_text(self, tools):
        return f"[AVAILABLE_TOOLS] {_dumps(tools)}[/AVAILABLE_TOOLS]"

    def _calls_text(self, calls):
        # Without the 9-character call ids of Mistral's API: canonical data has none.
        return "[TOOL_CALLS] " + _dumps([{"name": n, "arguments": a} for n, a in calls])

    def format_observation(self, content):
        # JSON results go in as they are (as Mistral's template writes them), other text as a JSON string.
        value = content if _loads(content) is not None else _dumps(content)
        return f'[TOOL_RESULTS] {{"content": {value}}}[/TOOL_RESULTS]'

    def _call_objects(self, text):
        _, found, calls = text.partition("[TOOL_CALLS]")
        if not found:
            return []
        calls = _loads(calls.strip())
        return calls if isinstance(calls, list) else [calls]


class DefaultTools(ToolFormat):
    """LLaMA-Factory's generic format (ReAct style): a tool list, then `Action: name` / `Action Input: {json}`
    lines; the definitions follow the system prompt directly, as LLaMA-Factory writes them."""

    name = "default"
    system_joiner = ""
    _action = re.compile(r"Action:[ \t]*([\w.-]+)\s*Action Input:\s*(.*?)(?=\s*Action:|\s*$)", re.DOTALL)

    def _tools_text(self, tools):
        blocks = "".join(f"> Tool Name: {f['name']}\nTool Description: {f.get('description', '')}\nTool Args:\n"
                         + self._arguments_text(f) + "\n" for f in _functions(tools))
        names = ", ".join(f["name"] for f in _functions(tools))
        return (f"You have access to the following tools:\n{blocks}Use the following format if using a tool:\n```\n"
                f"Action: tool name (one of [{names}])\nAction Input: the input to the tool, in a JSON format "
                'representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n')

    def _arguments_text(self, function: dict) -> str:
        parameters = function.get("parameters") or {}
        required = parameters.get("required") or ()
        return "".join(self._argument_line(name, spec, name in required)
                       for name, spec in (parameters.get("properties") or {}).items())

    @staticmethod
    def _argument_line(name: str, spec: dict, required: bool) -> str:
        line = f"  - {name} ({spec.get('type', '')}{', required' if required else ''}): {spec.get('description', '')}"
        if spec.get("enum"):
            line += f", should be one of [{', '.join(map(str, spec['enum']))}]"
        if spec.get("items"):
            line += f", where each item should be {spec['items'].get('type', '')}"
        return line + "\n"

    def _calls_text(self, calls):
        return "\n".join(f"Action: {n}\nAction Input: {_dumps(a)}" for n, a in calls)

    def _call_objects(self, text):
        # The input may be quoted or fenced as the prompt's example is.
        return [{"name": name, "arguments": _loads(body.strip().strip('"').strip("`"))}
                for name, body in self._action.findall(text)]


class Glm4Tools(ToolFormat):
    """GLM-4 / ChatGLM3: the definitions as indented JSON under `## name` headings after GLM-4's tool preamble;
    one call per message, its name on a line and its arguments as JSON on the next."""

    name = "glm4"
    system_joiner = ""

    def _tools_text(self, tools):
        return ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
                + "".join(f"\n\n## {f['name']}\n\n{json.dumps(f, indent=4, ensure_ascii=False)}\n"
                          "在调用上述函数时，请使用 Json 格式表示调用的参数。" for f in _functions(tools)))

    def _calls_text(self, calls):
        if len(calls) > 1:
            raise DataError(f"the glm4 tool format has one call per message, got {len(calls)}: split them into "
                            "function/observation turns of one call each")
        [(name, arguments)] = calls
        return f"{name}\n{_dumps(arguments)}"

    def _call_objects(self, text):
        name, newline, arguments = text.strip().partition("\n")
        if not newline or not re.fullmatch(r"[\w.-]+", name):
            return []
        return [{"name": name, "arguments": _loads(arguments.strip())}]


class MiniMax1Tools(ToolFormat):
    """MiniMax-M1: JSON definitions in <tools>, the calls one JSON object a line in <tool_calls>."""

    name = "minimax1"
    system_joiner = ""
    _block = re.compile(r"<tool_calls>(.*?)</tool_calls>", re.DOTALL)

    def _tools_text(self, tools):
        return ("You are provided with these tools:\n<tools>\n" + "".join(_dumps(f) + "\n" for f in _functions(tools))
                + "</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and "
                  "provide tool-name and json-object of arguments, following the format below:\n<tool_calls>\n"
                  '{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n...\n</tool_calls>')

    def _calls_text(self, calls):
        lines = "".join(_dumps({"name": n, "arguments": a}) + "\n" for n, a in calls)
        return f"<tool_calls>\n{lines}</tool_calls>"

    def _call_objects(self, text):
        return [_loads(line) for block in self._block.findall(text) for line in block.splitlines() if line.strip()]


class _TaggedTools(ToolFormat):
    """Formats that write each argument in tags of its own, strings bare and other values as JSON. Subclasses give
    the text of one call (`_call_fmt` around the `_argument_fmt` of each argument), how calls are joined and
    wrapped, and the patterns that read a call (name, body) and an argument (key, value) back."""

    _call_fmt = _argument_fmt = ""
    _calls_joiner, _wrapper = "\n", "{}"
    _call: re.Pattern
    _argument: re.Pattern

    def _calls_text(self, calls):
        return self._wrapper.format(self._calls_joiner.join(
            self._call_fmt.format(name=name, arguments="".join(
                self._argument_fmt.format(key=k, value=_value_text(v)) for k, v in arguments.items()))
            for name, arguments in calls))

    def _call_objects(self, text):
        return [{"name": name.strip(),
                 "arguments": {key.strip(): _text_value(value) for key, value in self._argument.findall(body)}}
                for name, body in self._call.findall(text)]


class Qwen35Tools(_TaggedTools):
    """Qwen3.5 / Qwen3.6 (Qwen3-Coder's XML calls): JSON definitions in <tools>, each call a <function=name> block
    with one <parameter=key> block per argument inside <tool_call>."""

    name = "qwen3_5"
    _call_fmt = "<tool_call>\n<function={name}>{arguments}\n</function>\n</tool_call>"
    _argument_fmt = "\n<parameter={key}>\n{value}\n</parameter>"
    _call = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
    _argument = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def _tools_text(self, tools):
        return ("# Tools\n\nYou have access to the following functions:\n\n<tools>"
                + "".join("\n" + _dumps(f) for f in _functions(tools))
                + "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO "
                  "suffix:\n\n"
                  "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
                  "</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can "
                  "span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
                  "- Function calls MUST follow the specified format: an inner <function=...></function> block must be "
                  "nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
                  "- You may provide optional reasoning for your function call in natural language BEFORE the function "
                  "call, but NOT after\n- If there is no function call available, answer the question like normal "
                  "with your current knowledge and do not tell the user about function calls\n</IMPORTANT>")

    format_observation = QwenTools.format_observation


class SeedOssTools(_TaggedTools):
    """Seed-OSS: the definitions as one JSON list after Seed's tool preamble, calls in <seed:tool_call> with
    <function=name> and <parameter=key> tags (values without padding newlines)."""

    name = "seed_oss"
    system_joiner = ""
    _call_fmt = "\n<seed:tool_call>\n<function={name}>{arguments}\n</function>\n</seed:tool_call>"
    _argument_fmt = "\n<parameter={key}>{value}</parameter>"
    # `>` after the name is optional: LLaMA-Factory 0.9.5 trains without it
    _call = re.compile(r"<seed:tool_call>\s*<function=([^>\s]+)>?(.*?)</function>\s*</seed:tool_call>", re.DOTALL)
    _argument = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)

    def _tools_text(self, tools):
        return ("system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the "
                "user query.Tool List:\nYou are authorized to use the following tools (described in JSON Schema "
                "format). Before performing any task, you must decide how to call them based on the descriptions and "
                f"parameters of these tools.\n{_dumps(_functions(tools))}\n工具调用请遵循如下格式:\n<seed:tool_call>\n"
                "<function=example_function_name>\n<parameter=example_parameter_1>value_1</parameter>\n"
                "<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple "
                "lines</parameter>\n</function>\n</seed:tool_call>\n")


class MiniMax2Tools(_TaggedTools):
    """MiniMax-M2: each definition in <tool></tool> inside <tools>, the calls as <invoke name=...> blocks with
    <parameter name=...> arguments inside one <minimax:tool_call>; results in <response>."""

    name = "minimax2"
    _call_fmt = '<invoke name="{name}">{arguments}\n</invoke>'
    _argument_fmt = '\n<parameter name="{key}">{value}</parameter>'
    _wrapper = "<minimax:tool_call>\n{}\n</minimax:tool_call>"
    _call = re.compile(r'<invoke name="([^"]+)">(.*?)</invoke>', re.DOTALL)
    _argument = re.compile(r'<parameter name="([^"]+)">(.*?)</parameter>', re.DOTALL)
    _block = re.compile(r"<minimax:tool_call>(.*?)</minimax:tool_call>", re.DOTALL)

    def _tools_text(self, tools):
        return ("# Tools\n\nYou may call one or more tools to assist with the user query.\nHere are the tools "
                "available in JSONSchema format:\n\n<tools>\n"
                + "".join(f"<tool>{_dumps(f)}</tool>\n" for f in _functions(tools))
                + "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n"
                  '\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1'
                  '</parameter>\n<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n'
                  "</minimax:tool_call>")

    def format_observation(self, content):
        return f"<response>{content}</response>"

    def _call_objects(self, text):
        parse = super()._call_objects
        return [call for block in self._block.findall(text) for call in parse(block)]


class Glm4MoeTools(_TaggedTools):
    """GLM-4.5 / 4.6 / 4.7: Qwen-style JSON definitions with GLM's call instructions; each call `<tool_call>name`
    followed by <arg_key>/<arg_value> pairs."""

    name = "glm4_moe"
    _call_fmt = "\n<tool_call>{name}{arguments}\n</tool_call>"
    _argument_fmt = "\n<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>"
    _calls_joiner = ""
    # the closing tag is optional: LLaMA-Factory 0.9.5 trains without it
    _call = re.compile(r"<tool_call>([^<\n]+)(.*?)(?:</tool_call>|(?=<tool_call>)|$)", re.DOTALL)
    _argument = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def _tools_text(self, tools):
        return (QwenTools._intro + "You are provided with function signatures within <tools></tools> XML tags:\n"
                "<tools>" + "".join("\n" + _dumps(t) for t in tools) + "\n</tools>\n\nFor each function call, output "
                "the function name and arguments within the following XML format:\n<tool_call>{function-name}\n"
                "<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
                "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>\n")


class Lfm2Tools(ToolFormat):
    """LFM2 / LFM2.5: the definitions as a JSON list between <|tool_list_start|> and <|tool_list_end|>, the calls as a
    Python list of calls with keyword arguments between <|tool_call_start|> and <|tool_call_end|>."""

    name = "lfm2"
    system_joiner = ""
    _block = re.compile(r"<\|tool_call_start\|>(.*?)<\|tool_call_end\|>", re.DOTALL)
    _constants = {"true": True, "false": False, "null": None}  # JSON's spellings, which models also write

    def _tools_text(self, tools):
        return f"List of tools: <|tool_list_start|>{_dumps(_functions(tools))}<|tool_list_end|>"

    def format_observation(self, content):
        return f"<|tool_response_start|>{content}<|tool_response_end|>"

    def _calls_text(self, calls):
        # A JSON string is a Python string literal too, quotes and backslashes escaped.
        return "<|tool_call_start|>[" + ", ".join(
            f"{name}({', '.join(f'{k}={_dumps(v)}' for k, v in arguments.items())})" for name, arguments in calls
        ) + "]<|tool_call_end|>"

    def _call_objects(self, text):
        return [call for block in self._block.findall(text) for call in self._python_calls(block.strip())]

    def _python_calls(self, text: str) -> list:
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError:
            return [None]
        nodes = tree.elts if isinstance(tree, ast.List) else [tree]
        return [self._python_call(node) for node in nodes]

    def _python_call(self, node) -> dict | None:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            return {"name": node.func.id, "arguments": {k.arg: self._value(k.value) for k in node.keywords}}
        except ValueError:
            return None

    def _value(self, node):
        if isinstance(node, ast.Name) and node.id in self._constants:
            return self._constants[node.id]
        if isinstance(node, ast.List):
            return [self._value(n) for n in node.elts]
        if isinstance(node, ast.Dict):
            return {self._value(k): self._value(v) for k, v in zip(node.keys, node.values)}
        return ast.literal_eval(node)  # ValueError for anything but a literal


class Gemma4Tools(ToolFormat):
    """Gemma 4: `declaration:name{...}` definitions and `<|tool_call>call:name{key:value,...}<tool_call|>` calls in
    Gemma's own notation: keys bare, strings between <|"|> marks, types in capitals."""

    name = "gemma4"
    system_joiner = ""
    _quote = '<|"|>'
    _call = re.compile(r"<\|tool_call>call:([^{\s]+)(\{.*?\})<tool_call\|>", re.DOTALL)
    _bare_key = re.compile(r"([{,]\s*)([A-Za-z_][\w.-]*)(\s*:)")

    def _string(self, text) -> str:
        return f"{self._quote}{text}{self._quote}"

    def _tools_text(self, tools):
        return "\n".join(map(self._declaration, _functions(tools)))

    def _declaration(self, function: dict) -> str:
        parts = [f"description:{self._string(function.get('description', ''))}"]
        parameters = function.get("parameters")
        if parameters:
            fields = []
            if parameters.get("properties"):
                fields.append("properties:{" + ",".join(f"{name}:{{{','.join(self._described(spec))}}}"
                                                        for name, spec in parameters["properties"].items()) + "}")
            if parameters.get("required"):
                fields.append(f"required:[{','.join(map(self._string, parameters['required']))}]")
            if parameters.get("type"):
                fields.append(f"type:{self._string(str(parameters['type']).upper())}")
            parts.append(f"parameters:{{{','.join(fields)}}}")
        response = function.get("response")
        if response:
            kind = str(response.get("type", "")).upper()
            parts.append("response:{" + ",".join(
                self._described({"description": response.get("description"), "type": kind if kind == "OBJECT" else ""}))
                + "}")
        return f"declaration:{function['name']}{{{','.join(parts)}}}"

    def _described(self, spec: dict) -> list[str]:
        fields = [f"description:{self._string(spec['description'])}"] if spec.get("description") else []
        return fields + ([f"type:{self._string(str(spec['type']).upper())}"] if spec.get("type") else [])

    def _value(self, value) -> str:
        """A value in Gemma's notation (keys in sorted order, as LLaMA-Factory writes them)."""
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{self._value(value[k])}" for k in sorted(value)) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(map(self._value, value)) + "]"
        return _dumps(value)  # numbers, true/false, null

    def _calls_text(self, calls):
        return "".join(f"<|tool_call>call:{name}{self._value(arguments)}<tool_call|>" for name, arguments in calls)

    def _call_objects(self, text):
        return [{"name": name, "arguments": self._json(body)} for name, body in self._call.findall(text)]

    def _json(self, text: str):
        """Gemma's notation as JSON: the parts between quote marks are strings, the bare keys outside them quoted."""
        parts = text.split(self._quote)
        if len(parts) % 2 == 0:
            return None
        return _loads("".join(_dumps(part) if i % 2 else self._bare_key.sub(r'\1"\2"\3', part)
                              for i, part in enumerate(parts)))


TOOL_FORMATS = MappingProxyType({f.name: f for f in (
    DefaultTools(), Gemma4Tools(), Glm4Tools(), Glm4MoeTools(), Llama3Tools(), Lfm2Tools(), MiniMax1Tools(),
    MiniMax2Tools(), MistralTools(), QwenTools(), Qwen35Tools(), SeedOssTools(), LingTools())})


# Which format a model's own jinja chat template writes, by a marker in it; the more specific markers first (Qwen3.5's
# and GLM-4.5's templates write <tool_call> too).
_JINJA_MARKERS = (("<minimax:tool_call>", "minimax2"), ("<seed:tool_call>", "seed_oss"), ("<arg_key>", "glm4_moe"),
                  ("<function=", "qwen3_5"), ("<|tool_list_start|>", "lfm2"), ("<|tool_call>", "gemma4"),
                  ("<tool_calls>", "minimax1"), ("<tool_call>", "qwen"), ("[TOOL_CALLS]", "mistral"),
                  ("ipython", "llama3"))


def tool_format_of(chat_template: str) -> str:
    """The name of the tool format a jinja chat template writes ("default" when it shows none)."""
    return next((name for marker, name in _JINJA_MARKERS if marker in chat_template), "default")


def get_tool_format(name: str) -> ToolFormat:
    if name not in TOOL_FORMATS:
        raise DataError(f"unknown tool format {name!r}.{did_you_mean(name, TOOL_FORMATS)} "
                        f"Registered: {', '.join(sorted(TOOL_FORMATS))}")
    return TOOL_FORMATS[name]
