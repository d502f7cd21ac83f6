"""Special tokens introduced with descriptions (LLaMA-Factory's `new_special_tokens_config`: a YAML mapping each
new token to a sentence about it) and initialised from them (`init_special_tokens`): a new token's embedding row
starts as the mean of the rows of its description's tokens (`desc_init`), plus Gaussian noise of standard deviation
1/sqrt(hidden size) (`desc_init_w_noise`); `noise_init` keeps lf's resizing (the mean of the old rows, with
transformers' noise). An untied output head gets the same from its own rows. Every described token is initialised
(list only tokens the model does not know); a description made only of described tokens falls back to the mean of
the rows before the first described token. (LLaMA-Factory 0.9.5 takes the input embeddings for the head too, and
writes the last rows of the grown matrix, which are the tokens' rows only without padding to a multiple of 64.)
"""

from __future__ import annotations

import math

import torch
import yaml

from lf.errors import ModelError


def read_descriptions(path: str) -> dict[str, str]:
    """new_special_tokens_config's {token: description}, or a ModelError in one line."""
    try:
        with open(path, encoding="utf-8") as f:
            descriptions = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"new_special_tokens_config: cannot read {path}: {exc}") from exc
    if not isinstance(descriptions, dict) or not descriptions or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in descriptions.items()):
        raise ModelError(f"new_special_tokens_config: {path} must map each new token to its description, e.g. "
                         f"'<think>: the start of the reasoning'")
    return descriptions


def init_from_descriptions(model, tokenizer, descriptions: dict[str, str], noise: bool) -> str:
    """Sets the described tokens' rows of the input embeddings and of an untied output head."""
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    rows = {token: tokenizer.convert_tokens_to_ids(token) for token in descriptions}
    described = set(rows.values())
    with torch.no_grad():
        for token, text in descriptions.items():
            ids = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in described]
            for weight in matrices:
                start = weight[ids].mean(0) if ids else weight[:min(described)].mean(0)
                if noise:
                    start = start + torch.randn_like(start) / math.sqrt(weight.shape[1])
                weight[rows[token]] = start
    return (f"init_special_tokens: {len(rows)} special tokens start from the mean embedding of their descriptions' "
            f"tokens{' plus noise' if noise else ''} (new_special_tokens_config)")
