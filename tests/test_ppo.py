"""stage: ppo on the tiny Llama (test_train's temporary LF_HOME and options): a rule-based reward served on loopback
by the test (LLaMA-Factory's scoring API) rises under PPO, an rm trained by `lf train` scores the rollouts end to
end, a run stopped after a checkpoint resumes to the same end, and bad reward models, endpoints and datasets stop
the run with one line."""

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file
from support import one_thread  # noqa: F401 (autouse: this module's runs on one thread)
from test_train import lf_home, options  # noqa: F401 (lf_home: the module's tiny model)
from transformers import AutoTokenizer, TrainerCallback

from lf.config import parse_train_args
from lf.errors import ConfigError, TrainError
from lf.tiny import tiny_path
from lf.train import run

ANSWER = "<|im_start|>assistant\n"  # the qwen template's reply marker: the scored text follows it
# every step: 8 prompts answered with up to 8 sampled tokens, 2 epochs over them in batches of 4
PPO = {"stage": "ppo", "reward_model_type": "api", "max_samples": 16, "cutoff_len": 192,
       "per_device_train_batch_size": 4, "ppo_buffer_size": 2, "ppo_epochs": 2, "max_new_tokens": 8,
       "temperature": 1.0, "top_p": 1.0, "top_k": 0, "learning_rate": 1e-3, "lora_rank": 8, "save_steps": 1000}


TARGET = "<s>"  # the token the rule rewards: a special token the qwen template never writes, kept in the texts


@pytest.fixture(scope="module")
def policy_path(lf_home, tmp_path_factory):  # noqa: F811 (test_train's fixture)
    """The tiny Llama with its head's row for TARGET turned towards the last hidden state of the answers it
    writes (which barely varies in a random model), so that the policy writes TARGET about once in 10 tokens
    instead of once in 4000: PPO has something to find."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("policy")
    tokenizer = AutoTokenizer.from_pretrained(tiny_path("lf-tiny-llama"))
    model = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"))
    torch.manual_seed(0)
    with torch.no_grad():
        prompt = tokenizer([f"<|im_start|>user\nHello<|im_end|>\n{ANSWER}"] * 4, return_tensors="pt").input_ids
        written = model.generate(input_ids=prompt, do_sample=True, top_k=0, max_new_tokens=16)
        hidden = model(input_ids=written, output_hidden_states=True).hidden_states[-1][:, prompt.shape[1]:]
        mean = hidden.mean((0, 1))
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(TARGET)] = 8.0 * mean / mean.norm() ** 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def target_count(text: str) -> float:
    """The rule: how often the answer (the text after the reply marker) holds TARGET."""
    return float(text.split(ANSWER, 1)[-1].count(TARGET))


@contextmanager
def serving(answer):
    """A scoring endpoint on loopback: `answer(request body) -> (status, bytes)`; yields its URL and the texts."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            status, payload = answer(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/score/evaluation", seen
    finally:
        server.shutdown()
        server.server_close()


def rule_server(score):
    return serving(lambda body: (200, json.dumps({"scores": [score(t) for t in body["messages"]]}).encode()))


def train(output_dir, callbacks=(), **overrides) -> dict:
    return run(parse_train_args(options(output_dir, **{**PPO, **overrides})), callbacks)


@pytest.fixture
def ppo(policy_path):
    """train() with the policy of policy_path (its `policy_path`)."""
    def train_policy(output_dir, **overrides):
        return train(output_dir, model_name_or_path=policy_path, **overrides)

    train_policy.policy_path = policy_path
    return train_policy


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]


def test_ppo_raises_a_rule_based_reward_served_on_loopback(tmp_path, ppo):
    out = tmp_path / "ppo"
    with rule_server(target_count) as (url, seen):
        result = ppo(out, reward_model=url, max_steps=8, plot_loss=True)
    rewards = [r["reward"] for r in records(out)]
    assert len(rewards) == 8
    # TARGET in a few of the 8 answers at first, then in most, several times
    assert sum(rewards[:2]) / 2 < 0.6 and sum(rewards[-3:]) / 3 > 2.0 and min(rewards[-3:]) > 1.0, rewards
    assert len(seen) == 8 and all(len(body["messages"]) == 8 and body["model"] == "model" for body in seen)
    assert all(ANSWER in text for text in seen[0]["messages"])  # prompt and answer, special tokens kept
    record = records(out)[-1]
    for key in ("loss", "reward", "reward_std", "kl", "kl_coef", "policy_loss", "value_loss", "clip_fraction",
                "entropy", "response_length", "lr"):
        assert key in record, key
    assert 0 < record["response_length"] <= 8 and record["entropy"] > 0
    assert result["plots"] == [str(out / "training_loss.png"), str(out / "training_reward.png")]
    head = load_file(out / "value_head.safetensors")
    assert sorted(head) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()


class StopAfter(TrainerCallback):
    """Raises after `step` (a run killed there)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_uninterrupted_end(tmp_path, ppo):
    with rule_server(target_count) as (url, _):
        quick = dict(reward_model=url, max_steps=4, save_steps=2, ppo_epochs=1, max_new_tokens=4)
        ppo(tmp_path / "whole", **quick)
        with pytest.raises(KeyboardInterrupt):
            ppo(tmp_path / "cut", callbacks=[StopAfter(3)], **quick)
        assert (tmp_path / "cut" / "checkpoint-2" / "value_head.safetensors").exists()
        ppo(tmp_path / "cut", **quick)
    whole, cut = records(tmp_path / "whole"), records(tmp_path / "cut")
    assert [r["current_steps"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(whole, cut):
        assert a["reward"] == pytest.approx(b["reward"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_an_rm_trained_by_lf_scores_the_rollouts_as_transformers_and_peft_score_them(tmp_path, ppo):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lf.train.rewards import load_scorer

    rm = tmp_path / "rm"
    run(parse_train_args(options(rm, stage="rm", dataset="lf_pref_demo", max_samples=4, max_steps=2,
                                 model_name_or_path=policy_path_of(ppo))))
    out = tmp_path / "ppo"
    ppo(out, reward_model_type="lora", reward_model=str(rm), max_steps=2, ppo_epochs=1, max_new_tokens=4)
    rewards = [r["reward"] for r in records(out)]
    assert len(rewards) == 2 and all(r == r for r in rewards) and records(out)[-1]["reward_std"] > 0

    cfg = parse_train_args(options(out / "unused", **{**PPO, "reward_model_type": "lora", "reward_model": str(rm),
                                                      "model_name_or_path": policy_path_of(ppo)}))
    tokenizer = AutoTokenizer.from_pretrained(rm)
    scorer = load_scorer(cfg, tokenizer, "cpu")
    sequences = [tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there"),
                 tokenizer.encode("<|im_start|>user\nA longer question<|im_end|>\n<|im_start|>assistant\nNo")]
    base = AutoModelForSequenceClassification.from_pretrained(policy_path_of(ppo), num_labels=1)
    reference = PeftModel.from_pretrained(base, rm).eval()
    with torch.no_grad():
        want = [reference(input_ids=torch.tensor([s])).logits[0, 0].item() for s in sequences]
    torch.testing.assert_close(scorer(sequences), torch.tensor(want), rtol=1e-4, atol=1e-5)


def policy_path_of(ppo) -> str:
    return ppo.policy_path


@pytest.mark.parametrize("setting, expected", [
    ({"reward_model": None}, "stage: ppo trains on the scores a reward model gives the policy's replies, but "
                             "reward_model is not set"),
    ({"reward_model": "saves/nothing-here"}, "reward_model: saves/nothing-here is not a folder"),
    ({"do_eval": True, "val_size": 2}, "stage: ppo does not evaluate"),
    ({"ppo_epochs": 0}, "ppo_epochs: 0 must be at least 1"),
])
def test_bad_ppo_settings_stop_before_anything_loads(tmp_path, setting, expected):
    settings = {**PPO, "reward_model_type": "full", "reward_model": "x", **setting}
    with pytest.raises((ConfigError, TrainError)) as caught:
        run(parse_train_args(options(tmp_path / "run", **settings)))
    assert str(caught.value).startswith(expected), caught.value
    assert not (tmp_path / "run").exists()


def test_a_reward_model_without_a_value_head_is_refused(tmp_path):
    sft = tmp_path / "sft"  # an adapter of an sft run: no `score` saved beside it
    sft.mkdir()
    (sft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "modules_to_save": None}))
    with pytest.raises(TrainError, match=r"^reward_model: .*sft has no value head .* train one with stage: rm"):
        train(tmp_path / "run", reward_model_type="lora", reward_model=str(sft))
    with pytest.raises(TrainError, match=r"holds no LoRA adapter .* set reward_model_type: full"):
        train(tmp_path / "run", reward_model_type="lora", reward_model=str(tmp_path))


@pytest.mark.parametrize("answer, expected", [
    (lambda body: (200, b"<html>busy</html>"), "answered b'<html>busy</html>', not {\"scores\": [one number per"),
    (lambda body: (200, b'{"scores": [1.0]}'), "gave 1 scores for 8 texts"),
    (lambda body: (500, b"{}"), "answered HTTP 500 (Internal Server Error): check its log"),
])
def test_a_reward_endpoint_that_answers_garbage_stops_the_run_in_one_line(tmp_path, answer, expected):
    with serving(answer) as (url, _):
        with pytest.raises(TrainError) as caught:
            train(tmp_path / "run", reward_model=url, max_steps=1)
    assert str(caught.value).startswith(f"reward_model: the scoring endpoint {url} ")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_reward_endpoint_that_is_down_stops_the_run_in_one_line(tmp_path):
    with serving(lambda body: (200, b"")) as (url, _):
        pass  # served, then shut: nothing listens on its port now
    with pytest.raises(TrainError, match=r"^reward_model: the scoring endpoint .* did not answer \(.*refused.*\): "
                                          r"start it, or fix the URL"):
        train(tmp_path / "run", reward_model=url, max_steps=1)
