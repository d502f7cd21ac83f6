"""Images users attach (lf.serve.media), and their way through `lf api` and `lf chat`: content parts into
placeholders in order, data: and file: URLs decoded, and every refusal: http(s) (no fetching for strangers), file:
URLs without a media root, outside it, or escaping it by symlink or `..`, FIFOs and folders, bytes over the limit
(413, before decoding), decompression bombs (413 from the header, no pixel decoded), bad base64, what is no image
or a format lf does not open, video and audio parts. End to end: the tiny text model answers an image with a 400
and stays up; with the refusal lifted, the engine gets the placeholders and the images in order."""

import base64
import io
import os
import struct
import sys
import zlib

import httpx
import pytest
from PIL import Image, ImageFile

from lf import cli
from lf.serve import RequestError
from lf.serve import chat as lf_chat
from lf.serve.app import create_app
from lf.serve.engine import Engine
from lf.serve.media import IMAGE, Images, Limits, MediaError, conversation_content, open_image
from test_serve_api import engine, live_server, url
from test_serve_engine import QUESTION, lf_home, one_thread

__all__ = ["engine", "lf_home", "one_thread", "url"]  # fixtures of the API and engine tests, used here too

CHAT = "/v1/chat/completions"
NO_IMAGES = ("this model/template (qwen) does not take image input; templates that do: gemma3 (gemma3 models), "
             "intern_vl (internvl models), llava (llava models), llava_next (llava_next models), qwen2_omni "
             "(qwen2_5_omni/qwen2_5_omni_thinker models), qwen2_vl "
             "(qwen2_vl/qwen2_5_vl models), qwen3_vl (qwen3_vl models), qwen3_vl_nothink (qwen3_vl models); this "
             "llama model reads text only: send text")


def png(width: int, height: int, color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG's signature and header, declaring width x height, and no pixel data: what a bomb looks like to a reader
    of headers (and a damaged image to a decoder)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture
def root(tmp_path):
    """A media root with two images, a symlink out of it, a FIFO and a folder; a secret beside it."""
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "a.png").write_bytes(png(3, 2))
    (media / "sub" / "b.jpg").write_bytes(png(5, 4))  # named .jpg: the bytes decide, not the name
    (tmp_path / "secret.png").write_bytes(png(1, 1))
    (media / "escape.png").symlink_to(tmp_path / "secret.png")
    os.mkfifo(media / "fifo.png")
    return media


def refusal(url: str, limits: Limits = Limits(), status: int = 400) -> str:
    with pytest.raises(MediaError) as caught:
        Images(limits).load(url)
    assert caught.value.status == status, str(caught.value)
    return str(caught.value)


# ---- the module ----

def test_content_parts_become_placeholders_in_order():
    parts = [{"type": "text", "text": "Compare "}, part("data:a"), {"type": "text", "text": " with "},
             part("file:///b"), {"type": "text", "text": "."}]
    assert conversation_content(parts, "messages[0]") == (f"Compare {IMAGE} with {IMAGE}.",
                                                          [("images", "data:a"), ("images", "file:///b")])
    audio = {"data": "AAAA", "format": "wav"}
    parts = [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, {"type": "text", "text": "hi"},
             {"type": "input_audio", "input_audio": audio}]
    assert conversation_content(parts, "messages[2]") == ("<video>hi<audio>", [
        ("videos", "data:video/mp4;base64,AAAA"), ("audios", audio)])
    with pytest.raises(MediaError, match=r"^messages\[2\]\.content\[0\] has type 'file': the parts taken are text, "
                                         r"image_url, video_url, input_audio$"):
        conversation_content([{"type": "file", "file": {}}], "messages[2]")


def test_data_and_file_urls_decode_to_rgb_images_in_order(root):
    decoder = Images(Limits(root=str(root)))
    jpeg = io.BytesIO()
    Image.new("L", (7, 6), 128).save(jpeg, "JPEG")
    images = [decoder.load(data_url(png(3, 2, "blue"))), decoder.load(f"file://{root}/sub/b.jpg"),
              decoder.load(data_url(jpeg.getvalue(), "jpeg")), decoder.load(f"file://localhost{root}/a.png")]
    assert [(i.size, i.mode) for i in images] == [((3, 2), "RGB"), ((5, 4), "RGB"), ((7, 6), "RGB"), ((3, 2), "RGB")]
    assert images[0].getpixel((0, 0)) == (0, 0, 255) and images[1].getpixel((4, 3)) == (255, 0, 0)
    spaced = "data:image/png;base64," + "\n".join(base64.encodebytes(png(2, 2)).decode().split())  # line breaks
    assert decoder.load(spaced).size == (2, 2) and decoder.count == 5


def test_network_urls_are_refused_the_server_fetches_nothing():
    for scheme in ("http", "https", "HTTPS"):
        assert refusal(f"{scheme}://169.254.169.254/latest/meta-data") == (
            f"image 1 is an {scheme.lower()} URL: this server fetches nothing from the network; send the image itself "
            f"as a data:image/...;base64, URL")
    assert refusal("ftp://host/a.png").startswith("image 1 is not a data: or file: URL ('ftp://host/a.png')")
    assert "..." in refusal("gopher://" + "x" * 500) and len(refusal("gopher://" + "x" * 500)) < 300


def test_file_urls_are_read_only_under_the_media_root(root, tmp_path):
    assert refusal(f"file://{root}/a.png") == (
        "image 1 is a file: URL, but this server reads no local files (API_MEDIA_ROOT is not set): send the image "
        "as a data:image/...;base64, URL")
    limits = Limits(root=str(root))
    outside = "is not in the server's media folder (API_MEDIA_ROOT; symlinks and .. followed): name a file in it, " \
              "or send a data: URL"
    for escape in (f"{tmp_path}/secret.png", f"{root}/escape.png", f"{root}/../secret.png",
                   f"{root}/sub/../../secret.png", "/etc/passwd", f"{root}/%00a.png", f"{root}x/a.png"):
        message = refusal(f"file://{escape}", limits)
        assert message == f"image 1: 'file://{escape}' {outside}"
    assert refusal("file://other-host/etc/passwd", limits).endswith("is not a local file URL: write it "
                                                                    "file:///absolute/path")
    assert refusal("file:relative.png", limits).endswith(outside)
    assert refusal(f"file://{root}/fifo.png", limits).endswith("is not a regular file: name a media file")
    assert refusal(f"file://{root}/sub", limits).endswith("is not a regular file: name a media file")
    assert refusal(f"file://{root}/missing.png", limits).endswith("(No such file or directory): check the path")
    link_root = tmp_path / "link-to-media"  # a root that is itself a symlink: its files are in it
    link_root.symlink_to(root)
    assert Images(Limits(root=str(link_root))).load(f"file://{root}/a.png").size == (3, 2)


def test_images_over_the_byte_limit_get_a_413_before_decoding(root, monkeypatch):
    image = png(3, 2)
    says = "brings the request's media over {} bytes, the server's limit for them together (API_MAX_IMAGE_BYTES): " \
           "send smaller or fewer files"
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("decoded a data: URL over the limit"))
    assert refusal(data_url(image), Limits(max_bytes=len(image) - 4), 413) == "image 1 " + says.format(len(image) - 4)
    monkeypatch.undo()
    decoder = Images(Limits(root=str(root), max_bytes=len(image) + 10))  # the limit counts a request's images together
    decoder.load(f"file://{root}/a.png")
    with pytest.raises(MediaError) as caught:
        decoder.load(data_url(image))
    assert (caught.value.status, str(caught.value)) == (413, "image 2 " + says.format(len(image) + 10))
    assert refusal(f"file://{root}/a.png", Limits(root=str(root), max_bytes=10), 413) == "image 1 " + says.format(10)


def test_decompression_bombs_are_refused_from_their_header(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded the pixels of a bomb"))
    assert refusal(data_url(header_only_png(5000, 5000)), status=413) == (
        "image 1 is 5000x5000 pixels, which brings the request's images over 16777216 pixels, the server's limit for "
        "them together (API_MAX_IMAGE_PIXELS): send smaller images")
    # past Pillow's own ceiling Pillow refuses it as it reads the header
    assert refusal(data_url(header_only_png(50000, 50000)), status=413) == (
        f"image 1 declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels: send a smaller image")
    decoder = Images(Limits(max_pixels=40))  # the pixels of a request's images together
    monkeypatch.undo()
    decoder.load(data_url(png(5, 5)))
    with pytest.raises(MediaError, match="image 2 is 5x4 pixels, which brings the request's images over 40 pixels"):
        decoder.load(data_url(png(5, 4)))


@pytest.mark.parametrize("url, says", [
    ("data:image/png;base64,iVBOR*w0K", "image 1: its data: URL is not valid base64 (Only base64 data is allowed): "
                                        "encode the image's bytes with standard base64"),
    ("data:image/png;base64,iVBORw0", "image 1: its data: URL is not valid base64"),
    (data_url(b"hello, not an image"), "image 1 is not an image lf reads (PNG, JPEG, WEBP, GIF, BMP): send one of "
                                       "those"),
    # Pillow reads EPS by running Ghostscript: never opened
    (data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "image 1 is not an image lf reads"),
    (data_url(header_only_png(2, 2)), "image 1 is damaged and cannot be decoded"),
    ("data:text/plain;base64,aGk=", "image 1 is a data: URL, but not data:image/<format>;base64,<data> "
                                    "('data:text/plain;base64')"),
    ("data:image/png,rawbytes", "image 1 is a data: URL, but not data:image/<format>;base64,<data>"),
    ("just text", "image 1 is not a data: or file: URL ('just text'): send a data:image/...;base64, URL"),
], ids=["bad-character", "bad-padding", "not-an-image", "eps", "damaged", "not-image-mime", "not-base64", "no-url"])
def test_malformed_images_get_a_400_naming_the_problem(url, says):
    assert refusal(url).startswith(says)


def test_open_image_for_the_chat_reads_the_users_files(tmp_path):
    (tmp_path / "a.png").write_bytes(png(3, 2))
    assert open_image(str(tmp_path / "a.png")).size == (3, 2)
    with pytest.raises(MediaError, match=f"cannot read '{tmp_path}/missing.png': No such file or directory"):
        open_image(str(tmp_path / "missing.png"))
    with pytest.raises(MediaError, match="is 3x2 pixels, more than 5: resize it first"):
        open_image(str(tmp_path / "a.png"), max_pixels=5)


# ---- the engine and lf api ----

@pytest.fixture
def seam_open(engine, monkeypatch):
    """The engine with its image refusal lifted, as for an image model (the tiny text model reads the placeholders)."""
    monkeypatch.setattr(engine, "image_refusal", None)
    return engine


def test_the_engine_refuses_images_for_a_text_model_and_checks_placeholders(engine, monkeypatch):
    assert engine.image_refusal == NO_IMAGES
    image = Image.new("RGB", (2, 2))
    with pytest.raises(RequestError, match="does not take image input"):
        engine.stream([{"role": "user", "content": f"{IMAGE}What is this?"}], images=[image])
    monkeypatch.setattr(engine, "image_refusal", None)
    with pytest.raises(RequestError, match=f"the conversation has 1 {IMAGE} placeholder\\(s\\) for 2 image\\(s\\): "
                                           "write one where each image goes"):
        engine.stream([{"role": "user", "content": f"{IMAGE}What is this?"}], images=[image, image])


def image_question(*urls: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                      *[part(u) for u in urls]]}], "max_tokens": 2}


def message(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_a_text_model_answers_an_image_with_a_400_and_stays_up(url):
    for sent in (data_url(png(3, 2)), "http://example.com/a.png", data_url(header_only_png(50000, 50000))):
        assert message(httpx.post(url + CHAT, json=image_question(sent)), 400) == NO_IMAGES  # nothing decoded
    text_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2}
    assert httpx.post(url + CHAT, json=text_parts).status_code == 200
    video = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:,"}}]}]}
    assert message(httpx.post(url + CHAT, json=video), 400) == (
        "this model/template (qwen) does not take video input; templates that do: qwen2_omni (qwen2_5_omni/"
        "qwen2_5_omni_thinker models), qwen2_vl (qwen2_vl/qwen2_5_vl "
        "models), qwen3_vl (qwen3_vl models), qwen3_vl_nothink (qwen3_vl models); this llama model reads text only: "
        "send text")  # nothing decoded
    unknown = {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}
    assert "does not match any of the expected tags: 'text', 'image_url', 'video_url', 'input_audio'" in message(
        httpx.post(url + CHAT, json=unknown), 400)
    system = {"messages": [{"role": "system", "content": [part(data_url(png(1, 1)))]}, *QUESTION]}
    assert message(httpx.post(url + CHAT, json=system), 400) == "messages[0] (system) has an image: images go in " \
                                                                "user messages"
    assert httpx.post(url + CHAT, json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_images_reach_the_engine_as_placeholders_and_images_in_order(seam_open, root, monkeypatch):
    seen = []
    streams = Engine.streams
    monkeypatch.setattr(Engine, "streams", lambda self, messages, *a, images=(), **k: seen.append(
        (messages, [i.size for i in images])) or streams(self, messages, *a, images=images, **k))
    body = {"messages": [{"role": "user", "content": [part(data_url(png(3, 2))), {"type": "text", "text": "and"},
                                                      part(f"file://{root}/sub/b.jpg")]},
                         {"role": "assistant", "content": "Two squares."},
                         {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                                      part(f"file://{root}/a.png")]}], "max_tokens": 2}
    with live_server(create_app(seam_open, media=Limits(root=str(root)))) as base:
        assert httpx.post(base + CHAT, json=body).status_code == 200
        assert seen == [([{"role": "user", "content": f"{IMAGE}and{IMAGE}"},
                          {"role": "assistant", "content": "Two squares."},
                          {"role": "user", "content": f"And this?{IMAGE}"}], [(3, 2), (5, 4), (3, 2)])]

        # the refusals over HTTP, each with its status, and the server still answering after them
        for sent, status, says in (
                ("https://example.com/a.png", 400, "image 1 is an https URL: this server fetches nothing"),
                (f"file://{root}/escape.png", 400, "is not in the server's media folder (API_MEDIA_ROOT"),
                (data_url(header_only_png(5000, 5000)), 413, "image 1 is 5000x5000 pixels, which brings"),
                ("data:image/png;base64,@@", 400, "image 1: its data: URL is not valid base64")):
            assert says in message(httpx.post(base + CHAT, json=image_question(sent)), status)
        assert httpx.post(base + CHAT, json=image_question(data_url(png(2, 2)))).status_code == 200
    with live_server(create_app(seam_open, max_body_bytes=10_000)) as base:  # an image counts toward the body
        assert "larger than 10000 bytes" in message(httpx.post(base + CHAT, json=image_question(
            data_url(os.urandom(9_000)))), 413)
    with live_server(create_app(seam_open, media=Limits(max_bytes=100))) as base:
        two = image_question(data_url(png(9, 9)), data_url(png(9, 9)))  # 2 x 75 bytes
        assert "image 2 brings the request's media over 100 bytes" in message(httpx.post(base + CHAT, json=two), 413)


def test_api_media_settings_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("API_MEDIA_ROOT", str(tmp_path / "nowhere"))
    assert cli.main(["api", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err == f"lf api: API_MEDIA_ROOT='{tmp_path / 'nowhere'}' is not a folder: name the " \
                                      f"folder whose images clients may send as file: URLs, or unset it (images " \
                                      f"then come only as data: URLs)\n"
    monkeypatch.setenv("API_MAX_IMAGE_PIXELS", "0")
    assert cli.main(["api", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err.startswith("lf api: API_MAX_IMAGE_PIXELS='0' is not a whole number from 1")


# ---- lf chat ----

def chat_with(engine, monkeypatch, capsys, typed: str) -> tuple[list, str]:
    """Runs the chat over `typed`; returns what each reply was asked (messages, image sizes) and the output."""
    seen = []
    stream = Engine.stream
    monkeypatch.setattr(Engine, "stream", lambda self, messages, *a, images=(), **k: seen.append(
        (messages, [i.size for i in images])) or stream(self, messages, *a, images=images, max_new_tokens=2, **k))
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    assert lf_chat.chat(engine) == 0
    return seen, capsys.readouterr().out


def test_chat_image_lines_refused_in_one_line_without_ending_the_session(engine, monkeypatch, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png(3, 2))
    seen, out = chat_with(engine, monkeypatch, capsys, f"/image {tmp_path}/a.png\n/image\nhello\n"
                                                       f"{'a' * (engine.max_chars + 1)}\nstill here\nexit\n")
    assert f"\nUser: {NO_IMAGES}\n" in out and "\nUser: /image needs a file: /image path/to/picture.jpg\n" in out
    assert [images for _, images in seen] == [[], [], []] and seen[-1][0][-1]["content"] == "still here"
    assert "characters, more than the model's context" in out and out.count("Assistant: ") == 3
    assert "`/image PATH` on a line of its own attaches an image" in out  # the help says how


def test_chat_attaches_images_to_the_next_message_and_keeps_them_with_the_history(seam_open, monkeypatch, capsys,
                                                                                  tmp_path):
    (tmp_path / "a.png").write_bytes(png(3, 2))
    (tmp_path / "b.png").write_bytes(png(5, 4))
    (tmp_path / "text.png").write_text("not an image")
    typed = (f"/image {tmp_path}/a.png\n/image '{tmp_path}/b.png'\n/image {tmp_path}/missing.png\n"
             f"/image {tmp_path}/text.png\nCompare them\nAnd now?\nclear\nhi\nexit\n")
    seen, out = chat_with(seam_open, monkeypatch, capsys, typed)
    assert "Attached 1 image(s) to your next message." in out and "Attached 2 image(s)" in out
    assert f"not attached: cannot read '{tmp_path}/missing.png': No such file or directory\n" in out
    assert f"not attached: '{tmp_path}/text.png' is not an image lf reads" in out
    first = {"role": "user", "content": f"{IMAGE}{IMAGE}Compare them"}
    assert seen[0] == ([first], [(3, 2), (5, 4)])
    assert seen[1][0][0] == first and seen[1][0][2] == {"role": "user", "content": "And now?"}
    assert seen[1][1] == [(3, 2), (5, 4)]  # the history's images go with its placeholders
    assert seen[2] == ([{"role": "user", "content": "hi"}], [])
