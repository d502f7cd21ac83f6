"""The model of the end-to-end benchmark: a 31.8M-parameter Llama (hidden 512, intermediate 1408, 8 layers, 8 heads,
4 kv heads, vocab 8000, untied embeddings) with random weights and a byte-level BPE tokenizer trained on the
benchmark's data, saved as a plain Hugging Face directory that lf and LLaMA-Factory both load with from_pretrained.

Built once into $LF_HOME/bench/e2e-llama-32m (LF_HOME defaults to ~/.cache/lf): written beside it, then renamed
into place, so a directory there is always complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "e2e-llama-32m"
# every width a multiple of 64: bitsandbytes' AVX-512 CPU 4-bit kernel misreads other rows (QLoRA variants)
CONFIG = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
VOCAB = 8000
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")  # template qwen's markers, one token each in both systems
ROLE_TEXT = "system\nuser\nassistant\n"  # once per record, as templated data has them: single tokens then
SEED = 0


def model_dir() -> Path:
    return Path(os.environ.get("LF_HOME") or Path.home() / ".cache" / "lf") / "bench" / NAME


def _texts(records: list[dict]) -> list[str]:
    fields = [r[key] for r in records for key in ("instruction", "input", "output") if r.get(key)]
    return [ROLE_TEXT] * len(records) + fields


def ensure_model(data_file: Path) -> Path:
    """The model's directory, built from `data_file` (alpaca-format JSON) on first use."""
    from lf.tiny import build_model

    dest = model_dir()
    if dest.is_dir():
        return dest
    texts = _texts(json.loads(data_file.read_text(encoding="utf-8")))
    return build_model(dest, texts, VOCAB, CHATML_TOKENS, CONFIG, SEED)
