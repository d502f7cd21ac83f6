"""`lf api` serving an rm trained by `lf train` on LLaMA-Factory's /v1/score/evaluation, live on loopback: its scores
equal ppo's reward model's (lf.train.rewards) for the same texts, max_length cuts the texts, ppo's api client takes
it as its endpoint, and a chat model there, chat on a reward model, and bad requests get a 400 in OpenAI's JSON."""

import json
import math
import time

import httpx
import pytest
import torch
from support import one_thread  # noqa: F401 (autouse: this module's runs on one thread)
from test_serve_api import live_server
from test_serve_engine import tiny_engine
from test_train import lf_home, options  # noqa: F401 (lf_home: the module's tiny model)
from transformers import AutoTokenizer

from lf.config import parse_infer_args, parse_train_args
from lf.serve.app import create_app
from lf.serve.api import _engine
from lf.train import run
from lf.train.rewards import ApiScorer, load_scorer

TEXTS = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>",
         "<|im_start|>user\nA longer question about the sea and its tides<|im_end|>\n<|im_start|>assistant\nNo",
         "plain text, no template"]


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    run(parse_train_args(options(out, stage="rm", dataset="lf_pref_demo", max_samples=4, max_steps=2)))
    return str(out)


@pytest.fixture(scope="module")
def ppo_scorer(rm, tmp_path_factory):
    """ppo's reward model over the rm output, as a ppo run loads it, and its tokenizer."""
    cfg = parse_train_args(options(tmp_path_factory.mktemp("ppo"), stage="ppo", reward_model_type="lora",
                                   reward_model=rm))
    tokenizer = AutoTokenizer.from_pretrained(rm)
    return load_scorer(cfg, tokenizer, "cpu"), tokenizer


@pytest.fixture(scope="module")
def scorer(rm):
    served = _engine(parse_infer_args({"model_name_or_path": "lf-tiny-llama", "adapter_name_or_path": rm,
                                       "template": "qwen", "infer_dtype": "float32"}, "api"))
    assert not served.generates  # `lf api` tells the rm output for a reward model
    return served


@pytest.fixture(scope="module")
def url(scorer):
    with live_server(create_app(scorer, model_name="rm")) as base:
        yield f"{base}/v1/score/evaluation"


def post(url, body, timeout=120):
    return httpx.post(url, json=body, timeout=timeout)


def test_served_scores_are_ppos_reward_models_for_the_same_texts(url, ppo_scorer):
    scorer, tokenizer = ppo_scorer
    answer = post(url, {"model": "judge", "messages": TEXTS})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"].startswith("scoreval-") and body["object"] == "score.evaluation" and body["model"] == "judge"
    want = scorer([tokenizer.encode(t, add_special_tokens=False) for t in TEXTS])
    torch.testing.assert_close(torch.tensor(body["scores"]), want, rtol=1e-4, atol=1e-5)
    assert len(set(body["scores"])) == 3  # the texts are told apart

    cut = post(url, {"model": "judge", "messages": TEXTS[1:2], "max_length": 5}).json()["scores"]
    torch.testing.assert_close(torch.tensor(cut), scorer([tokenizer.encode(TEXTS[1], add_special_tokens=False)[:5]]),
                               rtol=1e-4, atol=1e-5)


def test_ppos_api_client_takes_lf_api_as_its_endpoint(url, ppo_scorer):
    scorer, tokenizer = ppo_scorer
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:2]]
    torch.testing.assert_close(ApiScorer(url, tokenizer)(sequences), scorer(sequences), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("body, expected", [
    ({"model": "m", "messages": []}, "invalid request: messages: List should have at least 1 item"),
    ({"model": "m", "messages": ["hi"], "max_length": 0}, "invalid request: max_length: Input should be greater"),
    ({"model": "m", "messages": [""]}, "messages[0] is empty: send the text to score"),
    ({"model": "m", "messages": ["hi", "word " * 3000]}, "messages[1] is 3001 tokens, but the model's context is 2048"),
])
def test_bad_score_requests_get_a_400_naming_the_fix(url, body, expected):
    answer = post(url, body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith(expected), answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_gets_the_chat_routes_400(url):
    nan = httpx.post(url, content=b'{"model": "m", "messages": ["a"], "max_length": NaN}', timeout=60)
    assert nan.status_code == 400 and "not JSON as the API takes it" in nan.json()["error"]["message"]


def test_each_route_refuses_the_other_kind_of_model(url):
    chat = post(url.replace("score/evaluation", "chat/completions"),
                {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 400
    assert chat.json()["error"]["message"].startswith("rm is a reward model: it scores texts")
    with live_server(create_app(tiny_engine())) as base:
        answer = post(f"{base}/v1/score/evaluation", {"model": "m", "messages": ["Hi"]})
    assert answer.status_code == 400
    assert "is not a reward model (it has no value head): serve an lf rm run's output" in \
        answer.json()["error"]["message"]


def test_a_client_leaving_a_score_request_frees_the_model_after_its_current_batch(url, scorer, monkeypatch):
    # the route used to score every text of a request whose client had left, holding the model meanwhile
    batches, score = [], scorer._score

    def slow(sequences):
        batches.append(len(sequences))
        time.sleep(0.1)
        return score(sequences)

    monkeypatch.setattr(scorer, "_score", slow)
    with pytest.raises(httpx.ReadTimeout):  # 240 texts: 30 batches of 8, 3 s at least
        post(url, {"model": "m", "messages": TEXTS * 80}, timeout=httpx.Timeout(30, read=0.5))
    answer = post(url, {"model": "m", "messages": TEXTS})
    assert answer.status_code == 200 and len(answer.json()["scores"]) == 3
    assert 1 <= len(batches) - 1 < 15  # the left request's batches stopped (the answered one took one)


def test_a_ppo_run_trains_on_lf_apis_scores(url, tmp_path):
    out = tmp_path / "ppo"
    run(parse_train_args(options(out, stage="ppo", reward_model_type="api", reward_model=url, max_steps=1,
                                 max_samples=4, per_device_train_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                                 save_steps=1000)))
    [step] = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert math.isfinite(step["reward"]) and step["reward_std"] > 0  # the served rm told the rollouts apart


def test_a_whole_reward_model_is_served_as_ppo_scores_with_it(tmp_path):
    rm_full = tmp_path / "rm-full"
    run(parse_train_args(options(rm_full, stage="rm", finetuning_type="full", dataset="lf_pref_demo", max_samples=4,
                                 max_steps=1)))
    scorer = _engine(parse_infer_args({"model_name_or_path": str(rm_full), "template": "qwen",
                                       "infer_dtype": "float32"}, "api"))
    assert not scorer.generates
    cfg = parse_train_args(options(tmp_path / "ppo", stage="ppo", reward_model_type="full", reward_model=str(rm_full)))
    tokenizer = AutoTokenizer.from_pretrained(rm_full)
    want = load_scorer(cfg, tokenizer, "cpu")([tokenizer.encode(t, add_special_tokens=False) for t in TEXTS])
    with live_server(create_app(scorer)) as base:
        answer = post(f"{base}/v1/score/evaluation", {"model": "m", "messages": TEXTS})
    torch.testing.assert_close(torch.tensor(answer.json()["scores"]), want, rtol=1e-4, atol=1e-5)
