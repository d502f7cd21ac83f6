"""lf's kernels in TRL's SFTTrainer: patch the model, then train as usual.

Runs offline in a few seconds on a CPU with a tiny Llama and a word-level tokenizer built in place:
    python examples/trl_sft.py

(TRL's SFTTrainer computes its loss with its own chunked LM head; lf's norms, RoPE and MLP kernels run
inside the model.)
"""

import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import lf.kernels

VOCAB = 257


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", unk_token="t1", eos_token="t2")


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


def train(model, steps: int = 4) -> list[float]:
    """Trains on random token rows (already tokenized, so TRL skips its tokenization); returns the losses."""
    rows = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                             processing_class=tiny_tokenizer())
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    model = tiny_llama()
    print(lf.kernels.patch(model))
    print("losses:", train(model))
