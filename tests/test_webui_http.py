"""`lf webui` as a stranger meets it: every button is an HTTP endpoint, called here directly (httpx, Gradio's call
API) against the app served on 127.0.0.1. Behind --auth nothing answers without a login; logged in, the endpoints
refuse what the page refuses (a path outside the root, an unknown key, an export over a non-empty folder). And
`lf webui` ended by SIGTERM removes its run folders."""

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

from lf.serve import webui
from lf.serve.webaccess import Root

REPO = Path(__file__).resolve().parent.parent
USER = ("ann", "s3cret")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(client: httpx.Client, api_name: str, *data) -> list:
    """The outputs of the endpoint `api_name` given `data`: Gradio's call API posts the inputs, then streams
    events until the result."""
    posted = client.post(f"/gradio_api/call/{api_name}", json={"data": list(data)})
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
def logged_in(url: str):
    """A client with USER's login cookie."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/login", data={"username": USER[0], "password": USER[1]}).raise_for_status()
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
    demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True, auth=[USER])
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
            call(client, "start", *train_inputs(model_name_or_path=str(tmp_path / "no-model"),
                                                output_dir=str(root / "out")))
        assert len(list(root.glob("lf-webui-*"))) == 1
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
    assert not list(root.glob("lf-webui-*")), log.read_text()
    assert "login required (1 user)" in log.read_text()
