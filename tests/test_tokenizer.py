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


# ---- mutation-testing audit (r17): boundaries of the blocks, flags, equality and fingerprint ------------------

_SMALL_CORPUS = ["hello world", "the cat sat on the mat", "a b c d e f g"]


def test_bos_and_eos_are_added_each_by_its_own_flag(tok):
    plain = tok.encode("the cat")
    assert tok.encode("the cat", add_bos=True) == [BOS_ID, *plain]
    assert tok.encode("the cat", add_eos=True) == [*plain, EOS_ID]


def test_sentinel_and_piece_blocks_end_where_they_should(tok):
    """The last sentinel is ``<extra_id_99>``; the ordinary pieces start right after it, and none of
    them is special (token noise draws replacements from them)."""
    assert tok.pieces([tok.sentinel_id(99)]) == ["<extra_id_99>"]
    with pytest.raises(ValueError, match="sentinel 100 is outside"):
        tok.sentinel_id(100)
    pieces = tok.piece_ids
    assert pieces.start == tok.sentinel_id(99) + 1 and pieces.stop == tok.vocab_size
    assert not any(tok.is_special(i) for i in pieces[:5])


def test_piece_ids_without_sentinels_or_bins_start_after_the_last_special():
    bins_only = Tokenizer.train(_SMALL_CORPUS, vocab_size=300, num_bins=10, num_sentinels=0)
    assert bins_only.piece_ids.start == bins_only.bin_id(9) + 1 == 14
    bare = Tokenizer.train(_SMALL_CORPUS, vocab_size=300, num_bins=0, num_sentinels=0)
    assert bare.piece_ids.start == 4 and EOS_ID not in bare.piece_ids
    with pytest.raises(ValueError, match="the sentencepiece model has no <bin_0> piece"):
        Tokenizer(bare.model_proto, num_bins=10, num_sentinels=0)


def test_vocab_size_equal_to_the_reserved_ids_leaves_no_room():
    reserved = 4 + 10 + 5 + 256  # specials, bins, sentinels, bytes
    with pytest.raises(ValueError, match=f"{reserved} ids are reserved"):
        Tokenizer.train(_SMALL_CORPUS, vocab_size=reserved, num_bins=10, num_sentinels=5)
    assert Tokenizer.train(_SMALL_CORPUS, vocab_size=reserved + 20, num_bins=10, num_sentinels=5).vocab_size > reserved


def test_tokenizers_with_another_sentinel_count_differ(tok):
    """The same sentencepiece model read with fewer sentinels is another vocabulary: not equal, and
    of another fingerprint (a resume under it is refused)."""
    fewer = Tokenizer(tok.model_proto, tok.num_bins, 50)
    assert fewer != tok and tok != fewer
    assert fewer.fingerprint() != tok.fingerprint()
    assert Tokenizer(tok.model_proto, tok.num_bins, tok.num_sentinels).fingerprint() == tok.fingerprint()
