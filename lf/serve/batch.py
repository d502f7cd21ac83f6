"""Dynamic batching for lf.serve's Engine: one worker thread decodes the next token of every admitted reply in one
forward pass a step, instead of one reply at a time.

    batcher = Batcher(engine, max_batch=16)
    batcher.submit(row)          # a Row: prompt ids, its settings, where its tokens go

Replies join at the next step boundary (mid-batch): the prompts waiting then are prefilled together in one
forward pass, left-padded to the longest (replies to the same prompt, a request's `n`, share one prefill), with
their media inputs (images, videos, audio: the plugin's pixel_values and the like, joined in row order, which is the
order the model fills its media tokens in; M-RoPE families get each row's 3-D positions as it would alone), then
their key/value cache is left-padded to the batch's length (or the batch's to theirs) and stacked onto the batch's,
with an attention mask that hides the padding and position ids that count each row's own tokens, so every row is
decoded as if it were alone. A row leaves at the step its reply ends (end-of-turn marker, a
stop string, max_new_tokens) or its reader leaves (cancelled: checked before every step), freeing its slot at once;
columns that only padding fills any more are dropped. Each row samples with its own settings (greedy, or
temperature / top_k / top_p with its own seeded generator, and repetition_penalty, applied as transformers' logits
processors apply them). Each step holds the engine's lock (a step and anything else on the model take turns). A
prefill that fails fails its joiners only; a step that fails, every row.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lf.data.collator import left_padded

log = logging.getLogger("lf")


@dataclass(eq=False)
class Row:
    """One reply in the batch. `feed(token)` hands each new token to the reply's decoder and returns whether the reply
    is over (end-of-turn, stop string); `done(error)` is called once, when the row leaves (error: None, or why the
    batch failed)."""
    prompt_ids: list[int]
    settings: dict  # max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty
    seed: int | None
    cancel: threading.Event
    feed: Callable[[int], bool]
    done: Callable[[Exception | None], None]
    # the prompt's media inputs (the plugin's pixel_values, image_grid_thw, token types, ...: lf.serve.engine), CPU
    # tensors; None for a text prompt. The rows of one request share the one dict (one prefill).
    media: dict | None = None
    ids: list[int] = field(default_factory=list)  # generated so far
    generator: torch.Generator | None = None
    offset: int = 0  # its positions after the prompt run this far ahead of its length (M-RoPE's media runs)
    over: bool = False

    def finish(self, error: Exception | None = None) -> None:
        """Ends the row (calls `done` once, whatever ends it first)."""
        if not self.over:
            self.over = True
            self.done(error)


class Batcher:
    """The engine's batch: submit() queues a Row; the worker thread, started at the first one, runs until the process
    ends (a daemon, idle while nothing waits)."""

    def __init__(self, engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self._waiting: collections.deque[Row] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.active = 0  # rows in the batch (for tests and the bench)

    def submit(self, row: Row) -> None:
        with self._wake:
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="lf-batch")
                self._thread.start()
            self._wake.notify()

    def _loop(self) -> None:
        batch = _Batch(self.engine)
        while True:
            with self._wake:
                while not batch.rows and not self._waiting:
                    self._wake.wait()
                joining = [self._waiting.popleft()
                           for _ in range(min(len(self._waiting), self.max_batch - len(batch.rows)))]
                self.active = len(batch.rows) + len(joining)
            try:
                with self.engine._lock, torch.inference_mode():
                    try:
                        batch.join(joining)
                    except Exception as exc:  # a failed prefill fails its joiners only (join changes the batch last)
                        log.exception("lf: prefilling requests that joined the batch failed")
                        for row in joining:
                            row.finish(exc)
                    batch.step()
            except Exception as exc:  # every row in the batch fails with it; the worker goes on with new ones
                log.exception("lf: a batched generation step failed")
                for row in batch.rows + joining:
                    row.finish(exc)
                batch = _Batch(self.engine)
            with self._wake:
                self.active = len(batch.rows)
                self._wake.notify_all()  # wait_idle's waiters

    def wait_idle(self) -> None:
        """Returns once no row is queued or decoded (cancelled ones leave at the next step)."""
        with self._wake:
            while self._waiting or self.active:
                self._wake.wait()


class _Batch:
    """The rows being decoded: their key/value cache (one tensor pair a layer, rows left-padded to one length), the
    mask of their real columns, and each row's next input token."""

    def __init__(self, engine):
        self.engine, self.model, self.device = engine, engine.model, engine.device
        self.rows: list[Row] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.next: list[int] = []

    def join(self, rows: list[Row]) -> None:
        """Prefills the rows' prompts in one forward pass (left-padded; one for each different prompt), samples each
        row's first token and stacks the caches of those that go on onto the batch's."""
        for row in rows:
            if row.cancel.is_set():
                row.finish()
        rows = [row for row in rows if not row.over]
        if not rows:
            return
        firsts = {}  # one prefill row per distinct prompt (a request's n rows share theirs): its first row
        for row in rows:
            firsts.setdefault(_prompt(row), row)
        keys, firsts = list(firsts), list(firsts.values())
        ids, mask = left_padded([row.prompt_ids for row in firsts], 0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions, media = self._prefill_inputs(firsts, ids, mask)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, **media)
        logits = out.logits[:, -1]
        rows_of = [keys.index(_prompt(row)) for row in rows]
        going = []
        for row, prompt in zip(rows, rows_of):
            row.offset = firsts[prompt].offset
            if row.seed is not None:
                row.generator = torch.Generator(self.device).manual_seed(row.seed)
            token = _choose(logits[prompt], row)
            if self._take(row, token):
                going.append((row, prompt, token))
        if not going:
            return
        index = torch.tensor([prompt for _, prompt, _ in going], device=self.device)
        real = mask.index_select(0, index)
        # the padding's keys and values are zeroed: masked, but a NaN there would still spread through the product
        kv = [tuple(t.index_select(0, index).masked_fill(real[:, None, :, None] == 0, 0) for t in (layer.keys,
                                                                                                      layer.values))
              for layer in cache.layers]
        width = max(self.mask.shape[1], mask.shape[1])
        self.kv = [(torch.cat([_left_pad(k, width), _left_pad(nk, width)]),
                    torch.cat([_left_pad(v, width), _left_pad(nv, width)]))
                   for (k, v), (nk, nv) in zip(self.kv, kv)] if self.rows else kv
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(real, width, dim=1)]) \
            if self.rows else real
        self.rows += [row for row, _, _ in going]
        self.next += [token for _, _, token in going]

    def _prefill_inputs(self, firsts: list[Row], ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The prefill's position ids and media inputs. Positions count each row's own tokens. With media, the rows'
        inputs are joined in row order (the model fills its media tokens with their features in that order), with
        the token types of the whole padded batch where the family reads them; a family with M-RoPE gets each row's
        3-D positions as that row alone gets them, and the row's offset for the positions after its prompt."""
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        media, processor = [row.media for row in firsts if row.media], self.engine.media
        if not media:
            return positions, {}
        plugin = processor.plugin
        joined = {key: _joined([m[key] for m in media if key in m]).to(self.device)
                  for key in dict.fromkeys(k for m in media for k in m) if key != plugin.token_type_key}
        if plugin.token_types:
            joined[plugin.token_type_key] = processor.type_ids(ids) * mask  # padding: text, whatever its id
        if plugin.rope_positions is not None:
            positions = positions[None].repeat(3, 1, 1)
            for i, row in enumerate(firsts):
                if row.media:
                    n = len(row.prompt_ids)
                    alone = processor.packed_positions(torch.tensor([row.prompt_ids]), torch.arange(n)[None],
                                                       row.media)[1:, 0]
                    positions[:, i, -n:] = alone.to(self.device)
                    row.offset = int(alone.max()) + 1 - n
        return positions, joined

    def step(self) -> None:
        """One token for every row: a forward over each row's next token against the cache."""
        self._leave([i for i, row in enumerate(self.rows) if row.cancel.is_set()], cancelled=True)
        if not self.rows:
            return
        rows = len(self.rows)
        mask = torch.cat([self.mask, torch.ones(rows, 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        positions = torch.tensor([[len(row.prompt_ids) + len(row.ids) - 1 + row.offset] for row in self.rows],
                                 device=self.device)
        cache = DynamicCache(self.kv)
        out = self.model(input_ids=torch.tensor([[t] for t in self.next], device=self.device), attention_mask=mask,
                         position_ids=positions, past_key_values=cache, use_cache=True)
        self.kv, self.mask = [(layer.keys, layer.values) for layer in cache.layers], mask
        logits = out.logits[:, -1]
        ended = []
        for i, row in enumerate(self.rows):
            token = _choose(logits[i], row)
            if self._take(row, token):
                self.next[i] = token
            else:
                ended.append(i)
        self._leave(ended, cancelled=False)

    def _take(self, row: Row, token: int) -> bool:
        """Hands `token` to the row; False when its reply is over (the row is then done)."""
        row.ids.append(token)
        over = row.feed(token) or len(row.ids) >= row.settings["max_new_tokens"] or row.cancel.is_set()
        if over:
            row.finish()
        return not over

    def _leave(self, indices: list[int], cancelled: bool) -> None:
        """Drops rows (done already when they ended; told now when cancelled), then the columns only padding fills."""
        if not indices:
            return
        for i in indices if cancelled else ():
            self.rows[i].finish()
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows, self.next = [self.rows[i] for i in keep], [self.next[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        self.kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.kv]


def _prompt(row: Row) -> tuple:
    """What makes two rows' prefills the same: the prompt's ids and its media (one request's, by identity)."""
    return tuple(row.prompt_ids), id(row.media) if row.media else None


def _joined(values: list) -> torch.Tensor:
    """Requests' media inputs of one name as one batch's: stacked along the first axis (one entry per image, patch,
    clip), each zero-padded at the end of its other axes to the largest (LLaVA-NeXT's tiles per image: its model
    reads an image's own from image_sizes)."""
    shape = [max(sizes) for sizes in zip(*(v.shape[1:] for v in values))]
    return torch.cat([F.pad(v, [p for size, have in zip(reversed(shape), reversed(v.shape[1:]))
                                for p in (0, size - have)]) for v in values])


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`tensor` with zeros before its columns along `dim` up to `width` (a cache's sequence axis is 2, a mask's 1)."""
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


def _choose(logits: torch.Tensor, row: Row) -> int:
    """The row's next token from its logits, by its own settings: the likeliest, or drawn with its generator."""
    scores = processed(logits.float(), row.settings, row.prompt_ids + row.ids)
    if not row.settings["do_sample"]:
        return int(scores.argmax())
    return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator))


def processed(scores: torch.Tensor, settings: dict, seen: list[int]) -> torch.Tensor:
    """One row's next-token scores as transformers' logits processors leave them, in their order: repetition penalty
    on the `seen` tokens, then (sampling) temperature, top-k, top-p; cut tokens get -inf."""
    penalty = settings["repetition_penalty"]
    if penalty != 1.0:
        index = torch.tensor(seen, device=scores.device)
        picked = scores.gather(0, index)
        scores = scores.scatter(0, index, torch.where(picked < 0, picked * penalty, picked / penalty))
    if not settings["do_sample"]:
        return scores
    scores = scores / settings["temperature"]
    if settings["top_k"]:
        cut = torch.topk(scores, min(settings["top_k"], scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < cut, -float("inf"))
    if settings["top_p"] < 1.0:
        ordered, order = scores.sort()  # ascending: drop the low tail whose mass is at most 1 - top_p
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - settings["top_p"]
        tail[-1] = False  # the likeliest token always stays
        scores = scores.masked_fill(torch.zeros_like(tail).scatter(0, order, tail), -float("inf"))
    return scores
