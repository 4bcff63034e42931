"""The shared text vocabulary: training, special tokens, save/load."""

from __future__ import annotations

import pytest

from moe_gen.tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, default_corpus


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_layout_of_special_tokens(tok):
    assert tok.pieces([PAD_ID, BOS_ID, EOS_ID]) == ["<pad>", "<s>", "</s>"]
    assert tok.pieces([tok.bin_id(0), tok.bin_id(999)]) == ["<bin_0>", "<bin_999>"]
    assert tok.bin_id(999) + 1 == tok.sentinel_id(0)
    assert tok.pieces([tok.sentinel_id(7)]) == ["<extra_id_7>"]
    assert tok.bin_index(tok.bin_id(417)) == 417 and tok.bin_index(tok.sentinel_id(0)) is None
    assert tok.is_special(tok.sentinel_id(3)) and not tok.is_special(tok.encode("the")[0])
    with pytest.raises(ValueError, match="location bin 1000 is outside"):
        tok.bin_id(1000)


def test_round_trip_any_text(tok):
    for text in ["What does the image describe?", "x = [1, 2] -> {'a': None}", "Ünïcödé 漢字 🙂",
                 "<bin_12> <bin_400> caption"]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert tok.decode(ids) == text
    assert tok.unk_id not in tok.encode("Ünïcödé 漢字 🙂")  # byte fallback
    # written-out location tokens are single ids
    assert tok.encode("<bin_12>")[-1] == tok.bin_id(12)


def test_training_is_deterministic_and_saved_with_the_model(tmp_path, tok):
    corpus = default_corpus()[:500]
    a = Tokenizer.train(corpus, vocab_size=2000, num_bins=10, num_sentinels=5)
    b = Tokenizer.train(corpus, vocab_size=2000, num_bins=10, num_sentinels=5)
    assert a == b
    tok.save(str(tmp_path))
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded == tok
    text = "the interpreter evaluates expressions"
    assert loaded.encode(text) == tok.encode(text)
    assert len(default_corpus()) > 5000  # the stdlib corpus is really there


def test_training_errors():
    with pytest.raises(ValueError, match="leaves no room for pieces"):
        Tokenizer.train(["a b c"], vocab_size=1200)
    with pytest.raises(ValueError, match="non-empty corpus"):
        Tokenizer.train(["", "  "], vocab_size=2000)
