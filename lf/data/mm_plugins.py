"""Multimodal plugins, as data: one frozen entry per vision-language family (PLUGINS), named by a template's
`mm_plugin` and matched to a model by its config's model_type.

An entry says how the family's own processor turns each "<image>" placeholder into the model's image tokens (the
token, what wraps it, how many an image of a given size gets: always the processor's count, never a guess), and
which parts of the model are its vision tower, its projector and its language model (module path parts), which
the freeze keys and LoRA's `lora_target: all` read. `MMProcessor` applies an entry with the model's loaded image
processor: it expands a conversation's placeholders while tokenizing (image sizes from the files' headers) and
builds the forward's image inputs for a batch (pixel_values and what else the image processor returns, e.g.
Qwen2-VL's image_grid_thw; the model computes its own M-RoPE positions from them).

Adding a family: its entry below (and a template naming it in lf/data/templates.py); tests/test_multimodal.py
builds a tiny model of each family and compares lf's rows with the family's processor.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

from lf.data import images
from lf.data.conversation import IMAGE_PLACEHOLDER
from lf.errors import DataError, did_you_mean

log = logging.getLogger("lf")
PROCESSOR_CONFIG = "processor_config.json"  # the processor's own settings (LLaVA's patch_size, ...)


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


def _gemma3_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """Gemma3Processor's count: image_seq_length soft tokens for every image (its projector pools any image to
    that many)."""
    return _setting(processor_config, "image_seq_length", "Gemma3Processor")


def _intern_vl_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """InternVLProcessor's count: image_seq_length context tokens per patch, the patches as its image processor
    (GotOcr2's) cuts the image: one, or with crop_to_patches its tiles and a thumbnail."""
    patches = image_processor.get_number_of_image_patches(height, width)
    return _setting(processor_config, "image_seq_length", "InternVLProcessor") * patches


@dataclass(frozen=True)
class MMPlugin:
    name: str
    model_types: tuple[str, ...]  # config.model_type of the models it serves
    image_token: str  # repeated once per image feature
    image_tokens: Callable[..., int]  # (image_processor, processor_config, height, width) -> the token count
    wrap: tuple[str, str] = ("", "")  # written before and after an image's tokens
    token_types: bool = False  # the forward takes a mask of the image tokens (1 there), as its processor returns
    token_type_key: str = "mm_token_type_ids"  # that mask's name (Gemma 3: token_type_ids)
    unused: tuple[str, ...] = ()  # what the image processor returns that the forward does not take
    settings: tuple[tuple[str, str], ...] = ()  # (data key, the image processor attribute it sets)
    # module path parts (matched at "." boundaries) of each part of the model
    vision_tower: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    language_model: tuple[str, ...] = ()


_ENTRIES = {plugin.name: plugin for plugin in (
    MMPlugin("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "<|image_pad|>", _qwen2_vl_tokens,
             ("<|vision_start|>", "<|vision_end|>"), token_types=True,
             vision_tower=("visual.patch_embed", "visual.blocks"), projector=("visual.merger",),
             language_model=("language_model", "lm_head")),
    # Qwen3-VL's images read as Qwen2-VL's (its image processor is Qwen2-VL's, patch 16); its deepstack mergers feed
    # vision features into early language layers and, as LLaMA-Factory has it, count with the vision tower
    MMPlugin("qwen3_vl", ("qwen3_vl",), "<|image_pad|>", _qwen2_vl_tokens, ("<|vision_start|>", "<|vision_end|>"),
             token_types=True, vision_tower=("visual.pos_embed", "visual.patch_embed", "visual.blocks",
                                             "visual.deepstack_merger_list"),
             projector=("visual.merger",), language_model=("language_model", "lm_head")),
    MMPlugin("llava", ("llava",), "<image>", _llava_tokens, vision_tower=("vision_tower",),
             projector=("multi_modal_projector",), language_model=("language_model", "lm_head")),
    # image_newline (the learned token closing each row of the anyres grid) trains and freezes with the projector
    MMPlugin("llava_next", ("llava_next",), "<image>", _llava_next_tokens, vision_tower=("vision_tower",),
             projector=("multi_modal_projector", "image_newline"), language_model=("language_model", "lm_head")),
    # Gemma 3 attends bidirectionally within an image's soft tokens: its forward reads them from token_type_ids
    MMPlugin("gemma3", ("gemma3",), "<image_soft_token>", _gemma3_tokens,
             ("\n\n<start_of_image>", "<end_of_image>\n\n"), token_types=True, token_type_key="token_type_ids",
             unused=("num_crops",), vision_tower=("vision_tower",),
             projector=("multi_modal_projector",), language_model=("language_model", "lm_head")),
    MMPlugin("intern_vl", ("internvl",), "<IMG_CONTEXT>", _intern_vl_tokens, ("<img>", "</img>"),
             unused=("num_patches",), settings=(("crop_to_patches", "crop_to_patches"),),
             vision_tower=("vision_tower",), projector=("multi_modal_projector",),
             language_model=("language_model", "lm_head")),
)}
PLUGINS = MappingProxyType(_ENTRIES)


def get_plugin(name: str) -> MMPlugin:
    if name not in PLUGINS:
        raise DataError(f"unknown multimodal plugin {name!r}.{did_you_mean(name, PLUGINS)} Known: "
                        f"{', '.join(PLUGINS)}")
    return PLUGINS[name]


def plugin_for(model_type: str) -> MMPlugin | None:
    """The plugin serving models of `model_type`, or None for a text-only model."""
    return next((plugin for plugin in PLUGINS.values() if model_type in plugin.model_types), None)


def in_part(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the module or parameter path `name` lies in one of `parts` (e.g. "visual.blocks")."""
    dotted = f".{name}."
    return any(f".{part}." in dotted for part in parts)


@dataclass
class MMProcessor:
    """A plugin with the model's image processor and the run's image settings (picklable: dataset workers and
    DataLoader workers get a copy)."""

    plugin: MMPlugin
    image_processor: object
    image_token_id: int
    media_dir: str
    limits: images.PixelLimits
    processor_config: dict = field(default_factory=dict)
    _resize_said: bool = field(default=False, compare=False)

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

    def expand(self, messages: list[dict], refs: list) -> tuple[list[dict], list[dict], int]:
        """(messages with each placeholder replaced by its image's tokens, the references resolved against
        media_dir, the total image tokens); the sizes are read from the images' headers."""
        refs = [images.resolved(ref, self.media_dir) for ref in refs]
        sizes = [(images.size(ref), ref.get("path") or "an image given as bytes") for ref in refs]
        expanded, count = self.placed(messages, sizes)
        return expanded, refs, count

    def placed(self, messages: list[dict], sizes: list[tuple[tuple[int, int], str]]) -> tuple[list[dict], int]:
        """(messages with each placeholder replaced by the tokens of its image, the total image tokens), the
        images given by their ((width, height), name) in order: training's rows and served prompts both."""
        counts = [self.tokens(size, where) for size, where in sizes]
        left = iter(counts)
        before, after = self.plugin.wrap
        expanded = []
        for message in messages:
            pieces = (message["content"] or "").split(IMAGE_PLACEHOLDER)
            text = pieces[0] + "".join(before + self.plugin.image_token * next(left) + after + piece
                                       for piece in pieces[1:])
            expanded.append({**message, "content": text} if len(pieces) > 1 else message)  # None content kept
        return expanded, sum(counts)

    def features(self, refs: list[dict], input_ids) -> dict:
        """The forward's image inputs for a batch whose images are `refs` (in row order) and whose token ids are
        `input_ids` (a padded tensor)."""
        return self.inputs([images.pixels(ref, self.limits) for ref in refs], input_ids)

    def inputs(self, decoded: list, input_ids) -> dict:
        """The forward's image inputs from RGB images already in the pixel limits (in the order of their tokens
        in `input_ids`, a padded tensor): pixel_values and the like, and mm_token_type_ids where the forward
        takes them."""
        out = {}
        if decoded:
            features = self.image_processor(images=decoded, return_tensors="pt")
            out.update((key, value) for key, value in features.items() if key not in self.plugin.unused)
        if self.plugin.token_types:
            out[self.plugin.token_type_key] = (input_ids == self.image_token_id).long()
        return out

    def save_pretrained(self, output_dir: str) -> None:
        """The image processor (preprocessor_config.json) and the processor's own settings, beside the tokenizer
        that the trainer saves: what transformers' AutoProcessor / AutoImageProcessor load."""
        self.image_processor.save_pretrained(output_dir)
        if self.processor_config:
            with open(os.path.join(output_dir, PROCESSOR_CONFIG), "w") as f:
                json.dump(self.processor_config, f, indent=2, sort_keys=True)
