"""Audio of multimodal datasets: clips read as LLaMA-Factory reads them (librosa.load: soundfile, channels
averaged to mono, soxr's high-quality resampler to `audio_sampling_rate`, length ceil(n * new_rate / old_rate)),
and Qwen2-Audio's / Qwen2.5-Omni's inputs from transformers' WhisperFeatureExtractor, with the number of audio
tokens those models' processors put in the text for each clip.

`read_audio(path, sampling_rate)` reads wav, flac, mp3, ogg (what libsndfile reads) into mono float32, and a file
libsndfile does not read, such as a video, by its first audio stream (PyAV: a video's sound track, which
Qwen2.5-Omni's `use_audio_in_video` reads; decoded to float as soundfile reads 16-bit samples, x / 32768);
`qwen2_audio_inputs(audios, feature_extractor, sampling_rate)` gives `input_features` and
`feature_attention_mask` (clips padded, or cut, to the extractor's 30 s); `qwen2_audio_token_counts(mask)` the
tokens per clip.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
import torch

from lf.data.optional import require
from lf.errors import DataError

AUDIO_SAMPLING_RATE = 16000  # LLaMA-Factory's default for audio_sampling_rate

log = logging.getLogger(__name__)


def read_audio(path: str | Path, sampling_rate: int = AUDIO_SAMPLING_RATE) -> np.ndarray:
    """The clip at `path` (an audio file, or a video's sound track) as mono float32 samples at `sampling_rate`."""
    soundfile = require("soundfile", "reading audio")
    if not Path(path).is_file():
        raise DataError(f"audio {path}: no such file (check the path, relative to the dataset's media_dir)")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except soundfile.SoundFileError as exc:
        samples, rate = _sound_track(path, exc)
    if not len(samples):
        raise DataError(f"audio {path} has no samples (empty or truncated file): re-encode it or leave it out")
    mono = samples.mean(axis=1)
    if rate != sampling_rate:
        soxr = require("soxr", "resampling audio")
        _log_resampling(rate, sampling_rate)
        length = math.ceil(len(mono) * sampling_rate / rate)
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")[:length]
        mono = np.pad(mono, (0, length - len(mono)))
    return np.ascontiguousarray(mono, dtype=np.float32)


def _sound_track(path: str | Path, why) -> tuple[np.ndarray, int]:
    """(samples x channels float32, rate) of the first audio stream of a file libsndfile could not read (`why`),
    e.g. a video's sound, decoded by PyAV."""
    av = require("av", "reading the sound of a video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"cannot read audio {path}: {why}, and it holds no audio stream: give a wav, flac, mp3 "
                                f"or ogg file, or a video with a sound track")
            planes, rate = [], None
            to_float = av.AudioResampler(format="fltp")  # float planes; the stream's own layout and rate
            for frame in container.decode(container.streams.audio[0]):
                rate = rate or frame.sample_rate
                planes += [out.to_ndarray() for out in to_float.resample(frame)]
            planes += [out.to_ndarray() for out in to_float.resample(None)]
    except av.FFmpegError:
        raise DataError(f"cannot read audio {path}: {why}; give a wav, flac, mp3 or ogg file, or a video with a "
                        f"sound track") from None
    if not planes:
        raise DataError(f"audio {path} has no samples (empty or truncated file): re-encode it or leave it out")
    return np.ascontiguousarray(np.concatenate(planes, axis=1).T, dtype=np.float32), rate


def has_sound(path: str | Path) -> bool:
    """Whether the video at `path` holds an audio stream."""
    av = require("av", "reading videos")
    if not Path(path).is_file():
        raise DataError(f"video {path}: no such file (check the path, relative to the dataset's media_dir)")
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except av.FFmpegError as exc:
        raise DataError(f"cannot read video {path}: {exc}; is it a video file PyAV/FFmpeg can decode?") from None


@functools.cache
def _log_resampling(rate: int, sampling_rate: int) -> None:
    log.info("audio at %d Hz is resampled to audio_sampling_rate %d Hz (soxr, high quality)", rate, sampling_rate)


def qwen2_audio_inputs(audios: list[np.ndarray], feature_extractor,
                       sampling_rate: int = AUDIO_SAMPLING_RATE) -> dict[str, torch.Tensor]:
    """`input_features` (clips, mel bins, 3000 frames) and `feature_attention_mask` (clips, 3000), as Qwen2-Audio's
    and Qwen2.5-Omni's processors compute them: padded to the extractor's 30 s, the mask marking each clip's
    frames."""
    if sampling_rate != feature_extractor.sampling_rate:
        raise DataError(f"audio_sampling_rate: {sampling_rate} differs from the model's feature extractor "
                        f"({feature_extractor.sampling_rate} Hz): set audio_sampling_rate: "
                        f"{feature_extractor.sampling_rate}")
    features = feature_extractor(audios, sampling_rate=sampling_rate, return_attention_mask=True,
                                 padding="max_length", return_tensors="pt")
    return {"input_features": features["input_features"], "feature_attention_mask": features["attention_mask"]}


def qwen2_audio_token_counts(feature_attention_mask: torch.Tensor) -> list[int]:
    """How many audio tokens stand for each clip in the text: its mel frames through the audio encoder's
    stride-2 convolution, then its stride-2 pooling."""
    return _tokens_of_frames(feature_attention_mask.sum(-1)).tolist()


def _tokens_of_frames(frames):
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def qwen2_audio_token_count(samples: int, feature_extractor) -> int:
    """qwen2_audio_token_counts of a clip of `samples` samples, without its features: the extractor keeps at most
    n_samples (30 s) and makes one mel frame per hop_length samples begun."""
    return int(_tokens_of_frames(-(-min(samples, feature_extractor.n_samples) // feature_extractor.hop_length)))


def clip_samples(path: str | Path, sampling_rate: int = AUDIO_SAMPLING_RATE) -> int:
    """How many samples read_audio gives of the clip at `path`, from its header (a video's sound: decoded)."""
    soundfile = require("soundfile", "reading audio")
    if not Path(path).is_file():
        raise DataError(f"audio {path}: no such file (check the path, relative to the dataset's media_dir)")
    try:
        info = soundfile.info(str(path))
        frames, rate = info.frames, info.samplerate
    except soundfile.SoundFileError as exc:  # a video's sound track: its length is known once decoded
        samples, rate = _sound_track(path, exc)
        frames = len(samples)
    if frames <= 0:
        raise DataError(f"audio {path} has no samples (empty or truncated file): re-encode it or leave it out")
    return math.ceil(frames * sampling_rate / rate)
