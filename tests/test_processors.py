"""The processors on canonical rows, with a transparent stand-in template (one token per character) so that every
expected id can be written by hand; the real templates are covered in test_templates.py and test_data_pipeline.py."""

import pytest

from lf.data.conversation import canonical_row
from lf.data.processors import IGNORE_INDEX, PROCESSORS, Options, split_budget
from lf.stages import STAGES

EOS = 0


def ids(text):
    return [ord(c) for c in text]


class CharTemplate:
    """Each message's content, one id per character; replies end with EOS."""

    def encode_many(self, tokenizer, conversations):
        return [[(ids(messages[i]["content"]), ids(messages[i + 1]["content"]) + [EOS])
                 for i in range(0, len(messages), 2)] for messages, system, tools in conversations]


class CharTokenizer:
    eos_token = "\x00"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [ids(t) for t in texts]}


def msg(role, content):
    return {"role": role, "content": content}


def batch_of(*rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


def run(stage, rows, **options):
    return PROCESSORS[STAGES[stage].data](batch_of(*rows), template=CharTemplate(), tokenizer=CharTokenizer(),
                                          options=Options(**{"cutoff_len": 100, **options}))


@pytest.mark.parametrize("prompt, response, budget, expected", [
    (3, 4, 10, (3, 4)),  # fits
    (30, 4, 10, (6, 4)),  # short response (2*4 < 10) keeps all of it
    (4, 30, 10, (4, 6)),  # short prompt (2*4 < 10): the response gets the rest
    (30, 10, 10, (8, 2)),  # both long: in proportion, the response gets B*R/(P+R) = 2, the prompt the rest
])
def test_split_budget_rule(prompt, response, budget, expected):
    assert split_budget(prompt, response, budget) == expected


def test_split_budget_never_leaves_the_response_empty_or_overflows():
    for p in range(0, 40):
        for r in range(1, 40):
            for b in range(1, 50):
                kp, kr = split_budget(p, r, b)
                assert kp + kr <= b and 0 <= kp <= p and 1 <= kr <= r


def test_supervised_labels_replies_only():
    row = canonical_row([msg("user", "hi")], [msg("assistant", "yo")])
    out = run("sft", [row])
    assert out["input_ids"] == [ids("hi") + ids("yo") + [EOS]]
    assert out["labels"] == [[IGNORE_INDEX] * 2 + ids("yo") + [EOS]]
    assert run("sft", [row], train_on_prompt=True)["labels"] == [ids("hi") + ids("yo") + [EOS]]


def test_supervised_multiturn_and_mask_history():
    row = canonical_row([msg("user", "a"), msg("assistant", "b"), msg("user", "c")], [msg("assistant", "d")])
    out = run("sft", [row])
    assert out["input_ids"] == [ids("a") + ids("b") + [EOS] + ids("c") + ids("d") + [EOS]]
    assert out["labels"] == [[IGNORE_INDEX] + ids("b") + [EOS] + [IGNORE_INDEX] + ids("d") + [EOS]]
    masked = run("sft", [row], mask_history=True)
    assert masked["labels"] == [[IGNORE_INDEX] * 4 + ids("d") + [EOS]]
    # with a tight budget the last turn (the one that is learned) comes first
    tight = run("sft", [row], mask_history=True, cutoff_len=3)
    assert tight["input_ids"] == [ids("c") + ids("d") + [EOS]]


def test_supervised_cut_to_cutoff_keeps_something_to_learn():
    long = canonical_row([msg("user", "p" * 50)], [msg("assistant", "r" * 50)])
    empty = canonical_row([msg("user", "q")], [msg("assistant", "")])
    out = run("sft", [long, empty], cutoff_len=20, train_on_prompt=False)
    (input_ids, _), (labels, _) = out["input_ids"], out["labels"]
    assert len(input_ids) == 20 and input_ids[:10] == ids("p" * 10) and input_ids[10:] == ids("r" * 10)
    assert labels[:10] == [IGNORE_INDEX] * 10
    # an empty reply still ends with EOS, which is learned; a row without a reply is prompt + EOS
    assert run("sft", [empty])["labels"] == [[IGNORE_INDEX, EOS]]
    assert run("sft", [canonical_row([msg("user", "q")], [])])["input_ids"] == [ids("q") + [EOS]]
    tiny = run("sft", [long], cutoff_len=1)
    assert tiny["labels"] == [ids("r")]  # one token of budget goes to the reply


def test_pairwise_shares_the_cut_prompt():
    row = canonical_row([msg("user", "p" * 8)], [msg("assistant", "good"), msg("assistant", "bad")])
    out = run("dpo", [row, canonical_row([msg("user", "x")], [msg("assistant", "only one")])], cutoff_len=10)
    assert len(out["chosen_input_ids"]) == 1  # the row without a rejected reply is dropped
    # prompt 8, longest reply 5 ("good" + EOS), budget 10: neither fits in half, so the reply gets 10*5/13 = 3
    assert out["chosen_input_ids"][0] == ids("p" * 7) + ids("goo")
    assert out["rejected_input_ids"][0] == ids("p" * 7) + ids("bad")
    assert out["chosen_labels"][0] == [IGNORE_INDEX] * 7 + ids("goo")


def test_feedback_pairs_each_prompt_with_the_next_reply():
    rows = [canonical_row([msg("user", "a")], [msg("assistant", "x")], kto_tag=True),
            canonical_row([msg("user", "b")], [msg("assistant", "y")], kto_tag=False)]
    out = run("kto", rows)
    assert out["kto_tags"] == [True, False]
    assert out["input_ids"] == [ids("ax") + [EOS], ids("by") + [EOS]]
    assert out["kl_input_ids"] == [ids("ay") + [EOS], ids("bx") + [EOS]]


def test_unsupervised_keeps_the_reference_reply_as_labels():
    out = run("predict", [canonical_row([msg("user", "q")], [msg("assistant", "ref")])])
    assert out == {"input_ids": [ids("q")], "labels": [ids("ref") + [EOS]]}


def test_pretrain_concatenates_into_blocks():
    rows = [canonical_row([msg("user", "abc")], []), canonical_row([msg("user", "defgh")], [])]
    out = run("pt", rows, cutoff_len=4)
    assert out["input_ids"] == [ids("abc\x00"), ids("defg")]  # the last partial block ("h" + eos) is dropped
    assert out["labels"] == out["input_ids"]
    alone = PROCESSORS["text"](batch_of(*rows), template=None, tokenizer=CharTokenizer(), options=Options(4),
                               concatenate=False)
    assert alone["input_ids"] == [ids("abc\x00"), ids("defg")]
