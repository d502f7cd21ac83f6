"""Prediction (`do_predict: true`, `predict_with_generate: true`): the model answers every prompt of eval_dataset,
in batches, and output_dir gets

  generated_predictions.jsonl  one JSON object per example, in the dataset's order: prompt (the template's text,
                               special tokens kept), predict (the model's answer), label (the dataset's answer)
  predict_results.json         predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l (lf.train.metrics,
                               in percent), predict_runtime, predict_samples_per_second, predict_steps_per_second

The prompts are lf.data's "predict" stage of eval_dataset (each conversation through the last reply's generation
prompt, cut to cutoff_len; max_samples applies), the datasets concatenated. With a vision-language model (the trainer's
MMProcessor) each prompt keeps its images, and each batch gets their forward inputs as the collator builds them. Each batch of
per_device_eval_batch_size prompts (like lengths together) is padded on the left so that every answer starts right
after its prompt; an answer ends at eos or at a stop word of the template, or after max_new_tokens. The generating
group (do_sample, temperature, top_p, top_k, num_beams, repetition_penalty, length_penalty, max_new_tokens,
skip_special_tokens) sets the decoding, as in `lf chat`: do_sample with temperature 0 is greedy. With several
processes each generates every world_size-th prompt and the main one writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch

from lf.data import get_dataset
from lf.data.collator import left_padded
from lf.train.metrics import similarity

log = logging.getLogger("lf")
PREDICTIONS = "generated_predictions.jsonl"


def prediction_prompts(cfg, tokenizer, template, media=None):
    """eval_dataset as the predict stage tokenizes it: input_ids (the prompt) and labels (the reference answer),
    and with `media` (the model's MMProcessor) each prompt's images."""
    # only eval_dataset, read afresh (no cache, no stream, no packing: one row per prompt)
    data_args = dataclasses.replace(cfg.data, dataset=None, val_size=0.0, tokenized_path=None, streaming=False,
                                    eval_on_each_dataset=False, packing=None, neat_packing=None)
    return get_dataset(data_args, tokenizer=tokenizer, template=template, stage="predict",
                       seed=cfg.training.seed, media=media).eval_dataset


def generation_kwargs(generating, stops: list[int], pad_id: int) -> dict:
    """transformers' generate arguments from the generating group."""
    g = generating
    sample = g.do_sample and g.temperature > 0  # temperature 0 means greedy, as in lf chat
    kwargs = {"max_new_tokens": g.max_new_tokens, "do_sample": sample, "num_beams": g.num_beams,
              "repetition_penalty": g.repetition_penalty, "eos_token_id": stops, "pad_token_id": pad_id,
              "use_cache": True}  # training turns the model's cache off
    if sample:
        kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    if g.num_beams > 1:
        kwargs["length_penalty"] = g.length_penalty
    return kwargs


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """`ids` up to (without) the first stop id: an answer without its end-of-turn marker and the padding after."""
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:cut]


def generate_answers(model, prompts: list[list[int]], *, batch_size: int, kwargs: dict, stops: list[int],
                     show_progress: bool = True, images: list[dict] | None = None,
                     media=None) -> list[list[int]]:
    """Each prompt's answer ids (to the first stop id), generated in batches of `batch_size` left-padded prompts;
    with `media` (an MMProcessor), each batch gets the forward's media inputs from its prompts' `images` (each
    prompt's {column: refs})."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # like lengths share a batch: less padding
    answers = [[] for _ in prompts]
    device = next(model.parameters()).device
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="Predicting", unit="batch", disable=not show_progress):
        rows = order[start:start + batch_size]
        ids, mask = left_padded([prompts[i] for i in rows], kwargs["pad_token_id"])
        # the batch's media in row order, as its media tokens come (the collator's order in training)
        pixels = media.features(media.batch_refs([images[i] for i in rows]), ids) if media is not None else {}
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs,
                                 **{key: value.to(device) for key, value in pixels.items()})
        for i, generated in zip(rows, out[:, ids.shape[1]:].tolist()):
            answers[i] = until_stop(generated, stops)
    return answers


def predict(trainer, cfg, tokenizer, template) -> dict:
    """Generates answers for eval_dataset with the trainer's model and writes the files in the module docstring;
    returns their paths (for the CLI to print)."""
    from accelerate.utils import gather_object
    from transformers.trainer_utils import speed_metrics

    args, g = cfg.training, cfg.generating
    dataset = prediction_prompts(cfg, tokenizer, template, trainer.media)
    stops = template.stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    rank, world = args.process_index, args.world_size
    mine = list(range(rank, len(dataset), world))  # this process's share of the prompts
    start = time.time()
    images = [{c: dataset[i][c] for c in trainer.media.columns} for i in mine] if trainer.media is not None else None
    if cfg.model.infer_backend == "vllm":
        answers = _vllm_answers(cfg, [dataset[i]["input_ids"] for i in mine], stops, trainer.is_local_process_zero())
    else:
        answers = generate_answers(model, [dataset[i]["input_ids"] for i in mine],
                                   batch_size=args.per_device_eval_batch_size,
                                   kwargs=generation_kwargs(g, stops, pad_id), stops=stops,
                                   show_progress=trainer.is_local_process_zero(), images=images, media=trainer.media)
    answers = dict(gather_object(list(zip(mine, answers))))
    if not trainer.is_world_process_zero():
        return {}
    records = [{"prompt": tokenizer.decode(row["input_ids"], skip_special_tokens=False),
                "predict": tokenizer.decode(answers[i], skip_special_tokens=g.skip_special_tokens),
                "label": tokenizer.decode(until_stop(row["labels"], stops), skip_special_tokens=g.skip_special_tokens)}
               for i, row in enumerate(dataset)]
    path = os.path.join(args.output_dir, PREDICTIONS)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    scores = similarity([r["predict"] for r in records], [r["label"] for r in records])
    steps = -(-len(mine) // args.per_device_eval_batch_size)
    metrics = {f"predict_{name}": value for name, value in scores.items()}
    metrics.update(speed_metrics("predict", start, num_samples=len(records), num_steps=steps))
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    log.info("%d predictions written to %s", len(records), path)
    return {"predictions": path, "predict_results": os.path.join(args.output_dir, "predict_results.json")}


def _vllm_answers(cfg, prompts: list[list[int]], stops: list[int], show_progress: bool) -> list[list[int]]:
    """infer_backend: vllm: the answers of the model this run trained (saved in output_dir: its LoRA adapter on
    model_name_or_path, or the whole model), else of the model and adapter the config names, by vLLM."""
    from lf.serve.vllm_engine import vllm_answers

    model = cfg.model
    if cfg.training.do_train:
        trained = {"adapter_name_or_path": cfg.training.output_dir} if cfg.finetuning.finetuning_type == "lora" \
            else {"model_name_or_path": cfg.training.output_dir, "adapter_name_or_path": None}
        model = dataclasses.replace(model, **trained)
    ids = vllm_answers(model, cfg.generating, prompts, stops, cfg.training.seed, show_progress)
    return [until_stop(answer, stops) for answer in ids]
