"""The model of the end-to-end benchmark: a 31.8M-parameter Llama (hidden 512, intermediate 1408, 8 layers, 8 heads,
4 kv heads, vocab 8000, untied embeddings) with random weights and a byte-level BPE tokenizer trained on the
benchmark's data, saved as a plain Hugging Face directory that lf and LLaMA-Factory both load with from_pretrained.

Built once into $LF_HOME/bench/e2e-llama-32m (LF_HOME defaults to ~/.cache/lf): written beside it, then renamed
into place, so a directory there is always complete.
"""

from __future__ import annotations

import json
import os
import re
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
PLACEHOLDERS = r"<image>|<video>"  # the data's media placeholders, not text to learn
IMAGE_SIZE, PATCH = 112, 14  # 64 image tokens per image
VL_TEXT = dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
VL_VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)


def _message_tokenizer(data_files: list[Path], template_texts: list[str], specials: list[str]):
    """A BPE tokenizer trained on the messages of `data_files` (sharegpt-format JSON, media placeholders left out)
    and a template's own words, with `specials` single tokens; and VL_TEXT completed for it (vocabulary, ids)."""
    from lf.tiny import train_tokenizer

    texts = [re.sub(PLACEHOLDERS, "", m["content"]) for data_file in data_files
             for r in json.loads(data_file.read_text(encoding="utf-8")) for m in r["messages"]]
    tokenizer = train_tokenizer(texts * 4 + template_texts, VL_VOCAB, specials)
    tokenizer.model_max_length = VL_TEXT["max_position_embeddings"]
    return tokenizer, {**VL_TEXT, "vocab_size": -(-len(tokenizer) // 64) * 64, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _save_random(model_class, config, folder: Path) -> None:
    """`model_class(config)` with random weights (seed SEED, the caller's random state left alone) into `folder`."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model_class(config).save_pretrained(folder)


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
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tokenizer, text = _message_tokenizer([data_file], ["USER: ASSISTANT:"], [IMAGE_TOKEN])
        config = LlavaConfig(text_config=text, vision_config=VL_VISION,
                             image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        _save_random(LlavaForConditionalGeneration, config, folder)
        pixels = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        LlavaProcessor(image_processor=pixels, tokenizer=tokenizer, patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)

    from lf.tiny import written_whole

    return written_whole(dest, write)


# ---- the video row (and an image row): a tiny Qwen2-VL on mllm_video_demo and mllm_demo ----

QWEN2_VL_NAME = "e2e-qwen2-vl-tiny"
QWEN2_VL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                   "<|video_pad|>"]  # template qwen2_vl's markers and media tokens
QWEN2_VL_DATA = ("mllm_demo.json", "mllm_video_demo.json")  # one tokenizer for both rows
# the vision tower: 2 blocks of 128 wide; its merger projects 2 x 2 patches into the language model's width
QWEN2_VL_VISION = dict(depth=2, embed_dim=128, hidden_size=VL_TEXT["hidden_size"], num_heads=4, mlp_ratio=2,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL_MROPE = [8, 12, 12]  # M-RoPE's temporal, height and width sections of head_dim / 2 = 32


def qwen2_vl_model_dir() -> Path:
    return model_dir().parent / QWEN2_VL_NAME


def ensure_qwen2_vl_model(data_file: Path) -> Path:
    """A tiny Qwen2-VL (random weights, seed 0; the language model is the LLaVA row's Llama widths with M-RoPE),
    a BPE tokenizer trained on the messages of mllm_demo and mllm_video_demo (beside `data_file`) and Qwen2-VL's
    PIL image processor, which lf uses for images and video frames; built on first use."""
    dest = qwen2_vl_model_dir()
    if dest.is_dir():
        return dest

    def write(folder: Path) -> None:
        from transformers import AutoConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer, text = _message_tokenizer([data_file.parent / name for name in QWEN2_VL_DATA],
                                             ["system\nuser\nassistant\n"], QWEN2_VL_TOKENS)
        del text["model_type"]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": QWEN2_VL_MROPE}
        ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                       tokenizer.convert_tokens_to_ids(QWEN2_VL_TOKENS[2:])))
        config = AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=QWEN2_VL_VISION, **ids)
        _save_random(Qwen2VLForConditionalGeneration, config, folder)
        tokenizer.save_pretrained(folder)
        Qwen2VLImageProcessorPil(patch_size=QWEN2_VL_VISION["patch_size"]).save_pretrained(folder)

    from lf.tiny import written_whole

    return written_whole(dest, write)
