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


# ---- the vision-language row: a tiny LLaVA-1.5 on mllm_demo ----

VL_NAME = "e2e-llava-tiny"
VL_VOCAB = 2000
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 112, 14  # 64 image tokens per image
VL_TEXT = dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
VL_VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)


def vl_model_dir() -> Path:
    return model_dir().parent / VL_NAME


def ensure_vl_model(data_file: Path) -> Path:
    """A tiny LLaVA-1.5 (random weights, seed 0; a CLIP tower of 2 layers at 112 px, a 4-layer Llama) with a BPE
    tokenizer trained on `data_file`'s messages (sharegpt-format JSON) and LlavaProcessor's files, which lf and
    LLaMA-Factory both load (the PIL image processor: no torchvision); built on first use."""
    dest = vl_model_dir()
    if dest.is_dir():
        return dest

    def write(folder: Path) -> None:
        import torch
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from lf.tiny import train_tokenizer

        records = json.loads(data_file.read_text(encoding="utf-8"))
        texts = [m["content"].replace(IMAGE_TOKEN, "") for r in records for m in r["messages"]]
        tokenizer = train_tokenizer(texts * 4 + ["USER: ASSISTANT:"], VL_VOCAB, [IMAGE_TOKEN])
        tokenizer.model_max_length = VL_TEXT["max_position_embeddings"]
        vocab = -(-len(tokenizer) // 64) * 64
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        config = LlavaConfig(text_config={**VL_TEXT, "vocab_size": vocab, **ids}, vision_config=VL_VISION,
                             image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            LlavaForConditionalGeneration(config).save_pretrained(folder)
        pixels = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        LlavaProcessor(image_processor=pixels, tokenizer=tokenizer, patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)

    from lf.tiny import written_whole

    return written_whole(dest, write)
