"""The words of `lf webui` (lf.serve.webui_text): every one in English and Simplified Chinese with the same fields,
none of the page's labels, buttons or messages written in webui.py outside the table, the language chosen by
--lang / LF_WEBUI_LANG, and the page built in either language and relabelled by its switch."""

import ast
import re
import string
from pathlib import Path

import pytest

from lf.errors import ConfigError
from lf.serve import webui
from lf.serve.webui_text import LANG_ENV, LANGS, TEXT, server_lang, words

WEBUI = Path(webui.__file__)
CJK = re.compile(r"[\u4e00-\u9fff]")
WORDED = ("label", "placeholder", "info")  # the keyword arguments of a component that the page shows as words
VALUE_IS_WORDS = ("Button", "Markdown", "Tab", "Accordion")  # components whose first argument is shown as words


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("key", sorted(TEXT))
def test_every_text_has_both_languages_with_the_same_fields(key):
    assert set(TEXT[key]) == set(LANGS), key
    en, zh = TEXT[key]["en"], TEXT[key]["zh"]
    assert en.strip() and CJK.search(zh), f"{key}: the Chinese is missing or not Chinese: {zh!r}"
    assert not CJK.search(en), key
    assert _fields(en) == _fields(zh), key
    assert en.startswith("**") == zh.startswith("**"), key  # a status starts bold in both


def _gr_call(node: ast.Call) -> str | None:
    """X of a call `gr.X(...)`."""
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "gr" else None


def _is_words(node) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                and node.value.strip() != "")


def test_no_words_in_webui_bypass_the_table():
    tree = ast.parse(WEBUI.read_text(encoding="utf-8"))
    bypass, keys = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _gr_call(node):
            args = [kw.value for kw in node.keywords if kw.arg in WORDED]
            if _gr_call(node) in VALUE_IS_WORDS:
                args += node.args[:1] + [kw.value for kw in node.keywords if kw.arg == "value"]
            if _gr_call(node) == "Error":
                args += node.args
            bypass += [f"line {a.lineno}: gr.{_gr_call(node)}" for a in args if _is_words(a)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "words":
            keys += [node.args[0].value] if isinstance(node.args[0], ast.Constant) else []
        elif isinstance(node, ast.Dict):  # page(make, {attr: key}, ...)
            keys += [v.value for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)
                     and k.value in (*WORDED, "value") and isinstance(v, ast.Constant) and isinstance(v.value, str)]
        # a status message written in place ("**done**: ..."), not taken from the table
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("**"):
            bypass.append(f"line {node.lineno}: {node.value[:40]!r}")
    assert not bypass, "words written in webui.py, not in lf/serve/webui_text.py's TEXT:\n" + "\n".join(bypass)
    assert len(keys) > 40 and not [key for key in keys if key not in TEXT]


def test_the_language_from_the_option_the_environment_or_english(monkeypatch):
    monkeypatch.delenv(LANG_ENV, raising=False)
    assert server_lang() == "en" and server_lang("zh") == "zh" and server_lang("zh-CN") == "zh"
    monkeypatch.setenv(LANG_ENV, "zh_CN")
    assert server_lang() == "zh" and server_lang("en") == "en"  # --lang wins
    with pytest.raises(ConfigError, match="--lang: 'fr' is not a language of the web UI: use one of en, zh"):
        server_lang("fr")
    monkeypatch.setenv(LANG_ENV, "klingon")
    with pytest.raises(ConfigError, match=f"{LANG_ENV}: 'klingon' is not"):
        server_lang()


def _labels(demo) -> dict:
    return {c["props"].get("elem_id") or c["id"]: c["props"].get("label") or c["props"].get("value")
            for c in demo.config["components"]}


def test_the_page_in_chinese_and_relabelled_in_english(tmp_path, monkeypatch):
    from lf.serve.webaccess import Root

    demo = webui.create_ui(webui.Trainer(Root(str(tmp_path))), lang="zh")
    labels = list(_labels(demo).values())
    for key in ("tab.train", "tab.eval", "tab.chat", "tab.export", "train.start", "eval.start", "field.max_steps",
                "field.n_shot", "chat.send", "run.none"):
        assert words(key, "zh") in labels, key
    assert not [label for label in labels if label in {words(k, "en") for k in ("train.start", "chat.send")}]
    header = _labels(demo)["header"]
    assert header.startswith("## lf 网页界面") and str(tmp_path) in header and "无需登录" in header
    # the switch: one update per component made through the page, each in the language chosen
    page_updates = [u for u in demo.fns.values() if getattr(u.fn, "__name__", "") == "relabel"]
    assert len(page_updates) == 1
    english = page_updates[0].fn("en")
    assert len(english) == len(page_updates[0].outputs)
    shown = {value for update in english for value in update.values() if isinstance(value, str)}
    assert {"Start", "Send", "max_steps", "Train", "Chat"} <= shown
    assert not [value for value in shown if CJK.search(value)]
    demo.close()


def test_statuses_follow_the_language(tmp_path):
    from lf.serve.webaccess import Root

    root = Root(str(tmp_path))
    assert webui.save_yaml(root, webui.TRAIN_DEFAULTS, " ", "zh") == words("save.no_path", "zh")
    assert webui.Trainer(root).start({**webui.TRAIN_DEFAULTS, "output_dir": " "}, "zh").startswith("**未开始**：")
    assert webui.Chat().unload("zh") == "**未加载模型**"
    assert webui.Chat().load(str(tmp_path / "none"), "", "qwen", "zh").startswith("**未加载**：")
