"""The steps every stage's recipe shares, top to bottom: tokenizer and template -> datasets -> model (prepare),
the stage's own trainer over them (make_trainer), then train, save, evaluate, plot (train_and_save). Each step is
one call into lf.data, lf.model or HF's Trainer."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
from transformers import set_seed

from lf import device
from lf.data import collator, fit_template, get_dataset
from lf.errors import TrainError
from lf.model import load_mm_processor, load_model, load_tokenizer, pissa
from lf.train.callbacks import LossGuard, Progress, ReleaseFreedMemory, RunLog
from lf.train.tracking import finish_swanlab, swanlab_callback
from lf.train.checkpoints import RUN_CONFIG, last, resume_point
from lf.train.plot import plot_loss

log = logging.getLogger("lf")


@dataclass
class Prepared:
    tokenizer: object
    template: object
    data: object  # lf.data's datasets: train_dataset, eval_dataset
    model: object
    resume: str | bool | None  # the checkpoint training resumes from, if any
    media: object = None  # the image side of a vision-language model (lf.data.mm_plugins.MMProcessor), if any


def prepare(cfg) -> Prepared:
    """Tokenizer (with the template, which the saved tokenizer carries as its chat template), the stage's
    datasets and the model, as `cfg` says (which it leaves as it is)."""
    args, fin = cfg.training, cfg.finetuning
    if _cpu_training(args):
        _cpu_allocator(cfg.model.cpu_allocator)
    resume = resume_point(args.output_dir, args.resume_from_checkpoint, fin.overwrite_output_dir, args.do_train)
    tokenizer = load_tokenizer(cfg.model)
    template = fit_template(tokenizer, cfg.data)  # the saved tokenizer carries the format this run trains on
    media = load_mm_processor(cfg.model, cfg.data, tokenizer, template)
    with args.main_process_first(desc="preparing the datasets", local=not cfg.data.data_shared_file_system):
        data = get_dataset(cfg.data, tokenizer=tokenizer, template=template, stage=fin.stage, seed=args.seed,
                           media=media)
    if args.deepspeed:
        _deepspeed_comm()
    set_seed(args.seed)  # before the adapters' random initialisation: the same seed, the same run
    model, lines = load_model(tokenizer, cfg.model, fin, is_trainable=args.do_train, cutoff_len=cfg.data.cutoff_len,
                              tokens_per_step=args.per_device_train_batch_size * cfg.data.cutoff_len)
    for line in lines:
        log.info("%s", line)
    return Prepared(tokenizer, template, data, model, resume, media)


def make_trainer(trainer_class, cfg, prepared: Prepared, **extra):
    """`trainer_class` (an LFTrainer) over the prepared model, datasets and tokenizer, with lf's collator (which
    counts tokens for tokens/s, and decodes images); `extra`: the class's own arguments."""
    return trainer_class(model=prepared.model, args=cfg.training, finetuning_args=cfg.finetuning,
                         train_dataset=prepared.data.train_dataset, eval_dataset=prepared.data.eval_dataset,
                         data_collator=collator(prepared.tokenizer, count_tokens=True, media=prepared.media,
                                                  max_length=cfg.data.cutoff_len),
                         processing_class=prepared.tokenizer, media=prepared.media, **extra)


def _cpu_training(args) -> bool:
    return args.use_cpu or device.current().kind == "cpu"


def _cpu_allocator(setting: str) -> None:
    """glibc's malloc settings for training on the CPU (lf.allocator), said in a log line."""
    from lf import allocator

    reason = allocator.unavailable(setting)
    if reason:
        log.info("cpu_allocator: %s is not applied: %s", setting, reason)
        return
    values = allocator.apply(setting)
    if values:
        log.info("CPU allocator: %s; large tensors reuse freed memory instead of page-faulting fresh pages "
                 "(cpu_allocator: default keeps glibc's settings)", allocator.describe(setting, values))


def train_and_save(trainer, cfg, prepared: Prepared, callbacks=(), perplexity: bool = False) -> dict:
    """Trains (and/or evaluates) with the stage's `trainer` (an LFTrainer) as `cfg` says: lf's log, loss guard
    and progress bar, the model saved with its run config, the loss plot; returns what was written where."""
    args, fin = cfg.training, cfg.finetuning
    own = [ReleaseFreedMemory()] if _cpu_training(args) and cfg.model.cpu_allocator == "tuned" else []
    if fin.early_stopping_steps is not None:
        from transformers import EarlyStoppingCallback

        own.append(EarlyStoppingCallback(early_stopping_patience=fin.early_stopping_steps))
    if fin.use_swanlab:
        own.append(swanlab_callback(fin))
    for callback in (RunLog(trainer), LossGuard(trainer), *own, *callbacks):
        trainer.add_callback(callback)
    _use_progress(trainer)
    outputs = {"output_dir": args.output_dir}
    convert = args.do_train and fin.pissa_convert and trainer.is_world_process_zero()
    if convert and prepared.resume is None:  # a resumed run converts against the first run's initial adapter
        pissa.save_initial(trainer.model, args.output_dir)
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=prepared.resume)
        if trainer.nonfinite_step is not None:
            raise TrainError(_nonfinite_message(trainer, args))
        trainer.save_model()
        if convert:
            pissa.save_converted(trainer.model, args.output_dir)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        _save_run_config(args.output_dir, cfg)
        outputs["model"] = args.output_dir
        if fin.plot_loss and trainer.is_world_process_zero():
            outputs["plots"] = plot_loss(args.output_dir, trainer.state.log_history)
    if args.do_eval and prepared.data.eval_dataset is not None:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        if perplexity and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if fin.use_swanlab:
        finish_swanlab()
    outputs["log"] = os.path.join(args.output_dir, "trainer_log.jsonl")
    return outputs


def _deepspeed_comm() -> None:
    """ZeRO-3 partitions the weights while they load and asks deepspeed.comm for the world size then; accelerate
    sets deepspeed.comm up on GPUs only, so on the CPU lf does, over the process group torch already has."""
    import deepspeed

    if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def _use_progress(trainer) -> None:
    """HF's progress bar -> lf's (loss, learning rate, tokens/s in the bar instead of a printed dict per log)."""
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(Progress(trainer))


def _nonfinite_message(trainer, args) -> str:
    good = trainer.state.best_model_checkpoint or last(args.output_dir)
    kept = (f"the last good checkpoint is {good} (resume_from_checkpoint: {good})" if good
            else "no checkpoint was saved before it")
    precision = ("fp16 overflow (fp16: true): use bf16: true or fp32" if args.fp16
                 else "numbers too large for the dtype")
    return (f"the loss became nan or inf at step {trainer.nonfinite_step}; training stopped there and saved nothing "
            f"of that step: {kept}. Likely causes: a learning rate too high (learning_rate is {args.learning_rate:g}; "
            f"try a tenth), {precision}, or examples with nothing to learn from.")


def _save_run_config(output_dir: str, cfg) -> None:
    """The run's settings as given, beside the model: what produced it."""
    with open(os.path.join(output_dir, RUN_CONFIG), "w") as f:
        json.dump({"source": cfg.source, "config": cfg.raw}, f, indent=2, default=str)
