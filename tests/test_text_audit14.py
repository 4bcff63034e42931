"""Text targets, tokenizers and closed sets (audit 14); each test failed before its fix."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch
from helpers import build

from moe_gen.model.generate import Prediction
from moe_gen.model.grammar import TargetGrammar
from moe_gen.tasks import Task
from moe_gen.tasks.modalities.text_like import to_phones
from moe_gen.tasks.plan import TaskDataError
from moe_gen.trainer.evaluation import evaluate_task

SENTENCE = "the quick brown fox jumps over the lazy dog and then it runs far away into the dark forest again"


def _trained(plan, row, index: int) -> list[int]:
    """The decoder tokens a row's answer trains on, its EOS included."""
    return [t for c in plan.encode(row, index, training=False).decoder if c.loss for t in c.tokens]


def _perfect_text(plan, row, index: int, tok) -> str:
    """What decoding returns when the model writes exactly what it was trained to write."""
    grammar = TargetGrammar(plan, tok, max_new_tokens=500)
    state = grammar.start()
    for token in _trained(plan, row, index):
        if state.done:
            break
        option = next(o for o in grammar.options(state) if o.tokens is None or token in o.tokens)
        state = grammar.advance(state, option, token)
    return next(iter(grammar.parse(state)[0].values()))


def _answer_perfectly(model, task, tok, monkeypatch) -> list[int]:
    """Makes ``model.infer`` answer every row of ``task`` perfectly; returns the ``max_new_tokens`` asked."""
    plan, asked = model.plan(task), []

    def infer(task, rows, indices, max_new_tokens=32, **options):
        asked.append(max_new_tokens)
        return [Prediction(text=_perfect_text(plan, row, index, tok)) for row, index in zip(rows, indices)]

    monkeypatch.setattr(model, "infer", infer)
    return asked


def test_a_phone_target_is_scored_against_the_phones_it_trains_on(tok, monkeypatch):
    """The reference was the English text: a perfect grapheme-to-phoneme answer scored 0, and its
    length budget counted the text's pieces (50 tokens for an answer of 88 phones)."""
    rows = [{"text": "hello world"}, {"text": SENTENCE}]
    task = Task("g2p", "[TEXT:text] -> [PHONE:text]", rows)
    model = build([task], tok)
    asked = _answer_perfectly(model, task, tok, monkeypatch)
    pairs = []
    assert evaluate_task(model, task, pairs=pairs) == {"exact_match": 1.0}
    assert pairs[0][1].startswith("<ph_HH><ph_AH><ph_L><ph_OW><ph_|>")
    assert asked == [len(_trained(model.plan(task), rows[1], 1)) - 1 + 8]  # 88 phones (EOS left out), plus 8


def test_a_struct_text_target_is_scored_against_its_linearised_table(tok, monkeypatch):
    """The reference was the table's repr (a list of row dicts: a list of reprs, which BLEU refused)."""
    rows = [{"q": "two rows", "table": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]},
            {"q": "columns", "table": {"a": [5, 6], "b": [7, 8]}}]
    task = Task("t2t", "[TEXT:q] -> [STRUCT:table,preprocess=struct_text]", rows, metrics=["exact_match", "bleu"])
    model = build([task], tok)
    _answer_perfectly(model, task, tok, monkeypatch)
    pairs = []
    assert evaluate_task(model, task, pairs=pairs) == {"exact_match": 1.0, "bleu": pytest.approx(100.0)}
    assert [reference for _, reference in pairs] == ["a | b ; 1 | 2 ; 3 | 4", "a | b ; 5 | 7 ; 6 | 8"]


def test_a_reference_the_target_slot_refuses_fails_its_row_or_is_skipped(tok, monkeypatch):
    """A PHONE reference with no letter to speak: training refuses the row, so evaluation does too."""
    rows = [{"text": "hello"}, {"text": "?!"}]
    task = Task("g2p", "[TEXT:text] -> [PHONE:text]", rows)
    model = build([task], tok)
    monkeypatch.setattr(model, "infer", lambda task, rows, indices, **options: [Prediction(text="x") for _ in rows])
    with pytest.raises(TaskDataError, match=r"task 'g2p', column 'text', row 1: .* no letter or digit"):
        evaluate_task(model, task)
    skipping = Task("g2p", "[TEXT:text] -> [PHONE:text]", rows, on_error="skip")
    assert evaluate_task(model, skipping) == {"exact_match": 0.0, "skipped": 1}


def test_ranked_candidates_of_a_phone_target_are_scored_as_its_phones(tok):
    """A candidate was scored as text pieces ('▁he', 'll', 'o'), never what the target trains on."""
    task = Task("g2p", "[TEXT:text] -> [PHONE:text]", [{"text": "hello world"}])
    model = build([task], tok).eval()
    answer = model.infer(task, [{"text": "hello world"}], candidates=["hello world"])[0]
    assert answer.text == "hello world"
    assert answer.tokens == _trained(model.plan(task), {"text": "hello world"}, 0)[:-1]
    with pytest.raises(TaskDataError, match=r"task 'g2p', column 'text', candidate 1: .* no letter or digit"):
        model.infer(task, [{"text": "hello"}], candidates=["hello", "?!"])


def _minilm():
    from moe_gen.pretrained import CheckpointMissing, locate
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    try:
        return HFTokenizer.from_pretrained(locate("minilm"))
    except CheckpointMissing as exc:
        pytest.skip(str(exc))


def test_free_text_writes_the_unknown_token_that_a_wordpiece_target_trains_on():
    """WordPiece encodes an emoji as [UNK]: "🤖 robot" trained on [UNK] ▁robot, and decoding never wrote [UNK]."""
    bert = _minilm()
    rows = [{"q": "what is this", "a": "🤖 robot"}]
    task = Task("t", "[TEXT:q] -> [TEXT:a]", rows)
    trained = _trained(task.plan(bert), rows[0], 0)
    assert trained[0] == bert.unk_id
    model = build([task], bert).eval()
    original = model.output_logits

    def output_logits(hidden):  # a model sure of [UNK]
        out = original(hidden)
        return out + 50.0 * (torch.arange(out.shape[-1], device=out.device) == bert.unk_id)

    model.output_logits = output_logits
    assert model.infer(task, rows, max_new_tokens=3)[0].tokens == [bert.unk_id] * 3
    assert bert.encodes_unknown


def test_the_package_tokenizer_never_encodes_the_unknown_token(tok):
    assert not tok.encodes_unknown and tok.unk_id not in tok.encode("🤖 robot " + "x" * 300)


@pytest.mark.parametrize("text, ascii_form", [("café", "cafe"), ("naïve", "naive"), ("résumé", "resume"),
                                              ("don\u2019t", "don't"), ("it\u2019s", "it's"), ("\ufb01sh", "fish"),
                                              ("\u2018cat\u2019", "cat"), ("Æsop", "aesop"),
                                              ("hors d'œuvre", "hors d'oeuvre"), ("Straße", "strasse"),
                                              ("Łódź", "lodz"), ("smørrebrød", "smorrebrod"), ("5 µm", "5 um")])
def test_accents_ligatures_and_typographic_apostrophes_are_read_as_their_ascii_words(text, ascii_form):
    """An accented letter ended the word and vanished ("café" spelled C A F); U+2019 split "don’t"."""
    assert to_phones(text) == to_phones(ascii_form)


def test_letters_of_another_script_are_refused_naming_the_word_and_the_row(tok):
    """They were dropped silently ("smørrebrød" was spoken as "sm", "rrebr", "d"; it is now read as
    "smorrebrod", above)."""
    with pytest.raises(ValueError, match="the word 'москва' has letters of another script than the Latin one"):
        to_phones("I saw Москва")
    rows = [{"text": "hello", "label": "x"}, {"text": "東京", "label": "y"}]
    task = Task("tts", "[PHONE:text] -> [TEXT:label]", rows)
    task.encode(0, tok)
    with pytest.raises(TaskDataError, match="task 'tts', column 'text', row 1: the word '東京' has letters of another"):
        task.encode(1, tok)


def test_a_label_boundary_reached_past_an_empty_label_is_refused(tok):
    """b may be "" (no token), so c may begin right after a: rows (new, "", york) and (new york, "", "")
    trained on the same tokens, and the plan was accepted."""
    rows = [{"q": "one", "a": "new", "b": "", "c": "york"}, {"q": "two", "a": "new york", "b": "", "c": ""},
            {"q": "three", "a": "new", "b": "x", "c": "york"}]
    instruction = "[TEXT:q] -> [TEXT:a,closed_set] [TEXT:b,closed_set] [TEXT:c,closed_set]"
    with pytest.raises(TaskDataError, match=r"slot \[TEXT:a,closed_set\]'s labels go on past shorter ones, and "
                                            r"\[TEXT:c,closed_set\] after it \(past \[TEXT:b,closed_set\], which "
                                            "may be empty\\) may begin with the token that goes on"):
        Task("t", instruction, rows).plan(tok)
    never_empty = [dict(row, b="x") for row in rows]  # b always writes a token: c never follows a directly
    Task("t", instruction, never_empty).plan(tok)


def test_a_decimal_label_is_the_same_text_in_the_closed_set_and_in_its_rows(tok):
    """Decimal("1.50") joined the closed set as '1.50', and every row holding it was refused ("a TEXT
    slot needs text, got Decimal"); a Decimal input was refused too."""
    rows = [{"q": "a", "price": Decimal("1.50")}, {"q": "b", "price": Decimal("2.25")},
            {"q": "c", "price": Decimal("NaN")}]
    task = Task("t", "[TEXT:q] -> [TEXT:price,closed_set]", rows)
    assert task.closed_sets() == {"price": ["1.50", "2.25"]}  # the NaN is a missing value, no label
    plan = task.plan(tok)
    assert tok.decode(_trained(plan, rows[0], 0)) == "1.50"
    with pytest.raises(TaskDataError, match=r"task 't', column 'price', row 2: the label is a missing value \(NaN\)"):
        plan.encode(rows[2], 2)
    inputs = Task("u", "[TEXT:price] -> [TEXT:q]", rows)
    assert tok.decode(inputs.encode(0, tok).encoder[0].tokens) == "1.50"
    with pytest.raises(TaskDataError, match=r"task 'u', column 'price', row 2: a TEXT slot got a missing value"):
        inputs.encode(2, tok)


def test_a_closed_set_of_another_preprocessor_than_text_is_refused(tok):
    """Its label trie held text pieces while training wrote phones: every trained token after the
    first was outside the allowed lists (a NaN loss, answers that could never be decoded). (A PHONE
    slot refuses closed_set when the instruction is parsed.)"""
    task = Task("say", "[TEXT:q] say it. -> [TEXT:w,preprocess=phone,closed_set]",
                [{"q": "a", "w": "hello"}, {"q": "b", "w": "world"}])
    with pytest.raises(ValueError, match=r"task 'say': .*closed set read by the 'phone' preprocessor"):
        task.plan(tok)


def test_a_byte_level_vocabulary_never_encodes_its_unknown_token_so_answers_never_write_it():
    """GPT-2 style byte-level BPE (SmolLM2 names <|endoftext|> its unknown token) covers every byte:
    the unknown token is reserved from free-text answers, as for sentencepiece with byte fallback."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from moe_gen.model.grammar import TargetGrammar
    from moe_gen.tasks import Task
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    for pre_tokenizer in (pre_tokenizers.ByteLevel(add_prefix_space=False),
                          pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])):
        backend = Backend(models.BPE(unk_token="<|endoftext|>"))
        backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoders.ByteLevel()
        backend.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = HFTokenizer.from_pretrained(backend, unk_token="<|endoftext|>", num_bins=8, num_sentinels=2)
        assert tok.unk_id not in tok.encode("🤖 ☃ 𝔘 \x00 robot")
        assert not tok.encodes_unknown
        plan = Task("chat", "[TEXT:q] -> [TEXT:a]", [{"q": "hi", "a": "hello"}]).plan(tok)
        assert tok.unk_id in TargetGrammar(plan, tok).reserved
