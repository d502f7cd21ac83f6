"""The model's image processor (or, for audio, its feature extractor), bound to the template's multimodal plugin
(lf.data.mm_plugins.MMProcessor).

lf loads the image processor and the tokenizer apart rather than the family's transformers processor: Qwen2-VL's
processor class holds a video processor that needs torchvision even for images, while the image processors have
a PIL backend that runs anywhere (used when torchvision is not installed).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging

from lf.data.images import PixelLimits
from lf.data.mm_plugins import PLUGINS, PROCESSOR_CONFIG, VIDEO_PROCESSOR_CONFIG, MMProcessor, get_plugin
from lf.errors import ConfigError, ModelError
from lf.model.paths import download_error, resolve_model_path

log = logging.getLogger("lf")
_SUB_PROCESSORS = ("image_processor", "video_processor", "feature_extractor", "tokenizer", "audio_processor")


def _saved(path: str, model_args, name: str) -> dict:
    """The model's settings file `name`, or {}."""
    from transformers.utils import cached_file

    found = cached_file(path, name, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                        token=model_args.hf_hub_token, _raise_exceptions_for_missing_entries=False)
    if not found:
        return {}
    with open(found, encoding="utf-8") as f:
        return json.load(f)


def _processor_config(saved: dict) -> dict:
    """processor_config.json's own settings (patch_size, ...; not the sub-processors it may nest)."""
    return {k: v for k, v in saved.items() if k not in _SUB_PROCESSORS}


def _video_processor(saved: dict, path: str, model_args) -> dict:
    """The video processor's settings where the model saves them apart (nested in processor_config.json, else
    video_preprocessor_config.json, transformers' order), or {}."""
    return saved.get("video_processor") or _saved(path, model_args, VIDEO_PROCESSOR_CONFIG)


def load_mm_processor(model_args, data_args, tokenizer, template) -> MMProcessor | None:
    """The media side of the model for `template`'s plugin, or None when the template takes no media or the model
    has no image processor / feature extractor (a dataset with media is then refused by
    lf.data.pipeline.check_images)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor

    _check_audio_in_video(data_args, template)
    if template.mm_plugin is None:
        return None
    plugin = get_plugin(template.mm_plugin)
    path = resolve_model_path(model_args)
    hub = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir, token=model_args.hf_hub_token,
               trust_remote_code=model_args.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, **hub)
        model_type = config.model_type
    except (OSError, ValueError) as exc:
        raise download_error(model_args.model_name_or_path, exc) from exc
    if model_type not in plugin.model_types:
        raise ModelError(f"template {template.name} puts media in prompts the way {', '.join(plugin.model_types)} "
                         f"models read them, but {model_args.model_name_or_path} is a {model_type} model: use the "
                         f"template of its family")
    plugin = PLUGINS.get(model_type, plugin)  # a model type with an entry of its own under the template's family
    backend = None if importlib.util.find_spec("torchvision") else "pil"  # torchvision's backend when it is there
    visual = bool(plugin.image_token) or "videos" in plugin.modalities
    try:  # (image processor, feature extractor): Qwen2.5-Omni has both, in one preprocessor_config.json
        parts = (AutoImageProcessor.from_pretrained(path, backend=backend, **hub) if visual else None,
                 AutoFeatureExtractor.from_pretrained(path, **hub) if plugin.feature_extractor else None)
    except OSError:
        return None
    if plugin.processor:
        import transformers

        for attribute, value in getattr(transformers, plugin.processor).images_kwargs.items():
            if getattr(parts[0], attribute, None) is None:
                setattr(parts[0], attribute, value)
    for key, attribute in plugin.settings:  # saved with it: an export's processor cuts images alike
        setattr(parts[0], attribute, getattr(data_args, key))
    token_ids = {}
    for column, modality in plugin.modalities.items():
        token_id = tokenizer.convert_tokens_to_ids(modality.token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ModelError(f"the tokenizer of {model_args.model_name_or_path} has no token {modality.token!r}, "
                             f"which template {template.name} puts {column} into: use the model's own tokenizer")
        token_ids[column] = token_id
    log.info("media: %s's %s with plugin %s (%s)", model_args.model_name_or_path,
             " and ".join(type(part).__name__ for part in parts if part is not None), plugin.name,
             ", ".join(f"{column}: {m.token!r}" for column, m in plugin.modalities.items()))
    saved = _saved(path, model_args, PROCESSOR_CONFIG)
    video = dict(video_fps=data_args.video_fps, video_maxlen=data_args.video_maxlen,
                 video_max_pixels=data_args.video_max_pixels, video_min_pixels=data_args.video_min_pixels)
    config = getattr(config, "thinker_config", config)  # Qwen2.5-Omni saved whole: its thinker reads the media
    return MMProcessor(plugin, parts[0], token_ids, data_args.media_dir or data_args.dataset_dir,
                       PixelLimits(data_args.image_max_pixels, data_args.image_min_pixels),
                       _processor_config(saved), video, data_args.audio_sampling_rate, parts[1],
                       {key: functools.reduce(getattr, key.split("."), config) for key in plugin.model_settings},
                       _video_processor(saved, path, model_args) if "videos" in plugin.modalities else {},
                       use_audio_in_video=data_args.use_audio_in_video)


def _check_audio_in_video(data_args, template) -> None:
    """use_audio_in_video asks for a video's sound beside its frames: only a family that reads them together takes
    it (Qwen2.5-Omni)."""
    if not data_args.use_audio_in_video or (
            template.mm_plugin is not None and get_plugin(template.mm_plugin).audio_in_video is not None):
        return
    from lf.data.templates import TEMPLATES

    takers = [name for name, t in sorted(TEMPLATES.items()) if t.mm_plugin and get_plugin(t.mm_plugin).audio_in_video]
    raise ConfigError(f"use_audio_in_video: true reads each video's sound with its frames, which template "
                      f"{template.name} does not do (only {', '.join(takers)}: Qwen2.5-Omni): set template: "
                      f"{takers[0]} for a Qwen2.5-Omni model, or remove use_audio_in_video")
