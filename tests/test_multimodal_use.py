"""Using a vision-language model (the tiny Qwen2-VL and LLaVA-1.5 of test_multimodal.py): the engine behind `lf chat`
and `lf api` answering an image (its prompt holding the family processor's image-token count, its forward given
the processor's pixels), streamed and whole over HTTP, decoded in the batch beside text requests as each alone,
`/image` in the chat, what is refused (a text model, a
template of another family, images past the context, an image token typed as text); do_predict on mllm_demo; and
`lf export` of a VL LoRA adapter, which plain transformers reloads and which generates the unmerged model's tokens
(GGUF refused)."""

import base64
import dataclasses
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from support import one_thread  # noqa: F401 (autouse: tiny models run fastest on one thread)
from test_multimodal import (ASKED, NO_PROCESSOR, QWEN_VL, TEMPLATE, image_sequences, picture, plain_inputs,
                             shared_data)
from test_multimodal import (gemma3, intern_vl, llava, llava_next, qwen2_5_vl, qwen2_audio, qwen2_vl,  # noqa: F401
                             qwen3_vl)
from test_serve_api import live_server

from lf import cli
from lf.config import parse_infer_args
from lf.errors import ModelError, RequestError
from lf.serve import Engine
from lf.serve import chat as lf_chat
from lf.serve.app import create_app

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = list(TEMPLATE)
CHAT = "/v1/chat/completions"
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "input_features")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def engine_for(model, template: str, max_batch: int = 1, **keys) -> Engine:
    return Engine(parse_infer_args({"model_name_or_path": str(model), "template": template, "infer_dtype": "float32",
                                    "max_new_tokens": 4, **keys}, "chat"), max_batch=max_batch)


@pytest.fixture(scope="module", params=FAMILIES)
def vl(request):
    """(family, model folder, its engine)."""
    model = request.getfixturevalue(request.param)
    return request.param, model, engine_for(model, TEMPLATE[request.param])


def processor_image_tokens(family: str, model, image, token: str) -> int:
    """How many image tokens (`token`) the family's own processor gives `image`."""
    from transformers import AutoImageProcessor, AutoProcessor

    if family in NO_PROCESSOR:  # the processor needs torchvision: its tokens from the image processor's features
        features = AutoImageProcessor.from_pretrained(model, backend="pil")(images=[image])
        return image_sequences(family, model, features)[0].count(token)
    processor = AutoProcessor.from_pretrained(model)
    ids = processor(text=processor.image_token, images=[image])["input_ids"][0]
    # the token repeated per feature: LLaVA's placeholder itself, Gemma 3's soft token (its placeholder is boi)
    return ids.count(processor.tokenizer.convert_tokens_to_ids(getattr(processor.tokenizer, "image_token", None)
                                                                or processor.image_token))


def recorded(monkeypatch, engine: Engine) -> list[dict]:
    """The arguments of each of the engine's generate() calls from now on (input_ids and the image inputs)."""
    calls = []
    original = engine.model.generate

    def generate(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return original(**kwargs)

    monkeypatch.setattr(engine.model, "generate", generate)
    return calls


def message(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


# -- the engine, lf api and lf chat ------------------------------------------------------------------------------


def test_the_engine_prompts_with_the_processors_image_tokens_and_pixels(vl, monkeypatch):
    from transformers import AutoImageProcessor

    family, model, engine = vl
    assert engine.image_refusal is None
    image = picture()
    messages = [{"role": "user", "content": f"<image>{ASKED}"}]
    calls = recorded(monkeypatch, engine)
    [reply] = engine.generate(messages, images=[image], temperature=0)
    [call] = calls
    prompt = call["input_ids"][0].tolist()
    assert prompt == engine.prompt_ids(messages, images=[image]) and reply.prompt_tokens == len(prompt)
    assert prompt.count(engine.media.image_token_id) == processor_image_tokens(family, model, image,
                                                                                engine.media.plugin.image_token)
    expected = AutoImageProcessor.from_pretrained(model, backend="pil")(images=[image], return_tensors="pt")
    assert torch.equal(call["pixel_values"], expected["pixel_values"])
    if family in QWEN_VL:
        assert torch.equal(call["image_grid_thw"], expected["image_grid_thw"])
        assert call["mm_token_type_ids"][0].tolist() == [int(t == engine.media.image_token_id) for t in prompt]
    # the same prompt through transformers alone gives the same reply
    with torch.inference_mode():
        out = engine.model.generate(**call, max_new_tokens=4, do_sample=False)
    assert reply.completion_tokens == 4 and reply.text == engine.tokenizer.decode(out[0, len(prompt):])


def test_gemma3_with_pan_and_scan_prompts_as_its_processor_does(gemma3, monkeypatch):
    """A wide image gets its crops in a served prompt too: the prompt and pixels equal Gemma3Processor's."""
    from transformers import AutoProcessor

    engine = engine_for(gemma3, "gemma3", image_do_pan_and_scan=True)
    image = picture(600, 280)  # over twice as wide as high: two crops of 300 x 280 (each side at least 256)
    messages = [{"role": "user", "content": f"<image>{ASKED}"}]
    calls = recorded(monkeypatch, engine)
    engine.generate(messages, images=[image], temperature=0)
    processor = AutoProcessor.from_pretrained(gemma3)
    text = engine.template.render([{"role": "user", "content": f"{processor.image_token}{ASKED}"}],
                                  add_generation_prompt=True, tokenizer=engine.tokenizer)
    expected = processor(text=text, images=[image], do_pan_and_scan=True, add_special_tokens=False,
                         return_tensors="pt")
    [call] = calls
    assert call["input_ids"].tolist() == expected["input_ids"].tolist()
    assert len(call["pixel_values"]) == 3 and torch.equal(call["pixel_values"], expected["pixel_values"])
    assert torch.equal(call["token_type_ids"], expected["token_type_ids"])


def test_lf_api_answers_an_image_whole_and_streamed(vl, monkeypatch):
    family, model, engine = vl
    image = picture(60, 100)
    expected = engine.generate([{"role": "user", "content": f"<image>{ASKED}"}], images=[image], temperature=0)[0]
    calls = recorded(monkeypatch, engine)
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": ASKED}]
    with live_server(create_app(engine)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        completion = client.chat.completions.create(model="any", messages=[{"role": "user", "content": parts}],
                                                    temperature=0)
        chunks = list(client.chat.completions.create(model="any", messages=[{"role": "user", "content": parts}],
                                                     temperature=0, stream=True))
    assert completion.choices[0].message.content == expected.text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert len(calls) == 2 and all(
        call["input_ids"][0].tolist().count(engine.media.image_token_id)
        == processor_image_tokens(family, model, image, engine.media.plugin.image_token)
        for call in calls)


def batched_answers(engine: Engine, asked: list[tuple], monkeypatch, **settings) -> tuple[list[list[str]], list]:
    """Each request's greedy replies (n of them, `asked`: (messages, files) pairs), sent together to `engine`'s
    batch, none through transformers' generate; and the batch's prefills: (rows, the media inputs given)."""
    monkeypatch.setattr(engine.model, "generate", lambda **_: pytest.fail("a request left the batch for generate"))
    forward, prefills = engine.model.forward, []

    def recorded(**kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill: its rows, and whether media came with them
            prefills.append((len(kwargs["input_ids"]), [k for k in MEDIA_INPUTS if kwargs.get(k) is not None]))
        return forward(**kwargs)

    monkeypatch.setattr(engine.model, "forward", recorded)

    def answer(messages, files) -> list[str]:
        return [r.text for r in engine.generate(messages, temperature=0, max_new_tokens=8, **files, **settings)]

    rows = len(asked) * settings.get("n", 1)
    with ThreadPoolExecutor(len(asked)) as pool:
        with engine._lock:  # the batch's first step waits until all have come: the rest join at its second
            replies = [pool.submit(answer, *a) for a in asked]
            while engine.batcher.active + len(engine.batcher._waiting) < rows:
                time.sleep(0.01)
        return [reply.result() for reply in replies], prefills


def test_a_batched_engine_decodes_image_requests_in_its_batch_as_each_alone(vl, monkeypatch):
    """Requests with images join the batch beside text rows (prefilled together, their image inputs joined in row
    order, LLaVA-NeXT's tiles padded, Gemma 3's token types and the Qwen-VL families' 3-D positions as each gets
    them alone): every reply equals the one the request gets alone through generate."""
    family, model, alone = vl
    batched = engine_for(model, TEMPLATE[family], max_batch=8)
    asked = [([{"role": "user", "content": f"<image>{ASKED}"}], {"images": [picture(60, 100)]}),
             ([{"role": "user", "content": "Hello there"}], {}),
             ([{"role": "user", "content": f"{ASKED} <image> and <image>, side by side"}],
              {"images": [picture(), picture(120, 50)]}),
             ([{"role": "user", "content": "Tell me more about the sea, please"}], {}),
             ([{"role": "user", "content": f"<image>{ASKED}"}], {"images": [ImageOps.invert(picture(60, 100))]})]
    expected = [[r.text for r in alone.generate(messages, temperature=0, max_new_tokens=8, **files)]
                for messages, files in asked]
    # the pixels matter (so rows given each other's images would show), except to the tiny InternVL (newlines
    # whatever it sees) and Gemma 3 (its 4 pooled soft tokens)
    assert expected[0] != expected[4] or family in ("intern_vl", "gemma3")
    together, prefills = batched_answers(batched, asked, monkeypatch)
    assert together == expected
    # the first request starts the batch; the others, waiting meanwhile, are prefilled together, images and text
    assert any(rows > 1 and media for rows, media in prefills), prefills
    # a request's n rows (sharing one prefill when they join at one step; asked[0] and asked[4], the same prompt
    # with other pixels, do not share theirs)
    together, _ = batched_answers(batched, asked[2:3] + asked[:1], monkeypatch, n=2)
    assert together == [e * 2 for e in expected[2:3] + expected[:1]]


def test_lf_api_refuses_images_past_the_context_and_image_tokens_typed_as_text(vl, monkeypatch):
    family, _, engine = vl
    image = picture()
    tokens = len(engine.prompt_ids([{"role": "user", "content": f"{ASKED}<image>"}], images=[image]))
    question = {"messages": [{"role": "user", "content": [{"type": "text", "text": ASKED}, {
        "type": "image_url", "image_url": {"url": data_url(image)}}]}], "max_tokens": 2}
    typed = engine.media.plugin.image_token  # LLaVA's is the placeholder itself
    with live_server(create_app(engine)) as base:
        monkeypatch.setattr(engine, "context_length", tokens)  # the image's tokens leave no room for a reply
        assert message(httpx.post(base + CHAT, json=question), 400) == (
            f"the prompt is {tokens} tokens, but the model's context is {tokens} tokens, the reply included: "
            f"shorten the conversation")
        monkeypatch.undo()
        said = message(httpx.post(base + CHAT, json={"messages": [{"role": "user", "content": f"a {typed} b"}]}),
                       400)
        assert said == ("the conversation has 1 <image> placeholder(s) for 0 image(s): write one where each image "
                        "goes" if typed == "<image>" else "the conversation's text holds the image token "
                        f"{typed!r}: remove it (write <image> where an image goes)")
        assert httpx.post(base + CHAT, json=question).status_code == 200  # still answering


def test_lf_chat_attaches_an_image_and_answers(vl, monkeypatch, capsys, tmp_path):
    _, _, engine = vl
    image = picture()
    (tmp_path / "a.png").write_bytes(png(image))
    expected = engine.generate([{"role": "user", "content": f"<image>{ASKED}"}], images=[image], temperature=0)[0]
    monkeypatch.setattr(engine, "generating", dataclasses.replace(engine.generating, temperature=0))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path}/a.png\n{ASKED}\nexit\n"))
    assert lf_chat.chat(engine) == 0
    out = capsys.readouterr().out
    assert "Attached 1 image(s) to your next message." in out and f"Assistant: {expected.text}\n" in out


def test_a_model_or_template_that_takes_no_images_refuses_them_in_one_line(qwen2_vl):
    engine = engine_for(qwen2_vl, "qwen")  # the model's family, but a text template
    said = engine.image_refusal
    assert said.startswith("this model/template (qwen) does not take image input; templates that do: ")
    assert "llava (llava models), " in said and "qwen2_vl (qwen2_vl/qwen2_5_vl models), " in said
    assert said.endswith("; serve this qwen2_vl model with template: qwen2_vl")
    with pytest.raises(RequestError, match="does not take image input"):
        engine.stream([{"role": "user", "content": "<image>hi"}], images=[picture()])
    assert engine.generate([{"role": "user", "content": "hi"}], temperature=0)[0].completion_tokens == 4


# -- do_predict --------------------------------------------------------------------------------------------------


def predictions(tmp_path, model, batch_size: int, template: str = "qwen2_vl", dataset: str = "mllm_demo",
                **keys) -> list[dict]:
    out = tmp_path / f"batch{batch_size}"
    cfg = {"model_name_or_path": str(model), "template": template, "eval_dataset": dataset,
           "dataset_dir": str(shared_data()), "stage": "sft", "do_predict": True, "predict_with_generate": True,
           "finetuning_type": "lora", "max_samples": 4, "per_device_eval_batch_size": batch_size,
           "max_new_tokens": 4, "do_sample": False, "infer_dtype": "float32", "output_dir": str(out), "report_to": "none",
           "use_cpu": True, **keys}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "cfg.yaml")]) == 0
    return [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]


def test_do_predict_answers_the_images_of_mllm_demo(qwen2_vl, tmp_path):
    from transformers import AutoImageProcessor

    rows = json.loads((shared_data() / "mllm_demo.json").read_text())[:4]
    batched = predictions(tmp_path, qwen2_vl, 2)  # left-padded batches of prompts whose images differ in size
    assert [r["label"] for r in batched] == [row["messages"][-1]["content"] for row in rows]  # the last reply
    processor = AutoImageProcessor.from_pretrained(qwen2_vl, backend="pil")
    for record, row in zip(batched, rows):
        images = [Image.open(shared_data() / path) for path in row["images"]]
        pads = sum(int(g.prod()) // 4 for g in processor(images=images, return_tensors="pt")["image_grid_thw"])
        assert record["prompt"].count("<|image_pad|>") == pads and record["predict"]
    assert predictions(tmp_path, qwen2_vl, 1) == batched  # padding and batching change no answer


# -- lf export ---------------------------------------------------------------------------------------------------


def random_adapter(model, folder) -> None:
    """A LoRA adapter on the language model whose B matrices are random (not PEFT's zeros): it changes replies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)")
    get_peft_model(AutoModelForImageTextToText.from_pretrained(model), config).save_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_merges_a_vl_adapter_that_plain_transformers_reloads(request, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = request.getfixturevalue(family)
    random_adapter(model, tmp_path / "adapter")
    keys = {"model_name_or_path": str(model), "adapter_name_or_path": str(tmp_path / "adapter"),
            "template": TEMPLATE[family],
            "export_dir": str(tmp_path / "merged")}
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(keys))
    assert cli.main(["export", str(tmp_path / "export.yaml")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "preprocessor_config.json").is_file()
    # LLaVA's patch_size and the like, where the model has them
    assert (merged / "processor_config.json").is_file() == (model / "processor_config.json").is_file()
    inputs = plain_inputs(family, merged, picture())

    def greedy(net) -> list[int]:
        with torch.inference_mode():
            return net.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()

    tokens = greedy(AutoModelForImageTextToText.from_pretrained(merged).eval())
    base = AutoModelForImageTextToText.from_pretrained(model).eval()
    before = greedy(base)
    assert greedy(PeftModel.from_pretrained(base, tmp_path / "adapter").eval()) == tokens != before


def test_gguf_export_of_a_vl_model_is_refused_with_the_reason(qwen2_vl, tmp_path):
    pytest.importorskip("gguf", reason="export_gguf needs the gguf package (lf[export])")
    cfg = parse_infer_args({"model_name_or_path": str(qwen2_vl), "template": "qwen2_vl",
                            "export_dir": str(tmp_path / "out"), "export_gguf": "q8_0"}, "export")
    from lf.export import export

    with pytest.raises(ModelError, match=r"^export_gguf: qwen2_vl is a vision-language model, and lf writes no "
                                         r"projector file \(mmproj\) for its vision tower"):
        export(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, says", [("qwen2_vl", "images of .*, a qwen2_vl vision-language"),
                                          ("qwen2_audio", "audios of .*, a qwen2_audio multimodal")])
def test_export_of_a_vl_model_with_a_text_template_names_the_template(request, tmp_path, family, says):
    from lf.errors import ConfigError
    from lf.export import export

    cfg = parse_infer_args({"model_name_or_path": str(request.getfixturevalue(family)), "template": "qwen",
                            "export_dir": str(tmp_path / "out")}, "export")
    with pytest.raises(ConfigError, match=rf"^template: qwen takes no {says} model: set template: {family}, which "
                                          r"the export carries"):
        export(cfg)
    assert not (tmp_path / "out").exists()
