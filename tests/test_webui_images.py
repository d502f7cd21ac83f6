"""Images uploaded to the web chat (`lf webchat`, the Chat tab of `lf webui`): the reply equals the engine's answer
for the same image (the tiny Qwen2-VL of test_multimodal.py), the images stay with the conversation, the uploads
meet lf api's checks (formats, bytes and pixels of a message's images together, bombs refused from their header,
an upload over the byte limit refused as it arrives), and a text model refuses them in one line. Driven directly,
over HTTP (Gradio's upload and call API, behind a login) and in headless Chromium."""

import inspect
import json
from pathlib import Path

import gradio as gr
import httpx
import pytest
from PIL import ImageFile
from support import one_thread  # noqa: F401 (autouse: tiny models run fastest on one thread)
from test_multimodal import qwen2_vl  # noqa: F401 (session fixture: the tiny model)
from test_multimodal_use import ASKED, engine_for, picture, png
from test_serve_media import NO_IMAGES, header_only_png
from test_serve_media import png as plain_png
from test_serve_engine import tiny_engine
from test_train import lf_home  # noqa: F401 (autouse: the tiny text model in a temporary LF_HOME)
from test_webui import CHROMIUM, _free_port
from test_webui_http import USER, logged_in

from lf.serve import webui
from lf.serve.media import Limits
from lf.serve.webaccess import Access
from lf.serve.webui import Chat, Conversation

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = ("", 4, 0.0, 1.0, "en")  # system prompt (the template's), max_new_tokens, temperature (greedy), top_p, lang


@pytest.fixture(scope="module")
def vl_engine(qwen2_vl):
    return engine_for(qwen2_vl, "qwen2_vl")


@pytest.fixture(scope="module")
def text_engine():
    return tiny_engine()


def saved(folder, name: str, data: bytes) -> str:
    (folder / name).write_bytes(data)
    return str(folder / name)


def answered(chat: Chat, conversation: Conversation, query: str, files: list[str]) -> list[tuple]:
    return list(chat.respond(conversation, query, files, *SETTINGS))


def refusal(chat: Chat, query: str, files: list[str]) -> str:
    with pytest.raises(gr.Error) as refused:
        answered(chat, Conversation(), query, files)
    return refused.value.message


def test_an_uploaded_image_gets_the_engines_answer_and_stays_with_the_conversation(vl_engine, tmp_path):
    first, second = picture(), picture(60, 100)
    paths = [saved(tmp_path, "first.png", png(first)), saved(tmp_path, "second.png", png(second))]
    chat = Chat(vl_engine)
    shown = answered(chat, Conversation(), ASKED, paths[:1])
    expected = vl_engine.generate([{"role": "user", "content": f"<image>{ASKED}"}], images=[first],
                                  max_new_tokens=4, temperature=0)[0].text
    board, conversation, box, upload = shown[-1]
    assert conversation.messages == ({"role": "user", "content": f"<image>{ASKED}"},
                                     {"role": "assistant", "content": expected})
    assert board == [{"role": "user", "content": {"path": paths[0]}}, {"role": "user", "content": ASKED},
                     {"role": "assistant", "content": expected}]
    assert box == "" and upload is None and shown[0][1] == Conversation()  # kept once the reply is whole
    assert [image.tobytes() for image in conversation.images] == [first.tobytes()]
    # the next message's image joins the first one: the engine gets both, in order
    board, later, _, _ = answered(chat, conversation, "And this?", paths[1:])[-1]
    asked = [*conversation.messages, {"role": "user", "content": "<image>And this?"}]
    expected = vl_engine.generate(asked, images=[first, second], max_new_tokens=4, temperature=0)[0].text
    assert later.messages == (*asked, {"role": "assistant", "content": expected})
    assert len(later.images) == 2 and board[-1] == {"role": "assistant", "content": expected}


def test_a_text_model_refuses_an_upload_in_one_line_before_reading_it(text_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image for a text model"))
    assert refusal(Chat(text_engine), ASKED, [saved(tmp_path, "a.png", plain_png(4, 4))]) == NO_IMAGES
    assert "\n" not in NO_IMAGES


@pytest.mark.parametrize("data, limits, says", [
    (b"hello, not an image", Limits(), "image 1 (x.png) is not an image lf reads (PNG, JPEG, WEBP, GIF, BMP)"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", Limits(), "image 1 (x.png) is not an image lf reads"),
    (header_only_png(2, 2), Limits(), "image 1 (x.png) is damaged and cannot be decoded"),
    # a message's images count together: the second one brings them over the limit
    (plain_png(5, 5), Limits(max_pixels=28), "image 2 (x.png) is 5x5 pixels, which brings the request's images over "
                                             "28 pixels"),
    (plain_png(5, 5), Limits(max_bytes=100), "image 2 (x.png) brings the request's media over 100 bytes"),
], ids=["not-an-image", "eps", "damaged", "pixels", "bytes"])
def test_uploads_meet_the_apis_checks_counted_over_the_message(vl_engine, tmp_path, data, limits, says):
    files = [saved(tmp_path, "ok.png", plain_png(2, 2)), saved(tmp_path, "x.png", data)]
    got = refusal(Chat(vl_engine, limits), ASKED, files if "image 2" in says else files[1:])
    assert got.startswith(says), got


def test_an_uploaded_bomb_is_refused_from_its_header(vl_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded the pixels of a bomb"))
    got = refusal(Chat(vl_engine), ASKED, [saved(tmp_path, "x.png", header_only_png(5000, 5000))])
    assert got == ("image 1 (x.png) is 5000x5000 pixels, which brings the request's images over 16777216 pixels, "
                   "the server's limit for them together (API_MAX_IMAGE_PIXELS): send smaller images")


def _upload_and_call(client: httpx.Client, files: dict[str, bytes], query: str,
                     one_by_one: bool = False) -> tuple[str, object]:
    """Uploads `files` as the browser does (in one request, or `one_by_one`), then sends `query` with them through
    the chat endpoint: the last event's kind (complete or error) and its data."""
    paths = []
    for batch in ([{name: data} for name, data in files.items()] if one_by_one else [files] if files else []):
        sent = client.post("/gradio_api/upload", files=[("files", (name, data, "image/png"))
                                                        for name, data in batch.items()])
        sent.raise_for_status()
        paths += [{"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
                  for path, name in zip(sent.json(), batch)]
    posted = client.post("/gradio_api/call/chat", json={"data": [query, paths, *SETTINGS]})
    posted.raise_for_status()
    kind, last = None, None
    with client.stream("GET", f"/gradio_api/call/chat/{posted.json()['event_id']}") as events:
        for line in events.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif kind in ("complete", "error") and line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))
                return kind, last
    raise AssertionError("the event stream ended without a result")


def serving(engines, limits: Limits):
    """`lf webchat` pages of `engines` behind a login, served as the command serves them: their URLs, in order."""
    demos = [webui.chat_app(engine, login=True, limits=limits) for engine in engines]
    urls = []
    for demo in demos:
        port = _free_port()
        webui.serve(demo, Access("127.0.0.1", port, (USER,)))
        urls.append(f"http://127.0.0.1:{port}")
    yield urls
    for demo in demos:
        demo.close()


@pytest.fixture(scope="module")
def served(vl_engine, text_engine):
    """(the VL page's URL, the text one's)."""
    yield from serving((vl_engine, text_engine), Limits(max_bytes=4000))


def test_webchat_over_http_answers_an_upload_and_refuses_what_the_api_refuses(served, vl_engine):
    vl_url, text_url = served
    image = picture(40, 30)
    expected = vl_engine.generate([{"role": "user", "content": f"<image>{ASKED}"}], images=[image],
                                  max_new_tokens=4, temperature=0)[0].text
    with httpx.Client(base_url=vl_url, timeout=30) as client:  # no login: no upload either
        assert client.post("/gradio_api/upload", files=[("files", ("a.png", png(image)))]).status_code == 401
    with logged_in(vl_url) as client:
        kind, (board, _, box, upload) = _upload_and_call(client, {"a.png": png(image)}, ASKED)  # _: the state
        assert kind == "complete" and box == "" and upload is None
        # the reply as the page shows text (Gradio's Chatbot trims it, inspect.cleandoc)
        assert board[-1]["content"] == [{"type": "text", "text": inspect.cleandoc(expected)}], board
        assert board[0]["content"][0]["type"] == "file"
        kind, said = _upload_and_call(client, {"a.png": b"GIF89a not really"}, ASKED)
        assert kind == "error" and "image 1 (a.png) is not an image lf reads" in json.dumps(said)
        # larger than a message's images may be: Gradio refuses it as it arrives, before any handler
        big = client.post("/gradio_api/upload", files=[("files", ("big.png", plain_png(1, 1) + bytes(5000)))])
        assert big.status_code == 413, big.text
    with logged_in(text_url) as client:
        kind, said = _upload_and_call(client, {"a.png": png(image)}, ASKED)
        assert kind == "error" and NO_IMAGES in json.dumps(said)
        kind, (board, *_) = _upload_and_call(client, {}, ASKED)  # text still answered
        assert kind == "complete" and board[-1]["role"] == "assistant"


def asked_in_a_browser(url: str, upload: str, shown: str, expected: str) -> tuple[str, int]:
    """Logs into the webchat page at `url` in headless Chromium, uploads the file `upload`, asks ASKED greedily for
    4 tokens: (the reply as the page shows it, how many `shown` elements the conversation holds), read once the
    reply reads `expected` (it streams in) or a minute has passed, and the upload is drawn."""
    from playwright.sync_api import TimeoutError as PageTimeout, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(url)
        page.get_by_label("username").fill(USER[0])
        page.get_by_label("password").fill(USER[1])
        page.get_by_role("button", name="Login").click()
        page.locator("#chat_images input[type=file]").set_input_files(upload)
        page.wait_for_selector(f"#chat_images >> text={Path(upload).name}")
        page.get_by_text("generation settings").first.click()
        for label, value in (("max_new_tokens", "4"), ("temperature (0: greedy)", "0")):
            page.get_by_label(label).last.fill(value)
            page.get_by_label(label).last.press("Enter")
        page.get_by_label("message").fill(ASKED)
        page.get_by_role("button", name="Send").click()
        reply = page.locator('#chatbot [data-testid="bot"]')
        try:
            page.wait_for_function("e => { const m = document.querySelector('#chatbot [data-testid=bot]'); "
                                   "return m && m.innerText.trim() === e; }", arg=expected, timeout=60_000)
            page.wait_for_selector(f"#chatbot {shown}", state="attached", timeout=10_000)
        except PageTimeout:
            pass  # the assertions say what the page shows instead
        reply = reply.inner_text().strip() if reply.count() else ""
        count = page.locator(f"#chatbot {shown}").count()
        browser.close()
    return reply, count


def test_webchat_in_a_browser_answers_an_uploaded_image(served, vl_engine, tmp_path):
    image = picture(40, 30)
    expected = vl_engine.generate([{"role": "user", "content": f"<image>{ASKED}"}], images=[image],
                                  max_new_tokens=4, temperature=0)[0].text
    reply, pictures = asked_in_a_browser(served[0], saved(tmp_path, "a.png", png(image)), "img", expected.strip())
    assert reply == expected.strip()
    assert pictures == 1  # the uploaded picture, shown in the conversation


def test_webchat_refuses_a_bad_image_limit_before_loading_the_model(monkeypatch):
    from lf.errors import ConfigError
    from lf.serve import webchat

    monkeypatch.setenv("API_MAX_IMAGE_PIXELS", "0")
    monkeypatch.setattr(webchat, "open_engine", lambda cfg: pytest.fail("loaded the model first"))
    with pytest.raises(ConfigError, match="API_MAX_IMAGE_PIXELS='0' is not a whole number from 1"):
        webchat.command(["model_name_or_path=lf-tiny-llama", "template=qwen"])
    monkeypatch.setenv("API_MAX_IMAGE_PIXELS", "100")
    assert Chat().limits == Limits(None, 16 * 2**20, 100)  # the web UI's Chat tab reads them too
