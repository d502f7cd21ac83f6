"""The oracle for templates whose model has no real tokenizer on npm: lf's text against the model's own published
jinja chat template, rendered by transformers. llama.cpp keeps copies of those templates (models/templates/*.jinja
and the cases of tests/test-chat-template.cpp); llama-cpp-python's source distribution ships them, fetched once
into the test cache. Each difference lf makes on purpose (module docstring of lf.data.templates) is named here and
taken out of lf's text before comparing, so that anything else fails."""

import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from lf.data import get_template

CACHE = Path(os.environ.get("LF_TEST_CACHE", Path.home() / ".cache" / "lf-tests"))
SDIST = "llama-cpp-python==0.3.36"
CPP_CASES = "tests/test-chat-template.cpp"


@dataclass(frozen=True)
class Official:
    source: str  # a models/templates file, or the name of a test-chat-template.cpp case
    reasoning: bool = False  # compare on a conversation with reasoning (thinking templates)
    drop: tuple[str, ...] = ()  # what lf writes that the official text does not (documented)
    prompt_newline: bool = False  # lf's generation prompt ends with the newline the official reply starts with
    trailing: str = ""  # what the official template writes after the last turn and lf does not
    context: tuple[tuple[str, object], ...] = ()  # chat-template variables


ORACLE = {
    "bailing": Official("inclusionAI/Ling-lite", drop=("<|endoftext|>",)),
    "cohere": Official("CohereForAI/c4ai-command-r-plus"),
    "deepseek": Official("DeepSeek-V2"),
    "deepseekcoder": Official("deepseek-ai/deepseek-coder-33b-instruct"),
    "glm4": Official("ChatGLM4", drop=("<|endoftext|>",)),
    "glm4_moe": Official("GLM-4.6.jinja", reasoning=True, drop=("<|endoftext|>",), prompt_newline=True),
    "glm4_7": Official("GLM-4.7-Flash.jinja", reasoning=True, drop=("<|endoftext|>",)),
    # Gemma 4 in thinking mode drops every thought; lf's last reply keeps its (here empty) block
    "gemma4": Official("google-gemma-4-31B-it.jinja", drop=("<|channel>thought\n<channel|>",),
                       context=(("enable_thinking", True),)),
    "granite3": Official("ibm-granite-granite-3.3-2B-Instruct.jinja"),
    "granite4": Official("ibm-granite-granite-4.0.jinja"),
    "lfm2": Official("LFM2-8B-A1B.jinja"),
    "minimax1": Official("MiniMax-M1.jinja"),
    "minimax2": Official("MiniMax-M2.jinja", reasoning=True),
    "ministral3": Official("mistralai-Ministral-3-14B-Reasoning-2512.jinja"),
    "mistral_small": Official("Mistral-Small-3.2-24B-Instruct-2506.jinja"),
    "openchat": Official("openchat/openchat-3.5-0106"),
    "phi4": Official("phi-4"),
    "phi_small": Official("Phi-3-small", trailing="<|endoftext|>"),
    "qwen3_5": Official("Qwen3.5-4B.jinja", reasoning=True),
    "seed_oss": Official("ByteDance-Seed-OSS.jinja", reasoning=True),
}


def _fetch() -> Path:
    """The templates, one file each, in CACHE (fetched with pip on first use)."""
    folder = CACHE / "llama-cpp-templates"
    if (folder / "cases.json").is_file():
        return folder
    work = CACHE / "llama-cpp-work"
    done = subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                           "-d", str(work)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"pip download {SDIST} failed (it ships the official chat templates): {done.stderr[-300:]}")
    folder.mkdir(parents=True, exist_ok=True)
    cpp = ""
    with tarfile.open(next(work.glob("*.tar.gz"))) as tar:
        for member in tar.getmembers():
            path = member.name.split("/vendor/llama.cpp/", 1)[-1]
            if path.startswith("models/templates/") and path.endswith(".jinja"):
                (folder / Path(path).name).write_bytes(tar.extractfile(member).read())
            elif path == CPP_CASES:
                cpp = tar.extractfile(member).read().decode()
    # Each case: /* .name= */ "...", then /* .template_str= */ "..." (a C string literal, escaped as JSON is).
    cases = {name: json.loads(f'"{body}"') for name, body in re.findall(
        r'/\* \.name= \*/ "([^"]*)",\s*(?://[^\n]*\n\s*)*/\* \.template_str=? \*/ (?:U8C\()?"((?:[^"\\]|\\.)*)"', cpp)}
    (folder / "cases.json").write_text(json.dumps(cases))
    for file in work.iterdir():
        file.unlink()
    work.rmdir()
    return folder


@pytest.fixture(scope="session")
def official_sources() -> Path:
    return _fetch()


def _source(folder: Path, source: str) -> str:
    if source.endswith(".jinja"):
        return (folder / source).read_text()
    return json.loads((folder / "cases.json").read_text())[source]


PLAIN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]


def _reasoning(template) -> list[dict]:
    """Two turns whose replies reason, in the template's own tags."""
    start, end = template.thinking.open.strip(), template.thinking.close.strip()
    return [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": f"{start}\nr1\n{end}\n\nA1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": f"{start}\nr2\n{end}\n\nA2"}]


def _as_official(messages, template) -> list[dict]:
    """The chat the official templates read: the last reply's reasoning as reasoning_content, as they document it;
    earlier replies without theirs, as a client sends them back (lf drops it from history)."""
    chat = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and template.thinking:
            reasoning, answer = template.thinking.split(message["content"])
            last = i == len(messages) - 1 and reasoning is not None
            message = {**message, "content": answer.lstrip("\n"), **({"reasoning_content": reasoning} if last else {})}
        chat.append(message)
    return chat


@pytest.mark.parametrize("name", sorted(ORACLE))
@pytest.mark.parametrize("system", ["Be brief.", None])
def test_lf_writes_the_official_text(official_sources, name, system):
    """With a system prompt, or with the template's default where lf's is the official one."""
    spec, template = ORACLE[name], get_template(name)
    if system is None and name in ("granite3", "mistral_small", "ministral3"):
        system = "Be brief."  # their official default prompts hold today's date or a variant's text (documented)
    jinja = _source(official_sources, spec.source)
    messages = _reasoning(template) if spec.reasoning else PLAIN
    chat = ([{"role": "system", "content": system or template.default_system}] if system or template.default_system
            else []) + _as_official(messages, template)
    context = dict(spec.context, bos_token=template.bos_token, eos_token=template.eos_token)

    def official(conversation, generation_prompt):
        return render_jinja_template([conversation], chat_template=jinja, add_generation_prompt=generation_prompt,
                                     **context)[0][0]

    def lf(text):
        for piece in spec.drop:
            text = text.replace(piece, "")
        return text

    assert lf(template.render(messages, system)) + spec.trailing == official(chat, False)
    prompt = lf(template.render(messages[:3], system, add_generation_prompt=True))
    assert prompt == official(chat[:-1], True) + ("\n" if spec.prompt_newline else "")
