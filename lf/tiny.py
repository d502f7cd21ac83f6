"""Tiny tokenizers built on this machine (no model hub): for the quickstart, the tests and the benchmarks."""

from collections.abc import Iterable

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, extra_special_tokens: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained on `texts` (any text encodes; no unknown tokens), wrapped for transformers.

    bos `<s>`, eos `</s>`, pad `<pad>`; `extra_special_tokens` (a template's markers such as `<|im_start|>`) are
    added as single tokens. Encoding adds no special tokens: templates place them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[len(SPECIAL_TOKENS):])
