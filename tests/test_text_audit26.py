"""Text and instructions, twenty-sixth audit: an answer ending in a repetition group keeps its end
marker; a phone preprocessor refuses corruptions it never applies; a closed set filled by position
is refused with a true message; span masking leaves the text's own sentinels distinct."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.modalities.text import span_mask


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.mark.parametrize("instruction", [
    "[TEXT:q] -> ( [TEXT:a] [BOX:b,disable_auto_boseos] )*",
    "[TEXT:q] -> ( [BOX:b,disable_auto_boseos] )*",
])
def test_an_answer_ending_in_a_repetition_group_keeps_its_end_marker(tok, instruction):
    """Without it the last item could not be told from one more: every answer ran on to max_items."""
    rows = [{"q": "where?", "a": ["x"], "b": [[1, 2, 5, 6]], "image": np.zeros((8, 8), np.uint8)}]
    with pytest.raises(ValueError, match=r"the answer ends in a repetition group"):
        Task("t", instruction, rows).plan(tok)


def test_a_box_answer_of_fixed_length_may_drop_its_end_marker(tok):
    rows = [{"q": "where?", "b": [1, 2, 5, 6]}]
    Task("t", "[TEXT:q] -> [BOX:b,disable_auto_boseos]", rows).plan(tok)  # (four bins: no marker needed)


@pytest.mark.parametrize("attr", ["mask_ratio=0.9", "noise_ratio=0.9"])
def test_a_text_slot_read_as_phones_refuses_corruptions_it_never_applies(tok, attr):
    rows = [{"a": "hello world", "b": "x"}]
    with pytest.raises(ValueError, match=rf"preprocess=phone writes phones.*drop {attr.split('=')[0]}"):
        Task("t", f"[TEXT:a,preprocess=phone,{attr}] -> [TEXT:b]", rows).plan(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Task("t", "[TEXT:a,preprocess=phone,uncased] -> [TEXT:b]", rows).plan(tok)  # (harmless: phones are upper case)


@pytest.mark.parametrize("instruction", ["[TEXT] -> [CATEGORY]", "[TEXT] -> [TEXT,closed_set]"])
def test_a_closed_set_filled_by_position_is_refused_saying_why(tok, instruction):
    rows = [("q1", "yes"), ("q2", "no")]
    with pytest.raises(ValueError, match=r"is a closed set filled by position.*name one"):
        Task("t", instruction, rows).plan(tok)


def test_span_masking_marks_its_spans_with_sentinels_the_text_does_not_hold(tok):
    ids = tok.encode("fill <extra_id_0> in the blank of this sentence please now")
    own = tok.sentinel_id(0)
    assert ids.count(own) == 1
    sentinels = {tok.sentinel_id(k) for k in range(tok.num_sentinels)}
    for seed in range(20):
        inputs, targets = span_mask(ids, 0.3, tok, random.Random(seed))
        marks = [i for i in inputs if i in sentinels and i != own]  # the spans' marks, in order
        assert marks == [tok.sentinel_id(k) for k in range(1, len(marks) + 1)] and targets[0] == marks[0]
        assert inputs.count(own) + targets.count(own) == 1  # the text's own sentinel: shown or hidden, once
    plain = tok.encode("fill in the blank of this sentence please now")
    assert span_mask(plain, 0.3, tok, random.Random(0))[1][0] == own  # other texts' spans start at 0, as before
