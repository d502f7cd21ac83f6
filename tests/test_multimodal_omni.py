"""Qwen2.5-Omni's thinker (template qwen2_omni) on test_multimodal's tiny model: rows and batches of images, videos
and audio equal transformers' Qwen2_5OmniProcessor, with use_audio_in_video off and on (each video's sound is the
row's audio after it, as in LLaMA-Factory's mllm_video_audio_demo, or the video file's own sound track); the 3-D
positions lf gives (each example alone, and neat-packed rows) equal the model's get_rope_index; `lf train` LoRA on
them with lf's kernels; do_predict on videos with their sound; the bad-input errors (serving with the key too).

The processor holds Qwen2-VL's video processor, which needs torchvision: it runs in a subprocess beside
test_media_decode's stand-in torchvision, one row at a time, given the frames lf keeps (test_media_decode checks
them against LLaMA-Factory's sampling), each video's kept frame rate as fps (transformers assumes 2), the model's own
video limits (the processor's call defaults, 128 to 768 patches of 28 x 28 pixels a frame, are not what
LLaMA-Factory uses: it calls the video processor itself) and each video's sound already read (transformers reads a
video's sound with torchcodec, which cannot load here): from a wav file of the same samples, apart from the
video."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_media_decode import beside_stand_in
from test_multimodal import (pil_images, prepared, qwen2_omni, qwen2_vl, shared_data, train,  # noqa: F401 (fixtures)
                             write_dataset)
from test_multimodal_stages import run_losses, segments_of

from lf.data import collator, get_dataset
from lf.data.audio import clip_samples, read_audio
from lf.data.video import read_video
from lf.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore")

RUN_OMNI_PROCESSOR = """
import sys, torch
from transformers import AutoTokenizer, Qwen2_5OmniProcessor, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
model, calls = torch.load(sys.argv[1], weights_only=False)
images = Qwen2VLImageProcessorPil.from_pretrained(model)
processor = Qwen2_5OmniProcessor(image_processor=images, video_processor=Qwen2VLVideoProcessor.from_pretrained(model),
                                 feature_extractor=WhisperFeatureExtractor.from_pretrained(model),
                                 tokenizer=AutoTokenizer.from_pretrained(model))
limits = {key: images.size[key] for key in ("shortest_edge", "longest_edge")}
outs = []
for text, media, fps, kwargs in calls:
    out = processor(text=[text], **media, return_tensors="pt", **kwargs,
                    videos_kwargs=dict(do_sample_frames=False, cap_pixels_per_frame=False, fps=fps, size=limits))
    outs.append({**out, "text": processor.tokenizer.decode(out["input_ids"][0])})
torch.save(outs, sys.argv[2])
"""

# what each placeholder is given to the processor as (use_audio_in_video: an audio after a video is its sound)
MARKS = {"<image>": "<|vision_bos|><|IMAGE|><|vision_eos|>", "<video>": "<|vision_bos|><|VIDEO|><|vision_eos|>",
         "<audio>": "<|audio_bos|><|AUDIO|><|audio_eos|>"}


def write_sound_video(path: Path, seconds: float, sound_seconds: float, sound_rate: int = 22050) -> Path:
    """A QuickTime file: an MPEG-4 video of 64 x 48 flat gray frames at 10 per second and a mono 16-bit PCM sound
    track (a rising tone), its samples also written as a wav file beside it (path.with_suffix(".wav"))."""
    import av
    import soundfile

    t = np.arange(int(sound_seconds * sound_rate)) / sound_rate
    sound = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * 32767).astype(np.int16)
    soundfile.write(path.with_suffix(".wav"), sound, sound_rate, subtype="PCM_16")
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height = 64, 48
        audio = out.add_stream("pcm_s16le", rate=sound_rate)
        audio.codec_context.layout = "mono"
        out.start_encoding()
        for index in range(int(seconds * 10)):
            image = np.full((48, 64, 3), (12 * index) % 256, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode())
        frame = av.AudioFrame.from_ndarray(sound[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = sound_rate, 0
        out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return path


@pytest.fixture(scope="module")
def sound_videos(tmp_path_factory) -> Path:
    """Dataset "d": two videos with their own sound, 4 s with 4 s of sound (two time chunks of each) and 6 s with
    2.5 s (three video chunks, two audio ones), each alone in a row."""
    folder = tmp_path_factory.mktemp("sound")
    write_sound_video(folder / "a.mov", 4, 4)
    write_sound_video(folder / "b.mov", 6, 2.5)
    rows = [{"messages": [{"role": "user", "content": f"<video>What {question}?"},
                          {"role": "assistant", "content": answer}], "videos": [name]}
            for name, question, answer in (("a.mov", "do you hear", "A rising tone."),
                                           ("b.mov", "happens", "The screen grows lighter."))]
    return write_dataset(folder, rows, {"messages": "messages", "videos": "videos"})


# case -> (dataset, data keys): mllm_demo's images; mllm_video_audio_demo's video and audio, apart or (LLaMA-
# Factory's use_audio_in_video) the audio as the video's sound; the sound videos read with their own track
CASES = {"images": ("mllm_demo", {}),
         "video, audio": ("mllm_video_audio_demo", {"video_maxlen": 4}),
         "audio in video": ("mllm_video_audio_demo", {"video_maxlen": 4, "use_audio_in_video": True}),
         "video's own sound": ("d", {"use_audio_in_video": True})}


def omni_data(model, case: str, folder: Path, **keys):
    """(prepared, the sft rows, the dataset's raw rows, the folder its paths start in) of a case."""
    dataset, data = CASES[case]
    where = folder if dataset == "d" else shared_data()
    p = prepared(model, "qwen2_omni", dataset=dataset, dataset_dir=str(where), **data, **keys)
    rows = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft",
                       media=p.media).train_dataset
    return p, rows, json.loads((where / f"{dataset}.json").read_text()), where


def processor_call(p, row, where: Path, keys: dict) -> tuple:
    """(text, media, fps, keywords) of one row for Qwen2_5OmniProcessor."""
    in_video = keys.get("use_audio_in_video", False)
    marks = {**MARKS, "<audio>": ""} if in_video else MARKS
    messages = [{"role": m["role"], "content": re.sub("<image>|<video>|<audio>", lambda x: marks[x.group()],
                                                      m["content"])} for m in row["messages"]]
    text = p.template.render(messages, tokenizer=p.tokenizer)
    if "images" in row:
        return text, {"images": pil_images(row)}, None, {}
    videos = [read_video(where / path, video_maxlen=keys.get("video_maxlen", 128)) for path in row["videos"]]
    sounds = row.get("audios") or [str(Path(path).with_suffix(".wav")) for path in row["videos"]]
    media = {"videos": [np.stack([np.asarray(frame) for frame in v.frames]) for v in videos],
             "audio": [read_audio(where / path) for path in sounds]}
    extra = dict(load_audio_from_video=True, audio_from_video_indices=list(range(len(videos)))) if in_video else {}
    return text, media, videos[0].fps, extra


@pytest.mark.parametrize("case", list(CASES))
def test_rows_equal_qwen2_5_omni_processor(qwen2_omni, sound_videos, tmp_path, case):
    keys = CASES[case][1]
    p, rows, raw, where = omni_data(qwen2_omni, case, sound_videos)
    raw = raw[:len(rows)]
    assert len(rows) == len(raw) >= 2
    expected = beside_stand_in(RUN_OMNI_PROCESSOR, (str(qwen2_omni), [processor_call(p, row, where, keys)
                                                                      for row in raw]), tmp_path)
    batch = collator(p.tokenizer, media=p.media)([rows[i] for i in range(len(rows))])
    for i, out in enumerate(expected):
        ids = rows[i]["input_ids"]
        want = out["input_ids"][0].tolist()
        assert ids == want[:len(ids)] and len(want) - len(ids) <= 1  # lf's rows end at the reply's <|im_end|>
    inputs = set(expected[0]) - {"input_ids", "attention_mask", "mm_token_type_ids", "text"}
    assert inputs == set(batch) - {"input_ids", "attention_mask", "labels", "use_audio_in_video"}
    for key in inputs:
        assert torch.equal(batch[key], torch.cat([out[key] for out in expected])), key
    assert ("use_audio_in_video" in batch) == keys.get("use_audio_in_video", False)
    if case == "video's own sound":  # the video's tokens and its sound's, in time chunks: V A V A, V A V A V
        blocks = [re.search(r"<\|vision_bos\|><\|audio_bos\|>(.*)<\|audio_eos\|><\|vision_eos\|>", out["text"])
                  for out in expected]
        runs = [[kind for kind, _ in itertools.groupby(re.findall(r"<\|(VIDEO|AUDIO)\|>", block[1]))]
                for block in blocks]
        assert runs == [["VIDEO", "AUDIO"] * 2, ["VIDEO", "AUDIO"] * 2 + ["VIDEO"]]


def test_a_videos_sound_is_read_from_its_own_track(sound_videos):
    """read_audio of a video is its sound track, as read_audio reads the same samples from a wav file (16-bit,
    resampled from 22.05 kHz to 16 kHz); clip_samples counts them."""
    for name, seconds in (("a", 4), ("b", 2.5)):
        sound = read_audio(sound_videos / f"{name}.mov")
        assert np.array_equal(sound, read_audio(sound_videos / f"{name}.wav")) and len(sound) == seconds * 16000
        assert clip_samples(sound_videos / f"{name}.mov") == len(sound)


def rope_alone(model, p, example, in_video: bool) -> torch.Tensor:
    """The model's own 3-D positions (get_rope_index) of one example, (3, n)."""
    batch = collator(p.tokenizer, media=p.media)([example])
    mask = batch.get("feature_attention_mask")
    positions, _ = model.get_rope_index(batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                                        batch["attention_mask"], in_video, None if mask is None else mask.sum(-1),
                                        batch.get("video_second_per_grid"))
    return positions[:, 0, :len(example["input_ids"])]


@pytest.mark.parametrize("case", list(CASES))
def test_positions_equal_the_models_get_rope_index(qwen2_omni, sound_videos, case):
    """Each example alone, and each example of neat-packed rows (whose positions lf gives the model)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(qwen2_omni)
    in_video = CASES[case][1].get("use_audio_in_video", False)
    p, rows, _, _ = omni_data(qwen2_omni, case, sound_videos)
    collate = collator(p.tokenizer, media=p.media)
    alone = {}
    for example in rows:
        expected = rope_alone(model, p, example, in_video)
        n = len(example["input_ids"])
        ours = p.media.packed_positions(torch.tensor([example["input_ids"]]), torch.arange(n)[None],
                                        collate([example]))
        assert torch.equal(ours[1:, 0], expected) and torch.equal(ours[0, 0], torch.arange(n))
        alone[tuple(example["input_ids"])] = expected
    assert all(not torch.equal(positions, torch.arange(len(ids)).expand(3, -1)) for ids, positions in alone.items())
    _, packed, _, _ = omni_data(qwen2_omni, case, sound_videos, packing=True, neat_packing=True, cutoff_len=4096)
    assert len(packed) < len(rows)
    batch = collate([packed[i] for i in range(len(packed))])
    for r in range(len(packed)):
        for start, end in segments_of(packed[r]):
            assert torch.equal(batch["position_ids"][1:, r, start:end],
                               alone[tuple(packed[r]["input_ids"][start:end])])


def test_patched_thinker_computes_the_loss_and_gradients_transformers_does(qwen2_omni, sound_videos):
    """lf's kernels in the thinker (language model, and the vision tower's RMSNorms and MLPs): a batch of videos
    with their sound gives the loss and gradients of transformers' own model (use_audio_in_video reaches it through
    lf's patched forward)."""
    import copy

    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from lf.kernels import patch

    reference = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(qwen2_omni).train()
    model = copy.deepcopy(reference)
    report = patch(model)
    assert {"rms_norm", "swiglu", "rope", "fused_linear_cross_entropy", "packed_attention"} <= set(report.patched)
    assert report.towers["vision tower"].startswith("model.visual: rms_norm (5), swiglu (2); "), str(report)
    p, rows, _, _ = omni_data(qwen2_omni, "video's own sound", sound_videos)
    batch = collator(p.tokenizer, media=p.media)([rows[i] for i in range(len(rows))])
    results = []
    for net in (reference, model):
        loss = net(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: q.grad for n, q in net.named_parameters() if q.grad is not None}))
    (want, want_grads), (got, grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys() and any(n.startswith("model.audio_tower") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", ["images", "audio in video", "video's own sound"])
def test_lf_train_lora_on_omni_rows(qwen2_omni, sound_videos, tmp_path, case):
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    dataset, keys = CASES[case]
    where = sound_videos if dataset == "d" else shared_data()
    out = train(tmp_path, qwen2_omni, "qwen2_omni", dataset=dataset, dataset_dir=str(where), max_samples=2,
                max_steps=5, learning_rate=1e-2, save_steps=5, **keys)
    losses = run_losses(out)
    assert len(losses) == 5 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert all("language_model" in target for target in adapter["target_modules"])  # the towers stay frozen
    assert AutoFeatureExtractor.from_pretrained(out).feature_size == 128  # both, in one preprocessor_config.json
    assert type(AutoImageProcessor.from_pretrained(out, backend="pil")).__name__.startswith("Qwen2VLImageProcessor")


def test_bad_input_is_one_line(qwen2_omni, qwen2_vl, tmp_path):
    video = str(shared_data() / "mllm_demo_data" / "4.mp4")  # no sound track
    folder = write_dataset(tmp_path, [{"messages": [{"role": "user", "content": "<video>hi"},
                                                    {"role": "assistant", "content": "ok"}], "videos": [video]}],
                           {"messages": "messages", "videos": "videos"})
    p = prepared(qwen2_omni, "qwen2_omni", dataset="d", dataset_dir=str(folder), use_audio_in_video=True)
    with pytest.raises(DataError, match=rf"^video {re.escape(video)} has no audio track, and use_audio_in_video: "
                                        r"true reads each video's sound from it: give videos with sound"):
        get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    clip = str(shared_data() / "mllm_demo_data" / "4.mp3")
    write_dataset(tmp_path, [{"messages": [{"role": "user", "content": "<video><audio><audio>hi"},
                                           {"role": "assistant", "content": "ok"}], "videos": [video],
                              "audios": [clip, clip]}],
                  {"messages": "messages", "videos": "videos", "audios": "audios"})
    with pytest.raises(DataError, match=r"^use_audio_in_video: a row with 1 video\(s\) and 2 audio\(s\): give one "
                                        r"audio per video"):
        get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    for template in ("qwen2_vl", "qwen"):
        with pytest.raises(ConfigError, match=rf"^use_audio_in_video: true reads each video's sound with its frames, "
                                              rf"which template {template} does not do \(only qwen2_omni: "
                                              r"Qwen2.5-Omni\): set template: qwen2_omni for a Qwen2.5-Omni model, "
                                              r"or remove use_audio_in_video$"):
            prepared(qwen2_vl, template, use_audio_in_video=True)


def test_a_model_saved_whole_trains_as_its_thinker(qwen2_omni, tmp_path):
    """A Qwen2.5-Omni checkpoint saved whole (qwen2_5_omni: its thinker's weights under thinker., here without a
    talker) loads as its thinker with those weights, and `lf train` runs on it."""
    import shutil

    from transformers import (AutoConfig, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    from lf.config import ModelArguments
    from lf.config.finetuning import FinetuningArguments
    from lf.model import load_model, load_tokenizer

    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(qwen2_omni)
    whole = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(),
                                                                   enable_audio_output=False))
    whole.thinker.load_state_dict(thinker.state_dict())
    folder = tmp_path / "whole"
    whole.save_pretrained(folder)
    shutil.copytree(qwen2_omni, folder, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("config.json", "generation_config.json", "*.safetensors"))
    assert AutoConfig.from_pretrained(folder).model_type == "qwen2_5_omni"
    model_args = ModelArguments(model_name_or_path=str(folder), infer_dtype="float32")
    model, lines = load_model(load_tokenizer(model_args), model_args, FinetuningArguments(), is_trainable=False)
    assert type(model) is Qwen2_5OmniThinkerForConditionalGeneration and "(qwen2_5_omni_thinker, " in lines[0]
    weights = thinker.state_dict()
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    losses = run_losses(train(tmp_path, folder, "qwen2_omni", max_samples=2))
    assert len(losses) == 1 and np.isfinite(losses[0])


def test_do_predict_answers_videos_with_their_sound(qwen2_omni, sound_videos, tmp_path):
    """do_predict on the sound videos (the model's own positions for their interleaved tokens): a prompt holds the
    video's tokens and its sound's, and batching changes no prediction."""
    from test_multimodal_use import predictions

    keys = dict(template="qwen2_omni", dataset="d", dataset_dir=str(sound_videos), use_audio_in_video=True)
    batched = predictions(tmp_path, qwen2_omni, 2, **keys)
    assert [r["label"] for r in batched] == ["A rising tone.", "The screen grows lighter."]
    interleaved = ("<|VIDEO|><|AUDIO|>", "<|AUDIO|><|VIDEO|>")  # video, its sound, video again: time chunks
    assert all(all(pair in r["prompt"] for pair in interleaved) and r["predict"] for r in batched)
    assert predictions(tmp_path, qwen2_omni, 1, **keys) == batched


def test_serving_with_use_audio_in_video_is_refused(qwen2_omni):
    from test_multimodal_use import engine_for

    with pytest.raises(ConfigError, match=r"^use_audio_in_video: true is for training and do_predict: lf's chat and "
                                          r"API read a video's frames without its sound; remove use_audio_in_video "
                                          r"to serve$"):
        engine_for(qwen2_omni, "qwen2_omni", use_audio_in_video=True)


def test_a_batched_engine_answers_omni_media_as_each_alone(qwen2_omni, monkeypatch):
    """Served (without use_audio_in_video), an Omni thinker's video, audio, image and text requests are prefilled
    together, each row with its own 3-D positions: each reply equals the one generate gives the request alone."""
    from PIL import Image
    from test_multimodal_use import batched_answers, engine_for

    data = shared_data() / "mllm_demo_data"
    asked = [([{"role": "user", "content": "<video>What is it?"}], {"files": {"videos": [str(data / "4.mp4")]}}),
             ([{"role": "user", "content": "Hello there"}], {}),
             ([{"role": "user", "content": "<image>And this?"}], {"images": [Image.open(data / "1.jpg")]}),
             ([{"role": "user", "content": "What do you hear? <audio>"}], {"files": {"audios": [str(data / "2.wav")]}})]
    alone = engine_for(qwen2_omni, "qwen2_omni", video_maxlen=4)
    expected = [[r.text for r in alone.generate(messages, temperature=0, max_new_tokens=8, **media)]
                for messages, media in asked]
    together, prefills = batched_answers(engine_for(qwen2_omni, "qwen2_omni", max_batch=8, video_maxlen=4), asked,
                                         monkeypatch)
    assert together == expected
    assert any(rows > 1 and media for rows, media in prefills), prefills
