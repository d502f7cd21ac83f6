"""The data group: which datasets, how they are templated, cut, packed and cached (LLaMA-Factory's key names)."""

from dataclasses import dataclass


@dataclass
class DataArguments:
    template: str | None = None  # None: the tokenizer's own chat_template when it has one, else "default"
    dataset: str | None = None  # comma-separated names from dataset_info.json
    eval_dataset: str | None = None
    dataset_dir: str = "data"
    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False  # labels on the last turn only
    streaming: bool = False
    buffer_size: int = 16384  # shuffle buffer when streaming
    mix_strategy: str = "concat"  # concat | interleave_under | interleave_over
    interleave_probs: str | None = None  # comma-separated, one per dataset
    overwrite_cache: bool = False
    preprocessing_batch_size: int = 1000
    preprocessing_num_workers: int | None = None
    # several machines: true when they share one filesystem, so that only the first machine's main process prepares
    # the datasets (and writes the cache the others read); false: each machine's main process prepares its own
    data_shared_file_system: bool = False
    max_samples: int | None = None  # per dataset
    val_size: float = 0.0  # a fraction in (0, 1) or a count >= 1
    eval_on_each_dataset: bool = False
    packing: bool | None = None  # None: on for pt, off otherwise
    neat_packing: bool | None = None  # None: on when packing for sft (packed examples never see each other)
    tool_format: str | None = None  # None: the template's own
    default_system: str | None = None
    enable_thinking: bool = True
    tokenized_path: str | None = None
    # images (lf.data.mm_plugins): where relative paths in an images column start, and the pixel counts an image
    # is resized into (keeping its aspect ratio) before the model's image processor sees it
    media_dir: str | None = None  # None: dataset_dir
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    # videos (lf.data.video): frames kept per second of video and at most, each frame resized into the pixel range
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    audio_sampling_rate: int = 16000  # audio clips are resampled to this rate (lf.data.audio)
    # Qwen2.5-Omni (template qwen2_omni): each video is read with its sound, their tokens interleaved in time chunks
    use_audio_in_video: bool = False
    crop_to_patches: bool = False  # InternVL: an image is cut into tiles (and a thumbnail) as its processor does
    image_do_pan_and_scan: bool = False  # Gemma 3: a wide or tall image also gets its processor's crops
