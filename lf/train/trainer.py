"""HF's Seq2SeqTrainer with what lf changes, and nothing else:

- checkpoints are written into a staging folder and renamed into place (a run killed while saving keeps its
  previous checkpoints intact);
- LoRA+ (`loraplus_lr_ratio`): the B matrices learn `ratio` times faster than the A matrices;
- GaLore, Adam-mini, Muon and the like (lf.train.optimizers) in place of `optim` when the config turns one on;
- `use_dft_loss`, `use_eaft_loss`, `use_asft_loss`: in training, the fused loss is DFT's, EAFT's or ASFT's
  (lf.kernels.fused_linear_cross_entropy's `dft`, `eaft`, `kl`): each token's cross-entropy weighted by its detached
  probability, or by the entropy of its top logits, or DFT's plus asft_alpha times the KL divergence from the
  reference model's next-token distribution (lf.train.reference's model, run on the same batch without gradient);
  evaluation keeps the plain cross-entropy, so that eval_loss and eval_perplexity mean what they always do;
- the real (non-padding) tokens of each batch are counted (the collator passes them), for tokens/s;
- a loss that is not finite stops the run before anything else is saved (see callbacks.LossGuard);
- logging_dir (lf's finetuning group keeps it) is TensorBoard's folder;
- a vision-language model's image processor is saved beside the tokenizer in every checkpoint and the output;
- `fsdp` on CPU processes runs FSDP2, which accelerate would leave as plain DDP (see _fsdp_on_the_cpu).

The loss itself needs nothing here: lf's patched causal-LM forward takes `num_items_in_batch` from the Trainer
(which passes it to models that accept loss kwargs) and computes the fused loss with the right normalisation.
"""

from __future__ import annotations

import os
import shutil

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lf.data.collator import TOKENS_KEY
from lf.errors import TrainError
from lf.kernels.patch import TOKEN_WEIGHTS, fused_loss_on, reference_head
from lf.train import optimizers
from lf.train.checkpoints import STAGING
from lf.train.reference import as_reference


def _token_weights(fin) -> tuple[dict, str | None]:
    """The fused loss's token weighting the config asks for, and the key that asks."""
    if getattr(fin, "use_dft_loss", False):
        return {"dft": True}, "use_dft_loss"
    if getattr(fin, "use_eaft_loss", False):
        return {"eaft": fin.eaft_alpha}, "use_eaft_loss"
    if getattr(fin, "use_asft_loss", False):  # DFT plus the KL term (LLaMA-Factory 0.9.5's ASFT)
        return {"dft": True, "kl": fin.asft_alpha}, "use_asft_loss"
    return {}, None


class LFTrainer(Seq2SeqTrainer):
    def __init__(self, *args, finetuning_args=None, media=None, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.finetuning_args = finetuning_args
        # the frozen reference (lf.train.reference), or None where the model with its adapter off serves
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        if getattr(finetuning_args, "use_badam", False):
            _badam(self)
        self.token_weights, key = _token_weights(finetuning_args)
        if self.token_weights and not fused_loss_on(self.model):
            raise TrainError(f"{key}: true weights the tokens inside lf's fused loss, which this model does not run "
                             f"(its family has no lf kernels, or use_lf_kernels is off): remove {key}")
        self.media = media  # lf.data.mm_plugins.MMProcessor: saved with the tokenizer
        self.tokens_seen = 0  # real tokens trained on, this process
        self.nonfinite_step = None  # the first step whose loss was nan/inf
        self._staging = None
        _tensorboard_folder(self, getattr(finetuning_args, "logging_dir", None))

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and self.accelerator.distributed_type == DistributedType.MULTI_CPU:
            _fsdp_on_the_cpu(self)

    # -- tokens and loss ---------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = inputs.pop(TOKENS_KEY, None)
        if tokens is not None and model.training:
            self.tokens_seen += int(tokens)
        if self.token_weights and model.training:
            weights = self.token_weights
            if "kl" in weights:
                with self._as_reference(model) as reference:
                    weights = {**weights, **reference_head(self.accelerator.unwrap_model(reference), inputs)}
            inputs = {**inputs, TOKEN_WEIGHTS: weights}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _as_reference(self, model):
        """The reference in eval mode: the frozen one, or `model` with its adapter off."""
        return as_reference(model, self.ref_model, self.accelerator.unwrap_model(model))

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop(TOKENS_KEY, None)
        if self.compute_metrics is not None:  # compute_accuracy: the logits, never answers generated by
            return Trainer.prediction_step(self, model, inputs, *args, **kwargs)  # Seq2SeqTrainer (lf.train.predict)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite_step is None and not torch.isfinite(loss).all():
            self.nonfinite_step = self.state.global_step + 1
        return loss

    # -- the optimizer: lf.train.optimizers' choice, or LoRA+ --------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        self.optimizer = optimizers.build(model, self.args, self.finetuning_args, self.get_decay_parameter_names(model))
        if self.optimizer is not None:
            return self.optimizer
        ratio = getattr(self.finetuning_args, "loraplus_lr_ratio", None)
        if ratio is None:
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        lr, decay = self.args.learning_rate, self.args.weight_decay
        decayed = set(self.get_decay_parameter_names(model))
        groups = {}  # (lr, weight decay) -> parameters
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_embedding_" in name:
                group_lr = self.finetuning_args.loraplus_lr_embedding
            elif "lora_B" in name or param.ndim == 1:  # LoRA+ speeds up B (and the vectors beside it)
                group_lr = lr * ratio
            else:
                group_lr = lr
            groups.setdefault((group_lr, decay if name in decayed else 0.0), []).append(param)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls([{"params": params, "lr": group_lr, "weight_decay": wd}
                                        for (group_lr, wd), params in groups.items()], lr=lr, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.media is not None:
            self.media.save_pretrained(output_dir or self.args.output_dir)

    # -- atomic checkpoints --------------------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """HF's checkpoint, written under output_dir/.lf-saving and renamed to output_dir/checkpoint-N when
        complete; older checkpoints are rotated only after that."""
        final_root = super()._get_output_dir(trial)
        self._staging = os.path.join(final_root, STAGING)
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate once it is in place
        if self.args.should_save:
            shutil.rmtree(self._staging, ignore_errors=True)  # what a killed save left
        self.accelerator.wait_for_everyone()  # before any rank writes its RNG state there
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging, self.args.save_total_limit = None, limit
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(final_root, name)
        if os.path.isdir(final):  # saved again at the same step (after a resume): the new one replaces it
            shutil.rmtree(final)
        os.replace(os.path.join(final_root, STAGING, name), final)
        os.rmdir(os.path.join(final_root, STAGING))
        if self.state.best_global_step:
            best = os.path.join(final_root, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.isdir(best):
                self.state.best_model_checkpoint = best
        rotate_checkpoints(output_dir=final_root, save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def _fsdp_on_the_cpu(trainer) -> None:
    """FSDP for a process group of CPUs. accelerate (1.15) turns `fsdp` on only for accelerator process groups and
    leaves CPUs on DDP, though FSDP2's fully_shard runs over gloo: lf makes the switch accelerate makes on a GPU.
    PartialState keeps the type too: every later AcceleratorState() copies it back."""
    state = trainer.accelerator.state
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def _badam(trainer) -> None:
    """BAdam's trainer side: its callback (it re-enables gradient checkpointing in a way that keeps frozen blocks'
    inputs out of the graph) and its gradient clipping, which handles ratio mode's sparse gradients."""
    from types import MethodType

    from badam import BAdamCallback, clip_grad_norm_old_version

    trainer.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, trainer.accelerator)
    trainer.add_callback(BAdamCallback)


def _tensorboard_folder(trainer, logging_dir: str | None) -> None:
    """logging_dir for the trainer's TensorBoard callback, if any: transformers 5 reads the folder from the
    TENSORBOARD_LOGGING_DIR variable only, which lf leaves alone (the process's environment is its caller's)."""
    if logging_dir is None:
        return
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = os.path.expanduser(logging_dir)
