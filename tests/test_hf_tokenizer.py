"""Tokenizers from a checkpoint: exact to the Hugging Face tokenizer on plain text, moe_gen's tokens
appended after the checkpoint's ids, saved and reloaded with a model, new token rows initialised."""

from __future__ import annotations

import os

import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.pretrained import CheckpointMissing, locate
from moe_gen.tasks import Tokenizer, collate, load_preset
from moe_gen.tasks.hf_tokenizer import HFTokenizer, resize_token_rows
from moe_gen.tasks.tokenizer import PHONE_SYMBOLS

SENTENCES = [
    "the cat sat on the mat.",
    "What does the image describe?",
    "x = [1, 2] -> {'a': None}",
    "Héllo wörld — naïve café, 東京 🤖 test",
    "Ünïcödé 漢字 🙂",
    "two  spaces,\ttab and\nnewline",
    "",
]


def _checkpoint(name: str) -> str:
    try:
        return locate(name)
    except CheckpointMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=["minilm", "whisper-tiny.en"])
def pair(request):
    """(HFTokenizer, the checkpoint's transformers tokenizer)."""
    from transformers import AutoTokenizer

    path = _checkpoint(request.param)
    return HFTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def minilm() -> HFTokenizer:
    return HFTokenizer.from_pretrained(_checkpoint("minilm"))


def _check_exact(tok: HFTokenizer, hf) -> None:
    round_trips = 0
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == hf.decode(ids)
        if hf.decode(ids) == text:
            assert tok.decode(ids) == text
            round_trips += 1
    assert round_trips >= 2


def _check_appended(tok: HFTokenizer) -> None:
    base = tok.base_vocab_size
    assert tok.bin_id(0) >= base and tok.bin_id(999) + 1 == tok.sentinel_id(0)
    assert tok.sentinel_id(99) + 1 == tok.symbol_id(PHONE_SYMBOLS[0])
    assert tok.vocab_size == tok.symbol_id(PHONE_SYMBOLS[-1]) + 1
    for piece, token in [("<bin_12>", tok.bin_id(12)), ("<extra_id_7>", tok.sentinel_id(7)),
                         ("<ph_AA>", tok.symbol_id("<ph_AA>")), ("<ph_|>", tok.symbol_id("<ph_|>"))]:
        assert token >= base and tok.encode(piece) == [token] and tok.decode([token]) == piece
        assert tok.pieces([token]) == [piece]
    assert tok.bin_index(tok.bin_id(417)) == 417 and tok.bin_index(tok.sentinel_id(0)) is None
    assert tok.is_special(tok.sentinel_id(3)) and tok.is_special(tok.pad_id)
    assert not tok.is_special(tok.encode("the")[0]) and tok.encode("the")[0] in tok.piece_ids
    ids = tok.encode("the cat", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids + [tok.pad_id]) == "the cat"
    with pytest.raises(ValueError, match="location bin 1000 is outside"):
        tok.bin_id(1000)
    with pytest.raises(ValueError, match="no symbol"):
        tok.symbol_id("<ph_nothing>")


def test_plain_text_encodes_exactly_as_the_checkpoint_tokenizer(pair):
    _check_exact(*pair)


def test_appended_tokens_are_single_ids_after_the_checkpoint_vocabulary(pair):
    tok, hf = pair
    _check_appended(tok)
    assert tok.base_vocab_size == len(hf)
    box = tok.encode("the cat <bin_3><bin_40><bin_400><bin_999>")
    assert box[-4:] == [tok.bin_id(k) for k in (3, 40, 400, 999)]


def test_specials_map_to_the_checkpoint_tokens_or_are_appended():
    bert = HFTokenizer.from_pretrained(_checkpoint("minilm"))
    assert bert.pieces([bert.pad_id, bert.bos_id, bert.eos_id, bert.unk_id]) == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert bert.base_vocab_size == 30522 and bert.bin_id(0) == 30522  # nothing appended before the bins
    whisper = HFTokenizer.from_pretrained(_checkpoint("whisper-tiny.en"))
    assert whisper.pieces([whisper.bos_id, whisper.eos_id]) == ["<|startoftranscript|>", "<|endoftext|>"]
    assert (whisper.bos_id, whisper.eos_id) == (50257, 50256) and whisper.unk_id is None  # byte-level: no unknown
    assert whisper.pad_id == whisper.base_vocab_size == 50363 and whisper.pieces([whisper.pad_id]) == ["<pad>"]
    assert whisper.bin_id(0) == 50364
    # a role named explicitly wins
    assert HFTokenizer.from_pretrained(_checkpoint("minilm"), bos_token="[MASK]").bos_id == 103
    with pytest.raises(ValueError, match="not in the checkpoint's vocabulary"):
        HFTokenizer.from_pretrained(_checkpoint("minilm"), pad_token="<nothing>")


def test_whisper_starts_with_startoftranscript_from_every_source(tmp_path):
    """Whisper's transformers tokenizer (and its files) name <|endoftext|> the BOS; its decoder starts
    with <|startoftranscript|>, which every source now gives (the other start transcribed wrongly);
    ``bos_token`` still wins."""
    from moe_gen.pretrained.ctranslate2 import load_whisper

    _, hf, _ = load_whisper(_checkpoint("whisper-tiny.en"))  # transformers' WhisperTokenizer
    assert hf.bos_token == "<|endoftext|>"
    folder = tmp_path / "saved"
    hf.save_pretrained(str(folder))  # a transformers-format folder: its files name <|endoftext|> too
    for source in (hf, str(folder), hf.backend_tokenizer):
        assert HFTokenizer.from_pretrained(source, num_bins=500).pieces([50257]) == ["<|startoftranscript|>"]
        assert HFTokenizer.from_pretrained(source, num_bins=500).bos_id == 50257
    assert HFTokenizer.from_pretrained(hf, bos_token="<|endoftext|>").bos_id == 50256


def test_appended_role_tokens_typed_in_text_stay_text(tmp_path):
    """A pad (Whisper) or BOS / EOS (a vocabulary without them) that moe_gen appends is a special
    token: "<pad>" or "</s>" in a user's text is that text, not the role (mid-target it would train
    an EOS, or vanish when decoded); a folder saved before the change is read the same way."""
    import json

    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    whisper = HFTokenizer.from_pretrained(_checkpoint("whisper-tiny.en"))
    ids = whisper.encode("use the <pad> tag")
    assert whisper.pad_id not in ids and whisper.decode(ids) == "use the <pad> tag"
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz<>/")}}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    bare = HFTokenizer.from_pretrained(backend, num_bins=4, num_sentinels=2, extra_symbols=())
    assert bare.pieces([bare.pad_id, bare.bos_id, bare.eos_id]) == ["<pad>", "<s>", "</s>"]
    ids = bare.encode("a<s>b</s>c")
    assert not {bare.bos_id, bare.eos_id} & set(ids) and bare.decode(ids).replace(" ", "") == "a<s>b</s>c"
    assert bare.encode("<bin_2>") == [bare.bin_id(2)]  # moe_gen's other appended tokens still match
    # a tokenizer.json written when the role tokens were not special
    bare.save(str(tmp_path))
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    for entry in saved["added_tokens"]:
        entry["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    old = HFTokenizer.load(str(tmp_path))
    assert old.encode("a<s>b</s>c") == ids


def test_ids_outside_the_vocabulary_are_refused(minilm):
    """An id past the vocabulary decoded to nothing (or None as a piece), silently: a model of
    another vocabulary's output. It is refused, naming the ids."""
    size = minilm.vocab_size
    for bad in ([size], [5, size + 7], [-1]):
        with pytest.raises(ValueError, match=r"token ids \[.*\] are outside this tokenizer's vocabulary of"):
            minilm.decode(bad)
        with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
            minilm.pieces(bad)
    assert minilm.pieces([size - 1]) == [minilm.backend.id_to_token(size - 1)]


def test_every_source_gives_the_same_tokenizer(minilm):
    from transformers import AutoTokenizer

    folder = _checkpoint("minilm")
    hf = AutoTokenizer.from_pretrained(folder)
    assert HFTokenizer.from_pretrained(hf) == minilm
    assert HFTokenizer.from_pretrained(os.path.join(folder, "tokenizer.json")) == minilm
    # a bare tokenizers.Tokenizer names no roles: the well-known names find BERT's
    assert HFTokenizer.from_pretrained(hf.backend_tokenizer) == minilm
    small = HFTokenizer.from_pretrained(folder, num_bins=10, num_sentinels=5, extra_symbols=())
    assert small.vocab_size == 30522 + 15 and small.sentinel_id(4) == small.vocab_size - 1


def test_save_and_load_dispatch_by_folder(minilm, tmp_path):
    from transformers import AutoTokenizer

    assert minilm.save(str(tmp_path)) == ["tokenizer.json", "moe_gen_tokenizer.json"]
    loaded = Tokenizer.load(str(tmp_path))  # what GeneralistModel.from_pretrained calls
    assert isinstance(loaded, HFTokenizer) and loaded == minilm
    assert loaded.encode(SENTENCES[3]) == minilm.encode(SENTENCES[3])
    _check_appended(loaded)
    # the saved tokenizer.json is a Hugging Face file, appended tokens included
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    appended = [minilm.bin_id(3), minilm.symbol_id("<ph_AA>")]
    assert again("<bin_3> <ph_AA>", add_special_tokens=False).input_ids == appended
    with pytest.raises(ValueError, match="HFTokenizer.load"):
        HFTokenizer.from_pretrained(str(tmp_path))  # moe_gen's tokens are there already
    with pytest.raises(ValueError, match="no Hugging Face tokenizer file"):
        HFTokenizer.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer file"):
        Tokenizer.load(str(tmp_path))


def test_new_token_rows_start_at_the_mean_of_the_old_ones():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(500, 16, generator=g) * torch.linspace(0.1, 2.0, 16) + 3.0
    grown = resize_token_rows(old, 520)
    assert grown.shape == (520, 16) and grown.dtype == old.dtype
    assert torch.equal(grown[:500], old)
    mean = old.mean(0)
    assert not torch.equal(grown[500], grown[501])  # distinct rows
    torch.testing.assert_close(grown[500:], mean.expand(20, 16), atol=0.02, rtol=0)
    assert torch.equal(resize_token_rows(old, 520), grown)  # deterministic
    torch.testing.assert_close(resize_token_rows(old, 510, noise=0.0)[500:], mean.expand(10, 16))
    # the noise follows the old rows' covariance: wide where they are wide
    spread = (resize_token_rows(old, 4500, noise=1.0)[500:] - mean).std(0)
    torch.testing.assert_close(spread, old.std(0), rtol=0.1, atol=0)
    assert torch.equal(resize_token_rows(old, 300), old[:300])
    half = resize_token_rows(old.to(torch.bfloat16), 510)
    assert half.dtype == torch.bfloat16


def test_model_with_a_checkpoint_tokenizer_saves_and_reloads_identically(minilm, tmp_path):
    tasks = [load_preset(n, "train", limit=3) for n in ("visual_grounding", "text_to_speech", "table_to_text")]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), tasks, minilm).eval()
    assert model.token_embedding.weight.shape[0] == minilm.vocab_size
    batch = collate([s for t in tasks for s in t.samples(minilm)], minilm, model.task_ids)
    assert batch.decoder.tokens.max() >= minilm.bin_id(0)  # the grounding box is bin tokens
    target = tmp_path / "model"
    model.save_pretrained(str(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "moe_gen_tokenizer.json",
                                                         "tokenizer.json"]
    loaded = GeneralistModel.from_pretrained(str(target)).eval()
    assert loaded.tokenizer == minilm
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    # a folder holding other files too: saving a sentencepiece model there removes the other kind's file
    (target / "notes.txt").write_text("mine")
    sp = Tokenizer.default()
    GeneralistModel.build(flavour("debug"), tasks[:1], sp).save_pretrained(str(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "notes.txt",
                                                         "tokenizer.json", "tokenizer.model"]
    assert GeneralistModel.from_pretrained(str(target)).tokenizer == sp


@pytest.mark.slow
def test_llama_gguf_tokenizer():
    """SmolLM2's byte-level BPE, read from the GGUF file through transformers (slow imports)."""
    from transformers import AutoTokenizer

    path = _checkpoint("smollm2")
    try:
        tok = HFTokenizer.from_pretrained(path)
    except ImportError as exc:  # transformers reads GGUF with the gguf package
        pytest.skip(f"reading {path} needs the gguf package: {exc}")
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert tok.pieces([tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id]) == [
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]
    assert tok.base_vocab_size == 49152 == tok.bin_id(0)
    _check_exact(tok, hf)
    _check_appended(tok)


def test_wordpiece_decoding_keeps_decimal_numbers_whole():
    """WordPiece splits "1.4" into 1 . 4; decoding joins a point between digits back, so generated
    numbers read as numbers (table_to_text's references are full of them)."""
    tok = HFTokenizer.from_pretrained(_checkpoint("minilm"))
    text = "an iris setosa flower with petals 1.4 cm long and 0.2 cm wide"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("it ends. 4 more")) == "it ends. 4 more"



def _word_level(unk: str = "<oov>"):
    """A four-word vocabulary whose unknown token is named only by its model (no checkpoint needed)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    backend = RustTokenizer(models.WordLevel({unk: 0, "a": 1, "b": 2, "c": 3}, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


def test_the_models_own_unknown_token_is_the_unk_role_and_never_a_noise_piece():
    tok = HFTokenizer.from_pretrained(_word_level("<oov>"), num_bins=2, num_sentinels=1, extra_symbols=())
    assert tok.specials["unk"] == "<oov>" and tok.unk_id == 0  # not a well-known name: the model names it
    assert tok.encode("a zzz c") == [1, 0, 3]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (4, 5, 6)  # appended, before the bins
    assert tok.piece_ids == [1, 2, 3]  # the unknown token is no ordinary piece (it is not an added special)


def test_tokenizer_config_names_the_roles_over_special_tokens_map(tmp_path):
    import json

    _word_level().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "a", "eos_token": "c"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "b"}, "eos_token": None}))
    tok = HFTokenizer.from_pretrained(str(tmp_path), num_bins=2, num_sentinels=1, extra_symbols=())
    assert tok.pieces([tok.bos_id, tok.eos_id]) == ["b", "c"]  # the config wins; a null there does not erase


def test_appended_blocks_must_lie_after_the_checkpoint_vocabulary():
    tok = HFTokenizer.from_pretrained(_word_level(), num_bins=2, num_sentinels=1, extra_symbols=())
    with pytest.raises(ValueError, match=r"<bin_0> … <bin_1> are not consecutive ids after the checkpoint's 10"):
        HFTokenizer(tok.backend, base_vocab_size=tok.vocab_size, specials=tok.specials, num_bins=2, num_sentinels=1)


def test_new_token_rows_follow_a_correlated_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.5, -0.7], [0.3, 0.0, 0.2]], dtype=torch.float64)
    old = torch.randn(3000, 3, generator=g, dtype=torch.float64) @ mix
    new = resize_token_rows(old, 3000 + 20000, noise=1.0)[3000:]
    torch.testing.assert_close(torch.cov(new.T), torch.cov(old.T), atol=0.03, rtol=0)
