"""Multimodal plugins, as data: one frozen entry per vision-language family (PLUGINS), named by a template's
`mm_plugin` and matched to a model by its config's model_type.

An entry says how the family's own processor turns each "<image>" placeholder into the model's image tokens (the
token, what wraps it, how many an image of a given size gets: always the processor's count, never a guess), and
which parts of the model are its vision tower, its projector and its language model (module path parts), which
the freeze keys, LoRA's `lora_target: all` and QLoRA's unquantized modules read. `MMProcessor` applies an entry
with the model's loaded image processor: it expands a conversation's placeholders while tokenizing (image sizes
from the files' headers) and builds the forward's image inputs for a batch (pixel_values and what else the image
processor returns, e.g. Qwen2-VL's image_grid_thw; the model computes its own M-RoPE positions from them, except
in neat-packed rows, whose examples get theirs from the plugin's `rope_positions`).

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

import torch

from lf.data import images
from lf.data.conversation import IMAGE_PLACEHOLDER
from lf.errors import DataError, did_you_mean

log = logging.getLogger("lf")
PROCESSOR_CONFIG = "processor_config.json"  # the processor's own settings (LLaVA's patch_size, ...)


def _qwen2_vl_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """One token per merge_size x merge_size patches of the image as the image processor resizes it."""
    return image_processor.get_number_of_image_patches(height, width) // image_processor.merge_size ** 2


def _llava_tokens(image_processor, processor_config: dict, height: int, width: int) -> int:
    """LlavaProcessor's count: every image is cropped to crop_size, one token per patch, plus the processor's
    additional ones (CLIP's CLS), less one with the "default" feature strategy (which drops the CLS)."""
    try:
        patch = processor_config["patch_size"]
    except KeyError:
        raise DataError(f"the model's {PROCESSOR_CONFIG} has no patch_size, which LLaVA's image token count needs: "
                        f"save the model's LlavaProcessor beside it (processor.save_pretrained)") from None
    crop = image_processor.crop_size
    tokens = (crop.height // patch) * (crop.width // patch) + processor_config.get("num_additional_image_tokens", 0)
    return tokens - (processor_config.get("vision_feature_select_strategy") == "default")


def _mrope_positions(image_processor, is_media, grids) -> torch.Tensor:
    """Qwen2-VL's 3-D M-RoPE positions (temporal, height, width) of one example alone, as its model's get_rope_index
    gives them: text tokens count on in all three; an image's tokens get their (t, h, w) cell in the merged patch
    grid, offset by the position reached, which then moves on by the grid's larger side. `is_media`: (n,) bool,
    the example's image tokens; `grids`: an iterator over its images' (t, h, w) patch grids, in order."""
    merge, n = image_processor.merge_size, len(is_media)
    pieces, position, i = [], 0, 0
    while i < n:
        if is_media[i]:
            t, h, w = (int(v) for v in next(grids))
            h, w = h // merge, w // merge
            cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            pieces.append(cells.reshape(3, -1) + position)
            position += max(h, w)
            i += t * h * w
        else:
            media = is_media[i:].nonzero()
            end = i + int(media[0]) if len(media) else n
            pieces.append(torch.arange(position, position + end - i).expand(3, -1))
            position += end - i
            i = end
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


@dataclass(frozen=True)
class MMPlugin:
    name: str
    model_types: tuple[str, ...]  # config.model_type of the models it serves
    image_token: str  # repeated once per image feature
    image_tokens: Callable[..., int]  # (image_processor, processor_config, height, width) -> the token count
    wrap: tuple[str, str] = ("", "")  # written before and after an image's tokens
    token_types: bool = False  # the forward takes mm_token_type_ids (1 at image tokens), as its processor returns
    # (image_processor, is_media, grids) -> one example's (3, n) positions, for a family with 3-D M-RoPE positions
    # (its model computes them over a whole row, so a neat-packed row gets each example's from lf)
    rope_positions: Callable[..., torch.Tensor] | None = None
    # module path parts (matched at "." boundaries) of each part of the model
    vision_tower: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    language_model: tuple[str, ...] = ()


_ENTRIES = {plugin.name: plugin for plugin in (
    MMPlugin("qwen2_vl", ("qwen2_vl",), "<|image_pad|>", _qwen2_vl_tokens, ("<|vision_start|>", "<|vision_end|>"),
             token_types=True, rope_positions=_mrope_positions, vision_tower=("visual.patch_embed", "visual.blocks"),
             projector=("visual.merger",), language_model=("language_model", "lm_head")),
    MMPlugin("llava", ("llava",), "<image>", _llava_tokens, vision_tower=("vision_tower",),
             projector=("multi_modal_projector",), language_model=("language_model", "lm_head")),
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
            out.update(self.image_processor(images=decoded, return_tensors="pt"))
        if self.plugin.token_types:
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return out

    def packed_positions(self, input_ids, position_ids, inputs: dict):
        """The position_ids of a neat-packed batch (examples start where position_ids restart at 0), given its
        image inputs (from `inputs`): as they are, or for a family with M-RoPE (4, B, L): these text positions
        (from which attention finds the examples), then each example's 3-D positions as if it ran alone."""
        if self.plugin.rope_positions is None:
            return position_ids
        grids = iter(inputs.get("image_grid_thw", ()))
        rope = torch.empty(3, *position_ids.shape, dtype=position_ids.dtype)
        for row, (ids, positions) in enumerate(zip(input_ids, position_ids)):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            for start, end in zip(starts[:-1], starts[1:]):
                rope[:, row, start:end] = self.plugin.rope_positions(
                    self.image_processor, ids[start:end] == self.image_token_id, grids)
        return torch.cat([position_ids[None], rope])

    def save_pretrained(self, output_dir: str) -> None:
        """The image processor (preprocessor_config.json) and the processor's own settings, beside the tokenizer
        that the trainer saves: what transformers' AutoProcessor / AutoImageProcessor load."""
        self.image_processor.save_pretrained(output_dir)
        if self.processor_config:
            with open(os.path.join(output_dir, PROCESSOR_CONFIG), "w") as f:
                json.dump(self.processor_config, f, indent=2, sort_keys=True)
