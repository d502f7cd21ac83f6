"""The rm recipe: prompts with a chosen and a rejected reply train a reward model. The model carries a value head
(lf.stages' `value_head`: transformers' XForSequenceClassification, one label: `score`, trained fully and, with
LoRA, saved beside the adapter) that scores the last token of each sequence; the loss is
-log sigmoid(r_chosen - r_rejected), and the share of pairs scored the right way round is logged as `accuracy`.
sft.py's steps over lf's pairwise data; the pair trainer is lf.train.preference's."""

from __future__ import annotations

import torch.nn.functional as F

from lf.train.preference import PairTrainer, media, pairs
from lf.train.recipe import make_trainer, prepare, train_and_save


class RewardTrainer(PairTrainer):
    """A score per sequence from the value head; the chosen reply should score higher."""

    def pair_loss(self, model, batch):
        ids, mask, _ = pairs(batch, self.data_collator.pad_token_id)
        scores = model(input_ids=ids, attention_mask=mask, use_cache=False, **media(batch)).logits.squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        return loss, {"accuracy": (chosen > rejected).float(), "rewards/chosen": chosen, "rewards/rejected": rejected}


def run_rm(cfg, callbacks=()) -> dict:
    """Trains and evaluates as `cfg` says; returns what was written where, for the CLI to print."""
    parts = prepare(cfg)
    trainer = make_trainer(RewardTrainer, cfg, parts)
    # the value head scores the last token that is not padding
    config = parts.model.config  # (a VL model's head reads its text config's)
    config.pad_token_id = config.get_text_config().pad_token_id = trainer.data_collator.pad_token_id
    return train_and_save(trainer, cfg, parts, callbacks)
