"""`lf webui`: the YAML the Train tab builds (read back by `lf train`'s parser), the log and loss-curve readers, the
checks of Start, Save YAML and Export (the config as `lf train` checks it, every written path under the root, no
export over a non-empty folder unless told), the login and address options, and the page itself in headless
Chromium: two tabs, one in English and one in Chinese, drive every tab of the page (a tiny quickstart run trained,
its loss plot, a chat with the adapter it made, exported, its predictions scored, the demo multiple-choice task
evaluated, a run stopped), each run started in one language and followed in the other; the chat model owned by the
tab that loaded it; the language kept over a reload. The same checks as a stranger calling the HTTP endpoints meets
them: test_webui_http.py."""

import argparse
import functools
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pytest
import yaml
from test_train import lf_home  # noqa: F401  (the tiny model, built once in a temporary LF_HOME)

from lf.config import parse_train_args
from lf.errors import ConfigError
from lf.serve import webui
from lf.serve.webaccess import Access, Root, add_server_args
from lf.serve.webui_text import TEXT, words

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def fields(**changes) -> dict:
    return {**webui.TRAIN_DEFAULTS, **changes}


def header(demo) -> str:
    """The text a page starts with."""
    return next(c["props"]["value"] for c in demo.config["components"] if c["props"].get("elem_id") == "header")


def test_train_yaml_round_trips_through_lf_trains_parser(tmp_path):
    text = webui.to_yaml(webui.train_config(fields(
        dataset_dir=str(REPO / "data"), dataset=["lf_demo_en"], max_steps=3, learning_rate="5e-5",
        output_dir=str(tmp_path / "out"), extra="warmup_ratio: 0.1\nseed: 7\nlora_rank: 8")))
    path = tmp_path / "train.yaml"
    path.write_text(text)
    cfg = parse_train_args([str(path)])
    assert cfg.model.model_name_or_path == "lf-tiny-llama" and cfg.data.template == "qwen"
    assert cfg.data.dataset == "lf_demo_en" and cfg.data.cutoff_len == 512 and cfg.data.max_samples is None
    assert cfg.finetuning.stage == "sft" and cfg.finetuning.finetuning_type == "lora"
    assert cfg.finetuning.lora_rank == 8 and cfg.finetuning.lora_target == "all"  # the other keys win
    assert cfg.training.learning_rate == 5e-5 and cfg.training.max_steps == 3 and cfg.training.seed == 7
    assert cfg.training.per_device_train_batch_size == 4 and cfg.training.output_dir == str(tmp_path / "out")
    assert cfg.training.do_train and cfg.finetuning.plot_loss and cfg.finetuning.overwrite_output_dir
    assert yaml.safe_load(text)["num_train_epochs"] == 8.0


def test_train_yaml_leaves_out_what_the_method_or_a_zero_does_not_set():
    config = webui.train_config(fields(finetuning_type="full", max_steps=0, max_samples=16, template=None))
    assert "lora_rank" not in config and "lora_target" not in config and "max_steps" not in config
    assert "template" not in config and config["max_samples"] == 16 and config["dataset"] == "identity,lf_demo_en"
    assert parse_train_args(config).finetuning.finetuning_type == "full"


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": "fast"}, "learning_rate: 'fast' is not a number"),
    ({"extra": "- warmup_ratio"}, "must be `key: value` lines"),
    ({"extra": "warmup_ratio: [0.1"}, "not valid YAML"),
])
def test_train_yaml_mistakes_say_what_to_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        webui.train_config(fields(**change))


@pytest.fixture
def root(tmp_path) -> Root:
    """The web UI's root: a folder of its own in tmp_path, with a folder beside it (outside) and a symlink in it
    to that one."""
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    return Root(str(tmp_path / "root"))


# paths the root refuses: beside it, out of it with .., through a symlink in it
ESCAPES = ("{tmp}/outside/x", "{tmp}/root/../outside/x", "{tmp}/root/link/x")


def test_start_refuses_a_config_lf_train_would_refuse(root):
    trainer = webui.Trainer(root)
    problem = trainer.start(fields(output_dir=str(root.path / "out"), extra="learing_rate: 0.1"))
    assert problem.startswith("**not started**") and "Did you mean: learning_rate" in problem
    assert trainer.run is None and not (root.path / "out").exists()
    assert "output_dir is empty" in trainer.start(fields(output_dir=" "))


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("key", webui.WRITTEN_BY_TRAINING)
def test_start_refuses_a_run_writing_outside_the_root(root, tmp_path, key, escape):
    path = escape.format(tmp=tmp_path)
    extra = {key: path, "output_dir": str(root.path / "out")} if key != "output_dir" else {}
    problem = webui.Trainer(root).start(fields(output_dir=path, extra=yaml.safe_dump(extra)))
    assert problem == (f"**not started**: {key}: {path} is outside {root.path}, the only folder this web UI writes "
                       f"to: choose a path under it, or restart lf webui with --root DIR (or LF_WEBUI_ROOT=DIR), or "
                       f"--allow-any-path")
    assert not list(root.path.glob("lf-webui-*")) and not list((tmp_path / "outside").iterdir())


def test_save_yaml(root, tmp_path, monkeypatch):
    save = functools.partial(webui.save_yaml, root)
    out = fields(max_steps=5, output_dir="saves/run")
    monkeypatch.chdir(root.path)  # relative paths are the working directory's, as `lf train` reads them
    assert save(out, "sub/run.yaml").startswith("**saved**")
    assert yaml.safe_load((root.path / "sub" / "run.yaml").read_text())["max_steps"] == 5
    assert save(fields(), "  ").startswith("**not saved**")
    for escape in ESCAPES:
        path = escape.format(tmp=tmp_path) + ".yaml"
        assert save(out, path).startswith(f"**not saved**: the YAML's path: {path} is outside {root.path}")
    assert save(out, str(root.path / "setup.py")) == ("**not saved**: " + str(root.path / "setup.py") + " is not a "
                                                      ".yaml file: Save YAML writes YAML files only (e.g. "
                                                      "saves/my_run.yaml)")
    assert not list((tmp_path / "outside").iterdir()) and not (root.path / "setup.py").exists()
    assert "is outside" in save(fields(output_dir=str(tmp_path / "outside")), str(root.path / "o.yaml"))
    assert not (root.path / "o.yaml").exists()
    assert Root(str(root.path), any_path=True).check("output_dir", str(tmp_path / "outside")) == tmp_path / "outside"


@pytest.mark.parametrize("extra, message", [
    ("$(touch pwned): 1", "unknown key '$(touch pwned)' in the config."),
    ('"a\\nb": 1', "unknown key 'a\nb' in the config."),
    ("learing_rate: 0.1", "unknown key 'learing_rate' in the config. Did you mean: learning_rate?"),
    ("seed: [1", "not valid YAML"),
])
def test_save_yaml_checks_the_other_keys_before_writing(root, extra, message):
    target = root.path / "run.yaml"
    status = webui.save_yaml(root, fields(output_dir="saves/run", extra=extra), str(target))
    assert status.startswith("**not saved**") and message in status and not target.exists()
    assert not (root.path / "pwned").exists()


def test_preview_warns_of_trust_remote_code():
    assert "WARNING" not in webui._preview(fields())
    preview = webui._preview(fields(extra="trust_remote_code: true"))
    assert preview.startswith("# WARNING: trust_remote_code: true runs the Python code that lf-tiny-llama ships")
    assert yaml.safe_load(preview)["trust_remote_code"] is True  # a comment: the YAML below is unchanged


# What a run does with the server's credentials or rights, and the start of its refusal on an untrusted page
TRUSTED_ONLY = [
    ("report_to: swanlab", "report_to: swanlab would send the run to a service with this server's credentials"),
    ("report_to: [tensorboard, swanlab]", "report_to: swanlab would send"),
    ("report_to: all", "report_to: swanlab"),  # every tracker installed: the test extra's tensorboard and swanlab
    ("use_swanlab: true", "use_swanlab: SwanLab's cloud would get the run"),
    ("use_swanlab: true\nswanlab_mode: offline\nswanlab_api_key: k", "swanlab_api_key: would log this server in"),
    ("use_swanlab: true\nswanlab_mode: offline\nswanlab_lark_webhook_url: http://127.0.0.1:9/hook",
     "swanlab_lark_webhook_url: would make this server call a URL"),
    ("stage: ppo\nreward_model: http://127.0.0.1:9/v1\nreward_model_type: api",
     "reward_model_type: api would make this server call the reward_model URL"),
    ("trust_remote_code: true", "trust_remote_code: true would run the Python code the model ships"),
    ("ray_init_kwargs: {address: auto}", "ray_init_kwargs: would make this server join the Ray cluster it names"),
]


@pytest.mark.parametrize("extra, refusal", TRUSTED_ONLY)
def test_a_page_open_to_strangers_refuses_what_uses_the_servers_credentials(root, extra, refusal, monkeypatch):
    monkeypatch.setenv("USE_RAY", "1")  # ray_* keys ask for it (and every other case ignores it)
    form = fields(output_dir=str(root.path / "out"), extra=extra)
    problem = webui.Trainer(root).start(form)
    assert problem.startswith(f"**not started**: {refusal}") and problem.endswith(
        "this web UI allows that only behind a login or on this machine alone: remove it, or restart lf webui with "
        "--auth USER:PASSWORD (or on 127.0.0.1), or run lf train yourself"), problem
    assert webui.save_yaml(root, form, str(root.path / "r.yaml")).startswith(f"**not saved**: {refusal}")
    assert [path.name for path in root.path.iterdir()] == ["link"]  # no run folder, no YAML
    trusted = Root(str(root.path), trusted=True)  # behind a login, or on 127.0.0.1 (Access.trusted)
    assert yaml.safe_load(extra).items() <= webui.checked_config(form, trusted).items()


@pytest.mark.parametrize("extra", ["report_to: tensorboard", "report_to: none",
                                   "use_swanlab: true\nswanlab_mode: offline"])
def test_local_trackers_need_no_trust(root, extra):
    form = fields(output_dir=str(root.path / "out"), extra=extra)
    assert yaml.safe_load(extra).items() <= webui.checked_config(form, root).items()


def test_export_stays_in_the_root_and_off_non_empty_folders(root, tmp_path):
    export = functools.partial(webui.run_export, root, str(tmp_path / "no-model"), "", "qwen", export_size=1,
                               export_dtype="auto", export_gguf="none")
    for escape in ESCAPES:
        path = escape.format(tmp=tmp_path)
        assert export(path, overwrite=True).startswith(f"**not exported**: export_dir: {path} is outside {root.path}")
    full = root.path / "merged"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert export(str(full), overwrite=False) == (f"**not exported**: export_dir: {full} is not empty: tick "
                                                  f"\"{webui.OVERWRITE_EXPORT}\" to write over its files, or name "
                                                  f"a new or empty folder")
    assert "is not empty" not in export(str(full), overwrite=True)  # ticked: on to the export (no model here)
    assert (full / "keep.txt").read_text() == "mine" and not list((tmp_path / "outside").iterdir())


def test_root_from_the_environment(root, tmp_path, monkeypatch):
    monkeypatch.setenv("LF_WEBUI_ROOT", str(tmp_path))
    assert Root().path == tmp_path and Root(str(root.path)).path == root.path  # --root wins
    monkeypatch.delenv("LF_WEBUI_ROOT")
    monkeypatch.chdir(root.path / "link")
    assert Root().path == tmp_path / "outside"  # the working directory, resolved
    with pytest.raises(ConfigError, match="the web UI's root .*/none is not a folder: create it"):
        Root(str(tmp_path / "none"))


def _access(*argv: str) -> Access:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return Access.from_args(parser.parse_args(argv))


def test_access_options(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert _access() == Access("127.0.0.1", None) and not _access().login
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    users = tmp_path / "users"
    users.write_text("# who may log in\nann:s3cret:with:colons\n\n  bob:pw\n")
    access = _access("--port", "7001", "--auth", "eve:x", "--auth-file", str(users))
    assert access == Access("0.0.0.0", 7001, (("eve", "x"), ("ann", "s3cret:with:colons"), ("bob", "pw")))
    assert _access("--host", "::1").local() and _access("--host", "localhost").local()
    assert not _access("--host", "my-box").local()
    # trusted with the server's credentials (webaccess.TRUSTED_ONLY): a login, or this machine only
    assert access.trusted and _access("--host", "::1").trusted and not _access("--host", "my-box").trusted
    for argv, message in [(("--auth", "eve"), "--auth: expected USER:PASSWORD"),
                          (("--auth", ":pw"), "--auth: expected USER:PASSWORD"),
                          (("--auth-file", str(tmp_path / "none")), "--auth-file: cannot read"),
                          (("--auth-file", str(tmp_path)), "--auth-file: cannot read")]:
        with pytest.raises(ConfigError, match=message):
            _access(*argv)
    users.write_text("ann:pw\nbob\n")
    with pytest.raises(ConfigError, match=f"--auth-file {users}:2: expected USER:PASSWORD"):
        _access("--auth-file", str(users))
    users.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="has no USER:PASSWORD line"):
        _access("--auth-file", str(users))

    with caplog.at_level("INFO", logger="lf"):
        Access("0.0.0.0", 7001).announce("lf webui", "http://0.0.0.0:7001/")
        Access("127.0.0.1", 7001).announce("lf webui", "http://127.0.0.1:7001/")
        access.announce("lf webui", "http://0.0.0.0:7001/")
    warning, local, login = caplog.records
    assert warning.levelname == "WARNING" and "with no login: anyone who can reach it" in warning.getMessage()
    assert local.levelname == "INFO" and "open (no login): anyone on this machine" in local.getMessage()
    assert login.getMessage() == "lf webui: http://0.0.0.0:7001/, login required (3 users)"


def test_log_and_loss_curve_readers(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    records = [{"current_steps": s, "total_steps": 3, "loss": loss} for s, loss in ((1, 4.0), (2, 3.0), (3, 2.0))]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + json.dumps({"current_steps": 3, "eval_loss": 1.0})
                   + "\n" + '{"current_steps": 4, "lo')  # an evaluation, then a line being written
    assert webui.read_log(log)[:3] == records and len(webui.read_log(log)) == 4
    assert webui.read_log(log, since=time.time() + 60) == []  # an earlier run's log
    assert webui.read_log(tmp_path / "missing.jsonl") == []
    frame = webui.loss_frame(webui.read_log(log))
    assert list(frame["step"]) == [1, 2, 3, 1, 2, 3] and list(frame["loss"][:3]) == [4.0, 3.0, 2.0]
    assert list(frame["curve"]) == ["original"] * 3 + ["smoothed"] * 3
    assert frame["loss"][3] == 4.0 and 2.0 < frame["loss"][5] < 4.0  # the moving average starts at the first loss
    assert webui.loss_frame([]).empty
    output = tmp_path / "train.log"
    output.write_text("[lf] loading\n 50%|##   | 1/2\r100%|#####| 2/2\ndone\n")
    assert webui.log_text(output) == "[lf] loading\n100%|#####| 2/2\ndone"
    assert webui.log_text(output, lines=1) == "done"


def test_chat_streams_the_engines_reply_and_webchat_serves_it(tmp_path, monkeypatch):
    from lf.config import parse_infer_args
    from lf.serve import Engine, webchat

    with pytest.raises(gr.Error, match="No model is loaded"):
        next(webui.Chat().respond(webui.Conversation(), "hi", None, "", 4, 0.0, 1.0))
    assert webui.Chat().load(str(tmp_path / "none"), "", "qwen").startswith("**not loaded**")
    served = []
    monkeypatch.setattr(webui, "launch", lambda demo, access: served.append((demo, access)))
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert webchat.command(["model_name_or_path=lf-tiny-llama", "--auth", "ann:pw", "template=qwen",
                            "--max_new_tokens", "6"]) == 0
    assert served[0][0].title == "lf webchat: lf-tiny-llama" and served[0][1].users == (("ann", "pw"),)
    assert "open: no login" not in header(served[0][0])
    assert webui.command(["--port", "7999", "--root", str(tmp_path)]) == 0
    assert served[1][1] == Access("127.0.0.1", 7999) and served[1][0].trainer.root.path == tmp_path
    assert "open: no login" in header(served[1][0]) and served[1][0].trainer.root.trusted
    assert webui.command(["--host", "0.0.0.0", "--root", str(tmp_path), "--lang", "zh"]) == 0
    assert not served[2][0].trainer.root.trusted and not served[2][0].evaluator.root.trusted  # open beyond here
    assert header(served[2][0]).startswith("## lf 网页界面")
    assert webui.command(["--host", "0.0.0.0", "--auth", "ann:pw", "--root", str(tmp_path)]) == 0
    assert served[3][0].trainer.root.trusted

    engine = Engine(parse_infer_args({"model_name_or_path": "lf-tiny-llama", "template": "qwen"}, "webchat"))
    history = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    before = webui.Conversation(history, (), history)
    shown = list(webui.Chat(engine).respond(before, "Who are you?", None, "", 6, 0.0, 1.0))
    expected = engine.generate([*history, {"role": "user", "content": "Who are you?"}], max_new_tokens=6,
                               temperature=0.0)[0].text
    chat, kept, box, upload = shown[-1]
    assert chat == list(kept.shown) == list(kept.messages) == [*history, {"role": "user", "content": "Who are you?"},
                                                               {"role": "assistant", "content": expected}]
    assert box == "" and upload is None and shown[0][1] == before  # the history grows once the reply is whole


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(page, said: str, lang: str = "en") -> None:
    """Sends `said` in the page's chat (its words in `lang`), greedy and 4 tokens at the most, and waits for the
    reply."""
    chat = page.locator("#tab_chat")
    chat.get_by_text(words("chat.settings", lang)).first.click()
    for key, value in (("max_new_tokens", "4"), ("temperature", "0")):
        chat.get_by_label(words(f"field.{key}", lang)).last.fill(value)
        chat.get_by_label(words(f"field.{key}", lang)).last.press("Enter")
    chat.get_by_label(words("chat.message", lang)).fill(said)
    chat.get_by_role("button", name=words("chat.send", lang)).click()
    page.wait_for_function("() => { const m = document.querySelector('#chatbot [data-testid=bot]'); "
                           "return m && m.innerText.trim().length > 0; }", timeout=60_000)


def _status(page, selector: str, *words: str, timeout: float) -> str:
    """The text of `selector` once it starts with one of `words`, read in the same look: read again later, it may
    start with the progress timer of the page's next update ("0.1s")."""
    said = page.wait_for_function(
        "([sel, words]) => { const t = document.querySelector(sel).innerText;"
        " return words.some(w => t.startsWith(w)) ? t : null; }",
        arg=[selector, list(words)], timeout=timeout * 1000)
    return said.json_value()


def bold(key: str, lang: str) -> str:
    """The bold start of a status message (TEXT[key]: "**finished**: ..."), as the page shows it: "finished"."""
    return TEXT[key][lang].split("**")[1]


def served_page(tmp_path, lang: str = "en") -> tuple:
    """The `lf webui` page, its root tmp_path, served on a free port in `lang` (as `lf webui --lang`): (demo,
    port)."""
    demo = webui.create_ui(webui.Trainer(Root(str(tmp_path))), lang=lang)
    port = _free_port()
    demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, port


@dataclass
class Tab:
    """A browser tab on the page and its language: its words, fields and status lines."""
    page: object
    lang: str

    def say(self, key: str) -> str:
        return words(key, self.lang)

    def tab(self, key: str):
        """Selects the tab named by TEXT `key` (tab.train, ...) and gives its content."""
        self.page.get_by_role("tab", name=self.say(key)).click()
        return self.page.locator(f"#tab_{key.removeprefix('tab.')}")

    def field(self, where, key: str):
        return where.get_by_label(self.say(f"field.{key}"), exact=True)

    def fill(self, where, values: dict) -> None:
        for key, value in values.items():
            self.field(where, key).fill(value)
        self.field(where, key).press("Tab")  # the last one's change goes out too

    def status(self, selector: str, *keys: str, timeout: float) -> str:
        """The status line `selector` once it says one of `keys` (statuses starting in bold, in this language)."""
        return _status(self.page, selector, *(bold(key, self.lang) for key in keys), timeout=timeout)

    def yaml_shows(self, text: str) -> None:
        self.page.wait_for_function(f"document.querySelector('#train_yaml').innerText.includes({text!r})")

    def plotted(self) -> None:
        """The loss plot: both curves drawn through the logged steps."""
        self.page.wait_for_selector("#loss_plot svg .mark-line path")
        paths = self.page.locator("#loss_plot svg .mark-line path")
        assert paths.count() == 2 and all(len(p.get_attribute("d") or "") > 10 for p in paths.all())


def test_every_tab_in_both_languages_in_a_browser(tmp_path):
    """Two browser tabs on one page, one in English (its language switch) and one in Chinese (the server's --lang),
    drive every tab: each run is started in one language and followed, read-only, in the other, so the quickstart
    is trained once. Train (fields, dataset preview, Save and Load YAML, the run, the loss plot), Chat (the model
    one tab loaded, a conversation in each, its unloading), Export, Evaluate & Predict (predictions: BLEU and ROUGE
    and the predictions table; the demo multiple-choice task: accuracy per category), a run stopped, and the
    language kept over a reload."""
    from playwright.sync_api import expect, sync_playwright

    demo, port = served_page(tmp_path, lang="zh")
    data, out = str(REPO / "data"), tmp_path / "run"
    short = {"dataset_dir": data, "cutoff_len": "64", "max_samples": "8", "per_device_train_batch_size": "2",
             "logging_steps": "1"}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            en, zh = (Tab(browser.new_context(viewport={"width": 1400, "height": 1600}).new_page(), lang)
                      for lang in ("en", "zh"))
            for tab in (en, zh):
                tab.page.goto(f"http://127.0.0.1:{port}/")
            zh.page.get_by_role("button", name="开始", exact=True).wait_for()  # the server's language
            assert "公开：无需登录" in zh.page.locator("#header").inner_text()
            en.page.get_by_label("English").check()  # the switch
            en.page.get_by_role("button", name="Start", exact=True).wait_for()
            assert "open: no login" in en.page.locator("#header").inner_text()

            # Train, in Chinese: the fields, the dataset preview, Save YAML and Load YAML
            train = zh.tab("tab.train")
            zh.fill(train, {**short, "output_dir": str(tmp_path / "zh_run"), "max_steps": "2"})
            zh.yaml_shows("max_steps: 2")
            train.get_by_text(zh.say("train.preview"), exact=True).click()
            train.get_by_role("button", name=zh.say("train.preview_button")).click()
            zh.page.wait_for_selector("#dataset_preview pre mark")  # the replies, marked as trained on
            assert zh.say("preview.legend") in zh.page.locator("#dataset_preview").inner_text()
            train.get_by_label(zh.say("train.save_to"), exact=True).fill(str(tmp_path / "zh.yaml"))
            train.get_by_role("button", name=zh.say("train.save")).click()
            zh.status("#train_status", "save.done", timeout=30)
            assert yaml.safe_load((tmp_path / "zh.yaml").read_text())["max_steps"] == 2
            train.get_by_role("button", name=zh.say("train.load")).click()
            zh.status("#train_status", "load.done", timeout=30)

            # Train, in English: the tiny quickstart, a few steps, followed in the Chinese tab
            train = en.tab("tab.train")
            en.fill(train, {**short, "output_dir": str(out), "max_steps": "3"})
            train.get_by_label("save the YAML to", exact=True).fill("saves/my run.yaml")
            train.get_by_label("max_steps", exact=True).press("Tab")
            en.page.wait_for_function("document.querySelector('#train_command textarea').value === "
                                      "\"lf train 'saves/my run.yaml'\"")
            en.yaml_shows("max_steps: 3")
            assert f"output_dir: {out}" in en.page.locator("#train_yaml").inner_text()
            train.get_by_text("dataset preview", exact=True).click()
            en.page.locator("#preview_button").click()
            en.page.wait_for_selector("#dataset_preview pre mark")
            assert "<|im_start|>user" in en.page.locator("#dataset_preview pre").first.inner_text()
            en.page.locator("#start").click()
            status = en.status("#train_status", "run.finished", "run.failed", "run.not_started", timeout=240)
            log = en.page.locator("#train_log textarea").input_value()
            assert status.startswith("finished"), f"{status}\n{log}"
            assert "lf train: done" in log and len(webui.read_log(out / "trainer_log.jsonl")) == 3
            status = zh.status("#train_status", "run.finished", timeout=30)
            assert zh.say("run.watching") in status and zh.page.locator("#stop").is_disabled()
            assert "lf train: done" in zh.page.locator("#train_log textarea").input_value()
            for tab in (en, zh):
                tab.plotted()

            # Chat: the finished run filled in its adapter; the English tab loads it, both chat with it, each its
            # own conversation; the Chinese tab cannot unload it
            chats = {tab.lang: tab.tab("tab.chat") for tab in (en, zh)}
            for tab in (en, zh):
                assert tab.field(chats[tab.lang], "adapter_name_or_path").input_value() == str(out)
            en.page.locator("#load_model").click()
            loaded = en.status("#chat_status", "chat.loaded", timeout=120)
            assert loaded == f"loaded lf-tiny-llama with the adapter {out}"
            watching = zh.status("#chat_status", "chat.loaded", timeout=30)
            assert watching.startswith(f"已加载 lf-tiny-llama，适配器 {out}") and zh.say("chat.watching") in watching
            assert zh.page.locator("#unload_model").is_disabled() and zh.page.locator("#load_model").is_disabled()
            assert en.page.locator("#unload_model").is_enabled()
            for tab, said in ((en, "Who are you?"), (zh, "你好")):
                send(tab.page, said, tab.lang)
            for tab, said in ((en, "Who are you?"), (zh, "你好")):  # (retried: a reply may still be redrawn)
                expect(tab.page.locator('#chatbot [data-testid="user"]')).to_have_text([said], use_inner_text=True)
                expect(tab.page.locator('#chatbot [data-testid="bot"]')).to_have_count(1)

            # Export: the same adapter, merged, from each tab
            for tab in (en, zh):
                export = tab.tab("tab.export")
                tab.field(export, "export_dir").fill(str(tmp_path / f"merged_{tab.lang}"))
                export.get_by_role("button", name=tab.say("export.run"), exact=True).click()
                status = tab.status("#export_status", "export.done", "export.failed", timeout=120)
                assert status.startswith(bold("export.done", tab.lang)), status
                assert (tmp_path / f"merged_{tab.lang}" / "config.json").exists()

            # Evaluate & Predict, in English: the adapter's predictions on a few prompts, scored; the Chinese tab
            # shows the same results under its own headers
            evaluate = {tab.lang: tab.tab("tab.eval") for tab in (en, zh)}
            assert en.field(evaluate["en"], "adapter_name_or_path").input_value() == str(out)
            en.fill(evaluate["en"], {"dataset_dir": data, "max_samples": "3", "cutoff_len": "64",
                                     "max_new_tokens": "6", "eval_output_dir": str(tmp_path / "predict")})
            en.page.locator("#eval_start").click()
            status = en.status("#eval_status", "eval.finished", "run.failed", "run.not_started", timeout=120)
            assert status.startswith("finished"), f"{status}\n{en.page.locator('#eval_log textarea').input_value()}"
            predicted = [json.loads(line) for line in (tmp_path / "predict" / "generated_predictions.jsonl").open()]
            assert len(predicted) == 3
            for tab in (en, zh):
                tab.page.wait_for_function("document.querySelector('#eval_metrics').innerText.includes('rouge-l')")
                metrics, table = (tab.page.locator(f"#eval_{name}").inner_text() for name in ("metrics", "predictions"))
                assert "bleu-4" in metrics and tab.say("col.value") in metrics
                assert tab.say("col.predict") in table and tab.say("col.label") in table
                assert predicted[0]["label"].split()[0] in table
            assert zh.say("run.watching") in zh.status("#eval_status", "eval.finished", timeout=10)

            # Evaluate & Predict, in Chinese: lf's demo multiple-choice task, accuracy per category and the
            # answers; the English tab shows them under its headers
            evaluate["zh"].get_by_label("评测：多项选择题任务（各类别准确率）").check()
            zh.fill(evaluate["zh"], {"task_dir": str(REPO / "evaluation"), "n_shot": "0",
                                     "eval_output_dir": str(tmp_path / "eval")})
            evaluate["zh"].get_by_role("button", name="开始评估").click()
            status = zh.status("#eval_status", "eval.finished", "run.failed", "run.not_started", timeout=120)
            assert status.startswith("已完成"), f"{status}\n{zh.page.locator('#eval_log textarea').input_value()}"
            scored = json.loads((tmp_path / "eval" / "lf_results.json").read_text())
            accuracy = f"{100 * scored['average']['accuracy']:.2f}".rstrip("0").rstrip(".")
            for tab in (zh, en):
                tab.page.wait_for_function("document.querySelector('#eval_metrics').innerText.includes('Average')")
                metrics = tab.page.locator("#eval_metrics").inner_text()
                assert tab.say("col.accuracy") in metrics and accuracy in metrics and "STEM" in metrics
                assert tab.say("col.answer") in tab.page.locator("#eval_predictions").inner_text()
            assert "准确率（%）" in zh.page.locator("#eval_metrics").inner_text()

            # Stop, in Chinese: a long run started, shown read-only in the English tab (whose Start waits), then
            # stopped; its process group is gone
            train = {tab.lang: tab.tab("tab.train") for tab in (en, zh)}
            zh.fill(train["zh"], {"output_dir": str(tmp_path / "long"), "max_steps": "100000"})
            zh.yaml_shows("max_steps: 100000")
            zh.page.locator("#start").click()
            zh.status("#train_status", "run.loading", timeout=60)
            run = demo.trainer.run
            assert run.process.poll() is None
            assert en.say("run.watching") in en.status("#train_status", "run.loading", timeout=30)
            assert en.page.locator("#stop").is_disabled() and zh.page.locator("#stop").is_enabled()
            # its refusal shows until the next redraw of the run, a second later: every text shown is kept
            en.page.evaluate("() => { const s = document.querySelector('#train_status'); window.shown = []; "
                             "new MutationObserver(() => window.shown.push(s.innerText)).observe(s, "
                             "{subtree: true, childList: true, characterData: true}); }")
            en.page.locator("#start").click()
            en.page.wait_for_function("text => window.shown.some(t => t.startsWith(text))",
                                      arg=bold("run.busy", "en"))
            zh.page.locator("#stop").click()
            assert "已停止" in zh.status("#train_status", "run.stopped", timeout=30)
            en.status("#train_status", "run.stopped", timeout=30)
            assert run.process.poll() is not None
            with pytest.raises(ProcessLookupError):
                os.killpg(run.process.pid, 0)

            # a reload: the English tab stays English (its browser remembers the switch); having closed, it no
            # longer owns the chat model, which the Chinese tab may then unload
            en.page.reload()
            en.page.get_by_role("button", name="Start", exact=True).wait_for()
            assert en.page.get_by_label("English").is_checked()
            zh.tab("tab.chat")
            zh.page.wait_for_function("document.querySelector('#unload_model').disabled === false", timeout=30_000)
            assert zh.status("#chat_status", "chat.loaded", timeout=10) == f"已加载 lf-tiny-llama，适配器 {out}"
            zh.page.locator("#unload_model").click()
            assert zh.status("#chat_status", "chat.none", timeout=30) == "未加载模型"
            assert demo.chat.engine is None
            zh.page.reload()
            zh.page.get_by_role("button", name="开始", exact=True).wait_for()
            assert zh.page.get_by_label("简体中文").is_checked()
            assert zh.page.get_by_label("最大步数（0：按轮数） (max_steps)", exact=True).count() == 1
            browser.close()
    finally:
        demo.trainer.close()
        demo.evaluator.close()
        demo.close()
    assert not list(tmp_path.glob("lf-webui-*"))  # the run folders


@pytest.mark.parametrize("change", [{}, {"finetuning_type": "full", "max_steps": 9, "dataset": ["identity"]},
                                    {"extra": "warmup_ratio: 0.1\ndo_eval: false\nlora_rank: 4", "template": None}])
def test_a_loaded_yaml_gives_back_the_fields_config(root, monkeypatch, change):
    monkeypatch.chdir(root.path)
    config = webui.train_config(fields(output_dir="saves/run", **change))
    assert webui.save_yaml(root, fields(output_dir="saves/run", **change), "run.yaml").startswith("**saved**")
    said, loaded = webui.load_yaml(root, "run.yaml", "zh")
    assert said.startswith("**已加载**") and list(loaded) == list(webui.TRAIN_DEFAULTS)
    assert webui.train_config(loaded) == config


def test_load_yaml_keeps_other_keys_and_refuses_what_it_cannot_read(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root.path)
    Path("llamafactory.yaml").write_text("model_name_or_path: m\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
                                         "lora_target: all\ndataset: a, b\nlearning_rate: 1.0e-4\nbf16: true\n")
    _, loaded = webui.load_yaml(root, "llamafactory.yaml")
    assert loaded["dataset"] == ["a", "b"] and loaded["learning_rate"] == "0.0001" and loaded["lora_rank"] is None
    assert yaml.safe_load(loaded["extra"]) == {"bf16": True} and loaded["max_steps"] == 0
    assert webui.train_config(loaded)["learning_rate"] == 1e-4 and "lora_rank" not in webui.train_config(loaded)
    Path("list.yaml").write_text("- a\n")
    (tmp_path / "outside" / "x.yaml").write_text("seed: 1\n")
    for path, message in (("list.yaml", "list.yaml is not a YAML mapping"), ("none.yaml", "none.yaml cannot be read"),
                          (str(root.path / "setup.py"), "is not a .yaml file"),
                          (str(tmp_path / "outside" / "x.yaml"), "is outside")):
        said, loaded = webui.load_yaml(root, path)
        assert said.startswith("**not loaded**: ") and message in said and loaded is None


@pytest.mark.parametrize("train_on_prompt, mask_history", [(False, False), (True, False), (False, True)])
def test_dataset_preview_marks_what_the_loss_is_computed_on(train_on_prompt, mask_history):
    from lf.config import parse_train_args
    from lf.data import get_template
    from lf.serve.webpreview import preview_html, preview_parts

    extra = yaml.safe_dump({"train_on_prompt": train_on_prompt, "mask_history": mask_history})
    cfg = parse_train_args(webui.train_config(fields(dataset_dir=str(REPO / "data"), dataset=["identity"],
                                                     extra=extra)))
    rows = preview_parts(cfg.data, rows=2)
    records = json.loads((REPO / "data" / "identity.json").read_text())[:2]
    template = get_template("qwen")
    assert len(rows) == 2
    for parts, record in zip(rows, records):  # identity: one turn, instruction -> output
        messages = [{"role": "user", "content": record["instruction"]},
                    {"role": "assistant", "content": record["output"]}]
        joined = "".join(text for text, _ in parts)  # render() adds the newline the next turn would open with
        assert template.render(messages) in (joined, joined + "\n") and template.render(messages).startswith(joined)
        assert [trained for _, trained in parts] == [train_on_prompt, True]
        assert record["output"] in parts[1][0]
    page = preview_html(rows)
    assert page.count("<pre") == 2 and page.count("<mark>") == 2 + 2 * train_on_prompt and "&lt;|im_start|&gt;" in page
    assert webui.dataset_preview(Root(), fields(stage="dpo"), "zh") == "<p>无法预览：预览只显示 sft 阶段的数据；本次训练阶段为 dpo</p>"


def test_every_config_key_that_takes_a_path_is_checked():
    """Each key lf's parser takes whose value may be a path (its name says so, its type takes a string) is checked
    as a read (READ_KEYS) or a write, or is named here as not a path: a new path key fails this until it is sorted."""
    import typing

    from lf.config.parser import _owners
    from lf.serve.webaccess import READ_KEYS

    def takes_str(annotation) -> bool:
        return annotation is str or any(takes_str(a) for a in typing.get_args(annotation))

    words = ("dir", "path", "file", "folder", "model", "config", "deepspeed", "checkpoint", "adapter")
    named = {key for key, (_, annotation) in _owners(True).items()
             if takes_str(annotation) and any(w in key for w in words)}
    not_paths = {"model_revision", "reward_model_type", "hub_model_id", "metric_for_best_model",
                 "vllm_config", "liger_kernel_config",  # JSON text or mappings
                 "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"}
    written = {*webui.WRITTEN_BY_TRAINING, "export_dir", "save_dir"}  # checked by Start, Export, Evaluate
    joined = {"adapter_folder"}  # checked joined onto adapter_name_or_path (Root.check_reads)
    # lf train and export refuse it; the Chat and Evaluate tabs pass fixed keys (webui.model_config) without it
    unreachable = {"offload_folder"}
    assert named - set(READ_KEYS) - written - not_paths - joined - unreachable == set()
    assert set(READ_KEYS) - named == set()  # no stale entry


def test_reads_stay_in_the_readable_folders(root, tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(root.path)
    (root.path / "org").mkdir()
    (root.path / "org" / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(ConfigError, match=r"model_name_or_path: \.\./models/m is outside the folders this web UI "
                                          r"reads \(.*root, .*data, .*evaluation\): choose a path under one"):
        root.check_reads({"model_name_or_path": "../models/m"})
    with pytest.raises(ConfigError, match="adapter_name_or_path: org/escape is outside"):
        root.check_reads({"adapter_name_or_path": "saves/a, org/escape"})  # each of a comma list
    with pytest.raises(ConfigError, match="adapter_name_or_path: org/escape is outside"):
        root.check_reads({"adapter_name_or_path": "org", "adapter_folder": "escape"})  # checked as the parser joins it
    # not paths here: a hub id, the tiny model's name, a flag, an inline mapping; lf's own data
    root.check_reads({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "adapter_name_or_path": "lf-tiny-llama",
                      "resume_from_checkpoint": True, "deepspeed": {"zero_optimization": {"stage": 2}},
                      "dataset_dir": str(REPO / "data"), "task_dir": str(REPO / "evaluation")})
    readable = Root(str(root.path), readable=(str(tmp_path / "models"),))
    readable.check_reads({"model_name_or_path": "../models/m"})
    with pytest.raises(ConfigError, match=r"--read .*nothing is not a folder"):
        Root(str(root.path), readable=(str(tmp_path / "nothing"),))
    Root(str(root.path), any_path=True).check_reads({"model_name_or_path": "../models/m"})
    assert webui.dataset_names(root, str(tmp_path / "outside")) == []
