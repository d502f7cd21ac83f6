"""LLaMA Pro (Wu et al., 2024): block expansion, and which decoder layers train afterwards.

`lf expand` grows a model of N decoder layers by E new ones (E divides N): after every N/E original layers comes a
copy of the layer before it whose output projections (attention's o_proj, the MLP's down_proj) are zero. A zeroed
block adds nothing to the residual stream, so the expanded model computes what the original did; training then
teaches the new blocks while the original ones stay frozen (use_llama_pro: true with finetuning_type freeze or
lora and freeze_trainable_layers: E), so the model learns new knowledge without losing the old.

The expanded model's layers are numbered afresh: with N + E layers in groups of N/E + 1, the new block is the last
of each group (ids N/E, 2(N/E) + 1, ...), which is what `expanded_layer_ids` gives from the expanded model alone.
"""

from __future__ import annotations

import argparse
import logging
import re

import torch

from lf.errors import ModelError

log = logging.getLogger("lf")

ZEROED = ("o_proj", "down_proj")  # the output projections of a block's attention and MLP
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per decoder layer (sliding or full attention)

USAGE = """usage: lf expand --model_name_or_path PATH --output_dir DIR --num_expand E

LLaMA Pro block expansion: writes to DIR the model with E new decoder layers (E must divide its number of layers),
one after every (layers / E) layers: copies of the layer before with o_proj and down_proj zeroed, so the expanded
model computes what the original did. Then train the new layers alone with:
  model_name_or_path: DIR
  finetuning_type: freeze
  freeze_trainable_layers: E
  use_llama_pro: true"""


def expanded_layer_ids(num_layers: int, num_expand: int, key: str = "freeze_trainable_layers") -> list[int]:
    """The ids of the new blocks in a model expanded to `num_layers` layers by `num_expand` (`key` names the
    option that gave num_expand, for the message)."""
    if num_expand <= 0 or num_layers % num_expand:
        raise ModelError(f"{key}: {num_expand} does not divide the model's {num_layers} decoder layers: LLaMA Pro "
                         f"needs a positive divisor (the num_expand `lf expand` used), e.g. "
                         f"{', '.join(str(d) for d in range(1, num_layers + 1) if num_layers % d == 0)}")
    stride = num_layers // num_expand
    return list(range(stride - 1, num_layers, stride))


def _layer_map(num_layers: int, num_expand: int) -> list[tuple[int, bool]]:
    """For each layer of the expanded model: (the original layer it copies, whether it is a new zeroed block)."""
    expanded_layer_ids(num_layers, num_expand, "num_expand")  # the divisibility check
    split = num_layers // num_expand
    layers = []
    for i in range(num_layers):
        layers.append((i, False))
        if (i + 1) % split == 0:
            layers.append((i, True))
    return layers


def _decoder_prefix(state: dict[str, torch.Tensor], num_layers: int) -> str:
    """The state-dict prefix of the decoder layers ("model.layers."): the one with every index 0..num_layers-1."""
    found: dict[str, set[int]] = {}
    for key in state:
        for match in re.finditer(r"\.(\d+)\.", key):
            found.setdefault(key[:match.start() + 1], set()).add(int(match.group(1)))
    for prefix, ids in found.items():
        if ids == set(range(num_layers)):
            return prefix
    raise ModelError(f"lf expand: found no list of {num_layers} decoder layers in the model's weights")


def expand_state(state: dict[str, torch.Tensor], num_layers: int, num_expand: int) -> dict[str, torch.Tensor]:
    """The expanded model's weights from the original's."""
    prefix = _decoder_prefix(state, num_layers)
    layer_keys: dict[int, list[str]] = {}
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            layer_keys.setdefault(int(index), []).append(rest)
        else:
            out[key] = value
    if not any(name in rest for rest in layer_keys[0] for name in ZEROED):
        raise ModelError(f"lf expand: the decoder layers have no {' or '.join(ZEROED)} (Llama, Mistral, Qwen, Gemma "
                         f"and their kind have): this model's layers hold {', '.join(sorted(layer_keys[0]))}")
    for new, (old, zeroed) in enumerate(_layer_map(num_layers, num_expand)):
        for rest in layer_keys[old]:
            value = state[f"{prefix}{old}.{rest}"]
            zero = zeroed and any(f"{name}." in f".{rest}" for name in ZEROED)
            out[f"{prefix}{new}.{rest}"] = torch.zeros_like(value) if zero else value.clone() if zeroed else value
    return out


def expand_config(config, num_expand: int):
    """A copy of the config with num_expand more layers (per-layer lists follow the layers they copy)."""
    text = config.get_text_config()
    num_layers = text.num_hidden_layers
    layers = _layer_map(num_layers, num_expand)
    new = config.__class__.from_dict(config.to_dict())
    new_text = new.get_text_config()
    new_text.num_hidden_layers = len(layers)
    for name in PER_LAYER_CONFIG:
        per_layer = getattr(text, name, None)
        if isinstance(per_layer, list) and len(per_layer) == num_layers:
            setattr(new_text, name, [per_layer[old] for old, _ in layers])
    return new


def expand(model_name_or_path: str, output_dir: str, num_expand: int) -> list[int]:
    """Writes the expanded model and the tokenizer to output_dir; returns the new blocks' ids."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from lf.config.model import ModelArguments
    from lf.model.paths import resolve_model_path

    path = resolve_model_path(ModelArguments(model_name_or_path=model_name_or_path))
    config = AutoConfig.from_pretrained(path)
    num_layers = config.get_text_config().num_hidden_layers
    new_config = expand_config(config, num_expand)  # refuses a num_expand that does not divide num_layers
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    state = expand_state(model.state_dict(), num_layers, num_expand)
    with no_init_weights():  # every weight comes from `state`
        expanded = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
    try:
        expanded.load_state_dict(state, strict=True)
    except RuntimeError as e:  # layers built differently by their index (e.g. which ones are mixture-of-experts)
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:160]
        raise ModelError(f"lf expand: the expanded {config.model_type} model's layers do not take the copied weights "
                         f"({detail}): models whose layers differ by their position are not supported") from e
    expanded.generation_config = model.generation_config
    expanded.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return expanded_layer_ids(new_config.get_text_config().num_hidden_layers, num_expand, "num_expand")


def command(argv: list[str]) -> int:
    """`lf expand --model_name_or_path PATH --output_dir DIR --num_expand E`."""
    parser = argparse.ArgumentParser(prog="lf expand", usage=USAGE.split("\n", 1)[0][len("usage: "):])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_expand", type=int, required=True)
    args = parser.parse_args(argv)
    new = expand(args.model_name_or_path, args.output_dir, args.num_expand)
    print(f"lf expand: {args.output_dir}: {args.model_name_or_path} with new zeroed blocks at layers "
          f"{', '.join(map(str, new))}. Train them with:\n  model_name_or_path: {args.output_dir}\n"
          f"  finetuning_type: freeze\n  freeze_trainable_layers: {args.num_expand}\n  use_llama_pro: true")
    return 0
