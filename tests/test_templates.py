"""Chat templates and tool formats: exact official texts, token pieces, thinking, tools, the jinja path."""

import copy
import json
from dataclasses import replace

import jinja2
import pytest

from lf.data.templates import TEMPLATES, JinjaTemplate, get_template, resolve_template
from lf.data.tools import get_tool_format
from lf.errors import DataError
from lf.tiny import train_tokenizer

# Every marker the registered templates and tool formats write, so that each is one token in the test tokenizer.
MARKERS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<bos>", "<start_of_turn>", "<end_of_turn>",
           "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<｜begin▁of▁sentence｜>", "<｜User｜>",
           "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>", "</think>", "<tool_call>", "</tool_call>",
           "<tool_response>", "</tool_response>", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
MARKERS += ["<role>", "</role>", "<|role_end|>", "<|endoftext|>", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>",
            "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|EOT|>",
            "<|begin_of_sentence|>", "<|end_of_sentence|>", "[|system|]", "[|user|]", "[|assistant|]",
            "[|endofturn|]", "<|end_of_text|>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
            "<|tool>", "<tool|>", "[gMASK]", "<sop>", "<|observation|>", "<|start_of_role|>", "<|end_of_role|>",
            "<|startoftext|>", "<|extra_0|>", "<|extra_4|>", "<|eos|>", "<｜hy_begin▁of▁sentence｜>", "<｜hy_User｜>",
            "<｜hy_Assistant｜>", "<｜hy_eos｜>", "<｜hy_place▁holder▁no▁2｜>", "<｜hy_place▁holder▁no▁3｜>",
            "<｜hy_place▁holder▁no▁8｜>", "<unk>", "reserved_0", "reserved_1", "<|header_start|>", "<|header_end|>",
            "<|eot|>", "<|eom|>", "<beginning_of_sentence>", "<end_of_sentence>", "]~!b[", "]~b]", "[e~[",
            "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|end_of_turn|>", "<|im_sep|>",
            "<[begin▁of▁sentence]>", "<[end▁of▁sentence]>", "<seed:bos>", "<seed:eos>", "<seed:think>",
            "</seed:think>", "<_system>", "<_user>", "<_bot>", "<_end>", "<|User|>", "<|Assistant|>", "<sep>", "<eod>",
            "<response>", "</response>", "<|tool_response_start|>", "<|tool_response_end|>"]
CORPUS = ["Hi there! Hello, how are you? I am fine, thank you. Be brief and helpful.",
          "The weather in Paris is sunny: it is 20 degrees today. What is the weather in Rome?",
          "Human: Assistant: System: USER: ASSISTANT: ### Instruction: ### Response: Below is an instruction.",
          '{"name": "get_weather", "arguments": {"city": "Paris"}, "parameters": {"type": "object"}}'] * 20

CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400, extra_special_tokens=MARKERS)


@pytest.fixture(scope="session")
def plain_tok():
    """No template markers: they are split into pieces (copy it before changing it)."""
    return train_tokenizer(CORPUS, vocab_size=400)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def call(name, **arguments):
    return {"role": "function", "content": json.dumps({"name": name, "arguments": arguments})}


def observation(content):
    return {"role": "observation", "content": content}


SINGLE = [user("Hi there"), assistant("Hello!")]
MULTI = [user("Hi"), assistant("Hello!"), user("How are you?"), assistant("Fine.")]
TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
GLAIVE = [user("Weather in Paris?"), call("get_weather", city="Paris"), observation('{"temp": 20}'),
          assistant("It is 20 degrees.")]
REASONING = [user("Q1"), assistant("<think>\nr1\n</think>\n\nA1"),
             user("Q2"), assistant("<think>\nr2\n</think>\n\nA2")]

QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
INTERN_VL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.")
CHATML_MULTI = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
QWEN3_SINGLE = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n")
QWEN3_MULTI = CHATML_MULTI + "<think>\n\n</think>\n\nFine.<|im_end|>\n"

DEFAULT_SYSTEM = {name: template.default_system for name, template in TEMPLATES.items()}  # the long ones
# name -> (SINGLE with system "Be brief.", MULTI without system), as `render` writes them with the family's own
# bos/eos: each is the official chat template's text (see the module docstring of lf.data.templates for the few
# documented differences: mistral's system prompt, the reasoning of deepseekr1's last reply).
EXPECTED = {
    # LLaMA-Factory's own: eos after every part, the reply right after "Assistant:"
    "default": ("System: Be brief.</s>\nHuman: Hi there</s>\nAssistant:Hello!</s>\n",
                "Human: Hi</s>\nAssistant:Hello!</s>\nHuman: How are you?</s>\nAssistant:Fine.</s>\n"),
    "empty": ("Hi thereHello!", "HiHello!How are you?Fine."),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n",
               f"{ALPACA_SYSTEM}\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
               "### Instruction:\nHow are you?\n\n### Response:\nFine.</s>\n\n"),
    "vicuna": ("Be brief. USER: Hi there ASSISTANT: Hello!</s>",
               f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT: Fine.</s>"),
    # LLaVA-1.5's conversation format (its training code's "v1"): Vicuna v1.1's
    "llava": ("Be brief. USER: Hi there ASSISTANT: Hello!</s>",
              f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT: Fine.</s>"),
    "llava_next": ("Be brief. USER: Hi there ASSISTANT: Hello!</s>",  # LLaVA-NeXT on Vicuna: the same
                   f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT: Fine.</s>"),
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n", CHATML_MULTI + "Fine.<|im_end|>\n"),
    "qwen": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n", QWEN_SYSTEM + CHATML_MULTI + "Fine.<|im_end|>\n"),
    "qwen3": (QWEN3_SINGLE, QWEN3_MULTI),
    # Qwen2-VL's official template: chatml with its own default system prompt (images: tests/test_multimodal.py)
    "qwen2_vl": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\nHello!<|im_end|>\n",
                 "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + CHATML_MULTI + "Fine.<|im_end|>\n"),
    "qwen3_nothink": (QWEN3_SINGLE, QWEN3_MULTI),  # same text; the empty block is in the prompt (see below)
    "qwen3_vl": (QWEN3_SINGLE, QWEN3_MULTI),  # Qwen3's text (images: tests/test_multimodal.py)
    "qwen3_vl_nothink": (QWEN3_SINGLE, QWEN3_MULTI),
    "llama2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>",
               "<s>[INST] Hi [/INST] Hello! </s><s>[INST] How are you? [/INST] Fine. </s>"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
               "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nFine.<|eot_id|>"),
    "mistral": ("<s>[INST] Be brief.\n\nHi there[/INST] Hello!</s>",
                "<s>[INST] Hi[/INST] Hello!</s>[INST] How are you?[/INST] Fine.</s>"),
    "gemma": ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
              "<start_of_turn>model\nHello!<end_of_turn>\n",
              "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\nFine.<end_of_turn>\n"),
    # Gemma 3's images: user turns untrimmed (the image sequence's newlines stay), replies trimmed
    "gemma3": ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
               "<start_of_turn>model\nHello!<end_of_turn>\n",
               "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
               "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\nFine.<end_of_turn>\n"),
    # InternVL 3: chatml after the tokenizer's bos (Qwen's has none) with InternVL's own default system prompt
    "intern_vl": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n",
                  f"<|im_start|>system\n{INTERN_VL_SYSTEM}<|im_end|>\n" + CHATML_MULTI + "Fine.<|im_end|>\n"),
    "phi": ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n",
            "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nHow are you?<|end|>\n<|assistant|>\n"
            "Fine.<|end|>\n"),
    "deepseek3": ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
                  "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                  "<｜User｜>How are you?<｜Assistant｜>Fine.<｜end▁of▁sentence｜>"),
    "deepseekr1": ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜><think>\n\n</think>\n\n"
                   "Hello!<｜end▁of▁sentence｜>",
                   "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                   "<｜User｜>How are you?<｜Assistant｜><think>\n\n</think>\n\nFine.<｜end▁of▁sentence｜>"),
    # Real tokenizers without a chat_template (npm's @lenml gemma2, yi, llama2): the texts of the models' published
    # templates, Gemma's, ChatML and Llama 2's (with Chinese-Llama-2's default system prompt)
    "gemma2": ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
               "<start_of_turn>model\nHello!<end_of_turn>\n",
               "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
               "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\nFine.<end_of_turn>\n"),
    "yi": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
           "<|im_start|>assistant\nHello!<|im_end|>\n", CHATML_MULTI + "Fine.<|im_end|>\n"),
    "llama2_zh": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>",
                  "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                  "<s>[INST] How are you? [/INST] Fine. </s>"),
    # -- the rest of LLaMA-Factory 0.9.5's text templates. Sources (no model hub here): rendered with the published
    # jinja chat_template, as llama.cpp keeps them (llama-cpp-python 0.3.36's sdist: models/templates and
    # tests/test-chat-template.cpp), for bailing (Ling-lite), cohere (Command R+), deepseek (V2), deepseekcoder,
    # glm4 (GLM-4-9B-chat), glm4_moe (GLM-4.6), glm4_7 (GLM-4.7-Flash), gemma4 (Gemma 4 31B, thinking on),
    # granite3, granite4 (4.0), lfm2, minimax1, minimax2 (M2), mistral_small (3.2), ministral3, openchat (3.5),
    # phi4, phi_small, qwen3_5 (Qwen3.5-4B), seed_oss; llama.cpp's own renderings (src/llama-chat.cpp) for exaone
    # (3.0), bailing_v2 (Ling 2.0) and hunyuan (A13B); the model's tokenizer_config.json template as known for
    # phi4_mini, llama4, gemma3n, zephyr, moonlight, openchat-3.6, smollm, smollm2, dbrx and the chatml ones;
    # for the others the prompt format their model cards document, as LLaMA-Factory 0.9.5 records it.
    # Where these texts differ from the official ones (GLM and Ling replies end with eos; a last reply without
    # reasoning gets the empty block in thinking mode; date-dependent default system prompts left out) the
    # module docstring of lf.data.templates says so.
    "bailing": ('<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi there<role>ASSISTANT</role>'
        'Hello!<|endoftext|>',
        '<role>HUMAN</role>Hi<role>ASSISTANT</role>Hello!<|endoftext|><role>HUMAN</role>'
        'How are you?<role>ASSISTANT</role>Fine.<|endoftext|>'),
    "bailing_v2": ('<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi there<|role_end|><role>'
        'ASSISTANT</role>Hello!<|role_end|>',
        '<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>'
        'Hello!<|role_end|><role>HUMAN</role>How are you?<|role_end|><role>ASSISTANT</role>Fine.<|role_end|>'),
    "breeze": ('<s>Be brief. [INST] Hi there [/INST] Hello!</s>',
        '<s>[INST] Hi [/INST] Hello!</s>[INST] How are you? [/INST] Fine.</s>'),
    "chatml_de": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['chatml_de']
        + '<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        + '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "cohere": ('<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>'
        '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>'
        '<|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>',
        '<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>'
        '<|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>'
        'How are you?<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'
        'Fine.<|END_OF_TURN_TOKEN|>'),
    "cpm4": ('<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n'
        'How are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "dbrx": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['dbrx']
        + '<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        + '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "deepseek": ('<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi there\n\nAssistant: Hello!<｜end▁of▁sentence｜>',
        '<｜begin▁of▁sentence｜>User: Hi\n\nAssistant: Hello!<｜end▁of▁sentence｜>User: How are you?\n\n'
        'Assistant: Fine.<｜end▁of▁sentence｜>'),
    "deepseekcoder": ('<｜begin▁of▁sentence｜>Be brief.### Instruction:\nHi there\n### Response:\nHello!\n<|EOT|>\n',
        '<｜begin▁of▁sentence｜>'
        + DEFAULT_SYSTEM['deepseekcoder']
        + '### Instruction:\nHi\n### Response:\nHello!\n<|EOT|>\n### Instruction:\nHow are you?\n'
        + '### Response:\nFine.\n<|EOT|>\n'),
    "ernie": ('<|im_start|>system\nBe brief.<|im_end|>\n\n<|im_start|>user\nHi there<|im_end|>\n\n'
        '<|im_start|>assistant\nHello!<|im_end|>\n\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['ernie']
        + '<|im_end|>\n\n<|im_start|>user\nHi<|im_end|>\n\n<|im_start|>assistant\nHello!<|im_end|>\n\n'
        + '<|im_start|>user\nHow are you?<|im_end|>\n\n<|im_start|>assistant\nFine.<|im_end|>\n\n'),
    "ernie_nothink": ('<|begin_of_sentence|>Be brief.\nUser: Hi there\nAssistant: Hello!<|end_of_sentence|>',
        '<|begin_of_sentence|>User: Hi\nAssistant: Hello!<|end_of_sentence|>User: How are you?\n'
        'Assistant: Fine.<|end_of_sentence|>'),
    "exaone": ('[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n',
        '[|user|]Hi\n[|assistant|]Hello![|endofturn|]\n[|user|]How are you?\n'
        '[|assistant|]Fine.[|endofturn|]\n'),
    "falcon": ('Be brief.User: Hi there\nFalcon:Hello!<|endoftext|>\n',
        'User: Hi\nFalcon:Hello!<|endoftext|>\nUser: How are you?\nFalcon:Fine.<|endoftext|>\n'),
    "falcon_h1": ('<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>'
        '\n<|im_start|>assistant\nHello!<|im_end|>\n',
        '<|begin_of_text|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "fewshot": ('Be brief.Hi thereHello!</s>\n\n',
        'HiHello!</s>\n\nHow are you?Fine.</s>\n\n'),
    "gemma3n": ('<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n'
        'Hello!<end_of_turn>\n',
        '<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n'
        '<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\nFine.<end_of_turn>\n'),
    "gemma4": ('<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n'
        '<|channel>thought\n<channel|>Hello!<turn|>\n',
        '<bos><|turn>system\n<|think|>\nYou are a helpful assistant.<turn|>\n<|turn>user\nHi<turn|>\n'
        '<|turn>model\nHello!<turn|>\n<|turn>user\nHow are you?<turn|>\n<|turn>model\n<|channel>'
        'thought\n<channel|>Fine.<turn|>\n'),
    "gemma4n": ('<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n'
        '<|channel>thought\n<channel|>Hello!<turn|>\n',
        '<bos><|turn>system\n<|think|>\nYou are a helpful assistant.<turn|>\n<|turn>user\nHi<turn|>\n'
        '<|turn>model\nHello!<turn|>\n<|turn>user\nHow are you?<turn|>\n<|turn>model\n<|channel>'
        'thought\n<channel|>Fine.<turn|>\n'),
    "glm4": ('[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\nHello!<|endoftext|>',
        '[gMASK]<sop><|user|>\nHi<|assistant|>\nHello!<|endoftext|><|user|>\nHow are you?<|assistant|>'
        '\nFine.<|endoftext|>'),
    "glm4_moe": ('[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\n<think></think>\n'
        'Hello!<|endoftext|>',
        '[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello!<|endoftext|><|user|>\n'
        'How are you?<|assistant|>\n<think></think>\nFine.<|endoftext|>'),
    "glm4_7": ('[gMASK]<sop><|system|>Be brief.<|user|>Hi there<|assistant|><think></think>Hello!<|endoftext|>',
        '[gMASK]<sop><|user|>Hi<|assistant|></think>Hello!<|endoftext|><|user|>'
        'How are you?<|assistant|><think></think>Fine.<|endoftext|>'),
    "aeva": ('[gMASK]<sop><|system|>Be brief.<|user|>Hi there<|assistant|><think></think>Hello!<|endoftext|>',
        '[gMASK]<sop><|system|>'
        + DEFAULT_SYSTEM['aeva']
        + '<|user|>Hi<|assistant|></think>Hello!<|endoftext|><|user|>How are you?<|assistant|><think>'
        + '</think>Fine.<|endoftext|>'),
    "glmz1": ('[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\n<think>\n\n</think>\n\n'
        'Hello!<|endoftext|>',
        '[gMASK]<sop><|user|>\nHi<|assistant|>\nHello!<|endoftext|><|user|>\nHow are you?<|assistant|>'
        '\n<think>\n\n</think>\n\nFine.<|endoftext|>'),
    "granite3": ('<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n<|start_of_role|>'
        'user<|end_of_role|>Hi there<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>'
        'Hello!<|end_of_text|>\n',
        '<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n<|start_of_role|>'
        'assistant<|end_of_role|>Hello!<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>'
        'How are you?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>Fine.<|end_of_text|>\n'),
    "granite4": ('<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n<|start_of_role|>'
        'user<|end_of_role|>Hi there<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>'
        'Hello!<|end_of_text|>\n',
        '<|start_of_role|>system<|end_of_role|>'
        + DEFAULT_SYSTEM['granite4']
        + '<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n<|start_of_role|>'
        + 'assistant<|end_of_role|>Hello!<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>'
        + 'How are you?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>Fine.<|end_of_text|>\n'),
    "hunyuan": ('<|startoftext|>Be brief.<|extra_4|><|startoftext|>Hi there<|extra_0|>Hello!<|eos|>',
        '<|startoftext|>Hi<|extra_0|>Hello!<|eos|><|startoftext|>How are you?<|extra_0|>Fine.<|eos|>'),
    "hunyuan_small": ('<｜hy_begin▁of▁sentence｜>Be brief.<｜hy_place▁holder▁no▁3｜><｜hy_User｜>'
        'Hi there<｜hy_place▁holder▁no▁8｜>Hello!<｜hy_place▁holder▁no▁2｜>',
        '<｜hy_begin▁of▁sentence｜><｜hy_User｜>Hi<｜hy_place▁holder▁no▁8｜>Hello!<｜hy_place▁holder▁no▁2｜>'
        '<｜hy_User｜>How are you?<｜hy_place▁holder▁no▁8｜>Fine.<｜hy_place▁holder▁no▁2｜>'),
    "hy3": ('<｜hy_begin▁of▁sentence｜>Be brief.<｜hy_User｜>Hi there<｜hy_Assistant｜><think></think>'
        'Hello!<｜hy_eos｜>',
        '<｜hy_begin▁of▁sentence｜><｜hy_User｜>Hi<｜hy_Assistant｜>Hello!<｜hy_eos｜><｜hy_User｜>'
        'How are you?<｜hy_Assistant｜><think></think>Fine.<｜hy_eos｜>'),
    "index": ('<unk>Be brief.reserved_0Hi therereserved_1Hello!</s>',
        'reserved_0Hireserved_1Hello!</s>reserved_0How are you?reserved_1Fine.</s>'),
    "intern_s1": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n'
        'How are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "lfm2": ('<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n'
        '<|im_start|>assistant\nHello!<|im_end|>\n',
        '<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "llama4": ('<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|><|header_start|>'
        'user<|header_end|>\n\nHi there<|eot|><|header_start|>assistant<|header_end|>\n\nHello!<|eot|>',
        '<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>'
        'assistant<|header_end|>\n\nHello!<|eot|><|header_start|>user<|header_end|>\n\n'
        'How are you?<|eot|><|header_start|>assistant<|header_end|>\n\nFine.<|eot|>'),
    "mimo": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n',
        '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n'
        '<|im_start|>assistant\n<think>\n\n</think>\n\nFine.<|im_end|>\n'),
    "mimo_v2": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\n<think></think>Hello!<|im_end|>\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['mimo_v2']
        + '<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        + '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n<think></think>'
        + 'Fine.<|im_end|>\n'),
    "minimax1": ('<begin_of_document><beginning_of_sentence>system ai_setting=assistant\n'
        'Be brief.<end_of_sentence>\n<beginning_of_sentence>user name=user\nHi there<end_of_sentence>\n'
        '<beginning_of_sentence>ai name=assistant\nHello!<end_of_sentence>\n',
        '<begin_of_document><beginning_of_sentence>system ai_setting=assistant\n'
        + DEFAULT_SYSTEM['minimax1']
        + '<end_of_sentence>\n<beginning_of_sentence>user name=user\nHi<end_of_sentence>\n'
        + '<beginning_of_sentence>ai name=assistant\nHello!<end_of_sentence>\n<beginning_of_sentence>'
        + 'user name=user\nHow are you?<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n'
        + 'Fine.<end_of_sentence>\n'),
    "minimax2": (']~!b[]~b]system\nBe brief.[e~[\n]~b]user\nHi there[e~[\n]~b]ai\n<think>\n\n</think>\n\n'
        'Hello![e~[\n',
        ']~!b[]~b]system\n'
        + DEFAULT_SYSTEM['minimax2']
        + '[e~[\n]~b]user\nHi[e~[\n]~b]ai\nHello![e~[\n]~b]user\nHow are you?[e~[\n]~b]ai\n<think>\n\n'
        + '</think>\n\nFine.[e~[\n'),
    "ministral": ('<s>[INST]Be brief.\n\nHi there[/INST]Hello!</s>',
        '<s>[INST]Hi[/INST]Hello!</s>[INST]How are you?[/INST]Fine.</s>'),
    "ministral3": ('<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi there[/INST]Hello!</s>',
        '<s>[INST]Hi[/INST]Hello!</s>[INST]How are you?[/INST]Fine.</s>'),
    "mistral_small": ('<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi there[/INST]Hello!</s>',
        '<s>[INST]Hi[/INST]Hello!</s>[INST]How are you?[/INST]Fine.</s>'),
    "moonlight": ('<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>'
        'Hi there<|im_end|><|im_assistant|>assistant<|im_middle|>Hello!<|im_end|>',
        '<|im_system|>system<|im_middle|>'
        + DEFAULT_SYSTEM['moonlight']
        + '<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>'
        + 'Hello!<|im_end|><|im_user|>user<|im_middle|>How are you?<|im_end|><|im_assistant|>'
        + 'assistant<|im_middle|>Fine.<|im_end|>'),
    "olmo": ('<|endoftext|>Be brief.<|user|>\nHi there<|assistant|>\nHello!<|endoftext|>',
        '<|endoftext|><|user|>\nHi<|assistant|>\nHello!<|endoftext|><|user|>\nHow are you?<|assistant|>'
        '\nFine.<|endoftext|>'),
    "openchat": ('<s>GPT4 Correct System: Be brief.<|end_of_turn|>GPT4 Correct User: Hi there<|end_of_turn|>'
        'GPT4 Correct Assistant: Hello!<|end_of_turn|>',
        '<s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello!<|end_of_turn|>'
        'GPT4 Correct User: How are you?<|end_of_turn|>GPT4 Correct Assistant: Fine.<|end_of_turn|>'),
    "openchat-3.6": ('<|begin_of_text|>Be brief.<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n'
        'Hi there<|eot_id|><|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n'
        'Hello!<|eot_id|>',
        '<|begin_of_text|><|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nHi<|eot_id|>'
        '<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\nHello!<|eot_id|>'
        '<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nHow are you?<|eot_id|>'
        '<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\nFine.<|eot_id|>'),
    "opencoder": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['opencoder']
        + '<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        + '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "phi_small": ('<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n'
        'Hello!<|end|>\n',
        '<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nHow are you?<|end|>'
        '\n<|assistant|>\nFine.<|end|>\n'),
    "phi4": ('<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi there<|im_end|>'
        '<|im_start|>assistant<|im_sep|>Hello!<|im_end|>',
        '<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>'
        '<|im_start|>user<|im_sep|>How are you?<|im_end|><|im_start|>assistant<|im_sep|>Fine.<|im_end|>'),
    "phi4_mini": ('<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>Hello!<|end|>',
        '<|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>How are you?<|end|><|assistant|>'
        'Fine.<|end|>'),
    "qwen3_5": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n',
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n'
        'How are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nFine.<|im_end|>\n'),
    "qwen3_5_nothink": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n',
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n'
        'How are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nFine.<|im_end|>\n'),
    "qwen3_6": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n',
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n'
        'How are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nFine.<|im_end|>\n'),
    "sailor": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>question\nHi there<|im_end|>\n'
        '<|im_start|>answer\nHello!<|im_end|>\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['sailor']
        + '<|im_end|>\n<|im_start|>question\nHi<|im_end|>\n<|im_start|>answer\nHello!<|im_end|>\n'
        + '<|im_start|>question\nHow are you?<|im_end|>\n<|im_start|>answer\nFine.<|im_end|>\n'),
    "seed_coder": ('<[begin▁of▁sentence]>system\nBe brief.<[end▁of▁sentence]><[begin▁of▁sentence]>user\n'
        'Hi there<[end▁of▁sentence]><[begin▁of▁sentence]>assistant\nHello!<[end▁of▁sentence]>',
        '<[begin▁of▁sentence]>system\n'
        + DEFAULT_SYSTEM['seed_coder']
        + '<[end▁of▁sentence]><[begin▁of▁sentence]>user\nHi<[end▁of▁sentence]><[begin▁of▁sentence]>'
        + 'assistant\nHello!<[end▁of▁sentence]><[begin▁of▁sentence]>user\nHow are you?<[end▁of▁sentence]>'
        + '<[begin▁of▁sentence]>assistant\nFine.<[end▁of▁sentence]>'),
    "seed_oss": ('<seed:bos>system\nBe brief.<seed:eos><seed:bos>user\nHi there<seed:eos><seed:bos>assistant\n'
        '<seed:think></seed:think>\nHello!<seed:eos>',
        '<seed:bos>user\nHi<seed:eos><seed:bos>assistant\nHello!<seed:eos><seed:bos>user\n'
        'How are you?<seed:eos><seed:bos>assistant\n<seed:think></seed:think>\nFine.<seed:eos>'),
    "smollm": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n'
        'How are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "smollm2": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>'
        'assistant\nHello!<|im_end|>\n',
        '<|im_start|>system\n'
        + DEFAULT_SYSTEM['smollm2']
        + '<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n'
        + '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n'),
    "solar": ('### System:\nBe brief.\n\n### User:\nHi there\n\n### Assistant:\nHello!</s>',
        '### User:\nHi\n\n### Assistant:\nHello!</s>### User:\nHow are you?\n\n### Assistant:\n'
        'Fine.</s>'),
    "starchat": ('<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>Hello!<|end|>\n',
        '<|user|>\nHi<|end|>\n<|assistant|>Hello!<|end|>\n<|user|>\nHow are you?<|end|>\n<|assistant|>'
        'Fine.<|end|>\n'),
    "telechat2": ('<_system>Be brief.<_user>Hi there<_bot>Hello!<_end>',
        '<_system>'
        + DEFAULT_SYSTEM['telechat2']
        + '<_user>Hi<_bot>Hello!<_end><_user>How are you?<_bot>Fine.<_end>'),
    "xuanyuan": ('Be brief.Human: Hi there Assistant:Hello!</s>',
        DEFAULT_SYSTEM['xuanyuan']
        + 'Human: Hi Assistant:Hello!</s>Human: How are you? Assistant:Fine.</s>'),
    "youtu": ('Be brief.<|User|>Hi there<|Assistant|><think>\n\n</think>\n\nHello!<|end_of_text|>',
        '<|User|>Hi<|Assistant|>Hello!<|end_of_text|><|User|>How are you?<|Assistant|><think>\n\n'
        '</think>\n\nFine.<|end_of_text|>'),
    "yuan": ('Be brief.Hi there<sep>Hello!<eod>\n',
        'Hi<sep>Hello!<eod>\nHow are you?<sep>Fine.<eod>\n'),
    "zephyr": ('<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n',
        '<|system|>\nYou are Zephyr, a helpful assistant.</s>\n<|user|>\nHi</s>\n<|assistant|>\n'
        'Hello!</s>\n<|user|>\nHow are you?</s>\n<|assistant|>\nFine.</s>\n'),
}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_template_has_expected_texts():
    assert set(EXPECTED) <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_text(name):
    template = get_template(name)
    single, multi = EXPECTED[name]
    assert template.render(SINGLE, "Be brief.") == single
    assert template.render(MULTI) == multi


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt_is_the_prompt_of_the_next_reply(name):
    template = get_template(name)
    # The text up to the reply plus the reply is the whole conversation (minus what follows the last marker).
    prompt = template.render(MULTI[:3], add_generation_prompt=True)
    reply = template.render_pairs(MULTI)[-1][1]
    assert prompt + reply + template.separator == template.render(MULTI)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", [(SINGLE, "Be brief.", None), (MULTI, None, None), (GLAIVE, None, TOOLS)])
def test_token_pieces(tok, name, conversation):
    template = get_template(name)
    messages, system, tools = conversation
    texts = template.render_pairs(messages, system, tools, tokenizer=tok)
    turns = template.encode_multiturn(tok, messages, system, tools)
    # Each piece tokenized on its own, and all of them make up the rendered conversation.
    assert turns == [(ids(tok, prompt), ids(tok, reply)) for prompt, reply in texts]
    assert "".join(p + r for p, r in texts) + template.separator == template.render(messages, system, tools,
                                                                                    tokenizer=tok)
    if name != "empty":  # every reply ends with the token the model must learn to stop on
        ends = {tok.convert_tokens_to_ids(w) for w in template.stop_words} | {tok.eos_token_id}
        assert all(reply and reply[-1] in ends for _, reply in turns)
    prompt, reply = template.encode_oneturn(tok, messages, system, tools)
    assert reply == turns[-1][1] and prompt == [t for p, r in turns[:-1] for t in p + r] + turns[-1][0]


def test_encode_many_matches_encode_multiturn(tok):
    conversations = [(SINGLE, "Be brief.", None), (MULTI, None, None), (GLAIVE, None, TOOLS), (GLAIVE, "Sys", TOOLS),
                     (REASONING, None, None), (SINGLE, None, "")]
    for name in ("qwen3", "llama3", "mistral", "default"):
        template = get_template(name)
        assert template.encode_many(tok, conversations) == [template.encode_multiturn(tok, *c) for c in conversations]
    assert get_template("qwen").encode_many(tok, []) == []


def test_llama_mistral_gemma_place_the_system_prompt_in_a_user_turn():
    conversation = MULTI
    assert get_template("mistral").render(conversation, "Sys") == (
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Sys\n\nHow are you?[/INST] Fine.</s>")  # the last user message
    assert get_template("llama2").render(conversation, "Sys").startswith("<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi")
    assert get_template("gemma").render(conversation, "Sys").startswith("<bos><start_of_turn>user\nSys\n\nHi<end_")


# -- thinking ------------------------------------------------------------------------------------------------------


def test_qwen3_drops_history_reasoning_keeps_the_last():
    pairs = get_template("qwen3").render_pairs(REASONING, "Sys")
    assert pairs == [
        ("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "A1<|im_end|>"),
        ("\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "<think>\nr2\n</think>\n\nA2<|im_end|>")]


def test_deepseekr1_opens_the_reasoning_in_the_prompt_and_drops_it_from_history():
    template = get_template("deepseekr1")
    assert template.render_pairs(REASONING) == [
        ("<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜>", "\n\nA1<｜end▁of▁sentence｜>"),  # R1 keeps the newlines
        ("<｜User｜>Q2<｜Assistant｜><think>\n", "r2\n</think>\n\nA2<｜end▁of▁sentence｜>")]
    assert template.render(REASONING[:3], add_generation_prompt=True).endswith("<｜User｜>Q2<｜Assistant｜><think>\n")


# REASONING as each model's published chat template writes it (the sources of EXPECTED; reasoning passed as the
# template's reasoning_content), plus the eos lf ends GLM replies with; and each one's generation prompt for Q2.
OFFICIAL_REASONING = {
    "glm4_moe": ("[gMASK]<sop><|user|>\nQ1<|assistant|>\n<think></think>\nA1<|endoftext|><|user|>\nQ2<|assistant|>\n"
                 "<think>r2</think>\nA2<|endoftext|>", "<|user|>\nQ2<|assistant|>\n"),
    "glm4_7": ("[gMASK]<sop><|user|>Q1<|assistant|></think>A1<|endoftext|><|user|>Q2<|assistant|><think>r2</think>"
               "A2<|endoftext|>", "<|user|>Q2<|assistant|><think>"),
    "qwen3_5": ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n", "<|im_start|>assistant\n<think>\n"),
    "minimax2": ("]~!b[]~b]system\nYou are a helpful assistant.[e~[\n]~b]user\nQ1[e~[\n]~b]ai\nA1[e~[\n]~b]user\n"
                 "Q2[e~[\n]~b]ai\n<think>\nr2\n</think>\n\nA2[e~[\n", "]~b]ai\n<think>\n"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_REASONING))
def test_reasoning_as_the_official_templates_write_it(name):
    template = get_template(name)
    text, generation_prompt = OFFICIAL_REASONING[name]
    system = "You are a helpful assistant." if name == "minimax2" else None
    assert template.render(REASONING, system) == text
    assert template.render(REASONING[:3], system, add_generation_prompt=True).endswith(generation_prompt)
    # the reasoning is the reply's (learned), whatever the prompt opens
    assert "r2" in template.render_pairs(REASONING, system)[-1][1]


def test_seed_oss_reasoning_uses_its_own_tags():
    seed = [user("Q1"), assistant("<seed:think>r1</seed:think>A1"), user("Q2"),
            assistant("<seed:think>\nr2\n</seed:think>\nA2")]
    assert get_template("seed_oss").render(seed) == (  # Seed-OSS's published template, reasoning_content "r2"
        "<seed:bos>user\nQ1<seed:eos><seed:bos>assistant\nA1<seed:eos><seed:bos>user\nQ2<seed:eos>"
        "<seed:bos>assistant\n<seed:think>r2</seed:think>\nA2<seed:eos>")


def test_nothink_puts_the_empty_block_in_the_prompt():
    nothink = get_template("qwen3_nothink")
    assert get_template("qwen3", enable_thinking=False).render_pairs(MULTI) == nothink.render_pairs(MULTI)
    assert nothink.render_pairs(SINGLE)[0] == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", "Hello!<|im_end|>")
    # thinking on: the empty block is part of the reply
    assert get_template("qwen3").render_pairs(SINGLE)[0][1] == "<think>\n\n</think>\n\nHello!<|im_end|>"
    # a reply with reasoning keeps it in the reply in both modes
    assert nothink.render_pairs(REASONING)[1][1] == "<think>\nr2\n</think>\n\nA2<|im_end|>"
    assert nothink.render(SINGLE[:1], add_generation_prompt=True).endswith("assistant\n<think>\n\n</think>\n\n")
    assert get_template("qwen3").render(SINGLE[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert get_template("qwen3_nothink", enable_thinking=True).enable_thinking is False


# -- tools ---------------------------------------------------------------------------------------------------------


# The formats themselves: tests/test_tools.py.


TOOL_DEFINITION = ('{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
                   '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}')


def test_glaive_conversation_in_qwen():
    assert get_template("qwen").render(GLAIVE, tools=TOOLS) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        f"signatures within <tools></tools> XML tags:\n<tools>\n{TOOL_DEFINITION}\n</tools>\n\nFor each function "
        "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nIt is 20 degrees.<|im_end|>\n")


def test_glaive_conversation_in_llama3_and_mistral():
    definition = json.dumps(json.loads(TOOL_DEFINITION), indent=4)
    assert get_template("llama3").render(GLAIVE, tools=TOOLS) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please "
        "respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        f"Do not use variables.\n\n{definition}\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 20}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 20 degrees.<|eot_id|>")
    assert get_template("mistral").render(GLAIVE, tools=TOOLS) == (
        f"<s>[AVAILABLE_TOOLS] [{TOOL_DEFINITION}][/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>'
        '[TOOL_RESULTS] {"content": {"temp": 20}}[/TOOL_RESULTS] It is 20 degrees.</s>')


def test_tools_on_templates_without_a_protocol_use_the_default_format():
    text = get_template("gemma").render(GLAIVE, "Sys", tools=TOOLS)
    assert text.startswith("<bos><start_of_turn>user\nSysYou have access to the following tools:\n"
                           "> Tool Name: get_weather\n")
    assert 'model\nAction: get_weather\nAction Input: {"city": "Paris"}<end_of_turn>' in text
    assert 'user\n{"temp": 20}<end_of_turn>' in text
    qwen_calls = get_template("chatml", tool_format="qwen").render(GLAIVE, tools=TOOLS)
    assert "<tools>" in qwen_calls and "<tool_response>" in qwen_calls


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_call_and_result_markup_is_written_once(name):
    """The tool format writes a call's and a result's markup; a template's function/observation slots only frame
    them, so each appears exactly once in the rendering."""
    template = get_template(name)
    fmt = get_tool_format(template.tool_format)
    text = template.render(GLAIVE, tools=TOOLS)
    turns = text[text.index("Weather in Paris?"):]  # past the tool prompt, which may quote the markup
    for piece, inner in ((fmt.format_calls(GLAIVE[1]["content"]), "get_weather"),
                         (fmt.format_observation(GLAIVE[2]["content"]), '{"temp": 20}')):
        assert turns.count(piece) == 1, (piece, text)
        opening = piece[:piece.index(inner)].strip()
        assert not opening or turns.count(opening) == 1, (opening, text)


@pytest.mark.parametrize("content, problem", [("get_weather(Paris)", "not JSON"),
                                              ('{"arguments": {}}', "no tool name"),
                                              ('{"name": "f", "arguments": [1]}', "must be a JSON object")])
def test_malformed_function_content(content, problem):
    messages = [user("Weather?"), {"role": "function", "content": content}, observation("r"), assistant("ok")]
    for template in (get_template("qwen"), JinjaTemplate("jinja", chat_template=CHATML_JINJA)):
        with pytest.raises(DataError, match=r"message 2 \(function\)") as error:
            template.render(messages)
        assert problem in str(error.value)


def test_roles_must_alternate():
    with pytest.raises(DataError, match="message 2 has role 'user' where assistant or function is expected"):
        get_template("chatml").render([user("a"), user("b")])
    with pytest.raises(DataError, match="must end with a reply"):
        get_template("chatml").render_pairs(MULTI[:3])
    with pytest.raises(DataError, match="must end with a prompt"):
        get_template("chatml").render(MULTI, add_generation_prompt=True)


# -- the tokenizer's own jinja template ---------------------------------------------------------------------------


def test_jinja_chatml_matches_the_registered_chatml(tok):
    jinja_tok = copy.deepcopy(tok)
    jinja_tok.chat_template = CHATML_JINJA
    template, reason = resolve_template(jinja_tok)
    assert isinstance(template, JinjaTemplate) and "chat_template" in reason and "'<|im_end|>'" in reason
    assert template.stop_words == ("<|im_end|>",)
    chatml = get_template("chatml")
    for messages, system in ((SINGLE, "Be brief."), (MULTI, None), (MULTI + MULTI, "Sys")):
        assert template.encode_multiturn(jinja_tok, messages, system) == chatml.encode_multiturn(tok, messages, system)
        assert template.render(messages, system) == chatml.render(messages, system)
    conversations = [(SINGLE, "Be brief.", None), (MULTI, None, None)]
    assert template.encode_many(jinja_tok, conversations) == chatml.encode_many(tok, conversations)
    prompt = MULTI[:3]
    assert template.render(prompt, add_generation_prompt=True) == chatml.render(prompt, add_generation_prompt=True)


def test_jinja_sees_tool_calls_and_tool_results(tok):
    roles = ("{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}"
             "{{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}{% endif %}|{% endfor %}"
             "{% if tools %}tools:{{ tools[0].function.name }}{% endif %}")
    template = JinjaTemplate("jinja", chat_template=roles, tokenizer=tok)
    assert template.render(GLAIVE, "Sys", TOOLS) == ('system:Sys|user:Weather in Paris?|assistant:get_weather'
                                                     '{"city": "Paris"}|tool:{"temp": 20}|assistant:It is 20 degrees.|'
                                                     'tools:get_weather')


def test_non_incremental_jinja_template_errors_clearly(tok):
    jinja_tok = copy.deepcopy(tok)
    # Like Qwen3's and R1's own templates: replies before the last one lose their reasoning.
    history = ("(m['content'].split('</think>')[-1].lstrip() if m['role'] == 'assistant' and not loop.last "
               "else m['content'])")
    jinja_tok.chat_template = CHATML_JINJA.replace("m['content']", history)
    template, _ = resolve_template(jinja_tok)
    assert template.encode_multiturn(jinja_tok, MULTI) == get_template("chatml").encode_multiturn(tok, MULTI)
    with pytest.raises(DataError, match="not incremental") as error:
        template.encode_multiturn(jinja_tok, REASONING)
    assert "Set `template:` to a registered template" in str(error.value) and "qwen3" in str(error.value)


def test_resolve_template(tok):
    template, reason = resolve_template(tok)  # no chat_template
    assert template.name == "default" and "no chat_template" in reason
    template, reason = resolve_template(tok, "qwen3", enable_thinking=False, default_system="S")
    assert (template.name, template.enable_thinking, template.default_system) == ("qwen3", False, "S")
    assert "'qwen3'" in reason


# -- registry ------------------------------------------------------------------------------------------------------


def test_unknown_template_lists_close_names():
    with pytest.raises(DataError,
                       match=r"unknown template 'qwen2'\. Did you mean: .*qwen.*\? Registered: aeva, alpaca, "):
        get_template("qwen2")
    with pytest.raises(DataError, match="unknown tool format 'hermes'.*Registered: default, gemma4, glm4, "):
        get_template("chatml", tool_format="hermes")


def test_get_template_returns_copies():
    registered = TEMPLATES["qwen"]
    template = get_template("qwen", default_system="Be kind.", tool_format="default")
    assert template is not registered and template.default_system == "Be kind." and template.tool_format == "default"
    assert registered.default_system.startswith("You are Qwen") and registered.tool_format == "qwen"
    assert get_template("qwen") is not get_template("qwen")
    with pytest.raises(TypeError):
        TEMPLATES["qwen"] = template


def test_prepare_tokenizer(plain_tok):
    tokenizer = copy.deepcopy(plain_tok)
    assert len(ids(tokenizer, "<|im_end|>")) > 1
    changes = get_template("chatml").prepare_tokenizer(tokenizer)
    assert len(changes) == 1 and "'<|im_end|>'" in changes[0] and "embeddings" in changes[0]
    assert len(ids(tokenizer, "<|im_end|>")) == 1
    assert get_template("chatml").prepare_tokenizer(tokenizer) == []
    assert get_template("default").prepare_tokenizer(tokenizer) == []

    tokenizer.pad_token = None
    changes = get_template("llama2").prepare_tokenizer(tokenizer)
    assert changes == ["set the pad token to the eos token '</s>' (the tokenizer had none)"]
    assert tokenizer.pad_token == "</s>"

    tokenizer = copy.deepcopy(plain_tok)
    tokenizer.eos_token = None
    changes = get_template("llama3").prepare_tokenizer(tokenizer)
    assert changes[0] == "set the eos token to '<|eot_id|>' (the tokenizer had none)" and len(changes) == 1
    assert len(ids(tokenizer, "<|eot_id|>")) == 1 and tokenizer.eos_token_id == ids(tokenizer, "<|eot_id|>")[0]


# -- as a jinja chat template -------------------------------------------------------------------------------------


def apply_jinja(tok, template, messages, system=None, **kwargs):
    """`messages` rendered by transformers with the template's jinja, the system prompt as a leading message."""
    chat = ([{"role": "system", "content": system}] if system is not None else []) + messages
    return tok.apply_chat_template(chat, chat_template=template.to_jinja(), tokenize=False, **kwargs)


UNTRIMMED = [user("  Hi \n"), assistant(" Hello! \n"), user("\nHow are you? "), assistant("  Fine.\n")]
EDGE_REASONING = [user("Q1"), assistant("<think>\nr1\n</think>\n\nA1"), user("Q2"), assistant("no open</think>\nA2"),
                  user("Q3"), assistant("<think>\n\n</think>\n\nA3")]
JINJA_CASES = [(SINGLE, "Be brief.", False), (SINGLE, None, False), (SINGLE, "", False), (MULTI, None, False),
               (MULTI, "Sys", False), (UNTRIMMED, " Sys \n", False), (REASONING, "Sys", False),
               (EDGE_REASONING, None, False), (EDGE_REASONING[:4], None, False), (MULTI + REASONING, None, False),
               (SINGLE[:1], None, True), (MULTI[:3], None, True), (MULTI[:3], "Sys", True),
               (REASONING[:3], None, True), (EDGE_REASONING[:5], "Sys", True)]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_jinja_renders_as_the_template(tok, name, enable_thinking):
    registered = get_template(name)  # its jinja reads enable_thinking when rendered
    for template in (get_template(name, enable_thinking=enable_thinking),
                     get_template(name, enable_thinking=enable_thinking, default_system="Be kind.")):
        jinja = replace(registered, default_system=template.default_system)
        for messages, system, generation_prompt in JINJA_CASES:
            # bos/eos are the tokenizer's ("<s>", "</s>"), not the model family's
            expected = template.render(messages, system, add_generation_prompt=generation_prompt, tokenizer=tok)
            assert apply_jinja(tok, jinja, messages, system, add_generation_prompt=generation_prompt,
                               enable_thinking=enable_thinking) == expected, (messages, system, generation_prompt)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_without_generation_prompt(tok, name):
    template = get_template(name)
    # Ending with a user message: the user format already wrote the assistant header; the generation prompt adds
    # only what follows it.
    prompt = apply_jinja(tok, template, MULTI[:3])
    generation = apply_jinja(tok, template, MULTI[:3], add_generation_prompt=True)
    assert prompt.endswith(template.user.format(content="How are you?", bos="<s>", eos="</s>"))
    opening = {"deepseekr1": "<think>\n", "qwen3_5": "<think>\n", "qwen3_6": "<think>\n", "minimax2": "<think>\n",
               "glm4_7": "<think>", "aeva": "<think>", **dict.fromkeys(
                   ("qwen3_nothink", "qwen3_vl_nothink", "qwen3_5_nothink"), "<think>\n\n</think>\n\n")}.get(name, "")
    assert generation == prompt + opening
    # Ending with a reply: nothing to add.
    assert apply_jinja(tok, template, MULTI, add_generation_prompt=True) == apply_jinja(tok, template, MULTI)


def test_jinja_bos_eos_are_the_tokenizers(tok):
    other = copy.deepcopy(tok)
    other.bos_token, other.eos_token = "<bos>", "<|end|>"
    for name in ("llama2", "deepseekr1", "mistral"):
        template = get_template(name)
        assert apply_jinja(other, template, MULTI) == template.render(MULTI, tokenizer=other)
    assert apply_jinja(other, get_template("llama2"), SINGLE).startswith("<bos>[INST] ")


@pytest.mark.parametrize("messages, tools", [
    (SINGLE, [json.loads(TOOL_DEFINITION)]), (GLAIVE, None), ([user("a"), user("b")], None),
    ([user("Hi"), {"role": "system", "content": "Late"}], None), ([assistant("Hello!")], None),
    ([user("Weather?"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}], None)])
def test_jinja_rejects_tools_and_other_roles(tok, messages, tools):
    for name in ("qwen", "mistral"):
        with pytest.raises(jinja2.TemplateError, match=f"jinja chat template of '{name}' writes only alternating"):
            apply_jinja(tok, get_template(name), messages, tools=tools)


@pytest.mark.parametrize("name", ["qwen", "llama3", "gemma"])
def test_lf_reads_back_its_jinja(tok, name):
    template = get_template(name)
    saved = copy.deepcopy(tok)
    saved.chat_template = template.to_jinja()
    jinja, _ = resolve_template(saved)
    assert isinstance(jinja, JinjaTemplate) and jinja.stop_words == template.stop_words
    assert jinja.to_jinja() == saved.chat_template
    for messages, system in ((SINGLE, "Be brief."), (MULTI, None)):
        assert jinja.encode_multiturn(saved, messages, system) == template.encode_multiturn(tok, messages, system)


def test_mllama_is_refused_with_the_reason():
    """MllamaProcessor runs here, but Llama 3.2 Vision's cross-attention inputs are grouped per row, which lf's
    multimodal plugins (one flat list of a batch's images) do not build."""
    with pytest.raises(DataError, match=r"^template mllama is not supported: Llama 3.2 Vision reads images through "
                                        r"cross-attention: .* cross_attention_mask .*; train Llama 3.2 Vision with "
                                        r"LLaMA-Factory"):
        get_template("mllama")
