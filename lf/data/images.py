"""Reading a dataset's images: a canonical image reference ({"bytes", "path"}, lf.data.conversation) -> its size
or its pixels, resized into [image_min_pixels, image_max_pixels] with its aspect ratio kept.

Sizes come from the file's header (PIL opens lazily), so tokenizing never decodes pixels; the collator decodes
each batch's images when it builds the model's inputs.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass

from lf.errors import DataError

log = logging.getLogger("lf")


@dataclass(frozen=True)
class PixelLimits:
    max_pixels: int
    min_pixels: int

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) scaled to hold at most max_pixels and at least min_pixels (each side at least 1)."""
        pixels = width * height
        limit = self.max_pixels if pixels > self.max_pixels else self.min_pixels if pixels < self.min_pixels else 0
        if not limit:
            return width, height
        scale = math.sqrt(limit / pixels)
        return max(1, int(width * scale)), max(1, int(height * scale))


def resolved(ref: dict, media_dir: str) -> dict:
    """`ref` with a relative path made absolute against media_dir (bytes are kept as they are)."""
    if ref.get("bytes") or not ref.get("path") or os.path.isabs(ref["path"]):
        return ref
    return {"bytes": None, "path": os.path.join(media_dir, ref["path"])}


def _open(ref: dict):
    from PIL import Image, UnidentifiedImageError

    where = ref.get("path") or "an image given as bytes"
    try:
        return Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"])
    except FileNotFoundError:
        raise DataError(f"image {where} does not exist: fix the path in the images column (relative paths start at "
                        f"media_dir, which defaults to dataset_dir)") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image {where} cannot be read ({err}): replace it with a JPEG, PNG or another image file "
                        f"PIL reads") from None


def size(ref: dict) -> tuple[int, int]:
    """(width, height) of the image, read from its header."""
    with _open(ref) as image:
        return image.size


def pixels(ref: dict, limits: PixelLimits):
    """The image decoded as RGB, resized into the limits."""
    with _open(ref) as image:
        try:
            rgb = image.convert("RGB")
        except OSError as err:  # a truncated or corrupt body behind a readable header
            raise DataError(f"image {ref.get('path') or 'given as bytes'} cannot be decoded ({err}): replace "
                            f"it") from None
    return fitted(rgb, limits)


def fitted(rgb, limits: PixelLimits):
    """A decoded RGB image resized into the limits (itself when it is within them)."""
    target = limits.fit(*rgb.size)
    return rgb if target == rgb.size else rgb.resize(target, resample=3)  # 3: bicubic, as the image processors
