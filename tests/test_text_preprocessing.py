"""Text slot preprocessing: normalisation, span masking, noise."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_gen.tasks.modalities.text import add_token_noise, normalize_text, span_mask, truncate
from moe_gen.tasks.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def reconstruct(inputs, targets, tok):
    """Undo span masking: each sentinel in the input is replaced by the span it hid."""
    spans, current = {}, None
    for t in targets:
        if tok.is_special(t) and tok.bin_index(t) is None:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t in spans else [t])
    return out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 80), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 10**6))
def test_span_mask_hides_the_requested_share_and_is_invertible(n, ratio, seed):
    tok = Tokenizer.default()
    ids = [tok.encode("word")[-1] + (i % 50) for i in range(n)]  # ordinary pieces
    inputs, targets = span_mask(ids, ratio, tok, random.Random(seed))
    assert reconstruct(inputs, targets, tok) == ids
    sentinels = [t for t in inputs if tok.is_special(t)]
    hidden = len(targets) - len(sentinels)
    # at least one token once ratio > 0 (else a short text or a small ratio hides nothing), and
    # one left visible where there are two or more
    expected = 0 if n == 0 or ratio == 0 else 1 if n == 1 else min(max(1, round(n * ratio)), n - 1)
    assert hidden == expected
    assert sentinels == [tok.sentinel_id(k) for k in range(len(sentinels))]
    # spans never touch: two sentinels are never adjacent in the input
    assert all(not (tok.is_special(a) and tok.is_special(b)) for a, b in zip(inputs, inputs[1:]))
    assert span_mask(ids, ratio, tok, random.Random(seed)) == (inputs, targets)


def test_span_mask_by_example(tok):
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    assert span_mask(ids, 0.0, tok, random.Random(0)) == (ids, [])
    inputs, targets = span_mask(ids, 0.3, tok, random.Random(1))
    assert targets[0] == tok.sentinel_id(0) and tok.sentinel_id(0) in inputs
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        span_mask(ids, 1.0, tok, random.Random(0))


def test_normalize_and_truncate():
    assert normalize_text("Hello, World! “Quoted”", uncased=True) == "hello, world! “quoted”"
    assert normalize_text("Hello, World! “Quoted” end.", no_punctuation=True) == "Hello World Quoted end"
    assert truncate([1, 2, 3], 2) == [1, 2] and truncate([1, 2], None) == [1, 2]
    with pytest.raises(ValueError, match="text must be a str"):
        normalize_text(3)


def test_token_noise_keeps_specials_and_ratio(tok):
    ids = tok.encode("the interpreter evaluates expressions " * 40) + [tok.bin_id(3), tok.sentinel_id(0)]
    noisy = add_token_noise(ids, 0.5, tok, random.Random(0))
    assert noisy[-2:] == ids[-2:]
    changed = sum(a != b for a, b in zip(ids, noisy)) / len(ids)
    assert 0.35 < changed < 0.6
    assert all(not tok.is_special(t) for t, o in zip(noisy, ids) if t != o)
    assert add_token_noise(ids, 0.0, tok, random.Random(0)) == ids


def test_truncate_to_zero_is_empty_and_negative_is_refused():
    assert truncate([1, 2, 3], 0) == [] and truncate([1, 2, 3], 5) == [1, 2, 3]
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        truncate([1, 2, 3], -1)


@pytest.mark.parametrize("n, ratio", [(2, 0.9), (3, 0.9), (10, 0.95)])
def test_span_mask_leaves_one_token_visible_when_the_ratio_rounds_to_all(tok, n, ratio):
    # round(n * ratio) == n here: without the cap at n - 1 the input would be a lone sentinel
    ids = [tok.encode("word")[-1] + i for i in range(n)]
    inputs, targets = span_mask(ids, ratio, tok, random.Random(0))
    assert round(n * ratio) == n
    assert len(targets) - sum(tok.is_special(t) for t in targets) == n - 1
    assert [t for t in inputs if not tok.is_special(t)] != [] and reconstruct(inputs, targets, tok) == ids


def test_span_mask_uses_at_most_the_tokenizers_sentinels():
    # 60 tokens at 0.5 would be 10 spans of mean 3; a vocabulary with 2 sentinels caps them at 2
    small = Tokenizer.default(num_sentinels=2)
    ids = [small.encode("word")[-1] + (i % 50) for i in range(60)]
    for seed in range(5):
        inputs, targets = span_mask(ids, 0.5, small, random.Random(seed))
        sentinels = [t for t in inputs if small.is_special(t)]
        assert sentinels == [small.sentinel_id(0), small.sentinel_id(1)]
        assert reconstruct(inputs, targets, small) == ids
