"""Where ppo's scores come from (`reward_model`, `reward_model_type`), each a callable from whole sequences (prompt
and reply token ids) to one float score per sequence:

  lora  an lf `rm` output over model_name_or_path: the adapter with its value head (`score`, saved beside it)
  full  a whole reward model (XForSequenceClassification, one label: an lf `rm` run with finetuning_type full),
        with reward_model_adapters loaded onto it if given
  api   an OpenAI-compatible scoring endpoint, LLaMA-Factory's shape: POST {"model": "model", "messages": [the
        sequences' texts, special tokens kept]} answered by {"scores": [one number per text]}

The reward model is its own frozen copy beside the policy, scoring the last token of each sequence (where an `rm`
run trained it to); `lf api` serves the same scores (lf.serve.scores, through `served_scorer`). A reward model that
is missing or has no value head, and an endpoint that is down or answers anything else, stop the run with one line
saying what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.error
import urllib.request

import torch

from lf.errors import TrainError

log = logging.getLogger("lf")
API_TIMEOUT_S = 60


def load_scorer(cfg, tokenizer, device):
    """The scorer `cfg.finetuning` names: `scorer(sequences) -> tensor of scores`."""
    fin = cfg.finetuning
    if fin.reward_model_type == "api":
        return ApiScorer(fin.reward_model, tokenizer)
    return ModelScorer(_reward_model(cfg, tokenizer).to(device), tokenizer)


def reward_type(model_args) -> str | None:
    """How an inference config's model is a reward model: "lora" when its adapter is an lf rm output (the value head
    saved beside it), "full" when the model itself has a value head, None when it is not one (it generates)."""
    adapter = model_args.adapter_name_or_path
    if adapter and os.path.exists(os.path.join(adapter, "adapter_config.json")) and _adapter_head(adapter):
        return "lora"
    return "full" if _model_head(model_args.model_name_or_path) else None


def served_scorer(cfg, tokenizer, device: str) -> ModelScorer:
    """The scorer of the reward model an inference config (`lf api`'s) names, loaded as ppo loads its
    reward_model: the model (with its adapters) as reward_type finds it."""
    kind, model = reward_type(cfg.model), cfg.model
    fin = dataclasses.replace(cfg.finetuning, reward_model_type=kind,
                              reward_model_quantization_bit=model.quantization_bit,
                              reward_model=model.adapter_name_or_path if kind == "lora" else model.model_name_or_path,
                              reward_model_adapters=None if kind == "lora" else model.adapter_name_or_path)
    return ModelScorer(_reward_model(dataclasses.replace(cfg, finetuning=fin), tokenizer).to(device), tokenizer)


def check(fin) -> None:
    """Refuses, before anything loads, a reward model folder that is missing, is not what reward_model_type says,
    or has no value head (TrainError)."""
    if fin.reward_model_type == "api":
        return
    path = fin.reward_model
    if not os.path.isdir(path):
        raise TrainError(f"reward_model: {path} is not a folder: name an lf rm run's output_dir (or, with "
                         f"reward_model_type: api, set it to the scoring endpoint's URL)")
    if fin.reward_model_type == "lora":
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            raise TrainError(f"reward_model: {path} holds no LoRA adapter (adapter_config.json): for a whole reward "
                             f"model set reward_model_type: full")
        has_head = _adapter_head(path)
    else:
        has_head = _model_head(path)
    if not has_head:
        raise TrainError(f"reward_model: {path} has no value head (a `score` layer scoring sequences): train one "
                         f"with stage: rm and name that run's output_dir")


def _reward_model(cfg, tokenizer):
    """The reward model as `rm` trained it (a value head on the model), frozen, in eval mode."""
    from lf.model import load_model

    fin = cfg.finetuning
    check(fin)
    if fin.reward_model_type == "lora":  # the adapter over the policy's base model
        model_args = dataclasses.replace(cfg.model, adapter_name_or_path=fin.reward_model)
    else:
        model_args = dataclasses.replace(cfg.model, model_name_or_path=fin.reward_model,
                                         adapter_name_or_path=fin.reward_model_adapters)
    model_args = dataclasses.replace(model_args, quantization_bit=fin.reward_model_quantization_bit)
    as_rm = dataclasses.replace(fin, stage="rm", finetuning_type="lora")  # the value head; adapters merged at load
    model, _ = load_model(tokenizer, model_args, as_rm, is_trainable=False)
    config = model.config  # the head reads each row's last token that is not padding (as rm trained)
    config.pad_token_id = config.get_text_config().pad_token_id = tokenizer.pad_token_id
    log.info("reward model: %s (%s)", fin.reward_model, fin.reward_model_type)
    return model.requires_grad_(False).eval()


def _adapter_head(path: str) -> bool:
    with open(os.path.join(path, "adapter_config.json")) as f:
        saved = json.load(f).get("modules_to_save") or []
    return "score" in saved


def _model_head(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except OSError:
        return False
    return any(name.endswith("ForSequenceClassification") for name in architectures)


class ModelScorer:
    """Scores from a reward model's value head at each sequence's last token (sequences right-padded)."""

    def __init__(self, model, tokenizer):
        self.model, self.pad = model, tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        from lf.data.collator import right_padded

        ids, mask = right_padded(sequences, self.pad)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        return logits.squeeze(-1).float().cpu()


class ApiScorer:
    """Scores from an OpenAI-compatible scoring endpoint (LLaMA-Factory's request and answer)."""

    def __init__(self, url: str, tokenizer):
        self.url, self.tokenizer = url, tokenizer

    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=False)
        body = json.dumps({"model": "model", "messages": texts}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=API_TIMEOUT_S) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            raise TrainError(f"reward_model: the scoring endpoint {self.url} answered HTTP {exc.code} ({exc.reason}): "
                             f"check its log, or fix the URL") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise TrainError(f"reward_model: the scoring endpoint {self.url} did not answer ({_reason(exc)}): start "
                             f"it, or fix the URL (reward_model_type: api posts the texts to it)") from exc
        try:
            scores = json.loads(raw)["scores"]
            out = torch.tensor([float(s) for s in scores], dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"reward_model: the scoring endpoint {self.url} answered {raw[:80]!r}, not "
                             f'{{"scores": [one number per text]}}') from exc
        if len(out) != len(texts) or not torch.isfinite(out).all():
            raise TrainError(f"reward_model: the scoring endpoint {self.url} gave {len(out)} scores for {len(texts)} "
                             f"texts ({scores[:4]}...): it must answer one finite number per text")
        return out


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc)
