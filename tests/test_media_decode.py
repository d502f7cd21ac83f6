"""Video and audio decoding for multimodal data (lf.data.video, lf.data.audio): frames sampled by LLaMA-Factory's
rule from videos PyAV writes here and from LLaMA-Factory's demo files in ../shared/data; Qwen2-VL's video inputs
equal to what transformers' own Qwen2VLVideoProcessor computes; audio read to mono at audio_sampling_rate
(resampled from 8 kHz, 44.1 kHz and 48 kHz), Qwen2-Audio's features and token counts equal to transformers'
Qwen2-Audio processor's; every refusal one line naming the file.

torchvision cannot load beside the CPU torch here, and transformers' video processor needs it, so the video
processor runs in a subprocess beside a stand-in torchvision whose resize and normalize do what torchvision's do
on the CPU (uint8 bicubic antialiased interpolation, left alone at the same size; subtract the mean, divide by
the std): everything transformers does around them (smart_resize, the fused rescale, padding odd frame counts,
patch order, the grid) is its own code."""

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile
import soxr
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths
from transformers.models.qwen2_audio.processing_qwen2_audio import Qwen2AudioProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lf.data.audio import qwen2_audio_inputs, qwen2_audio_token_counts, read_audio
from lf.data.optional import require
from lf.data.video import fit_pixels, qwen2_vl_video_inputs, read_video, sample_indices
from lf.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = SHARED / "mllm_demo_data"
needs_shared = pytest.mark.skipif(not DEMO.is_dir(), reason=f"LLaMA-Factory's demo media are not at {DEMO}")


def write_video(path: Path, frames: int, rate: int = 10, size=(64, 48)) -> Path:
    """A video whose frame i is a flat gray of level 12 * i, so a decoded frame tells its index."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = size
        out.start_encoding()
        for index in range(frames):
            image = np.full((size[1], size[0], 3), 12 * index, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def frame_index(frame: Image.Image) -> int:
    return round(np.asarray(frame).mean() / 12)


# -- sampling and decoding


def test_sample_indices_follow_llamafactory():
    assert sample_indices(243, 9.72, 2.0, 128).tolist() == np.linspace(0, 242, 19).astype(int).tolist()
    assert len(sample_indices(3000, 120.0, 2.0, 128)) == 128  # video_maxlen caps
    assert sample_indices(10, 100.0, 2.0, 128).tolist() == list(range(10))  # never more than the video has
    assert sample_indices(5, 0.2, 2.0, 128).tolist() == [0]  # at least one frame
    assert sample_indices(0, None, 2.0, 4).tolist() == [0, 1, 2, 3]  # length unknown: the first video_maxlen


def test_read_video_keeps_the_sampled_frames_resized(tmp_path):
    path = write_video(tmp_path / "gray.mp4", frames=20, rate=10)  # 2 s
    video = read_video(path)  # 2 frames per second: 4 of 20, at linspace(0, 19, 4) truncated
    assert [frame_index(frame) for frame in video.frames] == [0, 6, 12, 19]
    assert video.fps == 2.0 and {frame.size for frame in video.frames} == {(64, 48)}
    assert {frame.mode for frame in video.frames} == {"RGB"}
    video = read_video(path, video_fps=5.0, video_maxlen=3, video_max_pixels=1024)  # 10 wanted, 3 kept
    assert [frame_index(frame) for frame in video.frames] == [0, 9, 19]
    assert video.frames[0].size == (36, 27)  # scaled by sqrt(1024 / 3072), both sides truncated
    assert video.fps == 1.5  # 3 frames over 2 s: Qwen2.5-VL's second_per_grid_ts is 2 / 1.5


def test_fit_pixels_scales_into_range():
    assert fit_pixels(Image.new("L", (640, 360)), 256 * 256, 16 * 16).size == (341, 192)
    assert fit_pixels(Image.new("RGB", (8, 4)), 256 * 256, 16 * 16).size == (22, 11)
    image = Image.new("RGBA", (30, 20))
    assert fit_pixels(image, 256 * 256, 16 * 16).mode == "RGB"


@needs_shared
def test_demo_videos():
    # (frames, duration) in each file's header -> LLaMA-Factory's count; 640x360 frames fit 256*256 as 341x192
    expected = {"1.mp4": (19, (341, 192)), "2.avi": (18, (295, 221)), "3.mp4": (12, (341, 192)),
                "4.mp4": (10, (224, 224))}
    config = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    for name, (count, size) in expected.items():
        video = read_video(DEMO / name)
        assert len(video.frames) == count and {frame.size for frame in video.frames} == {size}, name
        inputs = qwen2_vl_video_inputs([video], config)
        grid = inputs["video_grid_thw"].tolist()
        assert grid[0][0] == math.ceil(count / 2) and inputs["pixel_values_videos"].shape == (np.prod(grid), 1176)
    info = json.loads((SHARED / "mllm_video_demo.json").read_text())
    assert all((SHARED / row["videos"][0]).is_file() for row in info)


@pytest.mark.parametrize("read, kind, name, why", [
    (read_video, "video", "clip.mp4", "Invalid data found"),
    (read_audio, "audio", "clip.wav", "Format not recognised.*give a wav, flac, mp3 or ogg file"),
])
def test_missing_or_unreadable_file_is_one_line(read, kind, name, why, tmp_path):
    with pytest.raises(DataError, match=rf"^{kind} .*{name}: no such file \(check the path"):
        read(tmp_path / name)
    (tmp_path / name).write_text("not a media file")
    with pytest.raises(DataError, match=rf"^cannot read {kind} .*{name}: .*{why}") as refused:
        read(tmp_path / name)
    assert "\n" not in str(refused.value)


def test_video_without_a_stream_or_frames_is_refused(tmp_path):
    soundfile.write(tmp_path / "sound.wav", np.zeros(800, np.float32), 8000)
    with pytest.raises(DataError, match=r"^video .*sound\.wav holds no video stream"):
        read_video(tmp_path / "sound.wav")
    write_video(tmp_path / "empty.avi", frames=0)
    with pytest.raises(DataError, match=r"^video .*empty\.avi has no frames"):
        read_video(tmp_path / "empty.avi")


# -- Qwen2-VL's video inputs

STAND_IN_TORCHVISION = {
    "__init__.py": '__version__ = "0.28.0"\n',
    "io.py": "",
    "transforms/__init__.py": """
        import enum
        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"; NEAREST_EXACT = "nearest-exact"; BILINEAR = "bilinear"; BICUBIC = "bicubic"
            BOX = "box"; HAMMING = "hamming"; LANCZOS = "lanczos"
        """,
    "transforms/functional.py": "from . import InterpolationMode\ndef pil_to_tensor(image): raise NotImplementedError\n",
    "transforms/v2/__init__.py": "",
    "transforms/v2/functional.py": """
        import torch
        from .. import InterpolationMode
        def resize(image, size, interpolation, antialias=True):  # torchvision's CPU path for uint8 bicubic
            assert interpolation == InterpolationMode.BICUBIC and image.dtype == torch.uint8
            if list(image.shape[-2:]) == list(size):
                return image
            flat = image.reshape(-1, *image.shape[-3:])
            out = torch.nn.functional.interpolate(flat, size=list(size), mode="bicubic", align_corners=False,
                                                  antialias=antialias)
            return out.reshape(*image.shape[:-2], *size)
        def normalize(image, mean, std, inplace=False):
            mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
            return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)
        def grayscale_to_rgb(image):
            assert image.shape[-3] == 3
            return image
        """,
}

RUN_VIDEO_PROCESSOR = """
import sys, torch
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
videos, min_pixels, max_pixels = torch.load(sys.argv[1])
processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
out = processor(videos=[video.numpy() for video in videos], return_tensors="pt", cap_pixels_per_frame=False)
torch.save(dict(out), sys.argv[2])
"""


def beside_stand_in(script: str, given, tmp_path: Path):
    """What `script` saves (torch.save to sys.argv[2]) from `given` (torch.load of sys.argv[1]), run in a subprocess
    beside the stand-in torchvision."""
    for name, text in STAND_IN_TORCHVISION.items():
        (tmp_path / "torchvision" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "torchvision" / name).write_text(textwrap.dedent(text))
    torch.save(given, tmp_path / "in.pt")
    run = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + script,
                          str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=False)


def transformers_video_inputs(videos: list[np.ndarray], min_pixels: int, max_pixels: int, tmp_path: Path) -> dict:
    """transformers' Qwen2VLVideoProcessor on `videos` (each frames x H x W x 3, uint8), beside the stand-in."""
    return beside_stand_in(RUN_VIDEO_PROCESSOR, ([torch.from_numpy(video) for video in videos], min_pixels,
                                                 max_pixels), tmp_path)


def test_qwen2_vl_video_inputs_equal_transformers(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(3, 90, 120), (4, 56, 84), (2, 30, 40), (1, 300, 500)]  # down, unchanged, up, heavily down; odd counts
    videos = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    decoded = read_video(write_video(tmp_path / "gray.mp4", frames=20, size=(200, 120)), video_fps=1.5)
    videos.append(np.stack([np.asarray(frame) for frame in decoded.frames]))  # 3 frames
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 40
    expected = transformers_video_inputs(videos, min_pixels, max_pixels, tmp_path)
    config = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    ours = qwen2_vl_video_inputs([[Image.fromarray(frame) for frame in video] for video in videos[:-1]]
                                 + [decoded], config)
    assert torch.equal(ours["video_grid_thw"], expected["video_grid_thw"])
    assert ours["video_grid_thw"].tolist() == [[2, 6, 8], [2, 4, 6], [1, 4, 6], [1, 8, 16], [2, 8, 14]]
    assert ours["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(ours["pixel_values_videos"], expected["pixel_values_videos"])


def test_qwen2_vl_video_patches_match_the_image_processor():
    """A still frame twice is what the image processor makes of the frame (it repeats an image in time): same
    patches in the same order, the grid's time 1. At a size smart_resize keeps, only float rounding differs (it
    rescales, then normalizes; the video processor fuses the two); resized, PIL's and torch's bicubic differ by a
    level or two."""
    config = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 40)
    rng = np.random.default_rng(1)
    for shape, tolerance in (((56, 84), 1e-5), ((100, 150), 0.1)):
        frame = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        image = config(frame, return_tensors="pt")
        video = qwen2_vl_video_inputs([[frame, frame]], config)
        assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
        assert video["pixel_values_videos"].shape == image["pixel_values"].shape
        difference = (video["pixel_values_videos"] - image["pixel_values"]).abs()
        assert difference.max() < tolerance if tolerance < 1e-3 else difference.mean() < tolerance / 10


# -- audio


def sine(seconds: float, rate: int, hertz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hertz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_read_audio_resamples_to_mono_float32(tmp_path, caplog):
    left = sine(0.5, 8000)
    # stereo and mono, 8 kHz, float samples (16-bit ones would be rounded)
    soundfile.write(tmp_path / "a.wav", np.stack([left, 0.5 * left], axis=1), 8000, subtype="FLOAT")
    soundfile.write(tmp_path / "b.wav", left, 8000, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="lf.data.audio"):
        clip = read_audio(tmp_path / "a.wav")
        read_audio(tmp_path / "b.wav")
    assert clip.dtype == np.float32 and clip.shape == (8000,)
    mono = 0.75 * left  # the channels' mean
    np.testing.assert_array_equal(clip, soxr.resample(mono, 8000, 16000, quality="HQ")[:8000])
    spectrum = np.abs(np.fft.rfft(clip))
    assert np.argmax(spectrum) * 16000 / len(clip) == 440.0  # the tone kept its pitch
    assert [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()] == [
        "audio at 8000 Hz is resampled to audio_sampling_rate 16000 Hz (soxr, high quality)"]  # once
    assert read_audio(tmp_path / "b.wav", sampling_rate=8000).tolist() == left.tolist()  # same rate: as read


@needs_shared
def test_demo_audio():
    # (file's rate, channels, samples) from its header: read at 16 kHz, ceil(samples * 16000 / rate) samples
    for name, rate, samples in (("1.mp3", 48000, 193536), ("2.wav", 16000, 46421), ("3.flac", 16000, 93680),
                                ("4.mp3", 44100, 220500)):
        clip = read_audio(DEMO / name)
        assert clip.dtype == np.float32 and clip.ndim == 1, name
        assert len(clip) == math.ceil(samples * 16000 / rate), name
        assert 0.01 < np.abs(clip).max() < 1.5, name  # sound, not silence or garbage (resampling may overshoot 1)
    np.testing.assert_array_equal(read_audio(DEMO / "2.wav"), soundfile.read(DEMO / "2.wav", dtype="float32")[0])


def test_qwen2_audio_inputs_equal_transformers(tmp_path):
    extractor = WhisperFeatureExtractor()
    clips = [sine(1.0, 16000), sine(0.37, 16000, 1000.0), sine(31.0, 16000, 200.0)]  # the last is cut at 30 s
    ours = qwen2_audio_inputs(clips, extractor)
    # Qwen2-Audio's processor, run for its audio part with the feature extractor and audio token it would hold
    processor = SimpleNamespace(feature_extractor=extractor, audio_token="<|AUDIO|>")
    processor.replace_audio_token = lambda inputs, audio_idx: Qwen2AudioProcessor.replace_audio_token(
        processor, inputs, audio_idx)
    expected, replacements = Qwen2AudioProcessor._process_audio(processor, clips, sampling_rate=16000,
                                                                return_tensors="pt")
    assert torch.equal(ours["input_features"], expected["input_features"])
    assert torch.equal(ours["feature_attention_mask"], expected["feature_attention_mask"])
    counts = qwen2_audio_token_counts(ours["feature_attention_mask"])
    assert counts == [25, 9, 750] == list(expected["num_audio_tokens"])  # 25 a second, 30 s at most
    assert [text.count("<|AUDIO|>") for text in replacements] == counts
    assert counts == _get_feat_extract_output_lengths(ours["feature_attention_mask"].sum(-1)).tolist()  # Omni's


def test_empty_audio_and_a_rate_the_model_does_not_take_are_refused(tmp_path):
    soundfile.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    with pytest.raises(DataError, match=r"^audio .*empty\.wav has no samples"):
        read_audio(tmp_path / "empty.wav")
    with pytest.raises(DataError, match=r"^audio_sampling_rate: 8000 differs .* set audio_sampling_rate: 16000$"):
        qwen2_audio_inputs([sine(0.1, 8000)], WhisperFeatureExtractor(), sampling_rate=8000)


def test_missing_package_names_the_install():
    with pytest.raises(DataError, match=r"^reading videos needs the 'no_such_media_lib' package .*: "
                                        r"pip install 'lf\[media\]'$"):
        require("no_such_media_lib", "reading videos")
