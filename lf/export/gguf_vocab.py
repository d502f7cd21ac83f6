"""A tokenizer as GGUF's tokenizer.ggml.* metadata, in one of the two vocabularies llama.cpp reads from a BPE
tokenizer.json:
  - "gpt2": byte-level BPE (Llama 3, Qwen, Mistral Nemo): tokens and merges, and llama.cpp's name for the split
    before BPE (`tokenizer.ggml.pre`), by which it recognises the tokenizer;
  - "llama": SentencePiece BPE with byte fallback (Llama 2, Mistral 7B, Phi-3, Gemma): tokens with scores, as
    SentencePiece's model file has them. llama.cpp merges the adjacent pair whose joined token scores highest,
    transformers the pair whose merge comes first, so a token's score is minus the rank of the merge that makes it;
    `<0x..>` tokens are the byte fallback, and whether a space is put before the text follows the tokenizer's
    Metaspace/Prepend step.
Rows of the embedding past the tokenizer's tokens are written as unused placeholders, added tokens as control
tokens (special) or user-defined ones.
"""

from __future__ import annotations

import json

from lf.errors import ModelError

SPIECE_SPACE = "\u2581"


def vocab_spec(tokenizer, unsupported) -> dict:
    """The tokenizer's tokenizer.json, when it is one of the two BPE kinds of the module docstring; `unsupported`
    makes the error for another."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") == "BPE" and (model.get("byte_fallback") or decoder.get("type") == "ByteLevel"):
        return spec
    raise unsupported(f"lf writes BPE vocabularies (byte-level as Llama 3's and Qwen's, or SentencePiece with byte "
                      f"fallback as Llama 2's and Gemma's); this tokenizer is {model.get('type', 'unknown')}"
                      f"{' without byte fallback' if model.get('type') == 'BPE' else ''}")


def is_sentencepiece(spec: dict) -> bool:
    return bool(spec["model"].get("byte_fallback"))


def adds_bos(tokenizer) -> bool:
    """Whether encoding a text starts it with bos (then llama.cpp and Ollama add it too, and templates don't)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts a space before the text (Llama 2's does, Gemma's does not)."""
    steps = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    steps += [s for step in list(steps) for s in step.get("normalizers", step.get("pretokenizers", []))]
    return any((s.get("type") == "Prepend" and s.get("prepend") == SPIECE_SPACE)
               or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never") for s in steps)


def merge_scores(spec: dict) -> dict[str, float]:
    """Each token a merge makes -> minus the rank of its first merge."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        scores.setdefault("".join(merge.split(" ", 1) if isinstance(merge, str) else merge), -float(rank))
    return scores


def pre_tokenizer(spec: dict, vocab: dict, family_pre: str | None) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's split before BPE."""
    if family_pre:
        return family_pre
    if "<|begin_of_text|>" in vocab:  # Llama 3's
        return "llama-bpe"
    pre = spec.get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"


def add_vocab(writer, tokenizer, template, rows: int, family_pre: str | None, unsupported) -> None:
    """Tokens, their types (and scores or merges), the special ids and the chat template."""
    from gguf import TokenType

    spec = vocab_spec(tokenizer, unsupported)
    sentencepiece = is_sentencepiece(spec)
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows:
        raise ModelError(f"export_gguf: the tokenizer has {len(vocab)} tokens and the model's embedding only {rows} "
                         f"rows: export with the tokenizer the model was trained with")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    scores = merge_scores(spec) if sentencepiece else {}
    lowest = -float(len(scores))  # a token no merge makes is never preferred
    tokens, types, token_scores = [], [], []
    for i in range(rows):
        token = added[i].content if i in added else by_id.get(i, f"[PAD{i}]")
        if i in added:
            kind = TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
        elif i not in by_id:
            kind = TokenType.UNUSED
        elif i == tokenizer.unk_token_id:
            kind = TokenType.UNKNOWN
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        tokens.append(token)
        types.append(kind)
        token_scores.append(scores.get(token, 0.0 if len(token) == 1 else lowest))
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(token_scores)
        writer.add_add_space_prefix(adds_space_prefix(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(spec, vocab, family_pre))
        writer.add_token_list(tokens)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_token_types(types)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(token_id)
    end_of_turn = [i for i in template.stop_token_ids(tokenizer) if i != tokenizer.eos_token_id]
    if end_of_turn:  # llama.cpp stops on eos and on this one
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_chat_template(tokenizer.chat_template)
