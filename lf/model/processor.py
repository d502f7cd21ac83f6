"""The model's image processor, bound to the template's multimodal plugin (lf.data.mm_plugins.MMProcessor).

lf loads the image processor and the tokenizer apart rather than the family's transformers processor: Qwen2-VL's
processor class holds a video processor that needs torchvision even for images, while the image processors have
a PIL backend that runs anywhere (used when torchvision is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import logging

from lf.data.images import PixelLimits
from lf.data.mm_plugins import PROCESSOR_CONFIG, MMProcessor, get_plugin
from lf.errors import ModelError
from lf.model.paths import download_error, resolve_model_path

log = logging.getLogger("lf")
_SUB_PROCESSORS = ("image_processor", "video_processor", "feature_extractor", "tokenizer", "audio_processor")


def _processor_config(path: str, model_args) -> dict:
    """processor_config.json's own settings (patch_size, ...; not the sub-processors it may nest), or {}."""
    from transformers.utils import cached_file

    found = cached_file(path, PROCESSOR_CONFIG, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                        token=model_args.hf_hub_token, _raise_exceptions_for_missing_entries=False)
    if not found:
        return {}
    with open(found, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if k not in _SUB_PROCESSORS}


def load_mm_processor(model_args, data_args, tokenizer, template) -> MMProcessor | None:
    """The image side of the model for `template`'s plugin, or None when the template takes no images or the
    model has no image processor (a dataset with images is then refused by lf.data.pipeline.check_images)."""
    from transformers import AutoConfig, AutoImageProcessor

    if template.mm_plugin is None:
        return None
    plugin = get_plugin(template.mm_plugin)
    path = resolve_model_path(model_args)
    try:
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                                revision=model_args.model_revision,
                                                cache_dir=model_args.cache_dir, token=model_args.hf_hub_token).model_type
    except (OSError, ValueError) as exc:
        raise download_error(model_args.model_name_or_path, exc) from exc
    if model_type not in plugin.model_types:
        raise ModelError(f"template {template.name} puts images in prompts the way {', '.join(plugin.model_types)} "
                         f"models read them, but {model_args.model_name_or_path} is a {model_type} model: use the "
                         f"template of its family")
    backend = None if importlib.util.find_spec("torchvision") else "pil"  # torchvision's backend when it is there
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, backend=backend, revision=model_args.model_revision,
                                                             cache_dir=model_args.cache_dir,
                                                             token=model_args.hf_hub_token,
                                                             trust_remote_code=model_args.trust_remote_code)
    except OSError:
        return None
    for key, attribute in plugin.settings:  # saved with it: an export's processor cuts images alike
        setattr(image_processor, attribute, getattr(data_args, key))
    token_id = tokenizer.convert_tokens_to_ids(plugin.image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ModelError(f"the tokenizer of {model_args.model_name_or_path} has no token {plugin.image_token!r}, "
                         f"which template {template.name} puts images into: use the model's own tokenizer")
    log.info("images: %s's %s with plugin %s (image tokens %r)", model_args.model_name_or_path,
             type(image_processor).__name__, plugin.name, plugin.image_token)
    return MMProcessor(plugin, image_processor, token_id, data_args.media_dir or data_args.dataset_dir,
                       PixelLimits(data_args.image_max_pixels, data_args.image_min_pixels),
                       _processor_config(path, model_args))
