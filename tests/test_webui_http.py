"""`lf webui` as a stranger meets it: every button is an HTTP endpoint, called here directly (httpx, Gradio's call
API) against the app served on 127.0.0.1. Behind --auth nothing answers without a login; logged in, the endpoints
refuse what the page refuses (a path outside the root, an unknown key, an export over a non-empty folder), and the
chat model is its loader's (two logins, several sessions) until that tab closes. And `lf webui` ended by SIGTERM
removes its run folders."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from test_train import lf_home  # noqa: F401  (the tiny model, built once in a temporary LF_HOME)

from lf.serve import webui
from lf.serve.webaccess import Root
from lf.serve.webui_text import words

REPO = Path(__file__).resolve().parent.parent
USER, BOB = ("ann", "s3cret"), ("bob", "pw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(client: httpx.Client, api_name: str, *data, session: str | None = None) -> list:
    """The outputs of the endpoint `api_name` given `data`: Gradio's call API posts the inputs, then streams
    events until the result. `session`: the browser tab calling it (Gradio's session hash; else one of its own)."""
    posted = client.post(f"/gradio_api/call/{api_name}", json={"data": list(data), "session_hash": session})
    posted.raise_for_status()
    kind = None
    with client.stream("GET", f"/gradio_api/call/{api_name}/{posted.json()['event_id']}") as events:
        for line in events.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif kind in ("complete", "error") and line.startswith("data: "):
                assert kind == "complete", line
                return json.loads(line.removeprefix("data: "))
    raise AssertionError(f"{api_name}: the event stream ended without a result")


@contextlib.contextmanager
def logged_in(url: str, user: tuple[str, str] = USER):
    """A client with `user`'s login cookie."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/login", data={"username": user[0], "password": user[1]}).raise_for_status()
        yield client


def train_inputs(**changes) -> list:
    """The Train tab's inputs in the page's order (TRAIN_DEFAULTS'), then the page's language."""
    return [*{**webui.TRAIN_DEFAULTS, "dataset_dir": str(REPO / "data"), **changes}.values(), "en"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page behind a login, its root a fresh folder beside another one (outside): (url, root, outside)."""
    root, outside = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("outside")
    demo = webui.create_ui(webui.Trainer(Root(str(root))), login=True)
    port = _free_port()
    demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True, auth=[USER, BOB])
    yield f"http://127.0.0.1:{port}", root, outside
    demo.trainer.close()
    demo.close()


def test_nothing_answers_without_a_login(served):
    url, root, _ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/config").status_code == 401
        assert client.post("/gradio_api/call/save_yaml", json={"data": []}).status_code == 401
        assert client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0}).status_code == 401
        wrong = client.post("/login", data={"username": USER[0], "password": "guess"})
        assert wrong.status_code == 400 and client.get("/config").status_code == 401
    with logged_in(url) as client:
        assert client.get("/config").status_code == 200
        saved = call(client, "save_yaml", str(root / "run.yaml"), *train_inputs(output_dir=str(root / "out")))[0]
    assert saved.startswith("**saved**") and yaml.safe_load((root / "run.yaml").read_text())["output_dir"] == str(
        root / "out")
    (root / "run.yaml").unlink()


def test_endpoints_refuse_what_the_page_refuses(served):
    url, root, outside = served
    with logged_in(url) as client:
        saved = call(client, "save_yaml", str(outside / "x.yaml"), *train_inputs(output_dir=str(root / "out")))
        assert saved[0].startswith(f"**not saved**: the YAML's path: {outside / 'x.yaml'} is outside {root}")
        saved = call(client, "save_yaml", str(root / "x.yaml"),
                     *train_inputs(output_dir=str(root / "out"), extra="$(touch pwned): 1"))
        assert saved[0].startswith("**not saved**: unknown key '$(touch pwned)' in the config.")
        started = call(client, "start", *train_inputs(output_dir=str(outside / "out")))
        assert started[0].startswith(f"**not started**: output_dir: {outside / 'out'} is outside {root}")
        started = call(client, "start", *train_inputs(output_dir=str(root / "out"),
                                                      extra=yaml.safe_dump({"logging_dir": str(outside)})))
        assert started[0].startswith(f"**not started**: logging_dir: {outside} is outside {root}")
        (root / "merged").mkdir()
        (root / "merged" / "keep.txt").write_text("mine")
        for export_dir, refusal in ((outside, "is outside"), (root / "merged", "is not empty")):
            exported = call(client, "export", "lf-tiny-llama", "", "qwen", str(export_dir), 1, "auto", "none", False,
                            "en")
            assert exported[0].startswith(f"**not exported**: export_dir: {export_dir} ") and refusal in exported[0]
    assert not list(outside.iterdir()) and not (root / "x.yaml").exists() and not (root / "out").exists()
    assert (root / "merged" / "keep.txt").read_text() == "mine" and not list(root.glob("lf-webui-*"))


def _served(port: int, server: subprocess.Popen, timeout: float) -> str:
    """The server's URL once it accepts connections (it imports torch and Gradio first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"lf webui did not serve port {port} (exit code {server.poll()})")


def test_sigterm_stops_the_run_and_removes_its_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    port, log = _free_port(), tmp_path / "server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "lf.cli", "webui", "--port", str(port), "--root", str(root), "--auth", ":".join(USER)],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        with logged_in(_served(port, server, timeout=120)) as client:
            # a run of a model that is not there: its `lf train` child fails, or is stopped while it loads
            call(client, "start", *train_inputs(model_name_or_path=str(root / "no-model"),
                                                output_dir=str(root / "out")))
        assert len(list(root.glob("lf-webui-*"))) == 1
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
    assert not list(root.glob("lf-webui-*")), log.read_text()
    assert "login required (1 user)" in log.read_text()


def _secrets(outside: Path) -> None:
    """What a stranger must not read, outside the root: a dataset folder, a task folder, a model folder, a deepspeed
    config and a YAML, each with SECRET in it."""
    (outside / "dataset_info.json").write_text(json.dumps({"secret": {"file_name": "secret.json"}}))
    (outside / "secret.json").write_text(json.dumps([{"instruction": "SECRET", "input": "", "output": "SECRET"}]))
    task = outside / "task" / "secret"
    task.mkdir(parents=True)
    (task / "mapping.json").write_text(json.dumps({"s": {"name": "SECRET", "category": "SECRET"}}))
    for split in ("dev", "test"):
        (task / split).mkdir()
        (task / split / f"s_{split}.csv").write_text("SECRET,a,b,c,d,A\n")
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text('{"model_type": "llama", "SECRET": 1}')
    (outside / "ds.json").write_text('{"SECRET": 1}')
    (outside / "run.yaml").write_text("dataset: secret\nSECRET: 1\n")


def eval_inputs(**changes) -> list:
    """The Evaluate & Predict tab's inputs: model, adapter, template, its fields, the page's language."""
    from lf.serve.webeval import EVAL_DEFAULTS
    model = {"model_name_or_path": "lf-tiny-llama", "adapter_name_or_path": "", "template": "qwen"}
    named = {**model, **EVAL_DEFAULTS, "dataset_dir": str(REPO / "data"), **changes}
    return [*named.values(), "en"]


def test_every_field_reads_only_the_readable_folders(served):
    """Each field that names a path read (dataset_dir, task_dir, the model, an adapter, a deepspeed file, a YAML to
    load, ...) refuses one outside the root and lf's own folders: absolute, out through .., through a symlink."""
    url, root, outside = served
    _secrets(outside)
    (root / "link").symlink_to(outside)
    out = str(root / "out")
    with logged_in(url) as client:
        for where in (str(outside), f"{root}/../{outside.name}", str(root / "link")):
            said = lambda key, path: f"{key}: {path} is outside the folders this web UI reads"  # noqa: E731
            model = f"{where}/model"
            asked = [  # (endpoint, its inputs), (the key refused, the path named)
                (("start", *train_inputs(dataset_dir=where, dataset=["secret"], output_dir=out)),
                 ("dataset_dir", where)),
                (("start", *train_inputs(model_name_or_path=model, output_dir=out)), ("model_name_or_path", model)),
                (("resume", *train_inputs(model_name_or_path=model, output_dir=out)), ("model_name_or_path", model)),
                (("start", *train_inputs(output_dir=out, extra=f"adapter_name_or_path: {model}")),
                 ("adapter_name_or_path", model)),
                (("start", *train_inputs(output_dir=out, extra=f"deepspeed: {where}/ds.json")),
                 ("deepspeed", f"{where}/ds.json")),
                (("start", *train_inputs(output_dir=out, extra=f"media_dir: {where}")), ("media_dir", where)),
                (("save_yaml", str(root / "x.yaml"), *train_inputs(dataset_dir=where, output_dir=out)),
                 ("dataset_dir", where)),
                (("preview", *train_inputs(dataset_dir=where, dataset=["secret"], output_dir=out)),
                 ("dataset_dir", where)),
                (("load_yaml", f"{where}/run.yaml", "en"), ("the YAML's path", f"{where}/run.yaml")),
                (("evaluate", *eval_inputs(dataset_dir=where, eval_dataset=["secret"])), ("dataset_dir", where)),
                (("evaluate", *eval_inputs(mode="eval", task_dir=f"{where}/task", task="secret_test")),
                 ("task_dir", f"{where}/task")),
                (("evaluate", *eval_inputs(model_name_or_path=model)), ("model_name_or_path", model)),
                (("load_model", model, "", "qwen", "en"), ("model_name_or_path", model)),
                (("load_model", "lf-tiny-llama", model, "qwen", "en"), ("adapter_name_or_path", model)),
                (("export", model, "", "qwen", str(root / "merged-fresh"), 1, "auto", "none", False, "en"),
                 ("model_name_or_path", model)),  # a folder no other test fills: the read check is what refuses
            ]
            for (endpoint, *inputs), (key, path) in asked:
                answer = json.dumps(call(client, endpoint, *inputs), ensure_ascii=False)
                assert said(key, path) in answer and "SECRET" not in answer, (endpoint, answer)
            for endpoint in ("datasets", "eval_datasets"):  # the dataset lists: nothing listed
                assert call(client, endpoint, where)[0]["choices"] == []
        assert "lf_demo_en" in json.dumps(call(client, "datasets", str(REPO / "data")))  # lf's own data: listed
        # Gradio's file route serves no file outside its upload folder
        for path in (outside / "secret.json", root / "link" / "secret.json", REPO / "README.md"):
            answer = client.get(f"/gradio_api/file={path}")
            assert answer.status_code in (403, 404) and "SECRET" not in answer.text, (path, answer.status_code)
    assert not list(root.glob("lf-webui-*")) and not (root / "out").exists() and not (root / "x.yaml").exists()
    (root / "link").unlink()


def test_field_values_cannot_add_keys_or_upload(served):
    """A value with a newline stays one YAML value (the child reads only the keys the page sets), and a run that
    would upload with the server's credentials (push_to_hub), or report to a tracker on a page not trusted with
    them, is refused."""
    url, root, _ = served
    with logged_in(url) as client:
        injected = "lf-tiny-llama\ndataset_dir: /etc\noutput_dir: /tmp"
        saved = call(client, "save_yaml", str(root / "x.yaml"),
                     *train_inputs(model_name_or_path=injected, output_dir=str(root / "out")))[0]
        assert saved.startswith("**saved**"), saved
        written = yaml.safe_load((root / "x.yaml").read_text())
        assert written["model_name_or_path"] == injected and written["dataset_dir"] == str(REPO / "data")
        assert written["output_dir"] == str(root / "out")
        started = call(client, "start", *train_inputs(output_dir=str(root / "out"), extra="push_to_hub: true"))[0]
        assert started.startswith("**not started**: push_to_hub: the web UI uploads nothing"), started
        # a page not trusted with the server's credentials (Root(trusted=False); lf webui gives it on 127.0.0.1
        # or with --auth) starts no tracker
        started = call(client, "start", *train_inputs(output_dir=str(root / "out"), extra="report_to: swanlab"))[0]
        assert started.startswith("**not started**: report_to: swanlab would send the run to a service"), started
    (root / "x.yaml").unlink()


def test_the_chat_model_is_its_loaders_until_its_tab_closes(served):
    """The model one tab loads is every tab's to chat with; only that tab, or one of the same login, unloads it or
    loads another (the others' Load and Unload are greyed), until that tab closes."""
    url = served[0]
    load = ("lf-tiny-llama", "", "qwen")
    refused, unloaded = words("chat.not_owner"), words("chat.none")
    with logged_in(url) as ann, logged_in(url, BOB) as bob:
        status, load_button, unload_button = call(ann, "load_model", *load, "en", session="ann-tab")[:3]
        assert status == "**loaded** lf-tiny-llama" and load_button["interactive"] and unload_button["interactive"]
        for answer in (call(bob, "unload_model", "en", session="bob-tab"),
                       call(bob, "load_model", *load, "en", session="bob-tab")):
            assert answer[0] == refused and not answer[1]["interactive"] and not answer[2]["interactive"]
        assert call(bob, "unload_model", "zh", session="bob-tab")[0] == words("chat.not_owner", "zh")
        shown = call(bob, "chat", "hello", None, "", 4, 0.0, 1.0, "en", session="bob-tab")[0]
        assert [m["role"] for m in shown] == ["user", "assistant"] and shown[1]["content"]  # bob may chat with it
        # another tab of Ann's login controls it too
        assert call(ann, "unload_model", "en", session="ann-other-tab")[0] == unloaded
        assert call(ann, "load_model", *load, "en", session="ann-tab")[0] == "**loaded** lf-tiny-llama"
        assert call(bob, "unload_model", "en", session="bob-tab")[0] == refused
        # Ann's tab closes (its heartbeat connection ends, as when a browser tab closes or reloads): the model is
        # anyone's
        with ann.stream("GET", "/gradio_api/heartbeat/ann-tab") as beat:
            assert next(beat.iter_lines()).startswith("data: ALIVE")
        deadline = time.monotonic() + 30
        while (answer := call(bob, "unload_model", "en", session="bob-tab")[0]) == refused:
            assert time.monotonic() < deadline, "closing the tab did not release the model"
            time.sleep(0.5)
        assert answer == unloaded
