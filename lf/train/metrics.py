"""Similarity of generated answers to reference answers: BLEU-4 and ROUGE-1/2/L, in percent, averaged over examples
(the scores `do_predict` writes to predict_results.json, with LLaMA-Factory's names).

Texts are split into tokens by `tokens`: each CJK character (Chinese hanzi, Japanese kana) is one token; elsewhere a
run of letters and digits is a word and every other non-space character (punctuation) is a token of its own;
whitespace only separates. Case is kept. So "Hi, 世界!" is ["Hi", ",", "世", "界", "!"].

- BLEU-4 (`bleu4`): sentence BLEU against one reference, uniform weights over 1- to 4-grams, n-gram counts clipped
  by the reference's, brevity penalty exp(1 - r/c) when the answer is shorter; an order with no match has its
  precision smoothed to 1 / (2^k x its n-gram count), k counting such orders (NLTK's SmoothingFunction().method3,
  LLaMA-Factory's choice); no unigram in common gives 0.
- ROUGE-N (`rouge_n`): the F1 of n-gram overlap, counts clipped (the same n-gram matches at most as often as it
  occurs in both); ROUGE-L (`rouge_l`): the F1 of the longest common subsequence's length over the two lengths.
An empty answer or reference scores 0 on every metric.

LLaMA-Factory differs in the splitting (jieba's words for ROUGE, and characters, spaces included, for BLEU) and in
rouge-chinese's ROUGE (unique n-grams, sentences split at "."), so its numbers are close to these, not equal.
"""

from __future__ import annotations

import math
import re
from collections import Counter

# Hiragana, katakana, CJK ideographs (extension A, unified, compatibility): scripts written without spaces
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+|[^\w\s]|_")


def tokens(text: str) -> list[str]:
    """The tokens the metrics compare (the splitting rule in the module docstring)."""
    return _TOKEN.findall(text)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _overlap(hypothesis: list[str], reference: list[str], n: int) -> tuple[int, int, int]:
    """(matched n-grams, the hypothesis's n-grams, the reference's n-grams), matches clipped by the reference."""
    hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
    return sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values())


def _f1(matched: int, predicted: int, relevant: int) -> float:
    if not matched:
        return 0.0
    precision, recall = matched / predicted, matched / relevant
    return 2 * precision * recall / (precision + recall)


def bleu4(hypothesis: list[str], reference: list[str]) -> float:
    """Smoothed sentence BLEU-4 in [0, 1] of token lists."""
    if not hypothesis or not reference:
        return 0.0
    log_sum, unmatched = 0.0, 0
    for n in range(1, 5):
        matched, total, _ = _overlap(hypothesis, reference, n)
        if n == 1 and not matched:
            return 0.0
        if matched:
            precision = matched / total
        else:  # method3: the k-th order without a match counts as 1 / (2^k x its n-grams)
            unmatched += 1
            precision = 1 / (2 ** unmatched * max(total, 1))
        log_sum += math.log(precision) / 4
    brevity = min(0.0, 1 - len(reference) / len(hypothesis))
    return math.exp(brevity + log_sum)


def rouge_n(hypothesis: list[str], reference: list[str], n: int) -> float:
    """ROUGE-N F1 in [0, 1] of token lists."""
    return _f1(*_overlap(hypothesis, reference, n))


def rouge_l(hypothesis: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 in [0, 1]: the longest common subsequence against both lengths."""
    previous = [0] * (len(reference) + 1)
    for word in hypothesis:  # the LCS table, one row at a time
        row = [0]
        for j, other in enumerate(reference):
            row.append(previous[j] + 1 if word == other else max(previous[j + 1], row[j]))
        previous = row
    return _f1(previous[-1], len(hypothesis), len(reference))


def similarity(predictions: list[str], references: list[str]) -> dict[str, float]:
    """bleu-4, rouge-1, rouge-2 and rouge-l, each the mean over the pairs in percent (4 decimals); {} for none."""
    if not predictions:
        return {}
    scores = {"bleu-4": [], "rouge-1": [], "rouge-2": [], "rouge-l": []}
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = tokens(prediction), tokens(reference)
        for name, value in (("bleu-4", bleu4(hyp, ref)), ("rouge-1", rouge_n(hyp, ref, 1)),
                            ("rouge-2", rouge_n(hyp, ref, 2)), ("rouge-l", rouge_l(hyp, ref))):
            scores[name].append(value)
    return {name: round(100 * sum(values) / len(values), 4) for name, values in scores.items()}
