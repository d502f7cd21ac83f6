"""lf's kernels in Hugging Face's Trainer: patch the model, then train as usual.

Runs offline in a few seconds on a CPU with a tiny Llama built from a config:
    python examples/hf_trainer.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import lf.kernels


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    print(lf.kernels.patch(model))  # norms, RoPE, SwiGLU and the fused lm_head + loss

    ids = torch.randint(0, config.vocab_size, (8, 16))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                                 logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
        Trainer(model=model, args=args, train_dataset=dataset).train()


if __name__ == "__main__":
    main()
