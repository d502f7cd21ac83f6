"""Packages only some of lf's data needs (video and audio decoding): imported when first used, a missing one is
one line naming the pip command."""

import importlib

from lf.errors import DataError


def require(module: str, purpose: str, extra: str = "media"):
    """`module` imported, or a DataError saying that `purpose` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(f"{purpose} needs the '{module}' package ({exc}): pip install 'lf[{extra}]'") from None
