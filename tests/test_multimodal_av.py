"""Videos and audio: lf's rows and batches for LLaMA-Factory's mllm_video_demo (Qwen2-VL) and mllm_audio_demo
(Qwen2-Audio) against the families' own transformers processors, `lf train` and do_predict on each demo, the
bad-input errors, generating with lf's patched forward, and the engine behind `lf chat` (/video, /audio) and its
batch.

Qwen2-VL's processor holds a video processor that needs torchvision, which cannot load here: it runs in a
subprocess beside test_media_decode's stand-in torchvision (the frames it gets are the ones lf's sampling keeps,
which test_media_decode checks against LLaMA-Factory's rule). Qwen2-Audio's processor needs no torchvision."""

import base64
import dataclasses
import io
import json
import re
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from lf.data import collator, get_dataset
from lf.data.audio import read_audio
from lf.data.video import qwen2_vl_video_inputs, read_video
from lf.errors import DataError
from lf.serve import chat as lf_chat
from lf.serve.app import create_app
from lf.serve.media import Limits
from test_media_decode import beside_stand_in
from test_multimodal_use import batched_answers, engine_for, predictions
from test_serve_api import live_server
from test_multimodal import (chat, prepared, qwen2_5_vl, qwen2_audio, qwen2_vl, qwen3_vl, shared_data, tokenize,
                             train, write_dataset)

__all__ = ["qwen2_5_vl", "qwen2_audio", "qwen2_vl", "qwen3_vl"]  # the fixtures, used here too
pytestmark = pytest.mark.filterwarnings("ignore")
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def demo(name: str) -> list[dict]:
    return json.loads((shared_data() / f"{name}.json").read_text())


def rendered(p, row, placeholder: str, replacement: str) -> str:
    """The row's conversation as lf's template writes it, each placeholder replaced as the processor wants it."""
    messages = [{"role": m["role"], "content": m["content"].replace(placeholder, replacement)}
                for m in row["messages"]]
    return p.template.render(messages, tokenizer=p.tokenizer)


RUN_QWEN_VL_PROCESSOR = """
import importlib, sys, torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.video_utils import VideoMetadata
family, Family, model, texts, videos, metadata = torch.load(sys.argv[1])
video_processor = getattr(importlib.import_module(f"transformers.models.{family}.video_processing_{family}"),
                          f"{Family}VideoProcessor").from_pretrained(model)
processor = getattr(importlib.import_module("transformers"), f"{Family}Processor")(
    image_processor=Qwen2VLImageProcessorPil.from_pretrained(model), tokenizer=AutoTokenizer.from_pretrained(model),
    video_processor=video_processor)
kwargs = dict(video_metadata=[VideoMetadata(**m) for m in metadata]) if metadata else {}
out = processor(text=texts, videos=[v.numpy() for v in videos], return_tensors="pt", padding=True,
                do_sample_frames=False, cap_pixels_per_frame=False, **kwargs)
torch.save({**out, "text": processor.tokenizer.batch_decode(out["input_ids"])}, sys.argv[2])
"""


def qwen_vl_processor(family: str, model: Path, texts: list[str], videos: list[np.ndarray], tmp_path: Path,
                      metadata=()) -> dict:
    """transformers' processor of a Qwen-VL family ("qwen2_vl", "qwen3_vl": Qwen2VLProcessor, Qwen3VLProcessor,
    with the model's tokenizer, image processor and video processor, the last read as transformers reads it:
    video_preprocessor_config.json, else preprocessor_config.json) on texts and
    videos (each frames x H x W x 3, uint8; `metadata`: each one's VideoMetadata keywords), in a subprocess beside
    the stand-in torchvision."""
    name = "Qwen" + family[4:].replace("_vl", "VL")  # Qwen2VL, Qwen3VL
    return beside_stand_in(RUN_QWEN_VL_PROCESSOR, (family, name, str(model), texts,
                                                   [torch.from_numpy(v) for v in videos], list(metadata)), tmp_path)


# -- rows equal the families' processors ------------------------------------------------------------------------


def test_qwen2_vl_video_rows_equal_qwen2_vl_processor(qwen2_vl, tmp_path):
    p = prepared(qwen2_vl, "qwen2_vl", dataset="mllm_video_demo", max_samples=2)
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    rows = demo("mllm_video_demo")[:2]
    texts = [rendered(p, row, "<video>", "<|vision_start|><|video_pad|><|vision_end|>") for row in rows]
    videos = [np.stack([np.asarray(frame) for frame in read_video(shared_data() / row["videos"][0]).frames])
              for row in rows]
    expected = qwen_vl_processor("qwen2_vl", qwen2_vl, texts, videos, tmp_path)
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(2)])
    for i in range(2):
        ids = data.train_dataset[i]["input_ids"]
        want = expected["input_ids"][i][expected["attention_mask"][i].bool()].tolist()
        assert ids == want[:len(ids)] and len(want) - len(ids) <= 1  # lf's rows end at the reply's <|im_end|>
        assert batch["mm_token_type_ids"][i, :len(ids)].tolist() == \
            expected["mm_token_type_ids"][i][expected["attention_mask"][i].bool()].tolist()[:len(ids)]
    assert set(batch["mm_token_type_ids"].unique().tolist()) == {0, 2}  # 2: video tokens
    assert torch.equal(batch["video_grid_thw"], expected["video_grid_thw"])
    assert torch.equal(batch["pixel_values_videos"], expected["pixel_values_videos"])
    assert "pixel_values" not in batch


def test_qwen3_vl_video_rows_equal_qwen3_vl_processor(qwen3_vl, tmp_path):
    """Qwen3VLProcessor writes each temporal patch's time before its own wrapped tokens, the times from the kept
    frames' places in the stream (VideoMetadata: frames_indices, fps), and sizes frames on one pixel budget for the
    whole video. It is given the bare <|video_pad|>: transformers 5.23 keeps the wrap around a wrapped one, which
    Qwen3-VL's own format (and LLaMA-Factory's) does not have. The model saves its video processor apart, with
    larger limits than its image processor's, as Qwen3-VL's checkpoints do: lf reads those."""
    import av

    from lf.data.video import qwen3_vl_size, sample_indices

    model = tmp_path / "model"
    shutil.copytree(qwen3_vl, model)
    settings = json.loads((model / "preprocessor_config.json").read_text())
    (model / "video_preprocessor_config.json").write_text(json.dumps({
        **{key: settings[key] for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                          "image_std")},
        "size": {"shortest_edge": 64 * 64, "longest_edge": 4 * 256 * 256},
        "video_processor_type": "Qwen3VLVideoProcessor"}))
    p = prepared(model, "qwen3_vl", dataset="mllm_video_demo")
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    rows = demo("mllm_video_demo")
    assert len(data.train_dataset) == len(rows)
    texts = [rendered(p, row, "<video>", "<|video_pad|>") for row in rows]
    videos, metadata = [], []
    for row in rows:
        path = shared_data() / row["videos"][0]
        videos.append(np.stack([np.asarray(frame) for frame in read_video(path).frames]))
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            kept = sample_indices(stream.frames, float(stream.duration * stream.time_base), 2.0, 128)
            metadata.append(dict(total_num_frames=stream.frames, fps=float(stream.average_rate),
                                 frames_indices=kept.tolist()))
    expected = qwen_vl_processor("qwen3_vl", model, texts, videos, tmp_path, metadata)
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(len(rows))])
    for i in range(len(rows)):
        ids = data.train_dataset[i]["input_ids"]
        mask = expected["attention_mask"][i].bool()
        want = expected["input_ids"][i][mask].tolist()
        assert ids == want[:len(ids)] and len(want) - len(ids) <= 1  # lf's rows end at the reply's <|im_end|>
        assert batch["mm_token_type_ids"][i, :len(ids)].tolist() == expected["mm_token_type_ids"][i][mask].tolist()[
            :len(ids)]
    grids = batch["video_grid_thw"]
    assert "<|im_start|>user\n<0.3 seconds><|vision_start|><|video_pad|>" in expected["text"][0]
    assert [len(re.findall(r"<\d+\.\d seconds><\|vision_start\|>", text)) for text in expected["text"]] == \
        grids[:, 0].tolist() and grids[:, 0].gt(1).all()  # several temporal patches, each timed
    assert torch.equal(batch["video_grid_thw"], expected["video_grid_thw"])
    assert torch.equal(batch["pixel_values_videos"], expected["pixel_values_videos"])
    on_image_settings = qwen2_vl_video_inputs([read_video(shared_data() / row["videos"][0]) for row in rows],
                                              p.media.image_processor, qwen3_vl_size)["video_grid_thw"]
    assert not torch.equal(on_image_settings, grids)  # the video processor's own limits made the difference
    p.media.save_pretrained(tmp_path / "saved")  # and checkpoints carry them
    assert json.loads((tmp_path / "saved" / "video_preprocessor_config.json").read_text()) == json.loads(
        (model / "video_preprocessor_config.json").read_text())


def test_qwen2_audio_rows_equal_qwen2_audio_processor(qwen2_audio):
    from transformers import AutoProcessor

    p = prepared(qwen2_audio, "qwen2_audio", dataset="mllm_audio_demo")
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    processor = AutoProcessor.from_pretrained(qwen2_audio)
    rows = demo("mllm_audio_demo")
    assert len(data.train_dataset) == len(rows)
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(len(rows))])
    features, masks = [], []
    for i, row in enumerate(rows):
        text = rendered(p, row, "<audio>", "<|audio_bos|><|AUDIO|><|audio_eos|>")
        clips = [read_audio(shared_data() / path) for path in row["audios"]]
        expected = processor(text=text, audio=clips, sampling_rate=16000, return_tensors="pt")
        ids = data.train_dataset[i]["input_ids"]
        assert ids == expected["input_ids"][0].tolist()[:len(ids)]
        assert ids.count(p.media.token_ids["audios"]) == sum(expected["input_ids"][0].eq(
            processor.audio_token_id).tolist()) > 0
        features.append(expected["input_features"])
        masks.append(expected["feature_attention_mask"])
    assert torch.equal(batch["input_features"], torch.cat(features))
    assert torch.equal(batch["feature_attention_mask"], torch.cat(masks))
    assert "mm_token_type_ids" not in batch  # Qwen2-Audio's processor gives none


def test_qwen2_5_vl_videos_carry_the_seconds_per_temporal_patch(qwen2_vl, qwen2_5_vl):
    """Qwen2.5-VL's videos are Qwen2-VL's plus second_per_grid_ts, which its processor computes as
    temporal_patch_size / the sampled frame rate (transformers' VideoMetadata.sampled_fps of the kept frames)."""
    import av
    from transformers.video_utils import VideoMetadata

    from lf.data.video import sample_indices

    batches = {}
    for name, model in (("qwen2_vl", qwen2_vl), ("qwen2_5_vl", qwen2_5_vl)):
        p = prepared(model, "qwen2_vl", dataset="mllm_video_demo", max_samples=2)
        assert p.media.plugin.name == name  # the template's family, read as the model's own entry
        data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
        batches[name] = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(2)])
    ours, theirs = batches["qwen2_5_vl"], batches["qwen2_vl"]
    assert "second_per_grid_ts" not in theirs
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ours[key], theirs[key]), key
    expected = []
    for row in demo("mllm_video_demo")[:2]:
        with av.open(str(shared_data() / row["videos"][0])) as container:
            stream = container.streams.video[0]
            kept = sample_indices(stream.frames, float(stream.duration * stream.time_base), 2.0, 128)
            metadata = VideoMetadata(total_num_frames=stream.frames, fps=float(stream.average_rate),
                                     frames_indices=kept.tolist())
        expected.append(2 / metadata.sampled_fps)  # the tiny model's temporal_patch_size: 2
    assert ours["second_per_grid_ts"].tolist() == pytest.approx(expected, rel=1e-6)


# -- training through lf train ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family, template, dataset", [
    ("qwen2_vl", "qwen2_vl", "mllm_video_demo"), ("qwen2_5_vl", "qwen2_vl", "mllm_video_demo"),
    ("qwen3_vl", "qwen3_vl", "mllm_video_demo"), ("qwen2_audio", "qwen2_audio", "mllm_audio_demo")])
def test_lf_train_on_the_video_and_audio_demos(request, tmp_path, family, template, dataset):
    model = request.getfixturevalue(family)
    # one batch of the same two examples, five times: the loss must fall
    out = train(tmp_path, model, template, dataset=dataset, max_samples=2, max_steps=5, learning_rate=1e-2,
                video_maxlen=4)
    losses = [entry["loss"] for entry in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
              if "loss" in entry]
    assert len(losses) == 5 and all(np.isfinite(losses)) and losses[-1] < losses[0]


# -- bad input -----------------------------------------------------------------------------------------------------


def video_chat(prompt, videos):
    return chat(prompt, videos, "videos")


VIDEO_COLUMNS = {"messages": "messages", "videos": "videos"}


def test_placeholder_count_differs_from_video_count(qwen2_vl, tmp_path):
    video = str(shared_data() / "mllm_demo_data" / "1.mp4")
    folder = write_dataset(tmp_path, [video_chat("<video>hi", [video]), video_chat("what?", [video])], VIDEO_COLUMNS)
    with pytest.raises(DataError, match=r"^dataset 'd' \(d.json\), row 1: 0 <video> placeholder\(s\) in its messages "
                                        r"but 1 video\(s\) in column 'videos'"):
        tokenize(qwen2_vl, "qwen2_vl", folder)


def test_unreadable_or_missing_video_is_named_by_its_path(qwen2_vl, tmp_path):
    (tmp_path / "bad.mp4").write_text("not a video")
    folder = write_dataset(tmp_path, [video_chat("<video>hi", ["bad.mp4"])], VIDEO_COLUMNS)
    with pytest.raises(DataError, match=rf"^cannot read video {tmp_path}/bad\.mp4: "):
        tokenize(qwen2_vl, "qwen2_vl", folder)
    write_dataset(tmp_path, [video_chat("<video>hi", ["clips/none.mp4"])], VIDEO_COLUMNS)
    with pytest.raises(DataError, match=rf"^video {tmp_path}/clips/none\.mp4: no such file"):
        tokenize(qwen2_vl, "qwen2_vl", folder)


def test_qwen3_vl_refuses_a_video_of_fewer_frames_than_a_temporal_patch(qwen3_vl):
    p = prepared(qwen3_vl, "qwen3_vl", dataset="mllm_video_demo", video_fps=0.01)  # one frame kept
    with pytest.raises(DataError, match=rf"^video {shared_data()}/mllm_demo_data/1\.mp4: 1 frame\(s\) kept, and "
                                        r"Qwen3-VL needs at least 2: raise video_fps"):
        get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)


def test_a_family_without_the_modality_refuses_it(qwen2_vl, qwen2_audio, tmp_path):
    audio = str(shared_data() / "mllm_demo_data" / "2.wav")
    folder = write_dataset(tmp_path, [chat("<audio>hi", [audio], "audios")],
                           {"messages": "messages", "audios": "audios"})
    with pytest.raises(DataError, match=r"^template qwen2_vl does not take audios \(dataset d has them; it takes "
                                        r"images, videos\): templates that do: qwen2_audio, qwen2_omni;"):
        tokenize(qwen2_vl, "qwen2_vl", folder)
    with pytest.raises(DataError, match=r"^template qwen does not take audio input; templates that do: qwen2_audio"):
        tokenize(qwen2_audio, "qwen", folder)


# -- generating -----------------------------------------------------------------------------------------------------


def test_patched_qwen2_audio_generates_from_audio_as_transformers_does(qwen2_audio):
    """lf's patched causal-LM forward names every plugin's forward inputs (generate() refuses others): Qwen2-Audio
    generates from input_features with lf's kernels as transformers' own model does."""
    import inspect

    from transformers import AutoModelForMultimodalLM, AutoProcessor

    from lf.data.mm_plugins import PLUGINS
    from lf.kernels import patch

    processor = AutoProcessor.from_pretrained(qwen2_audio)
    clip = read_audio(shared_data() / "mllm_demo_data" / "2.wav")
    inputs = processor(text="<|audio_bos|><|AUDIO|><|audio_eos|>What is it?", audio=[clip], sampling_rate=16000,
                       return_tensors="pt")
    plain = AutoModelForMultimodalLM.from_pretrained(qwen2_audio).eval()
    patched = AutoModelForMultimodalLM.from_pretrained(qwen2_audio).eval()
    report = patch(patched)
    assert "fused_linear_cross_entropy" in str(report)
    names = inspect.signature(patched.forward).parameters
    assert all(name in names for plugin in PLUGINS.values() for name in plugin.forward_inputs)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert patched.generate(**inputs, **kwargs).tolist() == plain.generate(**inputs, **kwargs).tolist()


@pytest.mark.parametrize("family, template, dataset, token", [
    ("qwen2_vl", "qwen2_vl", "mllm_video_demo", "<|video_pad|>"),
    ("qwen2_audio", "qwen2_audio", "mllm_audio_demo", "<|AUDIO|>")])
def test_do_predict_answers_the_video_and_audio_demos(request, tmp_path, family, template, dataset, token):
    model = request.getfixturevalue(family)
    rows = demo(dataset)[:4]
    batched = predictions(tmp_path, model, 2, template, dataset, video_maxlen=4)
    assert len(batched) == min(4, len(rows))
    assert [r["label"] for r in batched] == [row["messages"][-1]["content"] for row in rows[:len(batched)]]
    assert all(record["prompt"].count(token) > 0 and record["predict"] for record in batched)
    assert predictions(tmp_path, model, 1, template, dataset, video_maxlen=4) == batched  # batching changes nothing


# -- lf chat and the engine ---------------------------------------------------------------------------------------


def generated(monkeypatch, engine) -> list[dict]:
    """Each generate() call of the engine from now on: its tensor arguments and the tokens it returned."""
    calls, original = [], engine.model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        calls.append({**{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}, "out": out})
        return out

    monkeypatch.setattr(engine.model, "generate", generate)
    return calls


def test_engine_answers_audio_as_plain_generate_on_the_processors_inputs(qwen2_audio, monkeypatch):
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    engine = engine_for(qwen2_audio, "qwen2_audio")
    clip = shared_data() / "mllm_demo_data" / "2.wav"
    calls = generated(monkeypatch, engine)
    reply = engine.generate([{"role": "user", "content": "<audio>What is it?"}], files={"audios": [str(clip)]},
                            temperature=0)[0]
    text = engine.template.render([{"role": "user", "content": "<|audio_bos|><|AUDIO|><|audio_eos|>What is it?"}],
                                  add_generation_prompt=True, tokenizer=engine.tokenizer)
    inputs = AutoProcessor.from_pretrained(qwen2_audio)(text=text, audio=[read_audio(clip)], sampling_rate=16000,
                                                        return_tensors="pt")
    [call] = calls
    assert call["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert torch.equal(call["input_features"], inputs["input_features"])
    assert torch.equal(call["feature_attention_mask"], inputs["feature_attention_mask"])
    plain = AutoModelForMultimodalLM.from_pretrained(qwen2_audio).eval()
    expected = plain.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert call["out"].tolist() == expected.tolist() and reply.completion_tokens == 4


@pytest.mark.parametrize("family, template, asked", [
    ("qwen2_vl", "qwen2_vl", [("<video>What is it?", {"files": {"videos": ["4.mp4"]}}), ("Hello there", {}),
                              ("<image>And this?", {"images": ["1.jpg"]}),
                              ("<video>What happens here?", {"files": {"videos": ["1.mp4"]}})]),
    ("qwen2_audio", "qwen2_audio", [("<audio>What is it?", {"files": {"audios": ["2.wav"]}}), ("Hello there", {}),
                                    ("What do you hear? <audio>", {"files": {"audios": ["3.flac"]}})])])
def test_a_batched_engine_decodes_video_and_audio_requests_as_each_alone(request, monkeypatch, family, template,
                                                                         asked):
    """Video and audio requests join the batch beside text and image rows (prefilled together; Qwen2-VL's video
    frames get their 3-D positions): each reply equals the one generate gives the request alone."""
    from PIL import Image

    model, data = request.getfixturevalue(family), shared_data() / "mllm_demo_data"
    asked = [([{"role": "user", "content": text}],
              {"files": {c: [str(data / name) for name in names] for c, names in media["files"].items()}}
              if "files" in media else {"images": [Image.open(data / name) for name in media.get("images", ())]})
             for text, media in asked]
    alone = engine_for(model, template, video_maxlen=4)
    expected = [[r.text for r in alone.generate(messages, temperature=0, max_new_tokens=8, **media)]
                for messages, media in asked]
    together, prefills = batched_answers(engine_for(model, template, max_batch=8, video_maxlen=4), asked, monkeypatch)
    assert together == expected
    assert any(rows > 1 and media for rows, media in prefills), prefills


def test_lf_chat_attaches_a_video_and_refuses_what_the_model_does_not_take(qwen2_vl, monkeypatch, capsys):
    engine = engine_for(qwen2_vl, "qwen2_vl", video_maxlen=4)
    video = shared_data() / "mllm_demo_data" / "4.mp4"
    calls = generated(monkeypatch, engine)
    expected = engine.generate([{"role": "user", "content": "<video>What is it?"}], files={"videos": [str(video)]},
                               temperature=0)[0]
    frames = read_video(video, video_maxlen=4).frames
    grid = qwen2_vl_video_inputs([frames], engine.media.image_processor)["video_grid_thw"]
    assert torch.equal(calls[0]["video_grid_thw"], grid)
    assert calls[0]["input_ids"][0].tolist().count(engine.media.token_ids["videos"]) == int(grid.prod()) // 4
    assert (calls[0]["mm_token_type_ids"] == 2).sum() == int(grid.prod()) // 4
    monkeypatch.setattr(engine, "generating", dataclasses.replace(engine.generating, temperature=0))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/audio {video}\n/video {video}.missing\n/video {video}\n"
                                                  f"What is it?\nexit\n"))
    assert lf_chat.chat(engine) == 0
    out = capsys.readouterr().out
    assert "Attached 1 video(s) to your next message." in out and f"Assistant: {expected.text}\n" in out
    assert ("User: this model/template (qwen2_vl) does not take audio input; templates that do: qwen2_audio "
            "(qwen2_audio models), qwen2_omni (qwen2_5_omni/qwen2_5_omni_thinker models); this qwen2_vl model reads "
            "images, videos and text: send those\n") in out
    assert f"not attached: cannot read '{video}.missing': no such file" in out


def test_engine_answers_a_qwen3_vl_video_with_its_timed_frames(qwen3_vl, monkeypatch):
    """A served Qwen3-VL prompt carries the video as training rows do: each temporal patch's time before its own
    wrapped tokens, generate() given the video's features and token types."""
    from lf.data.video import qwen3_vl_size

    engine = engine_for(qwen3_vl, "qwen3_vl", video_maxlen=4)
    video = shared_data() / "mllm_demo_data" / "4.mp4"
    calls = generated(monkeypatch, engine)
    reply = engine.generate([{"role": "user", "content": "<video>What is it?"}], files={"videos": [str(video)]},
                            temperature=0)[0]
    [call] = calls
    grid = qwen2_vl_video_inputs([read_video(video, video_maxlen=4)], engine.media.image_processor,
                                 qwen3_vl_size)["video_grid_thw"]
    assert torch.equal(call["video_grid_thw"], grid) and int(grid[0, 0]) == 2
    prompt = engine.tokenizer.decode(call["input_ids"][0])
    frame = f"<|vision_start|>{'<|video_pad|>' * (int(grid[0, 1:].prod()) // 4)}<|vision_end|>"
    assert re.search(rf"<\|im_start\|>user\n<\d+\.\d seconds>{re.escape(frame)}<\d+\.\d seconds>"
                     rf"{re.escape(frame)}What is it\?<\|im_end\|>", prompt), prompt
    assert (call["mm_token_type_ids"] == 2).sum() == int(grid.prod()) // 4 and reply.completion_tokens > 0


# -- lf api -----------------------------------------------------------------------------------------------------------


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def ask(base: str, part: dict) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}], "temperature": 0})


def test_lf_api_answers_input_audio_and_video_url_as_the_engine_does(qwen2_audio, qwen2_vl, tmp_path):
    clip = shared_data() / "mllm_demo_data" / "2.wav"
    engine = engine_for(qwen2_audio, "qwen2_audio")
    expected = engine.generate([{"role": "user", "content": "<audio>What is it?"}], files={"audios": [str(clip)]},
                               temperature=0)[0]
    with live_server(create_app(engine)) as base:
        answer = ask(base, {"type": "input_audio", "input_audio": {"data": b64(clip), "format": "wav"}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == expected.text
        assert answer.json()["usage"]["prompt_tokens"] == expected.prompt_tokens
        video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
        assert ask(base, video).json()["error"]["message"] == (
            "this model/template (qwen2_audio) does not take video input; templates that do: qwen2_omni (qwen2_5_omni/"
            "qwen2_5_omni_thinker models), qwen2_vl (qwen2_vl/"
            "qwen2_5_vl models), qwen3_vl (qwen3_vl models), qwen3_vl_nothink (qwen3_vl models); this qwen2_audio "
            "model reads audios and text: send those")
        wrong = ask(base, {"type": "input_audio", "input_audio": {"data": b64(clip), "format": "ogg"}})
        assert wrong.status_code == 400 and "input_audio.format" in wrong.json()["error"]["message"]
        # bytes that are no clip lf opens are refused by their first bytes, before libsndfile guesses at them
        playlist = base64.b64encode(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n").decode()
        wrong = ask(base, {"type": "input_audio", "input_audio": {"data": playlist, "format": "wav"}})
        assert wrong.status_code == 400 and wrong.json()["error"]["message"] == (
            "audio 1 is not an audio clip lf opens (WAV, FLAC, Ogg or MP3): send one of those")

    movie = shared_data() / "mllm_demo_data" / "4.mp4"
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "4.mp4").write_bytes(movie.read_bytes())
    engine = engine_for(qwen2_vl, "qwen2_vl", video_maxlen=4)
    expected = engine.generate([{"role": "user", "content": "<video>What is it?"}], files={"videos": [str(movie)]},
                               temperature=0)[0]
    limits = Limits(root=str(tmp_path / "media"), max_bytes=movie.stat().st_size + 10)
    with live_server(create_app(engine, media=limits)) as base:
        for url in (f"data:video/mp4;base64,{b64(movie)}", f"file://{tmp_path}/media/4.mp4"):
            answer = ask(base, {"type": "video_url", "video_url": {"url": url}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == expected.text
        # a playlist FFmpeg would follow to other files is refused by its first bytes, before FFmpeg sees it
        playlist = base64.b64encode(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n").decode()
        refused = ask(base, {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{playlist}"}})
        assert refused.status_code == 400 and refused.json()["error"]["message"] == (
            "video 1 is not a video lf opens (MP4/MOV, Matroska/WebM or AVI): send one of those")
        refused = ask(base, {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}})
        assert refused.status_code == 400 and refused.json()["error"]["message"] == (
            "video 1 is an https URL: this server fetches nothing from the network; send the video itself as a "
            "data:video/...;base64, URL")
        outside = ask(base, {"type": "video_url", "video_url": {"url": f"file://{movie}"}})
        assert outside.status_code == 400 and "is not in the server's media folder" in outside.text
        two = httpx.post(base + "/v1/chat/completions", timeout=120, json={"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{tmp_path}/media/4.mp4"}}] * 2}]})
        assert two.status_code == 413 and "video 2 brings the request's media over" in two.text


def test_export_of_qwen2_audio_carries_its_feature_extractor(qwen2_audio, tmp_path):
    from transformers import AutoFeatureExtractor, AutoModelForMultimodalLM

    from lf.config import parse_infer_args
    from lf.export import export

    cfg = parse_infer_args({"model_name_or_path": str(qwen2_audio), "template": "qwen2_audio",
                            "export_dir": str(tmp_path / "out")}, "export")
    export(cfg)
    assert AutoFeatureExtractor.from_pretrained(tmp_path / "out").feature_size == 128
    assert type(AutoModelForMultimodalLM.from_pretrained(tmp_path / "out")).__name__ == \
        "Qwen2AudioForConditionalGeneration"
