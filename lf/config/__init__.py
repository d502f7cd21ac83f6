"""lf's argument groups, with LLaMA-Factory's key names."""

from lf.config.data import DataArguments

__all__ = ["DataArguments"]
