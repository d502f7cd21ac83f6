"""An Ollama `Modelfile` beside the GGUF file: FROM the file, TEMPLATE the lf template in Go's text/template syntax
(what Ollama renders), SYSTEM the template's default system prompt, PARAMETER stop for each stop word and eos.

The TEMPLATE writes the text `Template.render` writes for user and assistant messages after an optional system
prompt, ending with the generation prompt after a user message. What it leaves out: the whitespace trimming some
templates do (llama3, gemma: Go templates have no trim), tools and tool results, and the dropping of reasoning
from earlier replies. It is written on one line: Go's whitespace trimming around actions would also eat spaces
and newlines of the template's own text. A tokenizer's own jinja chat template (no `template:` set) has no Go
version: the Modelfile then has no TEMPLATE, and Ollama goes by the GGUF file's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Formatter

from lf.data.templates import AT_START, IN_FIRST_USER_MESSAGE, IN_LAST_USER_MESSAGE, JinjaTemplate
from lf.export.gguf_vocab import adds_bos


def write_modelfile(gguf_path, tokenizer, template) -> Path:
    """Writes `Modelfile` beside `gguf_path` and returns its path."""
    gguf_path = Path(gguf_path)
    path = gguf_path.parent / "Modelfile"
    path.write_text(modelfile(gguf_path.name, tokenizer, template), encoding="utf-8")
    return path


def modelfile(gguf_name: str, tokenizer, template) -> str:
    """The Modelfile's text for the GGUF file `gguf_name` in the same folder."""
    lines = ["# written by lf export; to use it: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if isinstance(template, JinjaTemplate):
        lines.append("# no TEMPLATE: the model's own chat template is in the GGUF file; set `template:` to a "
                     "registered lf template to have one written here")
    else:
        lines.append(f'TEMPLATE """{go_template(template, tokenizer)}"""')
    if template.default_system:
        lines.append(f'SYSTEM """{template.default_system}"""')
    stops = dict.fromkeys([*template.stop_words, *([tokenizer.eos_token] if tokenizer.eos_token else [])])
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}" for word in stops]
    return "\n".join(lines) + "\n"


def go_template(template, tokenizer) -> str:
    """The template as an Ollama TEMPLATE over .System and .Messages (see the module docstring)."""
    # bos is written where the template writes it, unless the runtime adds it (the GGUF's add_bos_token)
    bos = "" if adds_bos(tokenizer) else tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""

    def fill(fmt: str, content: str = "") -> str:
        return _go(fmt, content, bos, eos)

    first = template.system_at == IN_FIRST_USER_MESSAGE  # then a variable says whether a user message came yet
    system_in_user = {IN_FIRST_USER_MESSAGE: "$first",
                      IN_LAST_USER_MESSAGE: "(le (len (slice $.Messages $i)) 2)"}.get(template.system_at)
    user_head, user_tail = template.user.split("{content}")
    reply_head, reply_tail = template.assistant.split("{content}")
    user = fill(user_head)
    if system_in_user:
        user += f"{{{{ if and $.System {system_in_user} }}}}{fill(template.system, '$.System')}{{{{ end }}}}"
    user += "{{ .Content }}" + fill(user_tail) + ("{{ $first = false }}" if first else "")
    opening = template._reply_body("", last=True)[0]  # what the generation prompt adds (reasoning templates)
    if opening:
        user += f"{{{{ if $last }}}}{_literal(opening)}{{{{ end }}}}"
    reply = (fill(reply_head) + "{{ .Content }}{{ if not $last }}" + fill(reply_tail) + fill(template.separator)
             + "{{ end }}")
    system = (f"{{{{ if .System }}}}{fill(template.system, '.System')}{{{{ end }}}}"
              if template.system_at == AT_START and template.system else "")
    messages = ('{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
                f'{{{{ if eq .Role "user" }}}}{user}{{{{ else if eq .Role "assistant" }}}}{reply}{{{{ end }}}}'
                '{{ end }}')
    return fill(template.prefix) + system + ("{{ $first := true }}" if first else "") + messages


def _go(fmt: str, content: str, bos: str, eos: str) -> str:
    """A template format string ({content}, {bos}, {eos}) as Go template text; `content` is a Go expression."""
    out = []
    for literal, field, _spec, _conversion in Formatter().parse(fmt):
        out.append(_literal(literal))
        if field == "content":
            out.append(f"{{{{ {content} }}}}")
        elif field in ("bos", "eos"):
            out.append(_literal(bos if field == "bos" else eos))
    return "".join(out)


def _literal(text: str) -> str:
    """Text a Go template writes as it is ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')
