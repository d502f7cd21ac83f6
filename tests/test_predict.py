"""`lf train` with do_predict: BLEU-4 and ROUGE against hand-computed cases; on the tiny Llama (test_train's
temporary LF_HOME), predictions with an adapter trained here, batched and left-padded, equal transformers' own greedy
generate one prompt at a time; training and predicting in one run; the configs refused."""

import json
import math

import pytest
import yaml
from support import one_thread  # noqa: F401 (autouse: this module's generations on one thread)
from test_train import REPO, lf_home, options, train  # noqa: F401 (lf_home: the module's tiny model)

from lf import cli
from lf.config import parse_train_args
from lf.errors import ConfigError
from lf.tiny import tiny_path
from lf.train import run
from lf.train.metrics import bleu4, rouge_l, rouge_n, similarity, tokens
from lf.train.predict import generation_kwargs

MAX_NEW = 12
SCORES = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")


# ---- metrics -----------------------------------------------------------------------------------------------------

def test_tokens_are_words_punctuation_and_cjk_characters():
    assert tokens("Hi, 世界! It's 3.5 km\tnow") == ["Hi", ",", "世", "界", "!", "It", "'", "s", "3", ".", "5", "km",
                                                     "now"]
    assert tokens("こんにちは世界") == list("こんにちは世界") and tokens("  \n ") == []


def test_bleu4_against_hand_computed_values():
    cat, mat = tokens("the cat sat on the mat"), tokens("the cat is on the mat")
    assert bleu4(cat, cat) == pytest.approx(1.0)
    assert bleu4(tokens("a b c d"), tokens("w x y z")) == 0.0  # no word in common
    # precisions 5/6, 3/5, 1/4 and 0/3 -> 1/(2 x 3) (method3 smoothing), equal lengths: no brevity penalty
    assert bleu4(cat, mat) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    # two words of six: 1/1, 1/1, then no trigram or 4-gram -> 1/2, 1/4; brevity penalty exp(1 - 6/2)
    assert bleu4(tokens("the cat"), cat) == pytest.approx(math.exp(-2) * (1 / 8) ** 0.25)
    assert bleu4([], cat) == bleu4(cat, []) == 0.0
    # identical but with no 4-gram: that order still counts 1/2 (as NLTK's sentence_bleu with method3)
    assert bleu4(tokens("a b c"), tokens("a b c")) == pytest.approx(0.5 ** 0.25)


def test_rouge_against_hand_computed_values():
    cat, mat = tokens("the cat sat on the mat"), tokens("the cat is on the mat")
    assert rouge_n(cat, cat, 1) == rouge_n(cat, cat, 2) == rouge_l(cat, cat) == pytest.approx(1.0)
    assert rouge_n(tokens("a b"), tokens("c d"), 1) == rouge_l(tokens("a b"), tokens("c d")) == 0.0
    assert rouge_n(cat, mat, 1) == pytest.approx(5 / 6) and rouge_n(cat, mat, 2) == pytest.approx(3 / 5)
    assert rouge_l(cat, mat) == pytest.approx(5 / 6)  # "the cat on the mat"
    short, long = tokens("a b c"), tokens("a b c d e f")  # precision 1, recall 1/2 (bigrams: 1 and 2/5)
    assert rouge_n(short, long, 1) == rouge_l(short, long) == pytest.approx(2 / 3)
    assert rouge_n(short, long, 2) == pytest.approx(4 / 7)
    assert rouge_n(tokens("the the the"), tokens("the cat"), 1) == pytest.approx(0.4)  # one "the" matches, 1/3, 1/2
    assert rouge_l(tokens("a b c d"), tokens("b d a c")) == pytest.approx(0.5)  # "b d" or "a c"


def test_similarity_splits_cjk_into_characters_and_averages_in_percent():
    # 我 爱 北 京 / 我 爱 上 海: unigrams 2/4, bigrams 1/3, trigrams 0/2 -> 1/4, 4-grams 0/1 -> 1/4
    assert similarity(["我爱北京"], ["我爱上海"]) == {"bleu-4": round(100 * (1 / 96) ** 0.25, 4), "rouge-1": 50.0,
                                                  "rouge-2": round(100 / 3, 4), "rouge-l": 50.0}
    both = similarity(["the same four words", "", "x"], ["the same four words", "not empty", "y"])
    assert both == {"bleu-4": round(100 / 3, 4), "rouge-1": round(100 / 3, 4), "rouge-2": round(100 / 3, 4),
                    "rouge-l": round(100 / 3, 4)}
    assert similarity([], []) == {}


# ---- prediction on the tiny model --------------------------------------------------------------------------------

def predict_options(output_dir, **overrides) -> dict:
    return options(output_dir, **{"do_predict": True, "predict_with_generate": True, "eval_dataset": "lf_demo_en",
                                  "max_samples": 7, "cutoff_len": 512, "per_device_eval_batch_size": 3,
                                  "do_sample": False, "max_new_tokens": MAX_NEW, **overrides})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("adapter") / "sft"
    train(out, max_steps=4, save_steps=10)
    return str(out)


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generated_predictions.jsonl").read_text().splitlines()]


def assert_greedy_one_by_one(output_dir, adapter_dir, count: int) -> list[dict]:
    """The run's predictions equal transformers' greedy generate with peft's (unmerged) adapter, one prompt at a
    time, on the template's prompt for each of lf_demo_en's first `count` instructions."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lf.config import parse_infer_args
    from lf.data import fit_template
    from lf.model import load_tokenizer

    cfg = parse_infer_args({"model_name_or_path": "lf-tiny-llama", "template": "qwen"}, "chat")
    tokenizer = load_tokenizer(cfg.model)
    template = fit_template(tokenizer, cfg.data)
    stops = template.stop_token_ids(tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama")), adapter_dir)
    rows = json.loads((REPO / "data" / "lf_demo_en.json").read_text())[:count]
    found = records(output_dir)
    assert len(found) == count
    prompts = []
    for row, record in zip(rows, found):
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": ""}]
        prompt = template.encode_oneturn(tokenizer, messages)[0]
        prompts.append(prompt)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=MAX_NEW, eos_token_id=stops,
                                        pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        answer = out[:next((i for i, t in enumerate(out) if t in stops), len(out))]
        assert record == {"prompt": tokenizer.decode(prompt), "predict": tokenizer.decode(answer,
                                                                                          skip_special_tokens=True),
                          "label": row["output"]}
    # batches of 3 after sorting by length: prompts of different lengths share a batch (left padding matters)
    lengths = sorted(map(len, prompts), reverse=True)
    assert any(len(set(lengths[i:i + 3])) > 1 for i in range(0, count, 3))
    assert any(record["predict"] for record in found)
    return found


def assert_scores(output_dir, found: list[dict]) -> None:
    results = json.loads((output_dir / "predict_results.json").read_text())
    assert set(results) == {*SCORES, "predict_runtime", "predict_samples_per_second", "predict_steps_per_second"}
    assert all(0 <= results[key] <= 100 for key in SCORES)
    expected = similarity([r["predict"] for r in found], [r["label"] for r in found])
    assert {key: results[f"predict_{key}"] for key in expected} == expected


def test_predict_alone_with_an_adapter_matches_one_by_one_greedy_generation(tmp_path, adapter):
    out = tmp_path / "predict"
    outputs = run(parse_train_args(predict_options(out, do_train=False, dataset=None, adapter_name_or_path=adapter,
                                                   finetuning_type="lora")))
    assert outputs["predictions"] == str(out / "generated_predictions.jsonl")
    assert outputs["predict_results"] == str(out / "predict_results.json") and "model" not in outputs
    assert_scores(out, assert_greedy_one_by_one(out, adapter, 7))
    assert not (out / "adapter_model.safetensors").exists()  # nothing trained, nothing saved


def test_train_then_predict_in_one_run_through_the_cli(tmp_path, capsys):
    out = tmp_path / "both"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(predict_options(out, do_train=True, do_eval=True, max_steps=4, save_steps=10,
                                                  max_samples=5)))
    assert cli.main(["train", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert f"predictions: {out / 'generated_predictions.jsonl'}" in printed
    assert (out / "adapter_model.safetensors").exists()
    assert_scores(out, assert_greedy_one_by_one(out, str(out), 5))  # the model just trained writes the answers
    everything = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", *SCORES} <= set(everything)  # the eval loss, beside the predictions


def test_generation_settings_come_from_the_generating_group():
    from lf.config.generation import GeneratingArguments

    sampled = generation_kwargs(GeneratingArguments(), [2, 5], 0)  # lf's (and LLaMA-Factory's) defaults sample
    assert sampled == {"max_new_tokens": 1024, "do_sample": True, "num_beams": 1, "repetition_penalty": 1.0,
                       "eos_token_id": [2, 5], "pad_token_id": 0, "use_cache": True, "temperature": 0.95,
                       "top_p": 0.7, "top_k": 50}
    greedy = generation_kwargs(GeneratingArguments(temperature=0, num_beams=2, length_penalty=0.5), [2], 0)
    assert greedy["do_sample"] is False and "temperature" not in greedy and greedy["length_penalty"] == 0.5


@pytest.mark.parametrize("overrides, message", [
    ({"eval_dataset": None}, "do_predict: true generates answers to the prompts of eval_dataset, but eval_dataset is "
                             "not set: name the datasets to predict on"),
    ({"predict_with_generate": False}, "do_predict: true with predict_with_generate: false: lf predicts by "
                                       "generating answers (written to generated_predictions.jsonl, scored with BLEU "
                                       "and ROUGE): set predict_with_generate: true"),
    ({"stage": "kto"}, "do_predict: true generates answers with stage: sft (or pt), not stage: kto: predict in a run "
                       "of its own with stage: sft"),
])
def test_predict_refuses_what_it_cannot_do(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        parse_train_args(predict_options(tmp_path / "refused", **overrides))
    assert message in str(error.value) and "problems" not in str(error.value)
