"""The reward model behind `lf api`'s POST /v1/score/evaluation (LLaMA-Factory's route): texts in, one score per
text out, the value head's at each text's last token, exactly as ppo's `reward_model` scores (lf.train.rewards
loads and runs it), so that an `lf api` of an rm output is an endpoint for ppo's `reward_model_type: api`.

A text is tokenized as it is, no special tokens added (ppo's api client sends them written out, as LLaMA-Factory's
does), cut to the request's max_length tokens when it gives one; an empty text, or one longer than the model's
context, is refused (RequestError).
"""

from __future__ import annotations

import threading

from lf import device as accelerator
from lf.errors import RequestError
from lf.model import load_tokenizer
from lf.serve.engine import _context_length
from lf.train.rewards import served_scorer

SCORE_BATCH = 8  # texts through the model at once: a request of many texts costs time, not memory


class Scorer:
    """A reward model (an lf `rm` output: lf.train.rewards.reward_type) scoring texts; it does not generate."""

    generates = False

    def __init__(self, cfg, device: str | None = None):
        """`cfg`: an InferConfig naming the rm output; `device`: default this process's accelerator (lf.device)."""
        self.name = cfg.model.model_name_or_path
        self.tokenizer = load_tokenizer(cfg.model)
        self._score = served_scorer(cfg, self.tokenizer, device or accelerator.current().device())
        self.context_length = _context_length(self._score.model.config, self.tokenizer)  # None: the model names none
        self._lock = threading.Lock()

    def encode(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """The texts' token ids, as the module docstring says."""
        sequences = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text, add_special_tokens=False)[:max_length]
            if not ids:
                raise RequestError(f"messages[{i}] is empty: send the text to score")
            if self.context_length and len(ids) > self.context_length:
                raise RequestError(f"messages[{i}] is {len(ids)} tokens, but the model's context is "
                                   f"{self.context_length}: shorten it, or send max_length to score each text's "
                                   f"first max_length tokens")
            sequences.append(ids)
        return sequences

    def scores(self, sequences: list[list[int]], cancel: threading.Event | None = None) -> list[float]:
        """The sequences' scores, SCORE_BATCH at a time; once `cancel` is set (its client left), the batches not
        begun are skipped (what was scored is returned), and the model is free for others after the current one."""
        scores = []
        for start in range(0, len(sequences), SCORE_BATCH):
            if cancel is not None and cancel.is_set():
                break
            with self._lock:  # a cancelled request's last batch may still run when the next request begins
                scores += self._score(sequences[start:start + SCORE_BATCH]).tolist()
        return scores
