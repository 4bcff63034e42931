"""Defects an audit of text handling found (2026-12-05, eighth session), each pinned: closed-set
answers and label clashes, corruption on answers, bytes targets, values that are no labels,
special tokens typed in text, the token-noise pool, truncation inside a character, masks that
hid nothing, and attributes on the wrong side of the arrow."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Task, Tokenizer, collate
from moe_gen.tasks.modalities.text import add_token_noise, slot_token_ids, span_mask


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_a_closed_set_answers_with_its_labels_as_given(tok):
    rows = [{"q": f"question {i}", "label": label} for i, label in enumerate(["Yes", "No", "Maybe", "Yes"])]
    task = Task("yn", "[TEXT:q] -> [CATEGORY:label,uncased]", rows)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    assert {p.text for p in model.infer(task, rows)} <= {"Yes", "No", "Maybe"}  # was "maybe", no label
    assert task.plan(tok).decode_specs()[0].labels == ("Maybe", "No", "Yes")


@pytest.mark.parametrize("labels, instruction", [
    (["a b", "a  b"], "[TEXT:q] -> [TEXT:label,closed_set]"),  # sentencepiece folds the spaces
    (["Paris", "PARIS"], "[TEXT:q] -> [TEXT:label,closed_set,uncased]"),
    (["new york", "new jersey"], "[TEXT:q] -> [TEXT:label,closed_set,max_length=1]"),
    (["U.S.", "U S"], "[TEXT:q] -> [TEXT:label,closed_set,no_punctuation]"),
])
def test_labels_the_slot_makes_alike_are_refused_naming_both(tok, labels, instruction):
    task = Task("t", instruction, [{"q": "x", "label": label} for label in labels])
    with pytest.raises(ValueError, match="task 't': slot .*: labels .* are the same tokens"):
        task.plan(tok)


def test_corruption_attributes_leave_an_answer_alone_with_a_warning(tok):
    rows = [{"q": f"q {i}", "label": "the quick brown fox", "c": ["alpha beta", "delta"][i % 2]} for i in range(4)]
    with pytest.warns(UserWarning, match="sets mask_ratio on the answer side.*does not apply"):
        free = Task("free", "[TEXT:q] -> [TEXT:label,mask_ratio=0.5]", rows).plan(tok)
    answer = [t for c in free.encode(rows[0], 0, rng=random.Random(0), training=True).decoder if c.loss
              for t in c.tokens]
    assert tok.decode(answer) == "the quick brown fox"  # trained on '... q<extra_id_0>...'
    with pytest.warns(UserWarning, match="noise_ratio on the answer side"):
        closed = Task("cls", "[TEXT:q] -> [TEXT:c,closed_set,noise_ratio=1.0]", rows)
        closed.plan(tok)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [closed], tok)
    from moe_gen.objectives import GenerativeObjective

    batch = collate([closed.encode(i, tok, training=True) for i in range(4)], tok, model.task_ids)
    assert torch.isfinite(GenerativeObjective(model)(batch)["loss"])  # NaN: labels outside their allowed set


def test_a_bytes_target_is_scored_as_the_text_it_trains_on(tok):
    from moe_gen.trainer.evaluation import _reference

    task = Task("t", "[TEXT:q] -> [TEXT:a]", [{"q": "x", "a": "café au lait".encode()}])
    plan = task.plan(tok)
    target = [p for p in plan.templates[0][1] if p.decode is not None][0]
    assert _reference(plan, target, "café au lait".encode(), 0) == "café au lait"  # was "b'caf\\xc3\\xa9 au lait'"


def test_values_that_are_no_label_do_not_join_the_label_set(tok):
    rows = [{"q": "a", "label": "cat"}, {"q": "b", "label": ["dog", "cow"]}, {"q": "c", "label": {"k": 1}},
            {"q": "d", "label": object()}, {"q": "e", "label": 3}]
    assert Task("t", "[TEXT:q] -> [CATEGORY:label]", rows, on_error="skip").closed_sets()["label"] == ["3", "cat"]


def test_typed_checkpoint_special_tokens_stay_text_and_noise_never_draws_them():
    from moe_gen.pretrained import locate
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = HFTokenizer.from_pretrained(locate("minilm"))
    ids = bert.encode("use [SEP] to split [CLS] sentences")
    assert bert.eos_id not in ids and bert.bos_id not in ids and bert.pad_id not in ids
    assert bert.decode(bert.encode("see <bin_3> here")).count("<bin_3>") == 1  # appended tokens still match
    pool = set(bert.piece_ids)
    assert not pool & {bert.eos_id, bert.bos_id, bert.pad_id, bert.unk_id}
    noisy = add_token_noise(bert.encode("the cat sat on the mat " * 100), 1.0, bert, random.Random(0))
    assert not set(noisy) & {bert.eos_id, bert.bos_id, bert.pad_id}


def test_noise_without_sentinels_never_draws_a_location_bin():
    from moe_gen.tasks.tokenizer import default_corpus

    small = Tokenizer.train(default_corpus()[:3000], vocab_size=1500, num_bins=16, num_sentinels=0)
    assert small.bin_id(15) < small.piece_ids.start
    out = add_token_noise(small.encode("the interpreter evaluates expressions " * 20), 1.0, small, random.Random(0))
    assert all(small.bin_index(t) is None for t in out)


@pytest.mark.parametrize("text, limit, expected", [("é", 2, ""), ("漢字", 3, ""), ("ok 🙂", 4, "ok")])
def test_max_length_never_cuts_a_character_in_half(tok, text, limit, expected):
    assert tok.decode(slot_token_ids(text, {"max_length": limit}, tok)) == expected


def test_a_mask_hides_at_least_one_token(tok):
    for text in ("hello", "the interpreter evaluates every expression from left to right"):
        ids = tok.encode(text)
        inputs, targets = span_mask(ids, 0.05, tok, random.Random(0))
        assert targets and any(tok.is_special(t) for t in inputs)
    one = tok.encode("hi")[:1]
    assert span_mask(one, 0.3, tok, random.Random(0))[0] == [tok.sentinel_id(0)]


def test_attributes_on_the_wrong_side_of_the_arrow(tok):
    with pytest.raises(ValueError, match="disable_auto_boseos, which drops the answer's end marker"):
        Task("t", "[TEXT:q] -> [TEXT:n,closed_set,disable_auto_boseos]", [{"q": "a", "n": "one"}]).plan(tok)
    for attribute in ("closed_set", "no_loss", "disable_auto_boseos"):
        with pytest.warns(UserWarning, match=f"sets {attribute} on an input, where it does nothing"):
            Task("p", f"[TEXT:q,{attribute}] -> [TEXT:a]", [{"q": "a", "a": "b"}]).plan(tok)


def test_disable_auto_boseos_is_refused_by_the_slot_the_answer_ends_in(tok):
    """The answer's end marker is needed where its last scored slot has no fixed length (text, a
    closed set, frames), wherever the flag sits; an answer ending in a box (4 location tokens)
    ends without it."""
    Task("t", "[TEXT:q] -> [TEXT:t] [BOX:b,disable_auto_boseos]", []).plan(tok)  # ends in a box: fine
    with pytest.raises(ValueError, match=r"slot \[BOX:b,disable_auto_boseos\] sets disable_auto_boseos, .*"
                                         r"the answer ends in \[TEXT:t\]"):
        Task("t", "[TEXT:q] -> [BOX:b,disable_auto_boseos] [TEXT:t]", []).plan(tok)
    with pytest.raises(ValueError, match=r"the answer ends in \[MOTION:m,adaptor=motion_tgt\]"):
        Task("t", "[TEXT:q] -> [BOX:b,disable_auto_boseos] [MOTION:m,adaptor=motion_tgt]", []).plan(tok)


def test_an_instructions_literal_text_may_name_the_checkpoints_special_tokens():
    # data cannot inject them (above), but an instruction's author can: Whisper's prompt
    from moe_gen.pretrained import locate
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whisper = HFTokenizer.from_pretrained(locate("whisper-tiny.en"))
    token = whisper.backend.token_to_id("<|notimestamps|>")
    assert whisper.encode_literal("<|notimestamps|>") == [token]
    assert token not in whisper.encode("<|notimestamps|>")


def test_adjacent_slots_whose_boundary_cannot_be_read_back_are_refused(tok):
    rows = [{"q": "a", "city": "new york", "state": "ohio"}, {"q": "b", "city": "new", "state": "york"}]
    with pytest.raises(ValueError, match=r"slot \[TEXT:city,closed_set\]'s labels go on past shorter ones, and "
                                         r"\[TEXT:state,closed_set\] after it"):
        Task("t", "[TEXT:q] -> [TEXT:city,closed_set] [TEXT:state,closed_set]", rows).plan(tok)
    with pytest.raises(ValueError, match="labels go on past shorter ones"):  # free text may begin with anything
        Task("t", "[TEXT:q] -> [TEXT:city,closed_set] [TEXT:state]", rows).plan(tok)
    Task("t", "[TEXT:q] -> [TEXT:city,closed_set] , state [TEXT:state,closed_set]", rows).plan(tok)  # a literal
    prefix_free = [{"q": "a", "city": "boston", "state": "ohio"}, {"q": "b", "city": "new york", "state": "york"}]
    Task("t", "[TEXT:q] -> [TEXT:city,closed_set] [TEXT:state,closed_set]", prefix_free).plan(tok)


def test_span_masking_without_sentinels_is_refused_when_planned():
    from moe_gen.tasks.tokenizer import default_corpus

    small = Tokenizer.train(default_corpus()[:3000], vocab_size=1500, num_bins=16, num_sentinels=0)
    with pytest.raises(ValueError, match=r"slot \[TEXT:text,mask_ratio=0.3\]: mask_ratio replaces spans by "
                                         r"sentinel tokens, and the tokenizer has none"):
        Task("fill", "[TEXT:text,mask_ratio=0.3] -> [TEXT:text]", [{"text": "a b c"}]).plan(small)
    # a table read as text masks spans with sentinels too (it planned, then every row failed); a table
    # read as cells masks cells as missing, which needs no sentinels
    with pytest.raises(ValueError, match=r"slot \[STRUCT:t,mask_ratio=0.3,preprocess=struct_text\]: mask_ratio "
                                         r"replaces spans by sentinel tokens, and the tokenizer has none"):
        Task("fill", "[STRUCT:t,preprocess=struct_text,mask_ratio=0.3] -> [TEXT:y]",
             [{"t": {"a": 0, "b": "x"}, "y": "z"}]).plan(small)
    Task("cells", "[STRUCT:t,mask_ratio=0.3] -> [TEXT:y]", [{"t": {"a": 0, "b": "x"}, "y": "z"}]).plan(small)
