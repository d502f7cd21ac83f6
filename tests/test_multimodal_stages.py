"""Images beyond sft: dpo (every pref_loss), kto and rm on the tiny Qwen2-VL and LLaVA of test_multimodal, packing
and neat packing with images, videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and audio (Qwen2-Audio) (a packed batch
equals its examples one by one), QLoRA, resume, workers and the tokenized cache with images."""

import json
import math

import pytest
import torch
from PIL import Image
from test_multimodal import (llava, prepared, qwen2_5_vl, qwen2_audio, qwen2_omni, qwen2_vl,  # noqa: F401 (fixtures)
                             qwen3_vl, shared_data, train)

from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

from lf.data import collator, get_dataset

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = ["qwen2_vl", "llava"]

# (prompt, images, chosen, rejected): a few rows like LLaMA-Factory's dpo_zh_demo, with mllm_demo's images
PAIRS = [
    ("<image>What is in this picture?", ["1.jpg"], "A picture of a scene.", "I cannot say anything at all."),
    ("<image><image>Which of the two is brighter?", ["2.jpg", "3.jpg"], "The first one.", "Neither, both are dark."),
    ("<image>Describe it in a few words.", ["3.jpg"], "Some people outdoors.", "A bowl of soup on a table."),
    ("Say hello.<image>", ["1.jpg"], "Hello!", "No."),
]


def preference_data(folder, kind: str) -> str:
    """A dataset of PAIRS in `folder` ("pairs": sharegpt ranking data; "kto": each reply flagged desirable or not),
    its images relative to media_dir (shared_data()/mllm_demo_data); returns its name."""
    images = lambda names: [f"mllm_demo_data/{name}" for name in names]  # noqa: E731
    if kind == "pairs":
        rows = [{"conversations": [{"from": "human", "value": prompt}], "chosen": {"from": "gpt", "value": good},
                 "rejected": {"from": "gpt", "value": bad}, "images": images(names)}
                for prompt, names, good, bad in PAIRS]
        info = {"ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                            "images": "images"}}
    else:
        rows = [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                 "label": flag, "images": images(names)}
                for prompt, names, good, bad in PAIRS for reply, flag in ((good, True), (bad, False))]
        info = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label", "images": "images"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}}
    (folder / f"{kind}.json").write_text(json.dumps(rows))
    info_path = folder / "dataset_info.json"
    infos = json.loads(info_path.read_text()) if info_path.is_file() else {}
    infos[kind] = {"file_name": f"{kind}.json", **info}
    info_path.write_text(json.dumps(infos))
    return kind


def run_losses(out) -> list[float]:
    return [entry["loss"] for entry in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in entry]


# -- dpo, kto, rm --------------------------------------------------------------------------------------------------

# every pref_loss on Qwen2-VL; LLaVA the losses of other shapes (hinge and ipo read what sigmoid reads)
STAGES = [("qwen2_vl", "dpo", {"pref_loss": kind}) for kind in ("sigmoid", "hinge", "ipo", "orpo", "simpo")] + [
    ("llava", "dpo", {"pref_loss": kind}) for kind in ("sigmoid", "orpo", "simpo")] + [
    (family, stage, {}) for family in FAMILIES for stage in ("kto", "rm")]


@pytest.mark.parametrize("family, stage, keys", STAGES,
                         ids=[f"{family}-{keys.get('pref_loss', stage)}" for family, stage, keys in STAGES])
def test_one_step_of_each_preference_stage_trains_on_images(request, tmp_path, family, stage, keys):
    model = request.getfixturevalue(family)
    data = preference_data(tmp_path, "kto" if stage == "kto" else "pairs")
    out = train(tmp_path, model, family, stage=stage, dataset=data, dataset_dir=str(tmp_path),
                media_dir=str(shared_data()), per_device_train_batch_size=4, **keys)
    losses = run_losses(out)
    assert len(losses) == 1 and math.isfinite(losses[0])
    start = {"sigmoid": math.log(2), "kto": 0.5}.get(keys.get("pref_loss", stage))
    if start is not None:  # LoRA starts as the identity: policy = reference, every margin 0
        assert losses[0] == pytest.approx(start, abs=1e-4)
    assert (out / "preprocessor_config.json").is_file()
    if stage == "rm":  # the value head trains fully, is saved beside the adapter and reloads through lf
        from safetensors.torch import load_file

        from lf.config import ModelArguments
        from lf.config.finetuning import FinetuningArguments
        from lf.model import load_model

        saved = [value for key, value in load_file(out / "adapter_model.safetensors").items() if ".score." in key]
        assert len(saved) == 1
        tuned, _ = load_model(prepared(model, family).tokenizer,
                              ModelArguments(model_name_or_path=str(model), adapter_name_or_path=str(out)),
                              FinetuningArguments(stage="rm"), is_trainable=False)
        assert torch.equal(tuned.score.weight.to(saved[0].dtype), saved[0])


def plain_inputs(model, ids: list[int], images: list, family: str) -> dict:
    """A row alone as the model's forward takes it, its images through the family's image processor (loaded by
    transformers, not lf)."""
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(model.name_or_path, backend="pil")
    inputs = {"input_ids": torch.tensor([ids]), **image_processor(images=images, return_tensors="pt")}
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    return inputs


def row_images(row) -> list:
    return [Image.open(ref["path"]).convert("RGB") for ref in row["images"]]


def plain_logps(model, ids: list[int], labels: list[int], images: list, family: str) -> torch.Tensor:
    """The summed log-probability of a row's labelled tokens from a plain forward of the model on the row alone."""
    with torch.no_grad():
        logits = model(**plain_inputs(model, ids, images, family)).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    picked = logits.log_softmax(-1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return picked[targets != -100].sum()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels", [False, True])
def test_preference_log_probabilities_equal_a_plain_forward_on_each_row(request, tmp_path, family, kernels):
    """lf's log-probabilities of the concatenated rows (with lf's kernels patched in, as training runs them, or
    not) against an unpatched model's plain forward on each row alone."""
    from lf.kernels import patch as patch_model
    from lf.kernels import unpatch
    from lf.model.logps import reply_logps
    from lf.train.preference import media, pairs

    model_path = request.getfixturevalue(family)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    ours = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    if kernels:
        patch_model(ours)
    request.addfinalizer(lambda: unpatch(ours))
    for kind, stage in (("pairs", "dpo"), ("kto", "kto")):
        p = prepared(model_path, family, dataset=preference_data(tmp_path, kind), dataset_dir=str(tmp_path),
                     media_dir=str(shared_data()))
        rows = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage=stage,
                           media=p.media).train_dataset
        assert len(rows) == len(PAIRS) * (1 if kind == "pairs" else 2)
        batch = collator(p.tokenizer, media=p.media)([rows[i] for i in range(len(rows))])
        if kind == "pairs":
            forwards = {"": (*pairs(batch, p.tokenizer.pad_token_id), media(batch), ("chosen_", "rejected_"))}
        else:
            forwards = {prefix: (batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                 batch[f"{prefix}labels"], media(batch, prefix), (prefix,)) for prefix in ("", "kl_")}
        for ids, mask, labels, inputs, sides in forwards.values():
            assert inputs and "pixel_values" in inputs
            with torch.no_grad():
                lf_sums = reply_logps(ours, ids, mask, labels, fused=True, media=inputs)
            expected = [plain_logps(model, rows[i][f"{side}input_ids"], rows[i][f"{side}labels"],
                                    row_images(rows[i]), family)
                        for side in sides for i in range(len(rows))]
            torch.testing.assert_close(lf_sums, torch.stack(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_rows_whose_images_cutoff_len_cuts_into_are_dropped(qwen2_vl, tmp_path, caplog, stage):
    p = prepared(qwen2_vl, "qwen2_vl", dataset=preference_data(tmp_path, "kto" if stage == "kto" else "pairs"),
                 dataset_dir=str(tmp_path), media_dir=str(shared_data()), cutoff_len=120)
    with caplog.at_level("WARNING", logger="lf"):
        rows = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage=stage,
                           media=p.media).train_dataset
    whole = (len(PAIRS) if stage == "dpo" else 2 * len(PAIRS)) - len(rows)
    assert whole > 0 and f"dropped {whole} of" in caplog.text and "raise cutoff_len" in caplog.text
    prefixes = ("chosen_", "rejected_") if stage == "dpo" else ("", "kl_")
    for row in rows:  # what is kept holds every token of its images
        tokens = sum(p.media.tokens(Image.open(ref["path"]).size) for ref in row["images"])
        assert all(row[f"{prefix}input_ids"].count(p.media.image_token_id) == tokens for prefix in prefixes)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_scores_equal_the_value_head_on_each_row_alone(request, tmp_path, family):
    """rm's value head on a VL model (transformers has no XForSequenceClassification for one): the family's model
    with lf's checkpoint weights, scoring the pairs' concatenated rows as each row alone with its images."""
    from lf.config import ModelArguments
    from lf.config.finetuning import FinetuningArguments
    from lf.model import load_model
    from lf.train.preference import media, pairs

    model_path = request.getfixturevalue(family)
    p = prepared(model_path, family, dataset=preference_data(tmp_path, "pairs"), dataset_dir=str(tmp_path),
                 media_dir=str(shared_data()))
    rows = get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="rm",
                       media=p.media).train_dataset
    model, _ = load_model(p.tokenizer, ModelArguments(model_name_or_path=str(model_path), infer_dtype="float32"),
                          FinetuningArguments(stage="rm", finetuning_type="full"), is_trainable=False)
    assert type(model).__name__.endswith("ForSequenceClassification") and model.score.out_features == 1
    generating = AutoModelForImageTextToText.from_pretrained(model_path)
    ours = dict(model.named_parameters())  # the checkpoint's weights (all but its lm_head), not random ones
    theirs = {name: p for name, p in generating.named_parameters() if not name.startswith("lm_head")}
    assert theirs.keys() <= ours.keys() and all(torch.equal(ours[name], p) for name, p in theirs.items())
    model.config.get_text_config().pad_token_id = p.tokenizer.pad_token_id
    batch = collator(p.tokenizer, media=p.media)([rows[i] for i in range(len(rows))])
    ids, mask, _ = pairs(batch, p.tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask, **media(batch)).logits[:, 0]
        alone = [model(**plain_inputs(model, rows[i][f"{side}input_ids"], row_images(rows[i]), family)).logits[0, 0]
                 for side in ("chosen_", "rejected_") for i in range(len(rows))]
    torch.testing.assert_close(scores, torch.stack(alone), rtol=1e-4, atol=1e-5)


# -- packing -------------------------------------------------------------------------------------------------------


def sft_rows(model_path, template, **data):
    p = prepared(model_path, template, **{"cutoff_len": 512, **data})
    return p, get_dataset(p.data_args, tokenizer=p.tokenizer, template=p.template, stage="sft",
                          media=p.media).train_dataset


def segments_of(row) -> list[tuple[int, int]]:
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
    return list(zip(starts[:-1], starts[1:]))


# (family, template, media column, data keys): images, then videos (Qwen2.5-VL's frames spaced in seconds, Qwen3-VL's
# timed frame by frame) and audio
PACKED = [*((family, family, "images", {}) for family in FAMILIES),
          *((family, template, "videos", {"dataset": "mllm_video_demo", "video_maxlen": 4})
            for family, template in (("qwen2_vl", "qwen2_vl"), ("qwen2_5_vl", "qwen2_vl"), ("qwen3_vl", "qwen3_vl"))),
          ("qwen2_audio", "qwen2_audio", "audios", {"dataset": "mllm_audio_demo", "cutoff_len": 1024}),
          # Qwen2.5-Omni: a video and an audio, apart; the audio as the video's sound (use_audio_in_video)
          *(("qwen2_omni", "qwen2_omni", column, {"dataset": "mllm_video_audio_demo", "video_maxlen": 4,
                                                  "cutoff_len": 1024, "use_audio_in_video": column == "audios"})
            for column in ("videos", "audios"))]


@pytest.mark.parametrize("family, template, column, data", PACKED, ids=[f"{f}-{c}" for f, _, c, _ in PACKED])
@pytest.mark.parametrize("kernels", [False, True])
def test_a_neat_packed_batch_with_media_equals_its_examples_one_by_one(request, family, template, column, data,
                                                                      kernels, monkeypatch):
    """A packed row keeps each example's media, in the row's order; the Qwen-VL families' packed rows get each
    example's 3-D M-RoPE positions (and the text positions attention finds the examples by); with lf's kernels
    (packed attention by segments, M-RoPE) or HF's SDPA mask path."""
    from test_packing import RTOL, _loss_sum

    from lf.kernels import packed_attention, unpatch
    from lf.kernels import patch as patch_model

    model_path = request.getfixturevalue(family)
    p, examples = sft_rows(model_path, template, **data)
    _, packed = sft_rows(model_path, template, packing=True, neat_packing=True, **data)
    assert len(packed) < len(examples) and sum(len(row[column]) for row in packed) == sum(
        len(row[column]) for row in examples)
    by_ids = {tuple(row["input_ids"]): row[column] for row in examples}
    for row in packed:  # each example's media, in the row's order
        pieces = [tuple(row["input_ids"][s:e]) for s, e in segments_of(row)]
        assert [ref for piece in pieces for ref in by_ids[piece]] == row[column]
    calls = []
    real = packed_attention.packed_sdpa
    monkeypatch.setattr(packed_attention, "packed_sdpa", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    monkeypatch.setattr(packed_attention, "segment_block", lambda dtype: 1)  # segments pay: packed_sdpa runs
    monkeypatch.setattr(packed_attention, "FLASH", ())  # (lf's fused CPU kernel is tested in test_packing)
    torch.manual_seed(0)
    model = AutoModelForMultimodalLM.from_pretrained(model_path, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    if kernels:
        patch_model(model, fused_linear_cross_entropy=False)  # logits are needed here
    try:
        collate = collator(p.tokenizer, media=p.media)
        batch = collate([packed[i] for i in range(len(packed))])
        if p.media.plugin.rope_positions is not None:  # text positions, then M-RoPE's three
            assert batch["position_ids"].shape == (4, *batch["input_ids"].shape)
        packed_loss, packed_grads = _loss_sum(model, batch)
        loss, grads = torch.zeros(()), None
        for i in range(len(examples)):
            one_loss, one_grads = _loss_sum(model, collate([examples[i]]))
            loss += one_loss
            grads = one_grads if grads is None else {n: grads[n] + g for n, g in one_grads.items()}
        torch.testing.assert_close(packed_loss, loss, rtol=RTOL, atol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
        if kernels:  # lf's attention ran the packed rows by segments, in every layer of the language model
            assert len(calls) == model.config.get_text_config().num_hidden_layers
        else:
            assert calls == []
    finally:
        unpatch(model)


@pytest.mark.parametrize("family, template, column, data", [case for case in PACKED if case[0] != "qwen2_5_vl"],
                         ids=[f"{f}-{c}" for f, _, c, _ in PACKED if f != "qwen2_5_vl"])
@pytest.mark.parametrize("neat", [False, True])
def test_packed_sft_with_media_trains_a_step(request, tmp_path, family, template, column, data, neat):
    out = train(tmp_path, request.getfixturevalue(family), template, packing=True, neat_packing=neat,
                preprocessing_num_workers=2, dataloader_num_workers=2, **{"cutoff_len": 512, **data})
    losses = run_losses(out)
    assert len(losses) == 1 and math.isfinite(losses[0])


# -- QLoRA, resume, workers, the tokenized cache ----------------------------------------------------------------


@pytest.mark.parametrize("family, method", [(family, "bnb") for family in FAMILIES] + [("qwen2_vl", "hqq")])
def test_qlora_quantizes_the_language_model_only_and_trains_a_step(request, tmp_path, family, method):
    import bitsandbytes as bnb
    from hqq.core.quantize import HQQLinear

    from lf.config import ModelArguments
    from lf.config.finetuning import FinetuningArguments
    from lf.data.mm_plugins import in_part, plugin_for
    from lf.model import load_model

    model_path = request.getfixturevalue(family)
    p = prepared(model_path, family)
    model, _ = load_model(p.tokenizer, ModelArguments(model_name_or_path=str(model_path), quantization_bit=4,
                                                     quantization_method=method),
                          FinetuningArguments(finetuning_type="lora"), is_trainable=True)
    plugin = plugin_for(model.config.model_type)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and ".lora_" not in name}
    towers = {name for name in linears if in_part(name, plugin.vision_tower + plugin.projector)}
    assert towers and all(type(linears[name]) is torch.nn.Linear and linears[name].weight.dtype.is_floating_point
                          for name in towers)  # the vision tower and projector keep 16/32-bit weights
    language = [m.base_layer for name, m in model.named_modules()
                if in_part(name, ("language_model",)) and len(getattr(m, "lora_A", ())) > 0]
    quantized = bnb.nn.Linear4bit if method == "bnb" else HQQLinear
    assert language and all(isinstance(m, quantized) for m in language)
    out = train(tmp_path, model_path, family, quantization_bit=4, quantization_method=method)
    losses = run_losses(out)
    assert len(losses) == 1 and math.isfinite(losses[0]) and (out / "adapter_model.safetensors").is_file()


def test_a_resumed_vl_run_continues_with_the_uninterrupted_losses(qwen2_vl, tmp_path):
    import shutil

    keys = dict(max_steps=4, save_steps=2, seed=3)
    (tmp_path / "whole").mkdir()
    whole = train(tmp_path / "whole", qwen2_vl, "qwen2_vl", **keys)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed_dir / "out" / "checkpoint-2")
    resumed = train(resumed_dir, qwen2_vl, "qwen2_vl", resume_from_checkpoint=True, **keys)
    steps = [(entry["current_steps"], entry["loss"]) for entry in map(
        json.loads, (resumed / "trainer_log.jsonl").read_text().splitlines()) if "loss" in entry]
    assert [step for step, _ in steps] == [3, 4]
    assert [loss for _, loss in steps] == pytest.approx(run_losses(whole)[2:], rel=1e-5)
    assert (resumed / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_workers_give_the_rows_and_batches_of_one_process(request, family):
    from torch.utils.data import DataLoader

    model_path = request.getfixturevalue(family)
    p, rows = sft_rows(model_path, family)
    _, rows_2 = sft_rows(model_path, family, preprocessing_num_workers=2, overwrite_cache=True)
    assert rows_2.to_list() == rows.to_list() and all(row["images"] for row in rows)
    collate = collator(p.tokenizer, media=p.media)
    one, two = ([batch for batch in DataLoader(rows, batch_size=2, collate_fn=collate, num_workers=workers)]
                for workers in (0, 2))
    assert len(one) == len(two) == -(-len(rows) // 2)
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and "pixel_values" in a
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_tokenized_cache_with_images_reloads_and_trains(qwen2_vl, tmp_path, monkeypatch):
    from lf.data import pipeline

    cache = tmp_path / "tokenized"
    _, first = sft_rows(qwen2_vl, "qwen2_vl", tokenized_path=str(cache))
    assert (cache / "lf_dataset.json").is_file()
    monkeypatch.setattr(pipeline, "load_canonical", lambda *a, **k: pytest.fail("read the dataset again"))
    p, again = sft_rows(qwen2_vl, "qwen2_vl", tokenized_path=str(cache))
    assert again.to_list() == first.to_list()
    batch = collator(p.tokenizer, media=p.media)([again[0], again[1]])
    assert batch["image_grid_thw"].shape[0] == len(again[0]["images"]) + len(again[1]["images"])
    out = train(tmp_path, qwen2_vl, "qwen2_vl", tokenized_path=str(cache), cutoff_len=512)
    losses = run_losses(out)
    assert len(losses) == 1 and math.isfinite(losses[0])
