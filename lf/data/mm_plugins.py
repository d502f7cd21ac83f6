"""Multimodal plugins, as data: one frozen entry per multimodal family (PLUGINS), named by a template's
`mm_plugin` and matched to a model by its config's model_type.

An entry says how the family's own processor turns each "<image>" placeholder into the model's image tokens (the
token, what wraps it, how many an image of a given size gets: always the processor's count, never a guess), its
other media as `Modality` entries ("<video>", "<audio>": token, wrap, one item's count from the file's header, or
its whole text where that is more than its wrapped tokens, as Qwen3-VL's timed frames; the batch's forward inputs),
the forward input names of each, and which parts of the model are its vision (or audio) tower, its projector and
its language model (module path parts), which the freeze keys LoRA's `lora_target: all` and QLoRA's unquantized
modules read. `MMProcessor` applies an entry with the model's loaded image processor (and feature extractor): it
expands a conversation's placeholders while tokenizing (sizes and lengths from the files' headers) and builds the
forward's media inputs for a batch, decoding them then (pixel_values and what else the image processor returns,
e.g. Qwen2-VL's image_grid_thw, pixel_values_videos/video_grid_thw, Qwen2-Audio's
input_features/feature_attention_mask; the model computes its own M-RoPE positions from the grids, except in
neat-packed rows, whose examples get theirs from the plugin's `rope_positions` over its modalities' `rope_grids`).
With use_audio_in_video (Qwen2.5-Omni) a video and its sound are one item, their tokens interleaved in time chunks
(the plugin's `audio_in_video`).

Adding a family: its entry below (and a template naming it in lf/data/templates.py); tests/test_multimodal.py
builds a tiny model of each family and compares lf's rows with the family's processor.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType, SimpleNamespace

import torch

from lf.data import images
from lf.data.conversation import PLACEHOLDERS
from lf.data.registry import IMAGES
from lf.errors import DataError, did_you_mean

log = logging.getLogger("lf")
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # an image processor's or feature extractor's settings
PROCESSOR_CONFIG = "processor_config.json"  # the processor's own settings (LLaVA's patch_size, ...)
VIDEO_PROCESSOR_CONFIG = "video_preprocessor_config.json"  # a video processor's settings, where saved apart
# what lf.data.video reads of a video processor's settings
VIDEO_SETTINGS = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                  "rescale_factor")


def _qwen2_vl_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """One token per merge_size x merge_size patches of the image as the image processor resizes it."""
    return image_processor.get_number_of_image_patches(height, width) // image_processor.merge_size ** 2


def _setting(processor_config: dict, key: str, family: str):
    """A setting of the model's processor_config.json that the family's image token count needs."""
    try:
        return processor_config[key]
    except KeyError:
        raise DataError(f"the model's {PROCESSOR_CONFIG} has no {key}, which {family}'s image token count needs: "
                        f"save the model's {family} processor beside it (processor.save_pretrained)") from None


def _llava_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """LlavaProcessor's count: every image is cropped to crop_size, one token per patch, plus the processor's
    additional ones (CLIP's CLS), less one with the "default" feature strategy (which drops the CLS)."""
    patch = _setting(processor_config, "patch_size", "LlavaProcessor")
    crop = image_processor.crop_size
    tokens = (crop.height // patch) * (crop.width // patch) + processor_config.get("num_additional_image_tokens", 0)
    return tokens - (processor_config.get("vision_feature_select_strategy") == "default")


def _llava_next_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """LlavaNextProcessor's count, by its own code (anyres: the base image's patches, then the unpadded patches
    of the grid pinpoint the image fits best, a newline token per row), on the processor's saved settings; less
    one with the "default" feature strategy, as the processor does."""
    from transformers import LlavaNextProcessor

    counter = object.__new__(LlavaNextProcessor)  # its counting methods read these settings alone, no tokenizer
    counter.image_processor = image_processor
    counter.patch_size = _setting(processor_config, "patch_size", "LlavaNextProcessor")
    counter.num_additional_image_tokens = processor_config.get("num_additional_image_tokens", 0)
    crop = image_processor.crop_size
    tokens = counter._get_number_of_features(height, width, crop.height, crop.width)
    return tokens - (processor_config.get("vision_feature_select_strategy") == "default")


def _gemma3_views(image_processor, height: int, width: int) -> int:
    """The views Gemma3ImageProcessor makes of an image: itself, and with do_pan_and_scan the crops its own code
    cuts (the PIL backend's pan_and_scan or the torchvision one's pan_and_scan_batched), run on a zero-strided
    tensor of the image's shape: no pixels needed."""
    if not image_processor.do_pan_and_scan:
        return 1
    cut = getattr(image_processor, "pan_and_scan", None) or image_processor.pan_and_scan_batched
    return 1 + len(cut(torch.zeros(()).expand(1, height, width), image_processor.pan_and_scan_min_crop_size,
                       image_processor.pan_and_scan_max_num_crops, image_processor.pan_and_scan_min_ratio_to_activate))


def _gemma3_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """Gemma3Processor's count: image_seq_length soft tokens for every view of the image (its projector pools any
    view to that many)."""
    return _setting(processor_config, "image_seq_length", "Gemma3Processor") * _gemma3_views(
        image_processor, height, width)


def _intern_vl_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """InternVLProcessor's count: image_seq_length context tokens per patch, the patches as its image processor
    (GotOcr2's) cuts the image: one, or with crop_to_patches its tiles and a thumbnail."""
    patches = image_processor.get_number_of_image_patches(height, width)
    return _setting(processor_config, "image_seq_length", "InternVLProcessor") * patches


def _gemma3_text(modality: "Modality", media: "MMProcessor", count: int) -> str:
    """Gemma3Processor's text for an image of `count` soft tokens: one view's sequence, or with pan-and-scan crops
    the original's sequence inside its sentence and then each crop's, joined by spaces (every sequence keeps its
    blank lines around it, so a space stands beside them: the same string tokenizes alike)."""
    seq = _setting(media.processor_config, "image_seq_length", "Gemma3Processor")
    one = modality.wrap[0] + modality.token * seq + modality.wrap[1]
    if count == seq:
        return one
    return (f"Here is the original image {one} and here are some crops to help you see better "
            + " ".join([one] * (count // seq - 1)))


def _grids(key: str, media: "MMProcessor", inputs: dict) -> list[tuple]:
    """Each item's (t, h, w) patch grid in `inputs[key]`, its frames spaced by one temporal position."""
    return [(*grid, 1) for grid in inputs.get(key, ())]


@dataclass(frozen=True)
class Modality:
    """One kind of media in a family's prompts: the column it comes from, the token repeated once per feature and
    what wraps them, one item's token count (`tokens(media, ref)`, from the file's header as the family's processor
    counts) or, where its text is more than its tokens inside `wrap`, that text and count (`text(media, ref)`),
    and a batch's forward inputs (`inputs(media, refs)`, decoded then), named in `forward_inputs`."""

    column: str  # images | videos | audios (lf.data.conversation.PLACEHOLDERS)
    token: str
    tokens: Callable[..., int] | None
    inputs: Callable[..., dict]
    forward_inputs: tuple[str, ...]
    wrap: tuple[str, str] = ("", "")
    type_id: int = 0  # its mark in mm_token_type_ids (transformers: 1 image, 2 video, 3 audio)
    text: Callable[..., tuple[str, int]] | None = None  # Qwen3-VL's videos: timestamped frames
    # (modality, media, count) -> the text of an item of `count` tokens, where the family writes words around its
    # wrapped tokens (Gemma 3's pan-and-scan crops); None: the tokens wrapped
    words: Callable[..., str] | None = None
    # (media, a batch's inputs) -> each item's M-RoPE runs in token order: (t, h, w, temporal spacing), one per run
    # of its tokens, as the model's get_rope_index walks them (families with rope_positions)
    rope_grids: Callable[..., list[tuple]] = functools.partial(_grids, "image_grid_thw")

    def placed(self, media: "MMProcessor", ref: dict) -> tuple[str, int]:
        """(the text that replaces one item's placeholder, its token count)."""
        return self.text(media, ref) if self.text is not None else self.written(media, self.tokens(media, ref))

    def written(self, media: "MMProcessor", count: int) -> tuple[str, int]:
        """(the text of an item of `count` tokens, count)."""
        if self.words is not None:
            return self.words(self, media, count), count
        return self.wrap[0] + self.token * count + self.wrap[1], count


def _image_tokens(media: "MMProcessor", ref: dict) -> int:
    return media.tokens(images.size(ref), ref.get("path") or "an image given as bytes")


def _image_inputs(media: "MMProcessor", refs: list[dict]) -> dict:
    return media.image_features([images.pixels(ref, media.limits) for ref in refs])


def _qwen2_vl_video_tokens(media: "MMProcessor", ref: dict) -> int:
    from lf.data import video

    kept = video.sampled(_path(ref, "video"), **media.video)
    grid_t, grid_h, grid_w = video.qwen2_vl_video_grid(len(kept.indices), *kept.size, media.video_settings)
    return grid_t * grid_h * grid_w // media.video_settings.merge_size ** 2


def _qwen3_vl_video_text(media: "MMProcessor", ref: dict) -> tuple[str, int]:
    """Qwen3VLProcessor's text of a video: each temporal patch's time ("<1.5 seconds>", from the kept frames' places
    in the stream) before its own wrapped tokens."""
    from lf.data import video

    path, config = _path(ref, "video"), media.video_settings
    kept = video.sampled(path, **media.video)
    if len(kept.indices) < config.temporal_patch_size:
        raise DataError(f"video {path}: {len(kept.indices)} frame(s) kept, and Qwen3-VL needs at least "
                        f"{config.temporal_patch_size}: raise video_fps, or leave out videos this short")
    grid_t, grid_h, grid_w = video.qwen2_vl_video_grid(len(kept.indices), *kept.size, config, video.qwen3_vl_size)
    frame, count = QWEN3_VL_VIDEO.written(media, grid_h * grid_w // config.merge_size ** 2)
    seconds = video.frame_group_seconds(kept.indices, kept.fps, config.temporal_patch_size)
    return "".join(f"<{time:.1f} seconds>{frame}" for time in seconds), count * grid_t


def _qwen2_vl_video_inputs(media: "MMProcessor", refs: list[dict], spacing: str | None = None,
                           size: str = "qwen2_vl_size") -> dict:
    """pixel_values_videos and video_grid_thw (frames sized by lf.data.video's `size` rule); with `spacing` also
    the seconds one temporal patch spans (temporal_patch_size frames at the kept frame rate), by which the M-RoPE
    spaces frames, under that name (Qwen2.5-VL: second_per_grid_ts, Qwen2.5-Omni: video_second_per_grid)."""
    from lf.data import video

    if not refs:
        return {}
    videos = [video.read_video(_path(ref, "video"), **media.video) for ref in refs]
    out = video.qwen2_vl_video_inputs(videos, media.video_settings, getattr(video, size))
    if spacing:
        out[spacing] = torch.tensor([media.video_settings.temporal_patch_size / v.fps for v in videos])
    return out


def _timed_grids(key: str, media: "MMProcessor", inputs: dict) -> list[tuple]:
    """Each video's (t, h, w, the seconds a temporal patch spans: `inputs[key]`)."""
    return [(*grid, seconds) for grid, seconds in zip(inputs.get("video_grid_thw", ()), inputs.get(key, ()))]


def _spaced_grids(media: "MMProcessor", inputs: dict) -> list[tuple]:
    """Qwen2.5-VL's video runs: frames spaced by tokens_per_second positions per second of video."""
    per_second = media.model_settings["vision_config.tokens_per_second"]
    return [(t, h, w, per_second * seconds)
            for t, h, w, seconds in _timed_grids("second_per_grid_ts", media, inputs)]


def _frame_grids(media: "MMProcessor", inputs: dict) -> list[tuple]:
    """Qwen3-VL's video runs: one per temporal patch (its timestamps' text lies between them)."""
    return [(1, h, w, 1) for t, h, w in inputs.get("video_grid_thw", ()) for _ in range(int(t))]


def _qwen2_audio_tokens(media: "MMProcessor", ref: dict) -> int:
    from lf.data import audio

    return audio.qwen2_audio_token_count(audio.clip_samples(_path(ref, "audio"), media.audio_sampling_rate),
                                         media.feature_extractor)


def _qwen2_audio_inputs(media: "MMProcessor", refs: list[dict]) -> dict:
    from lf.data import audio

    if not refs:
        return {}
    clips = [audio.read_audio(_path(ref, "audio"), media.audio_sampling_rate) for ref in refs]
    return audio.qwen2_audio_inputs(clips, media.feature_extractor, media.audio_sampling_rate)


def _path(ref: dict, kind: str) -> str:
    """A video's or audio clip's file (they are decoded from files, not from bytes)."""
    if not ref.get("path"):
        raise DataError(f"a {kind} given as bytes: give {kind}s as file paths (relative to media_dir)")
    return ref["path"]


QWEN2_VL_VIDEO = Modality("videos", "<|video_pad|>", _qwen2_vl_video_tokens, _qwen2_vl_video_inputs,
                          ("pixel_values_videos", "video_grid_thw"), ("<|vision_start|>", "<|vision_end|>"), 2,
                          rope_grids=functools.partial(_grids, "video_grid_thw"))
QWEN2_5_VL_VIDEO = replace(QWEN2_VL_VIDEO,
                           inputs=functools.partial(_qwen2_vl_video_inputs, spacing="second_per_grid_ts"),
                           forward_inputs=(*QWEN2_VL_VIDEO.forward_inputs, "second_per_grid_ts"),
                           rope_grids=_spaced_grids)
QWEN3_VL_VIDEO = replace(QWEN2_VL_VIDEO, tokens=None, text=_qwen3_vl_video_text, rope_grids=_frame_grids,
                         inputs=functools.partial(_qwen2_vl_video_inputs, size="qwen3_vl_size"))
QWEN2_AUDIO = Modality("audios", "<|AUDIO|>", _qwen2_audio_tokens, _qwen2_audio_inputs,
                       ("input_features", "feature_attention_mask"), ("<|audio_bos|>", "<|audio_eos|>"), 3)


# -- Qwen2.5-Omni: a video's tokens and its sound's, interleaved in time chunks (use_audio_in_video) --------------


def _omni_timing(media: "MMProcessor") -> tuple[int, int]:
    """(positions per second of video, positions per time chunk) of a Qwen2.5-Omni model (its config's
    position_id_per_seconds, and seconds_per_chunk of them)."""
    per_second = media.model_settings["position_id_per_seconds"]
    return per_second, int(per_second * media.model_settings["seconds_per_chunk"])


def _omni_chunks(values, size: int) -> list[tuple[int, int]]:
    """(start, end) of each time chunk of a video's or a clip's tokens, `values` their times in positions (non-
    decreasing), as Qwen2.5-Omni's processor and get_rope_index cut them: a chunk ends before the first token at
    or past the next multiple of `size`, and a boundary moves on by one chunk per token, as theirs does."""
    bounds, start, chunk = [], 0, 1
    for i, value in enumerate(values.tolist()):
        if value >= chunk * size:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    return bounds + [(start, len(values))]


def _omni_video_with_sound(media: "MMProcessor", ref: dict, sound: dict) -> tuple[str, int]:
    """(text, token count) of a video and its sound (`sound`: an audio, or the video itself for its track), as
    Qwen2_5OmniProcessor writes them: inside the video's wrap and the audio's, each time chunk's video tokens, then
    its audio tokens (the video's frames at temporal_patch_size / the kept frame rate seconds per temporal patch,
    the clip's tokens one position each)."""
    from lf.data import video

    config = media.video_settings
    kept = video.sampled(_path(ref, "video"), **media.video)
    t, h, w = video.qwen2_vl_video_grid(len(kept.indices), *kept.size, config)
    frame = h * w // config.merge_size ** 2
    per_second, chunk = _omni_timing(media)
    # float64, in the processor's order of operations: where a chunk ends
    times = torch.arange(t, dtype=torch.float64).repeat_interleave(frame) * (
        config.temporal_patch_size / kept.rate) * per_second
    clip = _qwen2_audio_tokens(media, sound)
    chunks = itertools.zip_longest(_omni_chunks(times, chunk), _omni_chunks(torch.arange(clip), chunk))
    body = "".join((OMNI_VIDEO.token * (v[1] - v[0]) if v else "") + (QWEN2_AUDIO.token * (a[1] - a[0]) if a else "")
                   for v, a in chunks)
    text = OMNI_VIDEO.wrap[0] + QWEN2_AUDIO.wrap[0] + body + QWEN2_AUDIO.wrap[1] + OMNI_VIDEO.wrap[1]
    return text, t * frame + clip


def _omni_audio_in_video(media: "MMProcessor", refs: dict) -> tuple[dict, dict]:
    """use_audio_in_video: each video and its sound as one item (_omni_video_with_sound). A video's sound is the
    row's audio at its place when the row has audios (LLaMA-Factory's layout, as mllm_video_audio_demo's
    "<video><audio>": the audio placeholder then stands for nothing), else the video file's own audio track.
    Returns the refs with the sounds as the audios column (in the videos' order: the order of their tokens) and the
    videos' and audios' items for MMProcessor.expand."""
    from lf.data import audio

    videos, given = refs["videos"], refs.get("audios") or []
    if given and len(given) != len(videos):
        raise DataError(f"use_audio_in_video: a row with {len(videos)} video(s) and {len(given)} audio(s): give one "
                        f"audio per video (its sound, after it: <video><audio>), or no audios to read each video's "
                        f"own sound track")
    for ref in () if given else videos:
        if not audio.has_sound(_path(ref, "video")):
            raise DataError(f"video {ref['path']} has no audio track, and use_audio_in_video: true reads each "
                            f"video's sound from it: give videos with sound, an audio per video (<video><audio>), or "
                            f"set use_audio_in_video: false")
    sounds = given or videos
    items = [_omni_video_with_sound(media, ref, sound) for ref, sound in zip(videos, sounds)]
    return {**refs, "audios": sounds}, {"videos": items, "audios": [("", 0)] * len(given)}


def _omni_video_inputs(media: "MMProcessor", refs: list[dict]) -> dict:
    """Qwen2.5-Omni's videos: Qwen2.5-VL's inputs with the seconds per temporal patch as video_second_per_grid,
    and use_audio_in_video when their sound is read with them: the model's rope rule for a video with its sound,
    as a one-element tensor like the batch's other inputs (the engine joins its rows' inputs along the first axis;
    its prefill gives the model the positions, so the model never reads the joined flags)."""
    out = _qwen2_vl_video_inputs(media, refs, spacing="video_second_per_grid")
    if out and media.use_audio_in_video:
        out["use_audio_in_video"] = torch.tensor([True])
    return out


def _audio_runs(media: "MMProcessor", inputs: dict) -> list[tuple]:
    """Each clip's token count, (n,), in the order of the batch's clips."""
    from lf.data import audio

    mask = inputs.get("feature_attention_mask")
    return [] if mask is None else [(n,) for n in audio.qwen2_audio_token_counts(mask)]


def _omni_cells(times: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(3, t * h * w): each token's (time, row, column) in a merged grid of h x w per temporal patch."""
    return torch.stack(torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)


def _omni_positions(media: "MMProcessor", types, grids) -> torch.Tensor:
    """Qwen2.5-Omni's thinker's 3-D positions of one example alone, as its get_rope_index gives them: each piece
    (a run of text, an image, a video, an audio clip) starts one past the largest position of the piece before it;
    text and audio count on in all three; an image's or video's tokens get their (time, row, column) cell in the
    merged grid, its time position_id_per_seconds per second of video (truncated). A video with its sound
    (use_audio_in_video) is one piece: the video's cells and the clip's positions start together and come in time
    chunks (_omni_chunks: video, then audio), and the two tokens opening it (vision, audio bos) share a position,
    as do the two closing it. `types`, `grids`: as for _mrope_positions (the audio's runs are (n,))."""
    per_second, chunk = _omni_timing(media)
    merge = media.image_processor.merge_size
    kinds, pieces, i, closing = types.tolist(), [], 0, False
    while i < len(kinds):
        start = int(pieces[-1].max()) + 1 if pieces else 0
        kind = kinds[i]
        if kind in (0, 3):  # text, or an audio clip on its own
            n = int(next(grids[3])[0]) if kind == 3 else next(
                (j for j in range(i, len(kinds)) if kinds[j] != 0), len(kinds)) - i
            steps = torch.arange(n)
            if closing and kind == 0:  # the two tokens closing a video with its sound
                steps, closing = (steps - 1).clamp(min=0), False
            pieces.append(steps.repeat(3, 1) + start)
            i += n
            continue
        t, h, w, seconds = next(grids[kind])
        times = (torch.arange(int(t)) * torch.as_tensor(seconds, dtype=torch.float32) * per_second).long()
        cells = _omni_cells(times, int(h) // merge, int(w) // merge)
        if kind == 1 or not media.use_audio_in_video:
            pieces.append(cells + start)
            i += cells.shape[1]
            continue
        opening = pieces[-1]  # the text before it ends with the two opening tokens: one position for both
        pieces[-1] = torch.cat([opening[:, :-1], opening[:, -2:-1]], dim=1)
        start -= 1
        n = int(next(grids[3])[0])
        sound = torch.arange(n).repeat(3, 1) + start
        for v, a in itertools.zip_longest(_omni_chunks(cells[0], chunk), _omni_chunks(sound[0] - start, chunk)):
            pieces += ([cells[:, v[0]:v[1]] + start] if v else []) + ([sound[:, a[0]:a[1]]] if a else [])
        i += cells.shape[1] + n
        closing = True
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


OMNI_VISION = ("<|vision_bos|>", "<|vision_eos|>")
OMNI_VIDEO = replace(QWEN2_VL_VIDEO, token="<|VIDEO|>", wrap=OMNI_VISION, inputs=_omni_video_inputs,
                     forward_inputs=(*QWEN2_VL_VIDEO.forward_inputs, "video_second_per_grid", "use_audio_in_video"),
                     rope_grids=functools.partial(_timed_grids, "video_second_per_grid"))


def _mrope_positions(media: "MMProcessor", types, grids) -> torch.Tensor:
    """The Qwen-VL families' 3-D M-RoPE positions (temporal, height, width) of one example alone, as their model's
    get_rope_index gives them: text tokens count on in all three; each run of media tokens gets its (t, h, w) cell
    in the merged patch grid, offset by the position reached (t times the run's temporal spacing, truncated), which
    then moves on by the grid's larger side. `types`: (n,) the example's token types (Modality.type_id at media
    tokens, 0 elsewhere); `grids`: {type_id: an iterator over its runs' (t, h, w, spacing), in order}."""
    merge = media.image_processor.merge_size
    pieces, position = [], 0
    for kind, run in itertools.groupby(types.tolist()):
        if kind == 0:
            n = len(list(run))
            pieces.append(torch.arange(position, position + n).expand(3, -1))
            position += n
            continue
        t, h, w, spacing = next(grids[kind])
        h, w = int(h) // merge, int(w) // merge
        cells = torch.stack(torch.meshgrid((torch.arange(int(t)) * spacing).long(), torch.arange(h),
                                           torch.arange(w), indexing="ij"))
        pieces.append(cells.reshape(3, -1) + position)
        position += max(h, w)
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


@dataclass(frozen=True)
class MMPlugin:
    """A family's entry. Its images are described by the image_* fields (image_token "" for a family without
    images); its other media by `media` entries."""

    name: str
    model_types: tuple[str, ...]  # config.model_type of the models it serves
    image_token: str  # repeated once per image feature
    image_tokens: Callable[..., int] | None  # (image_processor, processor_config, height, width) -> the token count
    wrap: tuple[str, str] = ("", "")  # written before and after an image's tokens
    image_text: Callable[..., str] | None = None  # its images' Modality.words
    token_types: bool = False  # the forward takes each token's modality (Modality.type_id at media tokens)
    token_type_key: str = "mm_token_type_ids"  # their name (Gemma 3: token_type_ids)
    unused: tuple[str, ...] = ()  # what the image processor returns that the forward does not take
    settings: tuple[tuple[str, str], ...] = ()  # (data key, the image processor attribute it sets)
    # the transformers processor class whose images_kwargs fill what the model's image processor leaves unset (as
    # that processor passes them on each call; lf calls the image processor alone)
    processor: str | None = None
    # (media, types, grids) -> one example's (3, n) positions, for a family with 3-D M-RoPE positions
    # (its model computes them over a whole row, so a neat-packed row gets each example's from lf)
    rope_positions: Callable[..., torch.Tensor] | None = None
    # module path parts (matched at "." boundaries) of each part of the model
    vision_tower: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    language_model: tuple[str, ...] = ()
    image_inputs: tuple[str, ...] = ("pixel_values", "image_grid_thw", "image_sizes")  # what image processors give
    media: tuple[Modality, ...] = ()  # videos, audios
    feature_extractor: bool = False  # its audio needs the model's feature extractor
    model_settings: tuple[str, ...] = ()  # what its media need of the model's config (dotted attribute paths)
    # use_audio_in_video: (media, {column: refs}) -> (the refs with each video's sound under audios, the videos' and
    # audios' items for MMProcessor.expand), for a family that reads a video with its sound (Qwen2.5-Omni)
    audio_in_video: Callable[..., tuple[dict, dict]] | None = None

    @property
    def modalities(self) -> dict[str, Modality]:
        """Column -> the modality, images first."""
        image = (Modality("images", self.image_token, _image_tokens, _image_inputs, self.image_inputs, self.wrap, 1,
                          words=self.image_text),)
        return {m.column: m for m in (image if self.image_token else ()) + self.media}

    @property
    def forward_inputs(self) -> tuple[str, ...]:
        names = [name for m in self.modalities.values() for name in m.forward_inputs]
        return (*names, self.token_type_key) if self.token_types else tuple(names)


# template qwen2_vl serves Qwen2-VL and Qwen2.5-VL models; lf.model.load_mm_processor reads a Qwen2.5-VL model's
# media with the entry named after its type (its videos' inputs differ)
_QWEN2_VL = MMPlugin("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "<|image_pad|>", _qwen2_vl_tokens,
                     ("<|vision_start|>", "<|vision_end|>"), token_types=True, rope_positions=_mrope_positions,
                     vision_tower=("visual.patch_embed", "visual.blocks"), projector=("visual.merger",),
                     language_model=("language_model", "lm_head"), media=(QWEN2_VL_VIDEO,))
_ENTRIES = {plugin.name: plugin for plugin in (
    _QWEN2_VL,
    replace(_QWEN2_VL, name="qwen2_5_vl", model_types=("qwen2_5_vl",), media=(QWEN2_5_VL_VIDEO,),
            model_settings=("vision_config.tokens_per_second",)),
    # Qwen3-VL's images read as Qwen2-VL's (its image processor is Qwen2-VL's, patch 16); its deepstack mergers feed
    # vision features into early language layers and, as LLaMA-Factory has it, count with the vision tower
    replace(_QWEN2_VL, name="qwen3_vl", model_types=("qwen3_vl",), media=(QWEN3_VL_VIDEO,),
            vision_tower=("visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list")),
    MMPlugin("llava", ("llava",), "<image>", _llava_tokens, vision_tower=("vision_tower",),
             projector=("multi_modal_projector",), language_model=("language_model", "lm_head")),
    # image_newline (the learned token closing each row of the anyres grid) trains and freezes with the projector
    MMPlugin("llava_next", ("llava_next",), "<image>", _llava_next_tokens, vision_tower=("vision_tower",),
             projector=("multi_modal_projector", "image_newline"), language_model=("language_model", "lm_head")),
    # Gemma 3 attends bidirectionally within an image's soft tokens: its forward reads them from token_type_ids;
    # image_do_pan_and_scan adds an image's crops as views of their own
    MMPlugin("gemma3", ("gemma3",), "<image_soft_token>", _gemma3_tokens,
             ("\n\n<start_of_image>", "<end_of_image>\n\n"), token_types=True, token_type_key="token_type_ids",
             unused=("num_crops",), image_text=_gemma3_text, settings=(("image_do_pan_and_scan", "do_pan_and_scan"),),
             processor="Gemma3Processor",
             vision_tower=("vision_tower",), projector=("multi_modal_projector",),
             language_model=("language_model", "lm_head")),
    MMPlugin("qwen2_audio", ("qwen2_audio",), "", None, vision_tower=("audio_tower",),
             projector=("multi_modal_projector",), language_model=("language_model", "lm_head"), media=(QWEN2_AUDIO,),
             feature_extractor=True),
    # Qwen2.5-Omni's thinker (its talker, which speaks, is not trained: as in LLaMA-Factory): images and videos
    # read as Qwen2.5-VL's in its own tokens, audio as Qwen2-Audio's (its audio tower is in the vision tower's part,
    # as LLaMA-Factory counts it); the whole model's config (qwen2_5_omni) or its thinker's alone
    MMPlugin("qwen2_omni", ("qwen2_5_omni", "qwen2_5_omni_thinker"), "<|IMAGE|>", _qwen2_vl_tokens, OMNI_VISION,
             rope_positions=_omni_positions, vision_tower=("visual.patch_embed", "visual.blocks", "audio_tower"),
             projector=("visual.merger",), language_model=("language_model", "lm_head"),
             media=(OMNI_VIDEO, replace(QWEN2_AUDIO, rope_grids=_audio_runs)), feature_extractor=True,
             model_settings=("position_id_per_seconds", "seconds_per_chunk"), audio_in_video=_omni_audio_in_video),
    MMPlugin("intern_vl", ("internvl",), "<IMG_CONTEXT>", _intern_vl_tokens, ("<img>", "</img>"),
             unused=("num_patches",), settings=(("crop_to_patches", "crop_to_patches"),),
             vision_tower=("vision_tower",), projector=("multi_modal_projector",),
             language_model=("language_model", "lm_head")),
)}
PLUGINS = MappingProxyType(_ENTRIES)


def forward_inputs() -> tuple[str, ...]:
    """Every media input a family's forward takes (lf.kernels.patch names them in the patched forward)."""
    return tuple(dict.fromkeys(name for plugin in PLUGINS.values() for name in plugin.forward_inputs))


def get_plugin(name: str) -> MMPlugin:
    if name not in PLUGINS:
        raise DataError(f"unknown multimodal plugin {name!r}.{did_you_mean(name, PLUGINS)} Known: "
                        f"{', '.join(PLUGINS)}")
    return PLUGINS[name]


def plugin_for(model_type: str) -> MMPlugin | None:
    """The plugin serving models of `model_type` (its template's), or None for a text-only model."""
    return next((plugin for plugin in PLUGINS.values() if model_type in plugin.model_types), None)


def in_part(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the module or parameter path `name` lies in one of `parts` (e.g. "visual.blocks")."""
    dotted = f".{name}."
    return any(f".{part}." in dotted for part in parts)


@dataclass
class MMProcessor:
    """A plugin with the model's image processor (and feature extractor, for audio) and the run's media settings
    (picklable: dataset workers and DataLoader workers get a copy)."""

    plugin: MMPlugin
    image_processor: object
    token_ids: dict[str, int]  # column -> the id of its modality's token
    media_dir: str
    limits: images.PixelLimits
    processor_config: dict = field(default_factory=dict)
    video: dict = field(default_factory=dict)  # lf.data.video.read_video's keywords (video_fps, ...)
    audio_sampling_rate: int = 16000
    feature_extractor: object = None
    model_settings: dict = field(default_factory=dict)  # the plugin's model_settings, read from the model's config
    video_processor: dict = field(default_factory=dict)  # the model's saved video processor settings, if any
    use_audio_in_video: bool = False  # each video is read with its sound (a plugin with audio_in_video)
    _resize_said: bool = field(default=False, compare=False)

    @property
    def image_token_id(self) -> int | None:
        return self.token_ids.get(IMAGES)

    @property
    def video_settings(self):
        """The video processor's settings (VIDEO_SETTINGS) that lf.data.video reads: the saved video processor's,
        else the image processor's, as transformers' video processors read preprocessor_config.json when no video
        processor is saved."""
        if not self.video_processor:
            return self.image_processor
        return SimpleNamespace(**{key: self.video_processor.get(key, getattr(self.image_processor, key, None))
                                  for key in VIDEO_SETTINGS})

    @property
    def columns(self) -> tuple[str, ...]:
        """The media columns the family takes."""
        return tuple(self.plugin.modalities)

    def tokens(self, size: tuple[int, int], where: str = "an image") -> int:
        """The image tokens of an image of `size` (width, height), after lf's resize into the pixel limits;
        `where` names it in the log line about resizing."""
        width, height = size
        fitted = self.limits.fit(width, height)
        if fitted != (width, height) and not self._resize_said:
            self._resize_said = True
            log.info("images outside image_min_pixels..image_max_pixels (%d..%d) are resized into them, keeping "
                     "their aspect ratio (e.g. %s: %dx%d -> %dx%d)", self.limits.min_pixels, self.limits.max_pixels,
                     where, width, height, *fitted)
        return self.plugin.image_tokens(self.image_processor, self.processor_config, fitted[1], fitted[0])

    def media_tokens(self, ids) -> int:
        """How many of `ids` are media tokens."""
        wanted = set(self.token_ids.values())
        return sum(token in wanted for token in ids)

    def expand(self, messages: list[dict], refs: Mapping[str, list]) -> tuple[list[dict], dict, int]:
        """(messages with each placeholder replaced by its item's tokens, the references ({column: refs} of the
        family's columns) resolved against media_dir, the total media tokens); sizes are read from the files'
        headers. With use_audio_in_video a row's videos come with their sound (the plugin's audio_in_video)."""
        resolved = {column: [images.resolved(ref, self.media_dir) for ref in refs.get(column) or ()]
                    for column in self.columns}
        joined = {}
        if self.use_audio_in_video and resolved.get("videos"):
            resolved, joined = self.plugin.audio_in_video(self, resolved)
        items = {column: joined[column] if column in joined else [modality.placed(self, ref)
                                                                  for ref in resolved[column]]
                 for column, modality in self.plugin.modalities.items()}
        expanded, total = self.placed_items(messages, items)
        return expanded, resolved, total

    def image_items(self, sizes: list[tuple[tuple[int, int], str]]) -> list[tuple[str, int]]:
        """Each image's (text, token count) for placed_items, the images given by their ((width, height), name):
        served prompts."""
        return [self.plugin.modalities[IMAGES].written(self, self.tokens(size, where)) for size, where in sizes]

    def placed_items(self, messages: list[dict], items: Mapping[str, list[tuple[str, int]]]) -> tuple[list[dict], int]:
        """(messages with each placeholder replaced by its item's text, the total media tokens), each column's
        items given by their (text, token count) (Modality.placed), in order. A column without items is left
        alone: its placeholders (checked against the items where the data has the column) are then text."""
        expanded = messages
        for column, column_items in items.items():
            if not column_items:
                continue
            left, mark, replaced = iter(column_items), PLACEHOLDERS[column], []
            for message in expanded:
                pieces = (message["content"] or "").split(mark)
                text = pieces[0] + "".join(next(left)[0] + piece for piece in pieces[1:])
                replaced.append({**message, "content": text} if len(pieces) > 1 else message)  # None content kept
            expanded = replaced
        return expanded, sum(count for column_items in items.values() for _, count in column_items)

    def features(self, refs: Mapping[str, list[dict]], input_ids) -> dict:
        """The forward's media inputs for a batch whose media are `refs` ({column: refs in row order}, resolved)
        and whose token ids are `input_ids` (a padded tensor); the token types where the forward takes them."""
        out = {}
        for column, modality in self.plugin.modalities.items():
            out.update(modality.inputs(self, list(refs.get(column) or ())))
        if self.plugin.token_types:
            out[self.plugin.token_type_key] = self.type_ids(input_ids)
        return out

    def inputs(self, decoded: list, input_ids) -> dict:
        """The forward's image inputs from RGB images already in the pixel limits (in the order of their tokens
        in `input_ids`, a padded tensor): served prompts."""
        out = self.image_features(decoded)
        if self.plugin.token_types:
            out[self.plugin.token_type_key] = self.type_ids(input_ids)
        return out

    def image_features(self, decoded: list) -> dict:
        """The image processor's outputs for RGB images already in the pixel limits, less what the forward does
        not take."""
        if not decoded:
            return {}
        features = self.image_processor(images=decoded, return_tensors="pt")
        return {key: value for key, value in features.items() if key not in self.plugin.unused}

    def type_ids(self, input_ids):
        """The token types: each media token's modality type_id, 0 elsewhere."""
        types = input_ids.new_zeros(input_ids.shape)
        for column, modality in self.plugin.modalities.items():
            types[input_ids == self.token_ids[column]] = modality.type_id
        return types

    @staticmethod
    def batch_refs(rows: list[Mapping[str, list]]) -> dict[str, list]:
        """Rows' media ({column: refs} each) as one batch's, in row order."""
        out = {}
        for row in rows:
            for column, refs in row.items():
                out.setdefault(column, []).extend(refs or ())
        return out

    def packed_positions(self, input_ids, position_ids, inputs: dict):
        """The position_ids of a neat-packed batch (examples start where position_ids restart at 0), given its
        media inputs (from `inputs`): as they are, or for a family with M-RoPE (4, B, L): these text positions
        (from which attention finds the examples), then each example's 3-D positions as if it ran alone."""
        if self.plugin.rope_positions is None:
            return position_ids
        grids = {m.type_id: iter(m.rope_grids(self, inputs)) for m in self.plugin.modalities.values()}
        types = self.type_ids(input_ids)
        rope = torch.empty(3, *position_ids.shape, dtype=position_ids.dtype)
        for row, positions in enumerate(position_ids):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            for start, end in zip(starts[:-1], starts[1:]):
                rope[:, row, start:end] = self.plugin.rope_positions(self, types[row, start:end], grids)
        return torch.cat([position_ids[None], rope])

    def save_pretrained(self, output_dir: str) -> None:
        """The image processor (preprocessor_config.json) or feature extractor, the processor's own settings and the
        video processor's where the model has them apart, beside the tokenizer that the trainer saves: what
        transformers' AutoProcessor / AutoImageProcessor / AutoVideoProcessor load. A model with both (Qwen2.5-Omni)
        keeps both in its one preprocessor_config.json, which each would write alone."""
        parts = [part for part in (self.image_processor, self.feature_extractor) if part is not None]
        for part in parts:
            part.save_pretrained(output_dir)
        if len(parts) == 2:
            both = {key: value for part in reversed(parts) for key, value in json.loads(part.to_json_string()).items()}
            with open(os.path.join(output_dir, PREPROCESSOR_CONFIG), "w") as f:
                json.dump(both, f, indent=2, sort_keys=True)
        saved = {PROCESSOR_CONFIG: self.processor_config, VIDEO_PROCESSOR_CONFIG: self.video_processor}
        for name, settings in saved.items():
            if settings:
                with open(os.path.join(output_dir, name), "w") as f:
                    json.dump(settings, f, indent=2, sort_keys=True)
