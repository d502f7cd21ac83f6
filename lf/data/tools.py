"""Tool-call formats: how a model is shown its tools, writes its calls and reads the results.

A dataset gives tools as a JSON list of function definitions ({"name", "description", "parameters"}, or OpenAI's
{"type": "function", "function": {...}}), a `function` message as a JSON call {"name", "arguments"} or a list
of them, and an `observation` as the results' text. Each format turns those into its model's own text:

  qwen     Hermes style (Qwen2.5, Qwen3): definitions in <tools></tools> in the system prompt, calls in
           <tool_call></tool_call>, results in <tool_response></tool_response> inside a user turn;
  llama3   Llama 3.1 JSON calling: definitions in the first user message, calls as {"name", "parameters"},
           results in the `ipython` role (the template writes the role);
  mistral  Mistral v0.3: [AVAILABLE_TOOLS] before the last user message, [TOOL_CALLS] [...], [TOOL_RESULTS];
  default  plain text for models without a protocol of their own: one `Tool call: {...}` line per call.

`extract_calls` reads calls back out of generated text (for the API server): a list of (name, arguments as a
JSON string), or None when the text holds no call.
"""

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
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = next((obj[k] for k in argument_keys if k in obj), {})
    return obj["name"], arguments if isinstance(arguments, str) else _dumps(arguments)


def _loads(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


class ToolFormat:
    """One tool-call protocol. Subclasses write the definitions and calls and read the calls back."""

    name = ""
    placement = IN_SYSTEM
    argument_keys = ("arguments",)  # what a call's arguments are named in this format's text

    def format_tools(self, tools) -> str:
        """The tool definitions as the text the template places (see `placement`); '' for no tools."""
        tools = parse_tools(tools)
        return self._tools_text(tools) if tools else ""

    def format_calls(self, function_content) -> str:
        """A `function` message's call(s) as the text the assistant writes."""
        return self._calls_text(parse_calls(function_content))

    def format_observation(self, content: str) -> str:
        """A tool result as the text of its turn."""
        return content

    def extract_calls(self, text: str) -> list[tuple[str, str]] | None:
        """The calls written in generated text, or None when it holds none."""
        calls = [c for c in (_as_call(obj, *self.argument_keys) for obj in self._call_objects(text)) if c]
        return calls or None

    def _tools_text(self, tools: list[dict]) -> str:
        raise NotImplementedError

    def _calls_text(self, calls: list[tuple[str, dict]]) -> str:
        raise NotImplementedError

    def _call_objects(self, text: str) -> list:
        raise NotImplementedError


class QwenTools(ToolFormat):
    name = "qwen"
    _call = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def _tools_text(self, tools):
        # Qwen2.5/Qwen3's own instructions, word for word (the models were trained on them).
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
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
        calls = _loads(calls.strip()) if found else None
        return calls if isinstance(calls, list) else [calls]


class DefaultTools(ToolFormat):
    name = "default"
    _prefix = "Tool call: "

    def _tools_text(self, tools):
        return ("You can use these tools:\n" + "\n".join(_dumps(t) for t in tools)
                + f"\n\nTo call tools, reply with nothing but one line per call: "
                  f'{self._prefix}{{"name": <tool name>, "arguments": <JSON object>}}\n'
                  'The results come back in the next message, after "Tool results:".')

    def _calls_text(self, calls):
        return "\n".join(self._prefix + _dumps({"name": n, "arguments": a}) for n, a in calls)

    def format_observation(self, content):
        return f"Tool results:\n{content}"

    def _call_objects(self, text):
        return [_loads(line.strip()[len(self._prefix):]) for line in text.splitlines()
                if line.strip().startswith(self._prefix)]


TOOL_FORMATS = MappingProxyType({f.name: f for f in (DefaultTools(), QwenTools(), Llama3Tools(), MistralTools())})


def get_tool_format(name: str) -> ToolFormat:
    if name not in TOOL_FORMATS:
        raise DataError(f"unknown tool format {name!r}.{did_you_mean(name, TOOL_FORMATS)} "
                        f"Registered: {', '.join(sorted(TOOL_FORMATS))}")
    return TOOL_FORMATS[name]
