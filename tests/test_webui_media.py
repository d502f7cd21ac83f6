"""Videos and audio clips uploaded to the web chat (`lf webchat`, the Chat tab of `lf webui`), as `lf chat`'s /video
and /audio lines send them: the reply equals the engine's for the same file (the tiny Qwen2-VL and Qwen2-Audio of
test_multimodal.py on LLaMA-Factory's demo media), the files stay with the conversation, and what a stranger may
upload is bounded as `lf api` bounds it, before anything is decoded: only known containers (by their bytes, not
their names) and video codecs, a message's bytes together, a video's frame size, a clip's length; a model that takes
no such media refuses it in one line. Driven directly, over HTTP (Gradio's upload and call API, behind a login,
including a path the client did not upload) and in headless Chromium."""

import inspect
import io
import json

import numpy as np
import pytest
from support import one_thread  # noqa: F401 (autouse: tiny models run fastest on one thread)
from test_multimodal import qwen2_audio, qwen2_vl, shared_data  # noqa: F401 (session fixtures: the tiny models)
from test_multimodal_use import ASKED, engine_for, picture, png
from test_train import lf_home  # noqa: F401 (autouse: the tiny text model in a temporary LF_HOME)
from test_webui_http import logged_in
from test_webui_images import SETTINGS, _upload_and_call, answered, asked_in_a_browser, refusal, saved, serving

from lf.serve import media
from lf.serve.media import Images, Limits
from lf.serve.webui import Chat, Conversation

pytestmark = pytest.mark.filterwarnings("ignore")
VIDEO, CLIP = "4.mp4", "2.wav"  # of LLaMA-Factory's mllm_demo_data: H.264 in MP4, 16 kHz PCM in WAV


def demo_bytes(name: str) -> bytes:
    return (shared_data() / "mllm_demo_data" / name).read_bytes()


@pytest.fixture(scope="module")
def video_engine(qwen2_vl):
    return engine_for(qwen2_vl, "qwen2_vl", video_maxlen=4)


@pytest.fixture(scope="module")
def audio_engine(qwen2_audio):
    return engine_for(qwen2_audio, "qwen2_audio")


def engines_answer(engine, messages, **media) -> str:
    return engine.generate(messages, max_new_tokens=4, temperature=0, **media)[0].text


def encoded(codec: str, container: str, size: int = 16) -> bytes:
    """Two black frames in `codec`, in `container` (PyAV's encoder)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container) as file:
        stream = file.add_stream(codec, rate=2)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(2):
            file.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), format="rgb24")))
        file.mux(stream.encode())
    return out.getvalue()


def test_an_uploaded_video_gets_the_engines_answer_and_stays_with_the_conversation(video_engine, tmp_path):
    video = saved(tmp_path, "clip.mp4", demo_bytes(VIDEO))
    image = picture(60, 40)
    chat = Chat(video_engine)
    board, conversation, box, upload = answered(chat, Conversation(), ASKED, [video])[-1]
    asked = [{"role": "user", "content": f"<video>{ASKED}"}]
    expected = engines_answer(video_engine, asked, files={"videos": [str(shared_data() / "mllm_demo_data" / VIDEO)]})
    assert conversation.messages == (*asked, {"role": "assistant", "content": expected})
    assert board[0] == {"role": "user", "content": {"path": video}} and board[-1]["content"] == expected
    assert conversation.files == (("videos", demo_bytes(VIDEO)),) and box == "" and upload is None
    # the next message's image and video join the first video: the engine gets all of them, in order
    later = answered(chat, conversation, "And these?", [saved(tmp_path, "a.png", png(image)), video])[-1][1]
    asked = [*conversation.messages, {"role": "user", "content": "<image><video>And these?"}]
    path = str(shared_data() / "mllm_demo_data" / VIDEO)
    assert later.messages[-1]["content"] == engines_answer(video_engine, asked, images=[image],
                                                          files={"videos": [path, path]})
    assert later.messages[:-1] == tuple(asked) and len(later.files) == 2 and len(later.images) == 1


def test_an_uploaded_clip_gets_the_engines_answer(audio_engine, tmp_path):
    clip = saved(tmp_path, "voice.wav", demo_bytes(CLIP))
    _, conversation, _, _ = answered(Chat(audio_engine), Conversation(), ASKED, [clip])[-1]
    asked = [{"role": "user", "content": f"<audio>{ASKED}"}]
    assert conversation.messages == (*asked, {"role": "assistant", "content": engines_answer(
        audio_engine, asked, files={"audios": [str(shared_data() / "mllm_demo_data" / CLIP)]})})


def test_a_model_that_takes_no_such_media_refuses_it_in_one_line_before_reading_it(video_engine, audio_engine,
                                                                                  tmp_path, monkeypatch):
    monkeypatch.setattr(Images, "_read", lambda *a: pytest.fail("read an upload the model refuses"))
    got = refusal(Chat(video_engine), ASKED, [saved(tmp_path, "a.mp3", demo_bytes("4.mp3"))])
    assert got == video_engine.refusal("audios") and "\n" not in got
    assert got.startswith("this model/template (qwen2_vl) does not take audio input; templates that do: qwen2_audio")
    got = refusal(Chat(audio_engine), ASKED, [saved(tmp_path, "a.mp4", demo_bytes(VIDEO))])
    assert got == audio_engine.refusal("videos") and "does not take video input" in got


PLAYLIST = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"


@pytest.mark.parametrize("name, data, limits, says", [
    ("notes.txt", b"hello", Limits(), "notes.txt: the chat takes .apng, .avi, .bmp, "),
    # FFmpeg would guess a playlist from these bytes and read the files it names: refused by its first bytes
    ("x.mp4", PLAYLIST, Limits(), "video 1 (x.mp4) is not a video lf opens (MP4/MOV, Matroska/WebM or AVI)"),
    ("x.avi", b"RIFF\x10\x00\x00\x00AVI LIST", Limits(), "video 1 (x.avi) is damaged or not the video its first"),
    ("x.mkv", encoded("ffv1", "matroska"), Limits(), "video 1 (x.mkv) holds ffv1 video: lf decodes h264, hevc, vp8"),
    ("x.mp4", demo_bytes(VIDEO), Limits(max_pixels=1000), "video 1 (x.mp4) has frames of "),
    ("x.mp4", demo_bytes(VIDEO), Limits(max_bytes=1000), "video 1 (x.mp4) brings the request's media over 1000 "),
    ("x.wav", PLAYLIST, Limits(), "audio 1 (x.wav) is not an audio clip lf opens (WAV, FLAC, Ogg or MP3)"),
    ("x.wav", b"RIFF\x10\x00\x00\x00WAVEfmt ", Limits(), "audio 1 (x.wav) is damaged or not the audio its first"),
], ids=["unknown-name", "playlist", "damaged-video", "codec", "frame-pixels", "bytes", "not-audio", "damaged-audio"])
def test_uploads_meet_the_apis_checks_before_any_decoding(video_engine, audio_engine, tmp_path, monkeypatch, name,
                                                          data, limits, says):
    import av

    monkeypatch.setattr(av.container.InputContainer, "decode", lambda *a, **k: pytest.fail("decoded a refused file"))
    engine = audio_engine if name.endswith(".wav") else video_engine
    got = refusal(Chat(engine, limits), ASKED, [saved(tmp_path, name, data)])
    assert got.startswith(says) and "\n" not in got, got


def test_a_clip_longer_than_the_limit_is_refused_from_its_header(audio_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 2)
    got = refusal(Chat(audio_engine), ASKED, [saved(tmp_path, "x.wav", demo_bytes(CLIP))])  # 2.9 s
    assert got == "audio 1 (x.wav) lasts 3 s, more than 2 s, the server's limit for a clip: send a shorter one"


@pytest.fixture(scope="module")
def served(video_engine, audio_engine):
    """(the video model's page URL, the audio one's), a message's files within the larger demo file and a bit (not
    two videos)."""
    most = max(len(demo_bytes(VIDEO)), len(demo_bytes(CLIP)))
    assert 2 * len(demo_bytes(VIDEO)) > most + 1000
    yield from serving((video_engine, audio_engine), Limits(max_bytes=most + 1000))


def test_webchat_over_http_answers_uploads_and_reads_no_path_it_did_not_receive(served, video_engine, audio_engine,
                                                                                tmp_path):
    video_url, audio_url = served
    path = str(shared_data() / "mllm_demo_data" / VIDEO)
    expected = engines_answer(video_engine, [{"role": "user", "content": f"<video>{ASKED}"}], files={"videos": [path]})
    with logged_in(video_url) as client:
        kind, (board, _, box, upload) = _upload_and_call(client, {"a.mp4": demo_bytes(VIDEO)}, ASKED)
        assert kind == "complete" and box == "" and upload is None
        assert board[-1]["content"] == [{"type": "text", "text": inspect.cleandoc(expected)}], board
        kind, said = _upload_and_call(client, {"a.mp4": PLAYLIST}, ASKED)
        assert kind == "error" and "video 1 (a.mp4) is not a video lf opens" in json.dumps(said)
        # a file the client names but never uploaded (a server path) is not read: Gradio refuses it
        secret = saved(tmp_path, "secret.mp4", demo_bytes(VIDEO))
        posted = client.post("/gradio_api/call/chat", json={"data": [ASKED, [
            {"path": secret, "orig_name": "a.mp4", "meta": {"_type": "gradio.FileData"}}], *SETTINGS]})
        assert posted.status_code != 200 or "error" in client.get(
            f"/gradio_api/call/chat/{posted.json()['event_id']}").text
        # two uploads, each within the limit, are over a message's bytes together: the second is refused unread
        kind, said = _upload_and_call(client, {"a.mp4": demo_bytes(VIDEO), "b.mp4": demo_bytes(VIDEO)}, ASKED,
                                      one_by_one=True)
        assert kind == "error" and "video 2 (b.mp4) brings the request's media over" in json.dumps(said)
    with logged_in(audio_url) as client:
        kind, (board, *_) = _upload_and_call(client, {"a.wav": demo_bytes(CLIP)}, ASKED)
        expected = engines_answer(audio_engine, [{"role": "user", "content": f"<audio>{ASKED}"}],
                                  files={"audios": [str(shared_data() / "mllm_demo_data" / CLIP)]})
        assert kind == "complete" and board[-1]["content"] == [{"type": "text", "text": inspect.cleandoc(expected)}]
        kind, said = _upload_and_call(client, {"a.mp4": demo_bytes(VIDEO)}, ASKED)
        assert kind == "error" and "does not take video input" in json.dumps(said)


def test_webchat_in_a_browser_answers_an_uploaded_video(served, video_engine, tmp_path):
    path = str(shared_data() / "mllm_demo_data" / VIDEO)
    expected = engines_answer(video_engine, [{"role": "user", "content": f"<video>{ASKED}"}], files={"videos": [path]})
    # the page shows an uploaded video as a component of its own (its player is drawn when it is looked at)
    reply, videos = asked_in_a_browser(served[0], saved(tmp_path, "clip.mp4", demo_bytes(VIDEO)),
                                       "[aria-label=\"user's message: a component of type video\"]", expected.strip())
    assert reply == expected.strip()
    assert videos == 1
