"""The Train tab's dataset preview: the first rows of the datasets as the template writes them for `lf train`
(stage sft), the part the loss is computed on marked. The text is the template's render without a tokenizer
({bos}/{eos} as the template's own text), read from the raw files as `lf train` reads them (lf.data's canonical rows),
without loading the model; the marks follow train_on_prompt and mask_history as lf.data's labels do. A row's media
placeholders ("<image>", "<video>", "<audio>") name the file that goes there: "<image: mllm_demo_data/1.jpg>"."""

from __future__ import annotations

import dataclasses
import html
import re

from lf.data.conversation import PLACEHOLDERS
from lf.data.loader import load_canonical
from lf.data.templates import get_template

ROWS = 3


def preview_parts(data_args, rows: int = ROWS) -> list[list[tuple[str, bool]]]:
    """Per row, its text in pieces: (text, trained on). Every reply is trained on (the last only with
    mask_history); with train_on_prompt the prompts too."""
    template = get_template(data_args.template or "default", default_system=data_args.default_system,
                            enable_thinking=data_args.enable_thinking, tool_format=data_args.tool_format)
    first = dataclasses.replace(data_args, max_samples=min(rows, data_args.max_samples or rows), streaming=False)
    canonical = load_canonical(data_args.dataset, first)
    shown = []
    for row in canonical.select(range(min(rows, len(canonical)))):
        pairs = template.render_pairs([*row["prompt"], *row["response"][:1]], row["system"] or None,
                                      row["tools"] or None)
        parts = []
        for turn, (prompt, reply) in enumerate(pairs):
            trained = not data_args.mask_history or turn == len(pairs) - 1
            parts += [(prompt, data_args.train_on_prompt and trained), (reply, trained)]
        shown.append(_named_media(parts, row))
    return shown


_PLACEHOLDER = re.compile("|".join(map(re.escape, PLACEHOLDERS.values())))


def _named_media(parts: list[tuple[str, bool]], row: dict) -> list[tuple[str, bool]]:
    """The parts with each media placeholder naming its item (the row's items of that column, in order)."""
    items = {mark: iter(row.get(column) or ()) for column, mark in PLACEHOLDERS.items()}

    def named(match: re.Match) -> str:
        item = next(items[match.group()], None)
        path = item.get("path") if isinstance(item, dict) else item
        return f"{match.group()[:-1]}: {path}>" if path else match.group()

    return [(_PLACEHOLDER.sub(named, text), trained) for text, trained in parts]


def preview_html(parts: list[list[tuple[str, bool]]]) -> str:
    """The rows as HTML: one <pre> each, the trained-on text in <mark>."""
    def piece(text: str, trained: bool) -> str:
        return f"<mark>{html.escape(text)}</mark>" if trained else html.escape(text)

    return "".join(f"<pre class='lf-preview'>{''.join(piece(*p) for p in row)}</pre>" for row in parts)
