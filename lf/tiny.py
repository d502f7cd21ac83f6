"""Tiny tokenizers and models built on this machine (no model hub): for the quickstart, the tests and the
benchmarks."""

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lf.errors import ModelError, did_you_mean
from lf.resources import shipped

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, extra_special_tokens: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained on `texts` (any text encodes; no unknown tokens), wrapped for transformers.

    bos `<s>`, eos `</s>`, pad `<pad>`; `extra_special_tokens` (a template's markers such as `<|im_start|>`) are
    added as single tokens. Encoding adds no special tokens: templates place them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[len(SPECIAL_TOKENS):])


# ---- the quickstart model ----

@dataclass(frozen=True)
class TinyModel:
    """A registered tiny model: its transformers config and the tokenizer trained for it."""

    config: Mapping[str, object]  # AutoConfig.for_model keyword arguments (model_type picks the family)
    vocab_size: int  # the BPE trainer's target; a small corpus may stop short of it
    special_tokens: tuple[str, ...] = CHATML_TOKENS  # so templates qwen and chatml find their markers
    seed: int = 0  # the random initial weights are the same on every machine


TINY_MODELS: Mapping[str, TinyModel] = MappingProxyType({
    # ~5M parameters: LoRA SFT with packing runs about a hundred steps in a minute or two on 2 CPU cores. Widths
    # are multiples of 64, bitsandbytes' 4-bit block: its AVX-512 CPU kernel misreads rows that are not (QLoRA)
    "lf-tiny-llama": TinyModel(MappingProxyType(dict(
        model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)), vocab_size=4000),
})

DATA_DIR = shipped("data")
CORPUS_FILES = ("lf_demo_en.json", "identity.json")
# chat templates wrap turns in role names: seen in training, each becomes a single token
ROLE_TEXT = "system\nuser\nassistant\n"
FALLBACK_TEXT = (
    "A language model reads text as tokens and learns to predict the next one. Fine-tuning adapts a trained "
    "model to new data: full fine-tuning updates every weight, freezing trains a few layers, and LoRA adds small "
    "low-rank matrices beside the frozen weights. Quantization stores weights in fewer bits so that large models "
    "fit in memory. A chat template turns a conversation of system, user and assistant messages into one text. "
    "Packing puts several short examples into one row so that little compute is spent on padding. "
    "Hello! I am an assistant. How can I help you today? Ask me a question and I will answer it."
)


def _corpus() -> list[str]:
    """The texts the tiny tokenizer learns from: lf's demo datasets, or a built-in paragraph without them."""
    texts = []
    for name in CORPUS_FILES:
        path = DATA_DIR / name
        if path.is_file():
            for record in json.loads(path.read_text(encoding="utf-8")):
                texts += [record.get(key) or "" for key in ("instruction", "input", "output")]
                texts += [text for turn in record.get("history") or [] for text in turn]
    return [ROLE_TEXT] + ([t for t in texts if t] or [FALLBACK_TEXT])


def _tiny_spec(name: str) -> TinyModel:
    if name not in TINY_MODELS:
        raise ModelError(f"no tiny model named {name!r} (there are: {', '.join(TINY_MODELS)})."
                         f"{did_you_mean(name, TINY_MODELS)}")
    return TINY_MODELS[name]


def build_tiny(name: str, dest_dir) -> Path:
    """Writes tiny model `name` to `dest_dir` (see `build_model`) and returns its path."""
    spec = _tiny_spec(name)
    return build_model(dest_dir, _corpus(), spec.vocab_size, spec.special_tokens, spec.config, spec.seed)


def build_model(dest_dir, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str], config: Mapping,
                seed: int) -> Path:
    """Writes a model with random weights (``config``'s architecture, a fixed seed) and a BPE tokenizer trained on
    ``texts`` to `dest_dir` as a normal Hugging Face directory (config.json, model.safetensors, tokenizer files),
    whole or not at all (`written_whole`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def write(tmp: Path) -> None:
        tokenizer = train_tokenizer(texts, vocab_size, special_tokens)
        tokenizer.model_max_length = config["max_position_embeddings"]
        vocab = -(-len(tokenizer) // 64) * 64  # embedding rows in multiples of 64, as resize_vocab pads them
        hf_config = AutoConfig.for_model(**config, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):  # a fixed seed without touching the caller's random state
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return written_whole(dest_dir, write)


def written_whole(dest_dir, write) -> Path:
    """`dest_dir`, made by `write(folder)` in a temporary folder beside it that is then renamed: an interrupted
    build leaves nothing at `dest_dir`; if another process finished the same build first, its folder is kept."""
    dest = Path(dest_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp)  # built meanwhile by another process: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def tiny_path(name: str) -> Path:
    """The directory of tiny model `name`: $LF_HOME/tiny/<name> (LF_HOME defaults to ~/.cache/lf), built on first
    use. A directory there is always complete (see `build_tiny`), so its existence means it is ready."""
    _tiny_spec(name)
    dest = Path(os.environ.get("LF_HOME") or Path.home() / ".cache" / "lf") / "tiny" / name
    if not dest.is_dir():
        logging.getLogger("lf").info("building the quickstart model %s in %s (first use; later runs reuse it)",
                                     name, dest)
        build_tiny(name, dest)
    return dest
