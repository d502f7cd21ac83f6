"""The ppo recipe: the policy writes replies to the prompts of an sft-format dataset, a reward model scores them
(lf.train.rewards), and PPO trains the policy towards higher scores while a per-token KL penalty keeps it near the
reference. lf's own loop (TRL 1.x has no PPO trainer), with LLaMA-Factory 0.9.5's keys and semantics; the
equations are lf.train.ppo_math's.

One step:
  1. rollout  per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size prompts (the dataset
              shuffled each epoch, seeded), answered by the policy with the generation keys (do_sample, temperature,
              top_p, max_new_tokens, ...; an answer keeps the stop token it ends with)
  2. score    the reward model scores each prompt + answer (ppo_score_norm: by the running mean and std)
  3. evaluate one pass without gradient: the policy's log-probabilities of the answer tokens and its values, the
              reference's log-probabilities; rewards = score at the last token - beta KL at every token
              (ppo_whiten_rewards: scaled to unit variance), GAE advantages (whitened) and returns
  4. update   ppo_epochs passes over the rollouts in shuffled batches of per_device_train_batch_size, one optimizer
              step per gradient_accumulation_steps of them: clipped policy loss + 0.1 x clipped value loss
  5. beta     the adaptive KL coefficient moves towards ppo_target (null: fixed); the learning rate schedule steps

The policy carries a value head (a linear layer on the last hidden state, `v_head.summary` as LLaMA-Factory saves
it in value_head.safetensors) trained beside the adapter (LoRA) or the model (full, freeze). The reference is the
policy as it starts: with LoRA the same model with its adapter switched off (no second copy), else a frozen copy,
or `ref_model`. The log-probabilities come from lf's fused linear cross-entropy over the answer tokens' hidden
states with lf's kernels on (the logits of the whole sequence never exist), else from the head's logits of the
answer tokens.

output_dir gets what sft writes (the adapter or model, tokenizer, trainer_log.jsonl with each step's reward, KL,
losses, clip fractions, entropy and answer length, training_loss.png and training_reward.png with plot_loss) and
value_head.safetensors; checkpoint-N every save_steps holds the same plus ppo_state.pt (optimizer, schedule, KL
coefficient, score moments, random state), from which a run started again resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lf import stages
from lf.data.collator import left_padded, right_padded
from lf.data.pipeline import WITH_IMAGES
from lf.errors import TrainError
from lf.model.quantization import is_quantized
from lf.train import ppo_math as pm
from lf.train.callbacks import LOG_FILE, _duration, _keep_until
from lf.train.tracking import finish_swanlab, swanlab_callback
from lf.train.checkpoints import STAGING
from lf.train.plot import plot_loss
from lf.train.predict import generation_kwargs
from lf.train.reference import as_reference, eval_mode, reference_model
from lf.train.recipe import _save_run_config, prepare
from lf.train.rewards import check as check_reward_model
from lf.train.rewards import load_scorer

log = logging.getLogger("lf")
VALUE_HEAD = "value_head.safetensors"
STATE = "ppo_state.pt"


class ValueHead(nn.Module):
    """V(s_t): one number per position from the last hidden state, in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


@dataclass
class Rollout:
    """A step's experience, one row per answer. Columns are positions of the right-padded prompt + answer rows
    less the last: column t predicts token t + 1, and `mask` marks the columns that predict answer tokens."""

    ids: torch.Tensor
    attention: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rows `index`, cut to their longest sequence."""
        width = int(self.attention[index].sum(-1).max())
        return Rollout(**{f.name: getattr(self, f.name)[index][:, :width if f.name in ("ids", "attention")
                                                                   else width - 1] for f in fields(self)})


class PPO:
    """The policy, value head, reference and scorer, and one step of PPO over them (`step`)."""

    def __init__(self, cfg, parts, scorer, reference):
        args, fin = cfg.training, cfg.finetuning
        self.args, self.fin = args, fin
        self.model, self.tokenizer, self.scorer, self.reference = parts.model, parts.tokenizer, scorer, reference
        self.device = args.device
        hidden = self.model.config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden).to(self.device)
        if not is_quantized(self.model):  # (bitsandbytes or hqq has placed a quantized one)
            self.model.to(self.device)
        self.fused = cfg.model.use_lf_kernels
        stops = parts.template.stop_token_ids(self.tokenizer)
        self.stops = set(stops)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        self.generate_kwargs = generation_kwargs(cfg.generating, stops, self.pad)
        # the policy is the distribution the answers are sampled from: the logits over the sampling temperature
        self.temperature = self.generate_kwargs.get("temperature", 1.0)
        self.micro = args.per_device_train_batch_size
        self.batch = self.micro * args.gradient_accumulation_steps  # rollouts per optimizer step
        self.rollouts = self.batch * fin.ppo_buffer_size  # per PPO step
        self.kl = pm.KLController(pm.INIT_KL_COEF, fin.ppo_target)
        self.moments = pm.RunningMoments()
        trainable = [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=args.weight_decay)
        self.trainable = trainable

    # -- the model's outputs -----------------------------------------------------------------------------------

    def outputs(self, model, rows: Rollout, values: bool = True, entropy: bool = False):
        """Per column: the log-probability of the next token (answer columns; 0 elsewhere), the value head's V and
        the policy's entropy (answer columns), as asked."""
        from lf.model.logps import _last_hidden

        hidden, head, softcap = _last_hidden(model, rows.ids, rows.attention, model)
        hidden = hidden[:, :-1]
        where = rows.mask.bool()
        answer_hidden, targets = hidden[where], rows.ids[:, 1:][where]
        logps = torch.zeros(rows.mask.shape, device=hidden.device).masked_scatter(
            where, token_logps(answer_hidden, head, targets, softcap, self.temperature, self.fused))
        out = [logps, self.value_head(hidden) * rows.mask if values else None]
        if entropy:
            out.append(pm.entropy(sampling_logits(answer_hidden, head, softcap, self.temperature)).mean())
        return out

    # -- one step ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def answer(self, prompts: list[list[int]]) -> list[list[int]]:
        """Each prompt's answer, generated by the policy in batches of per_device_train_batch_size, through the
        first stop token (kept: writing it was the policy's action too)."""
        answers = []
        with eval_mode(self.model):
            for start in range(0, len(prompts), self.micro):
                ids, attention = left_padded(prompts[start:start + self.micro], self.pad)
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attention.to(self.device),
                                          **self.generate_kwargs)
                for row in out[:, ids.shape[1]:].tolist():
                    end = next((i + 1 for i, token in enumerate(row) if token in self.stops), len(row))
                    answers.append(row[:end])
        return answers

    @torch.no_grad()
    def evaluate(self, prompts, answers, scores) -> tuple[Rollout, dict]:
        """Steps 3 of the module docstring: the rollout's log-probabilities, values, rewards and advantages."""
        ids, attention = right_padded([p + a for p, a in zip(prompts, answers)], self.pad)
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            mask[row, len(prompt) - 1:len(prompt) - 1 + len(answer)] = 1
        empty = torch.zeros_like(mask)
        rollout = Rollout(ids.to(self.device), attention.to(self.device), mask.to(self.device), empty, empty, empty,
                          empty)
        old_logps, values, entropies = [], [], []
        with eval_mode(self.model):
            for index in torch.arange(len(ids)).split(self.micro):
                logps, value, ent = self.outputs(self.model, rollout.rows(index), entropy=True)
                old_logps.append(_widen(logps, mask.shape[1]))
                values.append(_widen(value, mask.shape[1]))
                entropies.append(ent)
        with as_reference(self.model, self.reference) as reference:
            ref_logps = torch.cat([_widen(self.outputs(reference, rollout.rows(index), values=False)[0],
                                          mask.shape[1]) for index in torch.arange(len(ids)).split(self.micro)])
        rollout.logps, rollout.values = torch.cat(old_logps), torch.cat(values)
        mask = rollout.mask
        used = self.moments.normalise(scores) if self.fin.ppo_score_norm else scores
        rewards, kl = pm.kl_penalised_rewards(used.to(self.device), rollout.logps, ref_logps, mask, self.kl.value)
        if self.fin.ppo_whiten_rewards:
            rewards = pm.whiten(rewards, mask, keep_mean=True)
        advantages, rollout.returns = pm.gae(rewards, rollout.values, mask)
        rollout.advantages = pm.whiten(advantages, mask)
        stats = {"reward": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
                 "kl": kl.sum(-1).mean().item(), "kl_coef": self.kl.value,
                 "entropy": torch.stack(entropies).mean().item(),
                 "response_length": mask.sum(-1).mean().item()}
        return rollout, stats

    def update(self, rollout: Rollout) -> dict:
        """Step 4: ppo_epochs passes of clipped policy and value losses over the rollout; the mean of each term."""
        totals: dict[str, float] = {}
        count = 0
        n = rollout.ids.shape[0]
        self.model.train()
        for _ in range(self.fin.ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, self.batch):
                batch = order[start:start + self.batch]
                for index in batch.split(self.micro):
                    rows = rollout.rows(index)
                    logps, values = self.outputs(self.model, rows)
                    policy, policy_clipped = pm.policy_loss(logps, rows.logps, rows.advantages, rows.mask)
                    value, value_clipped = pm.value_loss(values, rows.values, rows.returns, rows.mask)
                    loss = policy + pm.VALUE_COEF * value
                    (loss * len(index) / len(batch)).backward()
                    for name, term in (("loss", loss), ("policy_loss", policy), ("value_loss", value),
                                       ("clip_fraction", policy_clipped), ("value_clip_fraction", value_clipped)):
                        totals[name] = totals.get(name, 0.0) + term.item()
                    count += 1
                if self.args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {name: total / count for name, total in totals.items()}

    def step(self, prompts: list[list[int]]) -> dict:
        """One PPO step over these prompts; the step's statistics."""
        answers = self.answer(prompts)
        scores = self.scorer([p + a for p, a in zip(prompts, answers)]).float()
        rollout, stats = self.evaluate(prompts, answers, scores)
        stats.update(self.update(rollout))
        if not all(math.isfinite(v) for v in stats.values()):
            raise TrainError(f"a ppo step gave a value that is not a number ({stats}): lower learning_rate, or check "
                             f"the reward model's scores")
        self.kl.update(stats["kl"], len(prompts))
        return stats

    # -- checkpoints -------------------------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """The policy (adapter or model), tokenizer and value head, in `folder`."""
        from safetensors.torch import save_file

        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        save_file({f"v_head.{k}": v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  os.path.join(folder, VALUE_HEAD))

    def state(self, scheduler, step: int, history: list) -> dict:
        return {"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "kl_coef": self.kl.value, "moments": vars(self.moments), "rng": torch.get_rng_state(),
                "log_history": history}

    def restore(self, folder: str, scheduler) -> tuple[int, list]:
        """The policy, value head and loop state saved in checkpoint `folder`; (its step, its log history)."""
        from safetensors.torch import load_file

        path = os.path.join(folder, STATE)
        if not os.path.exists(path):
            raise TrainError(f"{folder} is no ppo checkpoint (it has no {STATE}): resume from a checkpoint of a "
                             f"stage: ppo run, or set overwrite_output_dir: true to start afresh")
        if hasattr(self.model, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(os.path.join(folder, "adapter_model.safetensors")))
        else:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".safetensors") and name != VALUE_HEAD:
                    self.model.load_state_dict(load_file(os.path.join(folder, name)), strict=False)
        head = load_file(os.path.join(folder, VALUE_HEAD))
        self.value_head.load_state_dict({k.removeprefix("v_head."): v for k, v in head.items()})
        state = torch.load(path, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.kl.value = state["kl_coef"]
        self.moments = pm.RunningMoments(**state["moments"])
        torch.set_rng_state(state["rng"])
        return state["step"], state["log_history"]


def token_logps(hidden, head, targets, softcap, temperature: float, fused: bool) -> torch.Tensor:
    """log pi(target | hidden) per row under the sampling distribution softmax(logits / temperature): through lf's
    fused linear cross-entropy (`fused`: the rows' logits exist a chunk at a time) or the head's logits."""
    if fused:  # logits / T = (hidden / T) W + bias / T, soft-capped at softcap / T
        from lf.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        bias = None if head.bias is None else head.bias / temperature
        return -fused_linear_cross_entropy(hidden / temperature, head.weight, targets, bias, reduction="none",
                                           softcap=softcap and softcap / temperature)
    logits = sampling_logits(hidden, head, softcap, temperature).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def sampling_logits(hidden, head, softcap, temperature: float) -> torch.Tensor:
    """The head's logits (soft-capped where the model caps them) over the sampling temperature."""
    logits = F.linear(hidden, head.weight, head.bias)
    logits = softcap * torch.tanh(logits / softcap) if softcap else logits
    return logits / temperature


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """A micro-batch's columns padded with zeros to the rollout's width."""
    return F.pad(x, (0, width - x.shape[1]))


def _every(value: float, total: int) -> int:
    """HF's reading of logging_steps / save_steps: below 1, a fraction of the run."""
    return max(1, math.ceil(total * value)) if value < 1 else int(value)


def _prompt_order(size: int, seed: int):
    """Step k's prompts: positions k*B .. (k+1)*B - 1 of the epochs' shuffles (seeded: a resumed run continues
    with the prompts the uninterrupted one would have used)."""
    shuffles: dict[int, list[int]] = {}

    def take(step: int, count: int) -> list[int]:
        out = []
        for position in range(step * count, (step + 1) * count):
            epoch, offset = divmod(position, size)
            if epoch not in shuffles:
                shuffles[epoch] = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            out.append(shuffles[epoch][offset])
        return out

    return take


def _save_checkpoint(ppo: PPO, scheduler, step: int, history: list) -> None:
    """checkpoint-N, written under output_dir/.lf-saving and renamed into place when complete (as LFTrainer's);
    save_total_limit keeps the newest."""
    root = ppo.args.output_dir
    name = f"checkpoint-{step}"
    staging = os.path.join(root, STAGING, name)
    shutil.rmtree(os.path.join(root, STAGING), ignore_errors=True)
    ppo.save(staging)
    torch.save(ppo.state(scheduler, step, history), os.path.join(staging, STATE))
    final = os.path.join(root, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    os.rmdir(os.path.join(root, STAGING))
    limit = ppo.args.save_total_limit
    if limit:
        saved = sorted((int(n.split("-")[1]), n) for n in os.listdir(root) if n.startswith("checkpoint-")
                       and n.split("-")[1].isdigit())
        for _, old in saved[:-limit]:
            shutil.rmtree(os.path.join(root, old))


def _log_line(args, record: dict, history: list) -> None:
    history.append(record)
    with open(os.path.join(args.output_dir, LOG_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("step %d/%d: %s", record["current_steps"], record["total_steps"],
             ", ".join(f"{k} {record[k]:.4g}" for k in ("loss", "reward", "kl", "entropy", "response_length")))


def _total_steps(args, rollouts: int, size: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * size / rollouts))


def train(ppo: PPO, prompts: list[list[int]], resume: str | None, callbacks=()) -> list[dict]:
    """The steps of a run (from `resume`, a checkpoint, if given), logged and checkpointed; the log history."""
    from transformers import TrainerControl, TrainerState, get_scheduler

    args = ppo.args
    total = _total_steps(args, ppo.rollouts, len(prompts))
    scheduler = get_scheduler(args.lr_scheduler_type, ppo.optimizer, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total)
    torch.manual_seed(args.seed)
    done, history = ppo.restore(resume, scheduler) if resume else (0, [])
    os.makedirs(args.output_dir, exist_ok=True)
    _keep_until(os.path.join(args.output_dir, LOG_FILE), done)
    state, control = TrainerState(max_steps=total, global_step=done, log_history=history), TrainerControl()
    for callback in callbacks:
        callback.on_train_begin(args, state, control)
    take = _prompt_order(len(prompts), args.seed)
    log_every, save_every = _every(args.logging_steps, total), _every(args.save_steps, total)
    start = time.perf_counter()
    for step in range(done + 1, total + 1):
        stats = ppo.step([prompts[i] for i in take(step - 1, ppo.rollouts)])
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.global_step = step
        for callback in callbacks:
            callback.on_step_end(args, state, control)
        if step % log_every == 0 or step == total:
            elapsed = time.perf_counter() - start
            record = {"current_steps": step, "total_steps": total, **{k: round(v, 6) for k, v in stats.items()},
                      "lr": lr, "epoch": round(step * ppo.rollouts / len(prompts), 4),
                      "percentage": round(100 * step / total, 2), "elapsed_time": _duration(elapsed),
                      "remaining_time": _duration(elapsed / (step - done) * (total - step)), "step": step}
            _log_line(args, record, history)
            for callback in callbacks:
                callback.on_log(args, state, control, logs=record)
        if args.save_strategy != "no" and step % save_every == 0 and step < total:
            _save_checkpoint(ppo, scheduler, step, history)
    for callback in callbacks:
        callback.on_train_end(args, state, control)
    return history


def run_ppo(cfg, callbacks=()) -> dict:
    """Trains as `cfg` says; returns what was written where, for the CLI to print."""
    args, fin = cfg.training, cfg.finetuning
    if args.world_size > 1:
        raise TrainError("stage: ppo runs in one process: start it without torchrun / NPROC_PER_NODE")
    check_reward_model(fin)
    parts = prepare(cfg)
    if parts.media is not None:
        raise TrainError(f"stage: ppo answers text prompts only, but template {parts.template.name} puts media into "
                         f"them: train a vision-language model with one of the stages "
                         f"{', '.join(stages.with_media(WITH_IMAGES))}")
    prompts = [row["input_ids"] for row in parts.data.train_dataset]
    if not prompts:
        raise TrainError("stage: ppo found no prompts in dataset: give an sft-format dataset (instruction/input or "
                         "conversations) whose prompts fit cutoff_len")
    scorer = load_scorer(cfg, parts.tokenizer, args.device)
    reference = reference_model(parts.tokenizer, parts.model, cfg, fin.stage)
    if reference is not None:
        reference.to(args.device)
    ppo = PPO(cfg, parts, scorer, reference)
    log.info("ppo: %d prompts, %d rollouts a step, %d epochs over them; log-probabilities from %s", len(prompts),
             ppo.rollouts, fin.ppo_epochs, "lf's fused linear cross-entropy" if ppo.fused else "the head's logits")
    if fin.use_swanlab:
        callbacks = (*callbacks, swanlab_callback(fin))
    history = train(ppo, prompts, parts.resume, callbacks)
    if fin.use_swanlab:
        finish_swanlab()
    ppo.save(args.output_dir)
    last = history[-1] if history else {}
    results = {"train_reward": last.get("reward"), "train_loss": last.get("loss"), "train_steps": len(history)}
    with open(os.path.join(args.output_dir, "train_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, "trainer_state.json"), "w") as f:
        json.dump({"log_history": history, "global_step": last.get("current_steps", 0)}, f, indent=2)
    _save_run_config(args.output_dir, cfg)
    outputs = {"output_dir": args.output_dir, "model": args.output_dir,
               "log": os.path.join(args.output_dir, LOG_FILE)}
    if fin.plot_loss:
        outputs["plots"] = plot_loss(args.output_dir, history, keys=("loss", "reward"))
    return outputs
