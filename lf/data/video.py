"""Videos of multimodal datasets: frames decoded with PyAV and sampled as LLaMA-Factory samples them, and
Qwen2-VL's (and Qwen3-VL's) video inputs computed as transformers' video processors compute them, without
torchvision.

`read_video(path, ...)` keeps LLaMA-Factory's keys and defaults: of a stream of F frames lasting D seconds it keeps
n = min(F, video_maxlen, max(1, floor(D * video_fps))) frames, at the indices linspace(0, F - 1, n) truncated to
integers (a container that states no frame count gives its first video_maxlen frames), and fits each kept frame
within [video_min_pixels, video_max_pixels] (`fit_pixels`). Frames are decoded in order and only the kept ones are
held, already resized, so a long video never sits in memory; decoding stops after the last kept frame.

`qwen2_vl_video_inputs(videos, config)` gives `pixel_values_videos` and `video_grid_thw`: each video's frames
(padded to a multiple of temporal_patch_size with its last frame) resized to `smart_resize`'s size (Qwen3-VL's
`size=qwen3_vl_size`: one pixel budget for all the kept frames, its video processor's rule; its prompts put each
temporal patch's time, `frame_group_seconds`, before its tokens) (bicubic,
antialiased, on uint8, as torchvision resizes on the CPU), rescaled and normalized in one step with the image
processor's mean/std, and cut into temporal_patch_size x patch_size x patch_size patches grouped by merge_size.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # imports without torchvision
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as smart_resize_3d  # so does this

from lf.data.optional import require
from lf.errors import DataError

# LLaMA-Factory's defaults for its video keys.
VIDEO_FPS = 2.0
VIDEO_MAXLEN = 128
VIDEO_MAX_PIXELS = 256 * 256
VIDEO_MIN_PIXELS = 16 * 16


@dataclass(frozen=True)
class Video:
    frames: list[Image.Image]  # RGB, in playing order
    fps: float  # kept frames per second of video: Qwen2.5-VL's second_per_grid_ts is temporal_patch_size / fps


def sample_indices(total_frames: int, duration_s: float | None, video_fps: float, video_maxlen: int) -> np.ndarray:
    """The indices of the frames LLaMA-Factory keeps (see the module's docstring)."""
    if total_frames <= 0:  # the container does not say how long the stream is
        return np.arange(video_maxlen)
    wanted = total_frames if duration_s is None else max(1, math.floor(duration_s * video_fps))
    count = min(total_frames, video_maxlen, wanted)
    return np.linspace(0, total_frames - 1, count).astype(np.int32)


def fit_pixels(image: Image.Image, max_pixels: int, min_pixels: int) -> Image.Image:
    """`image` in RGB, scaled (both sides truncated, bicubic) to at most `max_pixels`, then to at least
    `min_pixels`: LLaMA-Factory's rule for images and video frames."""
    for size in _fit_steps(image.width, image.height, max_pixels, min_pixels):
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image.convert("RGB")


def _fit_steps(width: int, height: int, max_pixels: int, min_pixels: int) -> list[tuple[int, int]]:
    """The sizes fit_pixels resizes to, in turn (none when the size is in range)."""
    steps = []
    for pixels, outside in ((max_pixels, operator.gt), (min_pixels, operator.lt)):
        if outside(width * height, pixels):
            scale = math.sqrt(pixels / (width * height))
            width, height = int(width * scale), int(height * scale)
            steps.append((width, height))
    return steps


def fitted_size(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """The size fit_pixels gives a frame of (width, height)."""
    return (_fit_steps(width, height, max_pixels, min_pixels) or [(width, height)])[-1]


def read_video(path: str | Path, *, video_fps: float = VIDEO_FPS, video_maxlen: int = VIDEO_MAXLEN,
               video_max_pixels: int = VIDEO_MAX_PIXELS, video_min_pixels: int = VIDEO_MIN_PIXELS) -> Video:
    """The sampled, resized frames of the first video stream of the file at `path`."""
    av = require("av", "reading videos")
    if not Path(path).is_file():
        raise DataError(f"video {path}: no such file (check the path, relative to the dataset's media_dir)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"video {path} holds no video stream: give a video file (mp4, avi, mkv, webm, ...)")
            stream = container.streams.video[0]
            duration = _duration_s(container, stream)
            kept = set(sample_indices(stream.frames, duration, video_fps, video_maxlen).tolist())
            frames = []
            for index, frame in enumerate(container.decode(stream)):
                if index in kept:
                    frames.append(fit_pixels(frame.to_image(), video_max_pixels, video_min_pixels))
                    if len(frames) == len(kept):
                        break
    except av.FFmpegError as exc:
        raise DataError(f"cannot read video {path}: {exc}; is it a video file PyAV/FFmpeg can decode?") from None
    if not frames:
        raise DataError(f"video {path} has no frames (empty or truncated file): re-encode it or leave it out")
    return Video(frames, video_fps if not duration else len(frames) / duration)


@dataclass(frozen=True)
class Sampled:
    """What read_video keeps of a file, known from its header: the kept frames' indices in the stream, the
    stream's frame rate (None when it states none), the kept frames' (width, height) and how many of them stand
    for a second of video (read_video's Video.fps)."""

    indices: list[int]
    fps: float | None
    size: tuple[int, int]
    rate: float


def sampled(path: str | Path, *, video_fps: float = VIDEO_FPS, video_maxlen: int = VIDEO_MAXLEN,
            video_max_pixels: int = VIDEO_MAX_PIXELS, video_min_pixels: int = VIDEO_MIN_PIXELS) -> Sampled:
    """What read_video keeps of the file, from its header alone (a container that states no frame count is
    decoded: its first frames are kept)."""
    av = require("av", "reading videos")
    if not Path(path).is_file():
        raise DataError(f"video {path}: no such file (check the path, relative to the dataset's media_dir)")
    keys = dict(video_fps=video_fps, video_maxlen=video_maxlen, video_max_pixels=video_max_pixels,
                video_min_pixels=video_min_pixels)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0] if container.streams.video else None
            fps = float(stream.average_rate) if stream is not None and stream.average_rate else None
            if stream is not None and stream.frames > 0 and stream.codec_context.width:
                duration = _duration_s(container, stream)
                kept = sample_indices(stream.frames, duration, video_fps, video_maxlen)
                size = stream.codec_context.width, stream.codec_context.height
                return Sampled(kept.tolist(), fps, fitted_size(*size, video_max_pixels, video_min_pixels),
                               len(kept) / duration if duration else video_fps)
    except av.FFmpegError as exc:
        raise DataError(f"cannot read video {path}: {exc}; is it a video file PyAV/FFmpeg can decode?") from None
    read = read_video(path, **keys)  # says why the file has no frames or stream
    return Sampled(list(range(len(read.frames))), fps, read.frames[0].size, read.fps)


def frame_group_seconds(indices: list[int], fps: float | None, temporal_patch_size: int) -> list[float]:
    """Qwen3-VL's timestamp of each temporal patch: the mean time of its first and last frame (the last frame
    repeated to fill the last patch), at `fps` (24 when the stream states none, as transformers assumes)."""
    fps = fps or 24.0
    indices = indices + indices[-1:] * (-len(indices) % temporal_patch_size)
    return [(indices[i] / fps + indices[i + temporal_patch_size - 1] / fps) / 2
            for i in range(0, len(indices), temporal_patch_size)]


def _duration_s(container, stream) -> float | None:
    """The stream's duration in seconds, else the container's, else None."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # FFmpeg's AV_TIME_BASE: microseconds
    return None


def qwen2_vl_size(frames: int, height: int, width: int, config) -> tuple[int, int]:
    """Qwen2-VL's (and Qwen2.5-VL's) frame size: each frame within the pixel limits on its own."""
    return smart_resize(height, width, factor=config.patch_size * config.merge_size,
                        min_pixels=config.size["shortest_edge"], max_pixels=config.size["longest_edge"])


def qwen3_vl_size(frames: int, height: int, width: int, config) -> tuple[int, int]:
    """Qwen3-VL's frame size: all kept frames share the pixel limits (transformers' Qwen3VLVideoProcessor without
    its per-frame cap, cap_pixels_per_frame false, its default); at least temporal_patch_size frames."""
    return smart_resize_3d(frames, height, width, temporal_factor=config.temporal_patch_size,
                           factor=config.patch_size * config.merge_size, min_pixels=config.size["shortest_edge"],
                           max_pixels=config.size["longest_edge"])


def qwen2_vl_video_inputs(videos: list[Video | list[Image.Image]], config,
                          size=qwen2_vl_size) -> dict[str, torch.Tensor]:
    """`pixel_values_videos` (float32, one row per patch) and `video_grid_thw` (int64, one row per video) for
    Qwen2-VL and Qwen2.5-VL, or Qwen3-VL with `size=qwen3_vl_size`. `config` is the checkpoint's video processor
    settings, which transformers reads from `preprocessor_config.json` when there is no
    `video_preprocessor_config.json`, so the model's image processor serves: any object with `size`
    (shortest_edge/longest_edge: min and max pixels), `patch_size`, `temporal_patch_size`, `merge_size`,
    `image_mean`, `image_std` and `rescale_factor`."""
    mean = torch.tensor(config.image_mean) * (1.0 / config.rescale_factor)  # transformers' fused rescale+normalize
    std = torch.tensor(config.image_std) * (1.0 / config.rescale_factor)
    patches, grids = [], []
    for video in videos:
        frames = [_qwen2_vl_frame(frame) for frame in (video.frames if isinstance(video, Video) else video)]
        if len({frame.size for frame in frames}) != 1:
            raise DataError(f"a video's frames must share one size, got {sorted({f.size for f in frames})}")
        pixels = torch.from_numpy(np.stack([np.asarray(frame) for frame in frames])).permute(0, 3, 1, 2).contiguous()
        height, width = pixels.shape[-2:]
        target = size(len(frames), height, width, config)
        if target != (height, width):  # torchvision leaves a frame of the target size untouched
            pixels = torch.nn.functional.interpolate(pixels, size=list(target), mode="bicubic", align_corners=False,
                                                     antialias=True)
        pixels = (pixels.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        video_patches, grid = _patchify(pixels, config.patch_size, config.temporal_patch_size, config.merge_size)
        patches.append(video_patches)
        grids.append(grid)
    return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.int64)}


def qwen2_vl_video_grid(frames: int, width: int, height: int, config, size=qwen2_vl_size) -> list[int]:
    """video_grid_thw of a video of `frames` frames of (width, height) as read_video gives them (`config` and
    `size` as for qwen2_vl_video_inputs): its token count is the product over merge_size ** 2."""
    width, height = (_qwen2_vl_frame_steps(width, height) or [(width, height)])[-1]
    height, width = size(frames, height, width, config)
    return [-(-frames // config.temporal_patch_size), height // config.patch_size, width // config.patch_size]


def _qwen2_vl_frame(frame: Image.Image) -> Image.Image:
    """LLaMA-Factory's Qwen2-VL plugin's fix-ups (_qwen2_vl_frame_steps), applied."""
    for size in _qwen2_vl_frame_steps(frame.width, frame.height):
        frame = frame.resize(size, Image.Resampling.BICUBIC)
    return frame


def _qwen2_vl_frame_steps(width: int, height: int) -> list[tuple[int, int]]:
    """The sizes LLaMA-Factory's Qwen2-VL plugin resizes a frame to, in turn: sides of at least 28 pixels, aspect
    ratios of at most 200 (cut to 180), which smart_resize would otherwise refuse."""
    steps = []
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
        steps.append((width, height))
    if width / height > 200:
        width = height * 180
        steps.append((width, height))
    if height / width > 200:
        height = width * 180
        steps.append((width, height))
    return steps


def _patchify(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """(frames, C, H, W) -> (grid_t * grid_h * grid_w, C * temporal * patch * patch), patches ordered as
    transformers orders them: by time, then merge_size x merge_size blocks, row-major inside each block."""
    if pad := -pixels.shape[0] % temporal:
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
    frames, channels, height, width = pixels.shape
    grid_t, grid_h, grid_w = frames // temporal, height // patch, width // patch
    blocks = pixels.view(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> (t, block row, block col, row in block, col in block, C, temporal, patch row, patch col)
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch), [grid_t, grid_h, grid_w]
