"""Chat templates: a conversation in canonical form -> the text and token ids a model is trained on.

A registered `Template` is declarative: a format string per part of a conversation, with the fields {content},
{bos} and {eos} (the tokenizer's bos/eos text, placed where the model's official template writes them). The
conversation is cut into turns: turn i is (prompt_i, reply_i), where prompt_i is everything from the end of the
previous reply through the generation prompt (the header after which the model writes), and reply_i is the reply
through its end-of-turn marker. What the official template writes after a marker (chatml's newline) opens the
next prompt, so every reply ends with the marker the model must learn to stop on; after the last reply it is not
encoded at all (nothing follows it to learn), though `render` writes it, to match the official text.

Reasoning (qwen3, deepseekr1): a reply may start with "<think>...</think>". As in the official templates,
replies before the last one lose their reasoning (the models never see old reasoning at inference). The last
reply keeps it, written the way the model writes it after the generation prompt. In thinking mode a last reply
without reasoning gets an empty block "<think>\n\n</think>\n\n" in the reply: the official Qwen3 template does
the same, and training on it keeps the model writing the block it is always expected to open. With thinking off
(enable_thinking=False, qwen3_nothink) the empty block goes at the end of the prompt instead, as the official
non-thinking generation prompt does, so the model learns the answer only; a reply that does carry reasoning keeps
it in the reply either way. Other families write the block their own way (`Thinking`): GLM-4.5 keeps an empty
block in history replies, GLM-4.7 and Qwen3.5 open it in the generation prompt, Seed-OSS and Gemma 4 have their own
tags.

Where lf knowingly differs from a model's official template or from LLaMA-Factory's, the template's `differs` says
so; docs/templates.md lists them all (tests/test_template_oracle.py writes it and checks each template that has a
real tokenizer against the model's own chat_template).

`resolve_template` can instead use a tokenizer's own jinja `chat_template` (`JinjaTemplate`): turns are cut from
renderings of growing prefixes of the conversation, which only works for templates that never rewrite earlier
turns; others raise a DataError that asks for a registered template.
"""

import logging
from dataclasses import dataclass, field, replace
from string import Formatter
from types import MappingProxyType

from lf.data.conversation import ASSISTANT, FUNCTION, OBSERVATION, PROMPT_ROLES, REPLY_ROLES, SYSTEM, USER
from lf.data.tools import (BEFORE_LAST_USER, IN_FIRST_USER, IN_SYSTEM, get_tool_format, parse_calls, parse_tools,
                           tool_format_of)
from lf.errors import DataError, did_you_mean

# Where a template puts the system prompt: a block of its own at the start, or inside a user message.
AT_START, IN_FIRST_USER_MESSAGE, IN_LAST_USER_MESSAGE = "start", "first_user", "last_user"


@dataclass(frozen=True)
class Thinking:
    """How a template writes a reply's reasoning block."""

    open: str = "<think>\n"
    close: str = "\n</think>\n\n"
    prompt_opens: bool = False  # the generation prompt writes `open` (DeepSeek-R1): the model continues after it
    lstrip_history: bool = True  # history replies drop the newlines after "</think>" (Qwen3 does, R1 keeps them)
    history: str = ""  # what a history reply starts with in place of its dropped reasoning (GLM: an empty block)

    def split(self, content: str) -> tuple[str | None, str]:
        """(reasoning or None when there is no block, the text after the block)."""
        end = self.close.strip()
        if end not in content:
            return None, content
        head, _, answer = content.rpartition(end)
        return head.split(self.open.strip())[-1].strip("\n"), answer


def _check_roles(messages, open_ended: bool):
    """Conversations alternate a prompt role and a reply role, starting with a prompt; `open_ended`: they end on
    a prompt (for a generation prompt), else on a reply."""
    for i, message in enumerate(messages):
        expected = PROMPT_ROLES if i % 2 == 0 else REPLY_ROLES
        if message["role"] not in expected:
            raise DataError(f"message {i + 1} has role {message['role']!r} where {' or '.join(expected)} is "
                            "expected: a conversation alternates a prompt (user | observation) and a reply "
                            "(assistant | function), starting with a prompt")
    if not messages or len(messages) % 2 != open_ended:
        ending = "a prompt (user | observation), to be answered" if open_ended else "a reply (assistant | function)"
        raise DataError(f"a conversation of {len(messages)} messages cannot be templated here: it must end with "
                        f"{ending}")


@dataclass(frozen=True)
class Template:
    name: str
    stop_words: tuple[str, ...] = ()  # what ends a reply at generation time besides eos (none when eos does)
    prefix: str = ""  # once, at the very start (bos)
    system: str = "{content}"  # the system prompt ("" drops it)
    system_at: str = AT_START  # or inside the first / last user message (llama2, gemma / mistral)
    user: str = "{content}"  # a user turn, through the generation prompt
    observation: str = ""  # a tool-result turn ("" = like a user turn)
    assistant: str = "{content}"  # a reply, through its end-of-turn marker
    function: str = ""  # a tool-call reply ("" = like any reply)
    separator: str = ""  # what the official template writes after a reply's end-of-turn marker
    default_system: str = ""
    trim: tuple[str, ...] = ()  # roles whose content the official template strips of surrounding whitespace
    tool_format: str = "default"
    thinking: Thinking | None = None
    enable_thinking: bool = True
    bos_token: str = ""  # the model family's bos/eos text: written by `render` when no tokenizer is given,
    eos_token: str = "</s>"  # and the eos `prepare_tokenizer` gives a tokenizer that has none
    mm_plugin: str | None = None  # the lf.data.mm_plugins entry that puts media in its prompts; None: text only
    models: str = ""  # the model families it serves (docs/templates.md)
    differs: str = ""  # where lf's text knowingly differs from the model's official template or LLaMA-Factory's

    # -- text --------------------------------------------------------------------------------------------------

    def render_pairs(self, messages, system=None, tools=None, tokenizer=None) -> list[tuple[str, str]]:
        """(prompt, reply) text per turn: what `encode_multiturn` tokenizes, piece by piece."""
        _check_roles(messages, open_ended=False)
        return self._turns(messages, system, tools, tokenizer)

    def render(self, messages, system=None, tools=None, add_generation_prompt=False, tokenizer=None) -> str:
        """The conversation as text. With `add_generation_prompt` it ends with a prompt message and the text
        ends where the model's reply starts. {bos}/{eos} are the tokenizer's when one is given."""
        _check_roles(messages, open_ended=add_generation_prompt)
        turns = self._turns(messages, system, tools, tokenizer)
        if add_generation_prompt:
            return "".join(prompt + reply for prompt, reply in turns[:-1]) + turns[-1][0]
        return "".join(prompt + reply for prompt, reply in turns) + self._fill(self.separator, "", tokenizer)

    def _fill(self, fmt: str, content: str, tokenizer) -> str:
        if tokenizer is None:
            return fmt.format(content=content, bos=self.bos_token, eos=self.eos_token)
        return fmt.format(content=content, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")

    def _turns(self, messages, system, tools, tokenizer) -> list[tuple[str, str]]:
        """Turns of a checked conversation; an open-ended one's last turn has reply ''."""
        tool_format = get_tool_format(self.tool_format)
        system = (system or self.default_system).strip() if SYSTEM in self.trim else system or self.default_system
        tools_text = tool_format.format_tools(tools) if tools else ""
        if tools_text and tool_format.placement == IN_SYSTEM:
            system = tool_format.system_joiner.join(part for part in (system, tools_text) if part)
        users = [i for i, m in enumerate(messages) if m["role"] == USER] or [0]
        system_at = {AT_START: None, IN_FIRST_USER_MESSAGE: users[0], IN_LAST_USER_MESSAGE: users[-1]}[self.system_at]
        tools_at = {IN_SYSTEM: None, IN_FIRST_USER: users[0], BEFORE_LAST_USER: users[-1]}[tool_format.placement]

        head = self._fill(self.prefix, "", tokenizer)
        if system and system_at is None:
            head += self._fill(self.system, system, tokenizer)
        turns = []
        for i in range(0, len(messages), 2):
            role, content = messages[i]["role"], messages[i]["content"]
            if role == OBSERVATION:
                text = self._fill(self.observation or self.user, tool_format.format_observation(content), tokenizer)
            else:
                content = content.strip() if USER in self.trim else content
                if i == tools_at and tool_format.placement == IN_FIRST_USER:
                    content = tools_text + content
                if i == system_at and system:
                    content = self._fill(self.system, system, tokenizer) + content
                text = self._fill(self.user, content, tokenizer)
                if i == tools_at and tool_format.placement == BEFORE_LAST_USER:
                    text = tools_text + text
            prompt = (head if i == 0 else self._fill(self.separator, "", tokenizer)) + text
            if i + 1 == len(messages):  # open-ended: the generation prompt is that of a reply with no reasoning
                turns.append((prompt + self._reply_body("", last=True)[0], ""))
                continue
            reply = messages[i + 1]
            if reply["role"] == FUNCTION:
                try:
                    body = tool_format.format_calls(reply["content"])
                except DataError as e:
                    raise DataError(f"message {i + 2} (function): {e}") from None
            else:
                body = reply["content"].strip() if ASSISTANT in self.trim else reply["content"]
            opening, body = self._reply_body(body, last=i + 2 == len(messages))
            fmt = self.function if reply["role"] == FUNCTION and self.function else self.assistant
            turns.append((prompt + opening, self._fill(fmt, body, tokenizer)))
        return turns

    def _reply_body(self, content: str, last: bool) -> tuple[str, str]:
        """(text the prompt ends with, the reply's content) under the template's reasoning rules."""
        thinking = self.thinking
        if thinking is None:
            return "", content
        reasoning, answer = thinking.split(content)
        if not last:  # history: the official templates drop old reasoning
            return "", thinking.history + (answer.lstrip("\n") if reasoning is not None and thinking.lstrip_history
                                           else answer)
        if not reasoning and not self.enable_thinking:
            return thinking.open + thinking.close, answer.lstrip("\n") if reasoning is not None else answer
        block = thinking.open + (reasoning or "") + thinking.close + answer.lstrip("\n")
        if thinking.prompt_opens:
            return thinking.open, block[len(thinking.open):]
        return "", block

    # -- jinja -------------------------------------------------------------------------------------------------

    def to_jinja(self) -> str:
        """This template as a jinja `chat_template` (what transformers' `apply_chat_template` and vLLM render), built
        from its fields, so that a tokenizer saved with it prompts the model as lf trained it. For a conversation of
        alternating user and assistant messages, led by an optional system message (else `default_system`), it
        writes the text of `render` with that system prompt and the tokenizer's bos_token/eos_token; reasoning is
        handled as `render` does (history replies lose it, the last reply keeps it).

        Beyond or unlike `render`:
          - every user format includes the assistant header, so a conversation ending with a user message ends
            with that header even without add_generation_prompt; add_generation_prompt adds only what the
            generation prompt writes after it (the reasoning opening of deepseekr1, the empty block when thinking
            is off), and nothing after a final assistant message (`render` rejects both cases);
          - thinking templates read the chat-template variable `enable_thinking`: False turns thinking off, as
            `get_template(..., enable_thinking=False)` does;
          - tools, tool calls and any other role (tool, function, observation, a later system message) raise an
            error (`raise_exception`): lf's tool formats are not written in jinja, and dropping them silently
            would prompt the model without its tools.
        """
        system = f"(system or {self.default_system!r})" if self.default_system else "system"
        system = f"{system} | trim" if SYSTEM in self.trim else system
        # Roles alternate, so the last user message is the last message or the one before it.
        in_user = {AT_START: None, IN_FIRST_USER_MESSAGE: "loop.first",
                   IN_LAST_USER_MESSAGE: "loop.revindex0 < 2"}[self.system_at]
        unsupported = (f"lf's jinja chat template of {self.name!r} writes only alternating user and assistant "
                       "messages after an optional system message, without tools")
        lines = [_tag("set bos = bos_token or ''"), _tag("set eos = eos_token or ''"),
                 _tag("set system = messages[0].content if messages and messages[0].role == 'system' else ''"),
                 _tag("set loop_messages = messages[1:] if messages and messages[0].role == 'system' else messages"),
                 *([_tag(f"set system = {system}")] if system != "system" else []), *_out(self.prefix)]
        if in_user is None:
            lines += [_tag("if system"), *_out(self.system, "system", 1), _tag("endif")]
        if self.thinking:
            off = "enable_thinking is defined and not enable_thinking" if self.enable_thinking else "true"
            lines.append(_tag(f"set thinking_off = {off}"))
        lines += [_tag("for m in loop_messages"),
                  _tag("if tools or m.tool_calls or m.role != ('user' if loop.index0 % 2 == 0 else 'assistant')", 1),
                  _write(f"raise_exception({unsupported!r})", 2), _tag("endif", 1),
                  _tag("if m.role == 'user'", 1),
                  _tag("set content = m.content | trim" if USER in self.trim else "set content = m.content", 2)]
        if in_user is not None:
            lines += [_tag(f"if system and {in_user}", 2),
                      _tag(f"set content = {_jinja_expr(self.system, 'system')} + content", 3), _tag("endif", 2)]
        lines += _out(self.user, "content", 2)
        if self.thinking:
            lines += self._jinja_generation_prompt()
        lines += [_tag("else", 1),
                  _tag("set content = m.content | trim" if ASSISTANT in self.trim else "set content = m.content", 2)]
        if self.thinking:
            lines += self._jinja_reasoning()
        lines += [*_out(self.assistant, "content", 2), *_out(self.separator, depth=2), _tag("endif", 1),
                  _tag("endfor")]
        return "\n".join(lines)

    def _jinja_generation_prompt(self) -> list[str]:
        """What `_reply_body` puts after the header of an open-ended conversation."""
        thinking = self.thinking
        opening = repr(thinking.open) if thinking.prompt_opens else "''"
        return [_tag("if add_generation_prompt and loop.last", 2),
                _write(f"{thinking.open + thinking.close!r} if thinking_off else {opening}", 3),
                _tag("endif", 2)]

    def _jinja_reasoning(self) -> list[str]:
        """`_reply_body` on the reply's `content`: what it adds to the prompt is written first."""
        thinking = self.thinking
        start, end = repr(thinking.open.strip()), repr(thinking.close.strip())
        history = "(answer.lstrip('\\n') if reasoning is not none else answer)" if thinking.lstrip_history else "answer"
        history = f"{thinking.history!r} + {history}" if thinking.history else history
        rest = f"(reasoning or '') + {thinking.close!r} + answer.lstrip('\\n')"
        last = ([_write(repr(thinking.open), 3), _tag(f"set content = {rest}", 3)] if thinking.prompt_opens
                else [_tag(f"set content = {thinking.open!r} + {rest}", 3)])
        return [_tag(f"set reasoning = (content.split({end})[:-1] | join({end})).split({start})[-1].strip('\\n') "
                     f"if {end} in content else none", 2),
                _tag(f"set answer = content.split({end})[-1]", 2),
                _tag("if not loop.last", 2), _tag(f"set content = {history}", 3),
                _tag("elif not reasoning and thinking_off", 2), _write(repr(thinking.open + thinking.close), 3),
                _tag("set content = answer.lstrip('\\n') if reasoning is not none else answer", 3),
                _tag("else", 2), *last, _tag("endif", 2)]

    # -- tokens ------------------------------------------------------------------------------------------------

    def encode_multiturn(self, tokenizer, messages, system=None, tools=None) -> list[tuple[list[int], list[int]]]:
        """(prompt_ids, response_ids) per turn; each response ends with the end-of-turn marker (or eos)."""
        return self.encode_many(tokenizer, [(messages, system, tools)])[0]

    def encode_oneturn(self, tokenizer, messages, system=None, tools=None) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) of the last reply, all earlier turns merged into the prompt."""
        turns = self.encode_multiturn(tokenizer, messages, system, tools)
        return [t for prompt, reply in turns[:-1] for t in prompt + reply] + turns[-1][0], turns[-1][1]

    def encode_many(self, tokenizer, conversations) -> list[list[tuple[list[int], list[int]]]]:
        """`encode_multiturn` of each (messages, system, tools), with one batched tokenizer call for them all."""
        rendered = [self.render_pairs(messages, system, tools, tokenizer) for messages, system, tools in conversations]
        texts = [piece for turns in rendered for turn in turns for piece in turn]
        ids = iter(_token_ids(tokenizer, texts) if texts else ())
        return [[(next(ids), next(ids)) for _ in turns] for turns in rendered]

    def stop_token_ids(self, tokenizer) -> list[int]:
        """The ids that end a reply: the tokenizer's eos and the stop words (one token each after
        prepare_tokenizer)."""
        vocab = tokenizer.get_vocab()
        ids = [tokenizer.eos_token_id] + [vocab[word] for word in self.stop_words if word in vocab]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def prepare_tokenizer(self, tokenizer) -> list[str]:
        """Fits the tokenizer to the template: an eos and a pad token when missing, and the stop words as single
        special tokens. Returns what it changed, in plain words."""
        changes = []
        if tokenizer.eos_token is None:
            eos = self.stop_words[0] if self.stop_words else self.eos_token
            tokenizer.add_special_tokens({"eos_token": eos})
            changes.append(f"set the eos token to {eos!r} (the tokenizer had none)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            changes.append(f"set the pad token to the eos token {tokenizer.eos_token!r} (the tokenizer had none)")
        unknown = [w for w in self.stop_words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
        if unknown:
            tokenizer.add_tokens(unknown, special_tokens=True)
            changes.append(f"added the stop word(s) {', '.join(map(repr, unknown))} of template {self.name!r} as "
                           "special tokens (the tokenizer split them into pieces); the vocabulary now has "
                           f"{len(tokenizer)} tokens, so the model's embeddings must grow to match")
        return changes


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens added. A fast tokenizer's Rust backend is called directly: the same ids
    without transformers' per-text wrapping, which costs about a fifth of the time on 100k records."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


# One jinja tag per indented line: the tags' "-" keep that layout whitespace out of the text.
def _tag(statement: str, depth: int = 0) -> str:
    return "    " * depth + "{%- " + statement + " -%}"


def _write(expression: str, depth: int = 0) -> str:
    return "    " * depth + "{{- " + expression + " -}}"


def _out(fmt: str, content: str = "''", depth: int = 0) -> list[str]:
    """The line that writes format string `fmt`, none when it writes nothing."""
    return [_write(_jinja_expr(fmt, content), depth)] if fmt else []


def _jinja_expr(fmt: str, content: str) -> str:
    """A format string as a jinja expression: {content} is the jinja variable `content`, {bos}/{eos} the
    tokenizer's tokens. Python's repr of a str is a valid jinja string literal."""
    parts = []
    for literal, name, _, _ in Formatter().parse(fmt):
        parts += [repr(literal)] if literal else []
        parts += [{"content": content, "bos": "bos", "eos": "eos"}[name]] if name is not None else []
    return " + ".join(parts)


# Qwen3 writes reasoning in the reply; DeepSeek-R1's generation prompt opens the block and its history replies
# keep what follows "</think>" as it is.
QWEN3_THINKING = Thinking()
R1_THINKING = Thinking(prompt_opens=True, lstrip_history=False)

_CHATML = dict(stop_words=("<|im_end|>",), system="<|im_start|>system\n{content}<|im_end|>\n",
               user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
               assistant="{content}<|im_end|>", separator="\n")
_DEEPSEEK = dict(stop_words=("<｜end▁of▁sentence｜>",), prefix="{bos}", user="<｜User｜>{content}<｜Assistant｜>",
                 assistant="{content}<｜end▁of▁sentence｜>", bos_token="<｜begin▁of▁sentence｜>")
_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_INTERN_VL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                     "多模态大语言模型。")
_VICUNA = dict(system="{content} ", user="USER: {content} ASSISTANT:", assistant=" {content}{eos}",
               default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
                              "gives helpful, detailed, and polite answers to the user's questions.")

_GEMMA = dict(stop_words=("<end_of_turn>",), prefix="{bos}", system="{content}\n\n", system_at=IN_FIRST_USER_MESSAGE,
              user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
              assistant="{content}<end_of_turn>", separator="\n", bos_token="<bos>", eos_token="<eos>")

_LLAMA2 = dict(system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_at=IN_FIRST_USER_MESSAGE,
               user="{bos}[INST] {content} [/INST]", assistant=" {content} {eos}", trim=(USER, ASSISTANT),
               bos_token="<s>")
_INTERN2_SYSTEM = ("You are an AI assistant whose name is InternLM (书生·浦语).\n"
                   "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
                   "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
                   "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user "
                   "such as English and 中文.")

_NO_IDS = "tool calls and results carry no call ids (canonical data has none)"
_MISTRAL_SYSTEM = ("the system prompt joins the last user message, as mistral-common does, where the jinja writes it "
                   "only when the conversation ends on that message (a training conversation would lose it)")
_PHI = dict(stop_words=("<|end|>",), system="<|system|>\n{content}<|end|>\n",
            user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>", separator="\n",
            eos_token="<|endoftext|>")
_DBRX_SYSTEM = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on "
    "information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but "
    "provide thorough responses to more complex and open-ended questions.\nYou assist with various tasks, from "
    "writing to coding (using markdown for code blocks — remember to use ``` with code, JSON, and tables).\n(You do "
    "not have real-time data access or code execution capabilities. You avoid stereotyping and provide balanced "
    "perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do not "
    "divulge details of your training data.)\nThis is your system prompt, guiding your responses. Do not reference "
    "it, just respond to the user. If you find yourself talking about this message, stop. You should be responding "
    "appropriately and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT "
    "YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY.")
_DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you "
    "only answer questions related to computer science. For politically sensitive questions, security and privacy "
    "issues, and other non-computer science questions, you will refuse to answer\n")
_SEED_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the Seed-Coder model, developed by ByteDance Seed, and you only "
    "answer questions related to computer science. For politically sensitive questions, security and privacy "
    "issues, and other non-computer science questions, you will refuse to answer.\n\n")
_SAILOR_SYSTEM = ("You are an AI assistant named Sailor created by Sea AI Lab. Your answer should be friendly, "
                 "unbiased, faithful, informative and detailed.")
_AEVA_SYSTEM = ("You are an AI assistant named Aeva created by Zongzhi Lou. Your answer should be friendly, unbiased, "
               "faithful, informative and detailed.")
_TELECHAT_SYSTEM = ("你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院"
                   "（TeleAI）研发的人工智能助手。")
_XUANYUAN_SYSTEM = ("以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，会对人类提出的问题给出"
                   "有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、不安全、有争议、政治敏感等相关的话题、问题和指示。\n")
# Chatml with a `tool` role for tool results.
_CHATML_TOOL = dict(_CHATML, observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n")
# GLM-4 and its successors: replies have no end-of-turn marker of their own (the models stop on the next turn's
# header); lf ends each with eos instead (see the module docstring). The newline after "<|assistant|>" is the
# prompt's, so that GLM-4.5's reasoning block follows it; history replies there keep an empty block.
_GLM4 = dict(stop_words=("<|user|>", "<|observation|>"), prefix="[gMASK]<sop>", system="<|system|>\n{content}",
             user="<|user|>\n{content}<|assistant|>\n", observation="<|observation|>\n{content}<|assistant|>\n",
             assistant="{content}{eos}", eos_token="<|endoftext|>")
# GLM-4.7: no newlines between turns; the generation prompt opens the reasoning, history replies keep its end.
_GLM47 = dict(_GLM4, system="<|system|>{content}", user="<|user|>{content}<|assistant|>",
              observation="<|observation|>{content}<|assistant|>", tool_format="glm4_moe",
              thinking=Thinking(open="<think>", close="</think>", prompt_opens=True, history="</think>"))
_GRANITE = dict(stop_words=("<|end_of_text|>",),
                system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
                user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n"
                     "<|start_of_role|>assistant<|end_of_role|>",
                assistant="{content}<|end_of_text|>", separator="\n", eos_token="<|end_of_text|>")
_GEMMA4 = dict(stop_words=("<turn|>", "<tool|>"), prefix="{bos}", system="<|turn>system\n<|think|>\n{content}<turn|>\n",
               user="<|turn>user\n{content}<turn|>\n<|turn>model\n",
               observation="<|turn>tool\n{content}<turn|>\n<|turn>model\n", assistant="{content}<turn|>",
               function="<|tool>{content}<tool|>", separator="\n", default_system="You are a helpful assistant.",
               trim=(SYSTEM, USER, ASSISTANT),
               tool_format="gemma4", thinking=Thinking(open="<|channel>thought\n", close="<channel|>"),
               bos_token="<bos>", eos_token="<eos>")
# Mistral's later models: no space inside [INST] ... [/INST]; tool calls and results as the mistral tool format.
_MISTRAL = dict(prefix="{bos}", user="[INST]{content}[/INST]", observation="{content}", assistant="{content}{eos}",
                function="{content}{eos}", tool_format="mistral", bos_token="<s>")
_MISTRAL_SYSTEM_PROMPT = dict(_MISTRAL, system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]")
# ByteDance Seed: every turn is bos, role, newline, content, eos.
_SEED = dict(system="{bos}system\n{content}{eos}", user="{bos}user\n{content}{eos}{bos}assistant\n",
             assistant="{content}{eos}")
_QWEN3_5 = dict(_CHATML, tool_format="qwen3_5", thinking=Thinking(prompt_opens=True))  # Qwen3's, opened by the prompt
_HY_SMALL = "<｜hy_place▁holder▁no▁{}｜>"

# Differences shared by several templates (their `differs`).
_GLM_EOS = ("each reply ends with eos: the official template writes no end-of-turn marker (the model stops on the "
            "next turn's header, lf's stop words), and LLaMA-Factory writes eos after the last reply only, which "
            "teaches no stop after the others")
_GLM_NEWLINE = ('the newline after "<|assistant|>" is the prompt\'s, as GLM-4\'s generation prompt writes it (the '
                'same tokens)')
_EMPTY_BLOCK = ("in thinking mode a last reply without reasoning gets the empty block (as lf's qwen3); the official "
                "template writes none")
_FOLLOWS_MODEL = "follows the model's published template where LLaMA-Factory 0.9.5 differs"
_TEXT_SIDE = 'the text side only: no multimodal plugin yet'
_NO_DATED_SYSTEM = 'without the official default system prompt'

_REGISTRY = {t.name: t for t in (
    Template("default", system="System: {content}{eos}\n", user="Human: {content}{eos}\nAssistant:",
             assistant="{content}{eos}", separator="\n", models="any (LLaMA-Factory's plain format)"),
    Template("empty", system="", models="any: text only, for pretraining-like data"),
    Template("alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n### Response:\n",
             assistant="{content}{eos}", separator="\n\n",
             default_system="Below is an instruction that describes a task. "
                            "Write a response that appropriately completes the request.",
             models="Stanford Alpaca's prompt"),
    Template("vicuna", **_VICUNA, models="Vicuna v1.1 (FastChat)"),
    Template("llava", **_VICUNA, mm_plugin="llava", models="LLaVA-1.5 (Vicuna v1.1's format)"),
    Template("llava_next", **_VICUNA, mm_plugin="llava_next", models="LLaVA-NeXT (v1.6) on Vicuna"),
    Template("chatml", **_CHATML, models="any ChatML model"),
    Template("qwen", **_CHATML, default_system=_QWEN_SYSTEM, tool_format="qwen", models="Qwen2, Qwen2.5"),
    Template("qwen3", **_CHATML, tool_format="qwen", thinking=QWEN3_THINKING, models="Qwen3"),
    Template("qwen2_vl", **_CHATML, default_system="You are a helpful assistant.", tool_format="qwen",
             mm_plugin="qwen2_vl", models="Qwen2-VL, Qwen2.5-VL"),
    Template("qwen2_audio", **_CHATML, default_system="You are a helpful assistant.", mm_plugin="qwen2_audio",
             models="Qwen2-Audio"),
    # LLaMA-Factory's default system prompt, not the long one Qwen2.5-Omni's demos pass for speech output
    Template("qwen2_omni", **_CHATML, default_system="You are a helpful assistant.", tool_format="qwen",
             mm_plugin="qwen2_omni", models="Qwen2.5-Omni (its thinker)"),
    Template("qwen3_nothink", **_CHATML, tool_format="qwen", thinking=QWEN3_THINKING, enable_thinking=False,
             models="Qwen3, thinking off"),
    Template("qwen3_vl", **_CHATML, tool_format="qwen", thinking=QWEN3_THINKING, mm_plugin="qwen3_vl",
             models="Qwen3-VL"),
    Template("qwen3_vl_nothink", **_CHATML, tool_format="qwen", thinking=QWEN3_THINKING, enable_thinking=False,
             mm_plugin="qwen3_vl", models="Qwen3-VL, thinking off"),
    Template("llama2", **_LLAMA2, models="Llama 2 chat"),
    Template("llama2_zh", **_LLAMA2, default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
             models="Chinese Llama 2 / Alpaca 2"),
    Template("llama3", stop_words=("<|eot_id|>",), prefix="{bos}",
             system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
             user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
             observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
             assistant="{content}<|eot_id|>", trim=(SYSTEM, USER, ASSISTANT), tool_format="llama3",
             bos_token="<|begin_of_text|>", models="Llama 3, 3.1, 3.2 (text)",
             differs="Llama 3's format without 3.1's \"Cutting Knowledge Date\" system lines; tools go in the "
                     "first user message as Meta's 3.1 template puts them (LLaMA-Factory: in the system prompt)"),
    Template("mistral", prefix="{bos}", system="{content}\n\n", system_at=IN_LAST_USER_MESSAGE,
             user="[INST] {content}[/INST]", observation="{content}", assistant=" {content}{eos}",
             function="{content}{eos}", trim=(ASSISTANT,), tool_format="mistral", bos_token="<s>",
             models="Mistral 7B v0.3, Mixtral", differs=f"{_MISTRAL_SYSTEM}; {_NO_IDS}"),
    Template("ministral", **_MISTRAL, system="{content}\n\n", system_at=IN_LAST_USER_MESSAGE,
             models="Mistral NeMo, Ministral (Tekken tokenizer)",
             differs=f"{_MISTRAL_SYSTEM} (LLaMA-Factory: the first user message); {_NO_IDS}"),
    Template("gemma", **_GEMMA, trim=(USER, ASSISTANT), models="Gemma, Gemma 2, Gemma 3 (text)"),
    Template("gemma2", **{**_GEMMA, "stop_words": ("<eos>", "<end_of_turn>")}, trim=(USER, ASSISTANT),
             models="Gemma 2 (stops on eos too)"),
    Template("gemma3", **_GEMMA, trim=(ASSISTANT,), mm_plugin="gemma3", models="Gemma 3 with images",
             differs="user turns untrimmed (as LLaMA-Factory's): an image's sequence starts and ends with newlines "
                     "that Gemma3Processor writes after the chat template trimmed the text"),
    Template("phi", **_PHI, models="Phi-3, Phi-3.5",
             differs="without the eos the official template writes after the last turn (the reply already ends "
                     "with <|end|>)"),
    Template("yi", **_CHATML, models="Yi chat"),
    Template("intern2", **_CHATML, prefix="{bos}", default_system=_INTERN2_SYSTEM, bos_token="<s>",
             models="InternLM 2, 2.5",
             differs="LLaMA-Factory's default system prompt, which the model's own template does not write"),
    Template("intern_vl", **_CHATML, prefix="{bos}", default_system=_INTERN_VL_SYSTEM, mm_plugin="intern_vl",
             models="InternVL 3 (transformers' InternVLForConditionalGeneration)"),
    Template("deepseek3", **_DEEPSEEK, models="DeepSeek-V3"),
    Template("deepseekr1", **_DEEPSEEK, thinking=R1_THINKING, models="DeepSeek-R1",
             differs="the official template drops the reasoning of every reply (it is written for inference); lf "
                     "keeps the last reply's, written as the model generates it after \"<｜Assistant｜><think>\\n\""),
    # -- the rest of LLaMA-Factory 0.9.5's text templates --
    # Ling (bailing) 1.x and 2.0
    Template("bailing", stop_words=("<|endoftext|>",), system="<role>SYSTEM</role>{content}",
             user="<role>HUMAN</role>{content}<role>ASSISTANT</role>",
             observation="<role>OBSERVATION</role>{content}<role>ASSISTANT</role>", assistant="{content}{eos}",
             eos_token="<|endoftext|>",
             models='Ling 1.x (bailing)',
             differs=_GLM_EOS),
    Template("bailing_v2", stop_words=("<|role_end|>",), system="<role>SYSTEM</role>{content}<|role_end|>",
             user="<role>HUMAN</role>{content}<|role_end|><role>ASSISTANT</role>",
             observation="<role>OBSERVATION</role>\n{content}<|role_end|><role>ASSISTANT</role>",
             assistant="{content}<|role_end|>", default_system="detailed thinking off", tool_format="ling",
             eos_token="<|endoftext|>",
             models='Ling 2.0',
             differs=f'{_FOLLOWS_MODEL} (default system prompt)'),
    # Breeze (MediaTek, on Mistral): the system prompt then a space before the first [INST]
    Template("breeze", prefix="{bos}", system="{content} ", user="[INST] {content} [/INST] ",
             assistant="{content}{eos}", bos_token="<s>",
             models='Breeze (MediaTek, on Mistral)',
             differs=f'{_FOLLOWS_MODEL} (whitespace)'),
    Template("chatml_de", **_CHATML_TOOL, default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
             models='German ChatML models'),
    # Command R / R+ (Cohere)
    Template("cohere", stop_words=("<|END_OF_TURN_TOKEN|>",), prefix="{bos}",
             system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
             user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
             assistant="{content}<|END_OF_TURN_TOKEN|>", bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
             models='Command R, R+ (Cohere)'),
    Template("cpm4", **_CHATML_TOOL, prefix="{bos}", bos_token="<s>",
             models='MiniCPM 4'),
    Template("dbrx", **_CHATML_TOOL, default_system=_DBRX_SYSTEM, eos_token="<|endoftext|>",
             models='DBRX Instruct'),
    # DeepSeek LLM / V2 chat
    Template("deepseek", prefix="{bos}", system="{content}\n\n", user="User: {content}\n\nAssistant:",
             assistant=" {content}{eos}", bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
             models='DeepSeek LLM, DeepSeek-V2 chat',
             differs=f'{_FOLLOWS_MODEL} (a space before the reply)'),
    Template("deepseekcoder", stop_words=("<|EOT|>",), prefix="{bos}",
             user="### Instruction:\n{content}\n### Response:\n", assistant="{content}\n<|EOT|>", separator="\n",
             default_system=_DEEPSEEK_CODER_SYSTEM,
             bos_token="<｜begin▁of▁sentence｜>", eos_token="<|EOT|>",
             models='DeepSeek Coder',
             differs=f'{_FOLLOWS_MODEL} (whitespace)'),
    # ERNIE 4.5: the thinking models' chatml with blank lines, the base chat models' plain format
    Template("ernie", stop_words=("<|im_end|>",), system="<|im_start|>system\n{content}<|im_end|>\n\n",
             user="<|im_start|>user\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
             observation="<|im_start|>tool\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
             assistant="{content}<|im_end|>", separator="\n\n",
             default_system="<global_setting>\nthink_mode=True\n</global_setting>",
             models='ERNIE 4.5 thinking models'),
    Template("ernie_nothink", stop_words=("<|end_of_sentence|>",), prefix="<|begin_of_sentence|>",
             system="{content}\n", user="User: {content}\nAssistant: ", assistant="{content}<|end_of_sentence|>",
             models='ERNIE 4.5 chat models'),
    Template("exaone", stop_words=("[|endofturn|]",), system="[|system|]{content}[|endofturn|]\n",
             user="[|user|]{content}\n[|assistant|]", assistant="{content}[|endofturn|]", separator="\n",
             trim=(SYSTEM, USER, ASSISTANT), eos_token="[|endofturn|]",
             models='EXAONE 3, 3.5',
             differs=f'{_FOLLOWS_MODEL} (whitespace)'),
    Template("falcon", user="User: {content}\nFalcon:", assistant="{content}{eos}", separator="\n",
             eos_token="<|endoftext|>",
             models='Falcon (1) instruct'),
    Template("falcon_h1", **{**_CHATML_TOOL, "stop_words": ("<|im_end|>", "<|end_of_text|>")}, prefix="{bos}",
             bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
             models='Falcon-H1'),
    Template("fewshot", assistant="{content}{eos}", separator="\n\n",
             models='any: examples one after another'),  # examples one after another
    # Gemma 3n's text side (Gemma 3's format); Gemma 4's text side, with its thought channel
    Template("gemma3n", **_GEMMA, trim=(USER, ASSISTANT),
             models='Gemma 3n',
             differs=_TEXT_SIDE),
    Template("gemma4", **_GEMMA4,
             models='Gemma 4',
             differs=f'{_TEXT_SIDE}; trained in thinking mode, as LLaMA-Factory does: the system turn starts with '
                     '"<|think|>" and is always written, where Gemma 4\'s template writes it only with '
                     f'enable_thinking and drops every thought; {_EMPTY_BLOCK}; {_FOLLOWS_MODEL} ("<|think|>" on a '
                     'line of its own)'),
    Template("gemma4n", **_GEMMA4,
             models='Gemma 4n',
             differs=f'{_TEXT_SIDE}; trained in thinking mode, as gemma4'),
    Template("glm4", **_GLM4, tool_format="glm4",
             models='GLM-4, GLM-4-0414',
             differs=_GLM_EOS),
    Template("glm4_moe", **_GLM4, tool_format="glm4_moe",
             thinking=Thinking(open="<think>", close="</think>\n", history="<think></think>\n"),
             models='GLM-4.5, GLM-4.6',
             differs=f'{_GLM_EOS}; {_GLM_NEWLINE}'),
    Template("glm4_7", **_GLM47,
             models='GLM-4.7',
             differs=f'{_GLM_EOS}; thinking off ends the prompt with "<think></think>" where GLM-4.7 writes '
                     f'"</think>"; {_EMPTY_BLOCK}; {_FOLLOWS_MODEL} (no newlines; the generation prompt opens the '
                     'reasoning)'),
    Template("aeva", **_GLM47, default_system=_AEVA_SYSTEM,
             models='Aeva (on GLM-4.7)',
             differs=_GLM_EOS),
    Template("glmz1", **_GLM4, tool_format="glm4", thinking=QWEN3_THINKING,
             models='GLM-Z1',
             differs=f'{_GLM_EOS}; {_GLM_NEWLINE}'),
    Template("granite3", **_GRANITE,
             models='Granite 3.x',
             differs=f"{_NO_DATED_SYSTEM} (Granite 3.3's holds today's date)"),
    Template("granite4", **_GRANITE, observation="<|start_of_role|>tool<|end_of_role|>{content}<|end_of_text|>\n"
                                                 "<|start_of_role|>assistant<|end_of_role|>",
             default_system="You are a helpful assistant. Please ensure responses are professional, accurate, and "
                            "safe.",
             models='Granite 4',
             differs=f'{_FOLLOWS_MODEL} (default system prompt)'),
    # Hunyuan: the first release, the small dense ones (0.5B-7B), Hy3
    Template("hunyuan", stop_words=("<|eos|>",), system="<|startoftext|>{content}<|extra_4|>",
             user="<|startoftext|>{content}<|extra_0|>", assistant="{content}<|eos|>",
             models='Hunyuan-A13B',
             differs=f'{_FOLLOWS_MODEL} (<|startoftext|> opens every turn)'),
    Template("hunyuan_small", stop_words=(_HY_SMALL.format(2),), prefix="<｜hy_begin▁of▁sentence｜>",
             system="{content}" + _HY_SMALL.format(3), user="<｜hy_User｜>{content}" + _HY_SMALL.format(8),
             assistant="{content}" + _HY_SMALL.format(2),
             models='Hunyuan 0.5B-7B'),
    Template("hy3", stop_words=("<｜hy_eos｜>",), prefix="{bos}", user="<｜hy_User｜>{content}<｜hy_Assistant｜>",
             assistant="{content}<｜hy_eos｜>", thinking=Thinking(open="<think>", close="</think>"),
             bos_token="<｜hy_begin▁of▁sentence｜>",
             models='Hy3',
             differs='LLaMA-Factory 0.9.5\'s Hy3 format: Tencent\'s newest published template names its tokens with '
                     'an ":opensource" suffix and adds a reasoning-effort line'),
    Template("index", system="<unk>{content}", user="reserved_0{content}reserved_1", assistant="{content}{eos}",
             models='Index-1.9B'),
    Template("intern_s1", **_CHATML, prefix="{bos}",
             models='Intern-S1',
             differs=_TEXT_SIDE),
    Template("lfm2", **_CHATML_TOOL, prefix="{bos}", tool_format="lfm2", bos_token="<|startoftext|>",
             models='LFM2 (Liquid)',
             differs=f'{_FOLLOWS_MODEL} (default system prompt)'),
    # Llama 4's text side
    Template("llama4", stop_words=("<|eot|>", "<|eom|>"), prefix="{bos}",
             system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
             user="<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
             observation="<|header_start|>ipython<|header_end|>\n\n{content}<|eot|>"
                         "<|header_start|>assistant<|header_end|>\n\n",
             assistant="{content}<|eot|>", trim=(SYSTEM,), tool_format="llama3", bos_token="<|begin_of_text|>",
             models='Llama 4',
             differs=_TEXT_SIDE),
    Template("mimo", **_CHATML, default_system="You are a helpful assistant.", tool_format="qwen",
             thinking=QWEN3_THINKING,
             models='MiMo 7B'),
    Template("mimo_v2", **_CHATML, default_system="You are MiMo, a helpful AI assistant engineered by Xiaomi.",
             tool_format="qwen", thinking=Thinking(open="<think>", close="</think>"),
             models='MiMo V2'),
    Template("minimax1", stop_words=("<end_of_sentence>",), prefix="<begin_of_document>",
             system="<beginning_of_sentence>system ai_setting=assistant\n{content}<end_of_sentence>\n",
             user="<beginning_of_sentence>user name=user\n{content}<end_of_sentence>\n"
                  "<beginning_of_sentence>ai name=assistant\n",
             observation="<beginning_of_sentence>tool name=tools\n{content}<end_of_sentence>\n"
                         "<beginning_of_sentence>ai name=assistant\n",
             assistant="{content}<end_of_sentence>", separator="\n",
             default_system="You are a helpful assistant created by Minimax based on MiniMax-M1 model.",
             tool_format="minimax1",
             models='MiniMax-Text-01, MiniMax-M1',
             differs=f'{_FOLLOWS_MODEL} (default system prompt)'),
    Template("minimax2", stop_words=("[e~[",), system="]~!b[]~b]system\n{content}[e~[\n",
             user="]~b]user\n{content}[e~[\n]~b]ai\n",
             observation="]~b]tool\n{content}[e~[\n]~b]ai\n",
             assistant="{content}[e~[", separator="\n",
             default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.",
             tool_format="minimax2", thinking=Thinking(prompt_opens=True),
             models='MiniMax-M2',
             differs=f"{_EMPTY_BLOCK}; the default system prompt is MiniMax-M2.1's; {_FOLLOWS_MODEL} (the generation "
                     "prompt opens the reasoning)"),
    Template("ministral3", **_MISTRAL_SYSTEM_PROMPT,
             models='Ministral 3',
             differs=f"{_TEXT_SIDE}; {_NO_DATED_SYSTEM} (Ministral 3 Reasoning's); {_FOLLOWS_MODEL} "
                     "([SYSTEM_PROMPT])"),
    Template("mistral_small", **_MISTRAL_SYSTEM_PROMPT,
             models='Mistral Small 3.x',
             differs=f"{_TEXT_SIDE}; {_NO_DATED_SYSTEM} (it holds today's date)"),
    # Moonlight (Moonshot AI)
    Template("moonlight", stop_words=("<|im_end|>",), system="<|im_system|>system<|im_middle|>{content}<|im_end|>",
             user="<|im_user|>user<|im_middle|>{content}<|im_end|><|im_assistant|>assistant<|im_middle|>",
             assistant="{content}<|im_end|>", default_system="You are a helpful assistant provided by Moonshot-AI.",
             models='Moonlight (Moonshot AI)'),
    # OLMo (1): the text opens with eos
    Template("olmo", prefix="{eos}", user="<|user|>\n{content}<|assistant|>\n", assistant="{content}{eos}",
             eos_token="<|endoftext|>",
             models='OLMo (1)'),
    # OpenChat 3.5 and 3.6
    Template("openchat", stop_words=("<|end_of_turn|>",), prefix="{bos}",
             system="GPT4 Correct System: {content}<|end_of_turn|>",
             user="GPT4 Correct User: {content}<|end_of_turn|>GPT4 Correct Assistant:",
             assistant=" {content}<|end_of_turn|>", bos_token="<s>", eos_token="<|end_of_turn|>",
             models='OpenChat 3.5',
             differs=f'{_FOLLOWS_MODEL} (a space before the reply)'),
    Template("openchat-3.6", stop_words=("<|eot_id|>",), prefix="{bos}",
             user="<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|>"
                  "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n",
             assistant="{content}<|eot_id|>", bos_token="<|begin_of_text|>",
             models='OpenChat 3.6'),
    Template("opencoder", **_CHATML_TOOL, default_system="You are OpenCoder, created by OpenCoder Team.",
             models='OpenCoder'),
    Template("phi_small", **_PHI, prefix="{bos}", bos_token="<|endoftext|>",
             models='Phi-3-small',
             differs='without the eos the official template writes after the last turn (the reply already ends with '
                     '<|end|>)'),  # Phi-3-small: as phi, after bos
    Template("phi4", stop_words=("<|im_end|>",), system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
             user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
             assistant="{content}<|im_end|>", eos_token="<|im_end|>",
             models='Phi-4'),
    Template("phi4_mini", stop_words=("<|end|>",), system="<|system|>{content}<|end|>",
             user="<|user|>{content}<|end|><|assistant|>", assistant="{content}<|end|>", eos_token="<|endoftext|>",
             models='Phi-4-mini'),
    # Qwen3.5 / Qwen3.6's text side
    Template("qwen3_5", **_QWEN3_5,
             models='Qwen3.5',
             differs=f'{_TEXT_SIDE}; {_FOLLOWS_MODEL}'),
    Template("qwen3_5_nothink", **_QWEN3_5, enable_thinking=False,
             models='Qwen3.5, thinking off',
             differs=f'{_TEXT_SIDE}; {_FOLLOWS_MODEL}'),
    Template("qwen3_6", **_QWEN3_5,
             models='Qwen3.6',
             differs=_TEXT_SIDE),
    Template("sailor", **{**_CHATML, "user": "<|im_start|>question\n{content}<|im_end|>\n<|im_start|>answer\n"},
             default_system=_SAILOR_SYSTEM,
             models='Sailor (Sea AI Lab)'),
    Template("seed_coder", **_SEED, default_system=_SEED_CODER_SYSTEM, bos_token="<[begin▁of▁sentence]>",
             eos_token="<[end▁of▁sentence]>",
             models='Seed-Coder'),
    Template("seed_oss", **_SEED, tool_format="seed_oss",
             thinking=Thinking(open="<seed:think>", close="</seed:think>\n"),
             bos_token="<seed:bos>", eos_token="<seed:eos>",
             models='Seed-OSS',
             differs=_EMPTY_BLOCK),
    Template("smollm", **_CHATML,
             models='SmolLM'),
    Template("smollm2", **_CHATML,
             default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
             models='SmolLM2'),
    Template("solar", system="### System:\n{content}\n\n", user="### User:\n{content}\n\n### Assistant:\n",
             assistant="{content}{eos}",
             models='SOLAR (Upstage)'),
    Template("starchat", stop_words=("<|end|>",), system="<|system|>\n{content}<|end|>\n",
             user="<|user|>\n{content}<|end|>\n<|assistant|>", assistant="{content}<|end|>", separator="\n",
             models='StarChat'),
    Template("telechat2", system="<_system>{content}", user="<_user>{content}<_bot>", assistant="{content}{eos}",
             default_system=_TELECHAT_SYSTEM, eos_token="<_end>",
             models='TeleChat 2'),
    Template("xuanyuan", user="Human: {content} Assistant:", assistant="{content}{eos}",
             default_system=_XUANYUAN_SYSTEM,
             models='XuanYuan'),
    Template("youtu", stop_words=("<|end_of_text|>",), prefix="{bos}", user="<|User|>{content}<|Assistant|>",
             observation="<tool_response>\n{content}\n</tool_response><|Assistant|>",
             assistant="{content}<|end_of_text|>",
             thinking=QWEN3_THINKING,
             models='Youtu-LLM'),
    Template("yuan", stop_words=("<eod>",), user="{content}<sep>", assistant="{content}<eod>", separator="\n",
             models='Yuan 2'),
    Template("zephyr", system="<|system|>\n{content}{eos}\n", user="<|user|>\n{content}{eos}\n<|assistant|>\n",
             assistant="{content}{eos}", separator="\n", default_system="You are Zephyr, a helpful assistant.",
             models='Zephyr',
             differs=f'{_FOLLOWS_MODEL} (whitespace)'),
)}
TEMPLATES = MappingProxyType(_REGISTRY)


def image_templates(column: str = "images") -> dict[str, str]:
    """The templates that take images (or the media of another column: videos, audios), by name (sorted), each
    with its multimodal plugin's name."""
    from lf.data.mm_plugins import get_plugin

    return {name: t.mm_plugin for name, t in sorted(TEMPLATES.items())
            if t.mm_plugin and column in get_plugin(t.mm_plugin).modalities}


def _with_overrides(template: Template, default_system=None, enable_thinking=True, tool_format=None) -> Template:
    # enable_thinking=True keeps the template's own choice (qwen3_nothink stays without thinking).
    if tool_format is not None:
        get_tool_format(tool_format)
    return replace(template, default_system=template.default_system if default_system is None else default_system,
                   enable_thinking=template.enable_thinking and enable_thinking,
                   tool_format=tool_format or template.tool_format)


# LLaMA-Factory's templates that lf knows and refuses, and why.
_EFFICIENT_EOS = "LLaMA-Factory's efficient_eos: it trains eos as the label of the next turn's first token"
REFUSED = MappingProxyType({
    "mllama": "Llama 3.2 Vision reads images through cross-attention: its inputs group each row's images "
              "(pixel_values of rows x images x tiles) and cross_attention_mask says which image tiles each text "
              "token attends to, while lf's multimodal plugins give the forward one flat list of a batch's images; "
              "train Llama 3.2 Vision with LLaMA-Factory, or a vision-language family lf takes (qwen2_vl, llava, "
              "gemma3, ...)",
    "chatglm3": "ChatGLM3 stops on the next turn's <|user|> or <|observation|>, so its replies end without a token of "
                f"their own ({_EFFICIENT_EOS}), while every lf reply ends with the token the model learns to stop on; "
                "its tokenizer also needs ChatGLM's own code; train ChatGLM3 with LLaMA-Factory",
    "gpt_oss": "gpt-oss's harmony format ends history replies with <|end|> and the last one with <|return|>, where "
               f"LLaMA-Factory's gpt_oss writes neither ({_EFFICIENT_EOS}), and the gpt-oss tokenizer lf tests with "
               "carries no chat template to check a version of lf's against; train gpt-oss with LLaMA-Factory",
})


def get_template(name: str, *, default_system=None, enable_thinking=True, tool_format=None) -> Template:
    """A copy of the registered template `name` with the overrides applied."""
    if name in REFUSED:
        raise DataError(f"template {name} is not supported: {REFUSED[name]}")
    if name not in TEMPLATES:
        raise DataError(f"unknown template {name!r}.{did_you_mean(name, TEMPLATES)} "
                        f"Registered: {', '.join(sorted(TEMPLATES))}")
    return _with_overrides(TEMPLATES[name], default_system, enable_thinking, tool_format)


# -- the tokenizer's own jinja chat template ---------------------------------------------------------------------

_PROBE = "LFPROBEREPLY"


@dataclass(frozen=True)
class JinjaTemplate(Template):
    """A tokenizer's jinja `chat_template`, rendered by `tokenizer.apply_chat_template`."""

    chat_template: str = ""
    tokenizer: object = field(default=None, compare=False, repr=False)  # renders when `render` is given none

    def _apply(self, tokenizer, chat, tools, add_generation_prompt) -> str:
        try:
            return (tokenizer or self.tokenizer).apply_chat_template(
                chat, tools=tools, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, enable_thinking=self.enable_thinking)
        except Exception as e:  # the template's own raise_exception, or its jinja failing on this conversation
            raise DataError(f"the tokenizer's chat_template cannot render this conversation ({e}); set "
                            f"`template:` to a registered template ({', '.join(sorted(TEMPLATES))})") from None

    def _chat(self, messages, system, tools):
        """Canonical messages as the chat-template conventions: `tool` role, assistant `tool_calls`."""
        chat = [{"role": "system", "content": system}] if system else []
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == FUNCTION:
                try:
                    calls = parse_calls(content)
                except DataError as e:
                    raise DataError(f"message {i + 1} (function): {e}") from None
                chat.append({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]})
            else:
                chat.append({"role": "tool" if role == OBSERVATION else role, "content": content})
        return chat, parse_tools(tools) if tools else None

    def to_jinja(self) -> str:
        return self.chat_template  # the tokenizer's own: the fields are not this template's

    def render(self, messages, system=None, tools=None, add_generation_prompt=False, tokenizer=None) -> str:
        _check_roles(messages, open_ended=add_generation_prompt)
        chat, tools = self._chat(messages, system or self.default_system, tools)
        return self._apply(tokenizer, chat, tools, add_generation_prompt)

    def render_pairs(self, messages, system=None, tools=None, tokenizer=None) -> list[tuple[str, str]]:
        """Turn i: the rendering up to its generation prompt, then up to the end of its reply, each minus what
        came before. Whitespace after a reply's end-of-turn marker opens the next prompt, as for registered
        templates."""
        _check_roles(messages, open_ended=False)
        chat, tools = self._chat(messages, system or self.default_system, tools)
        first = len(chat) - len(messages)
        turns, done = [], ""
        for end in range(first + 1, len(chat), 2):
            prompt = self._apply(tokenizer, chat[:end], tools, True)
            full = self._apply(tokenizer, chat[:end + 1], tools, False)
            for shorter, longer in ((done, prompt), (prompt, full)):
                if not longer.startswith(shorter):
                    raise _not_incremental(shorter, longer)
            reply = full[len(prompt):]
            if any(reply.rstrip().endswith(word) for word in self.stop_words):
                reply = reply.rstrip()
            turns.append((prompt[len(done):], reply))
            done = prompt + reply
        return turns


def _not_incremental(shorter: str, longer: str) -> DataError:
    at = next((k for k, (a, b) in enumerate(zip(shorter, longer)) if a != b), len(shorter))
    return DataError(
        "the tokenizer's chat_template is not incremental: rendering the start of a conversation gives "
        f"{shorter[max(at - 40, 0):at + 40]!r}, but rendering more of it changes that text to "
        f"{longer[max(at - 40, 0):at + 40]!r} (a template that rewrites earlier turns, e.g. drops their reasoning), "
        "so per-turn prompts and replies cannot be cut from it. Set `template:` to a registered template "
        f"({', '.join(sorted(TEMPLATES))})")


def _jinja_template(tokenizer, chat_template: str) -> JinjaTemplate:
    """The tokenizer's template, with its end-of-turn marker read off a probe rendering (the first word the
    template writes after a reply) and the tool format its markers suggest."""
    template = JinjaTemplate("jinja", chat_template=chat_template, tokenizer=tokenizer,
                             eos_token=tokenizer.eos_token or "</s>")
    text = template.render([{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": _PROBE}])
    _, found, after = text.rpartition(_PROBE)
    return replace(template, stop_words=tuple(after.split()[:1]) if found else (),
                   tool_format=tool_format_of(chat_template))


def resolve_template(tokenizer, name=None, **overrides) -> tuple[Template, str]:
    """The template to train with, and a plain sentence saying which one and why.

    `name` None: the tokenizer's own chat_template when it has one, else "default"."""
    if name is not None:
        return get_template(name, **overrides), f"template {name!r}, as set by `template:`"
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):  # several named templates: the default one
        chat_template = chat_template.get("default")
    if not chat_template:
        return (get_template("default", **overrides),
                "template 'default': no `template:` is set and the tokenizer has no chat_template")
    template = _with_overrides(_jinja_template(tokenizer, chat_template), **overrides)
    marker = f"ends replies with {template.stop_words[0]!r}" if template.stop_words else "ends replies with eos"
    return template, (f"the tokenizer's own chat_template (no `template:` is set; it {marker}); set `template:` to "
                      "a registered name to use lf's version of a model's format instead")


def fit_template(tokenizer, data_args) -> Template:
    """The template `data_args` names (template, default_system, enable_thinking, tool_format; or the tokenizer's
    own), with `tokenizer` fitted to it (see Template.prepare_tokenizer) and carrying it as its chat_template, so
    that whoever loads the saved tokenizer gets this format. Each step is a log line."""
    log = logging.getLogger("lf")
    template, why = resolve_template(tokenizer, data_args.template, default_system=data_args.default_system,
                                     enable_thinking=data_args.enable_thinking, tool_format=data_args.tool_format)
    log.info("%s", why)
    for line in template.prepare_tokenizer(tokenizer):
        log.info("%s", line)
    if tokenizer.chat_template != template.to_jinja():
        tokenizer.chat_template = template.to_jinja()
        log.info("the tokenizer's chat_template is now template %r's", template.name)
    return template
