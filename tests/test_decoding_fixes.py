"""Decoding fixes: empty free-text values read back as "", ``min_length`` holds back the next slot too,
a decoded box answers its corners ordered, and ranking / beam search refuse arguments they would misread."""

import pytest
import torch
from helpers import build

from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.generate import TextRules, beam_search, rank
from moe_gen.model.grammar import TargetGrammar
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _walk(grammar: TargetGrammar, tokens: list[int]):
    """The grammar's state after ``tokens`` (a token goes to the option that lists it, else to free
    text), or where the answer is done (a box or literal text at the end needs no EOS step)."""
    state = grammar.start()
    for token in tokens:
        if state.done:
            break
        options = grammar.options(state)
        option = next((o for o in options if o.tokens is not None and token in o.tokens), None)
        option = option or next(o for o in options if o.tokens is None)
        state = grammar.advance(state, option, token)
    return state


def _biased_head(model, monkeypatch, bins_of_call):
    """Adds ``bins_of_call(n)`` (``[num_bins]``) to the location tokens' logits of the decoder's n-th
    call of ``output_logits`` (0: the prefill, which predicts the answer's first token): what a
    model that strongly prefers those tokens there would answer, without training one."""
    original = model.output_logits
    first = model.tokenizer.bin_id(0)
    calls = []

    def biased(hidden):
        logits = original(hidden).clone()
        bias = bins_of_call(len(calls)).to(logits.dtype)
        calls.append(None)
        logits[..., first:first + bias.shape[0]] += bias
        return logits

    monkeypatch.setattr(model, "output_logits", biased)


# ---- 1. an empty free-text value is a value ---------------------------------------------------

@pytest.mark.parametrize("template, row", [
    # its closing EOS first
    ("[TEXT:q] -> [TEXT:a] : [TEXT:b,closed_set]", {"q": "x", "a": "", "b": "eps"}),
    # in a repetition group: the column's list keeps its place among the items
    ("[TEXT:q] -> ( [TEXT:ws] = [TEXT:vs,closed_set] )* end", {"q": "x", "ws": ["", "beta"], "vs": ["eps", "alpha"]}),
    # ended by the answer's EOS at once
    ("[TEXT:q] -> [TEXT:a]", {"q": "x", "a": ""}),
])
def test_an_empty_free_text_value_reads_back_as_empty_text(tok, template, row):
    """The tokens training writes for a row whose free-text value is "" parse back to the row."""
    other = {k: (["gamma"] * len(v) if isinstance(v, list) else "gamma") for k, v in row.items()}
    task = Task("empty", template, [row, other])
    plan = task.plan(tok)
    tokens = [t for chunk in plan.encode(row, 0, training=False).decoder for t in chunk.tokens]
    grammar = TargetGrammar(plan, tok)
    state = _walk(grammar, tokens)
    assert state.done
    targets, groups = grammar.parse(state)
    assert targets == {k: v for k, v in row.items() if k != "q"}
    if "ws" in row:  # the items pair each ws with its own vs
        assert groups == [[{"ws": "", "vs": "eps"}, {"ws": "beta", "vs": "alpha"}]]


# ---- 2. min_length holds back the start of the next slot ---------------------------------------

def test_min_length_holds_back_the_next_box_after_a_short_label(tok, monkeypatch):
    """Labels that a box follows: a model that prefers location tokens everywhere would start the next
    box after one label token; under ``min_length`` every label has at least that many tokens, greedy
    and beam search alike."""
    task = load_preset("digit_detection", "train", limit=1)
    model = build([task], tok).eval()
    _biased_head(model, monkeypatch, lambda call: torch.full((tok.num_bins,), 50.0))
    grammar = TargetGrammar(model.plan(task), tok, max_new_tokens=4, max_items=2, modality_ids=model.modality_ids)
    labels = grammar.keys.index("labels")
    for beams in (1, 2):
        for p in model.infer(task, task.data, min_length=3, max_new_tokens=4, max_items=2, beams=beams):
            state = _walk(grammar, p.tokens)
            lengths = [sum(1 for slot, i, _ in state.pieces if slot == labels and i == item)
                       for item in range(len(p.targets["labels"]))]
            assert lengths and min(lengths) >= 3, (beams, p.targets["labels"], lengths)
    # the rule itself: a 1-token label keeps only its next token, whatever would end it
    state = _walk(grammar, [tok.bin_id(1)] * 4 + tok.encode("seven")[:1])
    options = grammar.options(state)
    assert {o.action for o in options} == {"content", "start", "end"}
    assert [o.action for o in TextRules(min_length=3).allowed(grammar, state, options)] == ["content"]


def test_min_length_keeps_a_closed_sets_empty_label(tok):
    """``min_length`` is about free text: after a long enough value, a next closed set's empty label
    "" (a trained label) may still be answered; an empty free-text value may not."""
    rows = [{"q": "hi", "a": "one two", "b": ""}, {"q": "hi", "a": "three", "b": "yes"}]
    grammar = TargetGrammar(Task("t", "[TEXT:q] -> [TEXT:a] label [TEXT:b,closed_set]", rows).plan(tok), tok)
    state = _walk(grammar, tok.encode("one two") + [tok.eos_id] + tok.encode_literal(" label"))
    options = grammar.options(state)
    assert [(o.action, o.empty) for o in options] == [("start", None), ("end", 2)]  # "yes", or ""
    assert TextRules(min_length=2).allowed(grammar, state, options) == options
    free = TargetGrammar(Task("f", "[TEXT:q] -> [TEXT:a] label [TEXT:b]", rows).plan(tok), tok)
    state = _walk(free, tok.encode("one two") + [tok.eos_id] + tok.encode_literal(" label"))
    assert [o.empty for o in TextRules(min_length=2).allowed(free, state, free.options(state))] == [None]


# ---- 3. boxes are never inverted -----------------------------------------------------------------

def test_a_decoded_box_is_ordered_and_re_encodes(tok, monkeypatch):
    """A model whose x0, y0 prefer the highest location token and x1, y1 the lowest decodes those
    tokens (the argmax over the bins, as always); the box they span is answered with its corners
    ordered, and the answer re-encodes (the box preprocessor refuses an inverted box)."""
    task = load_preset("visual_grounding", "train", limit=2)
    model = build([task], tok).eval()
    ramp = torch.linspace(0.0, 1e4, tok.num_bins)
    _biased_head(model, monkeypatch, lambda call: ramp if call % 4 < 2 else -ramp)  # x0 y0 up, x1 y1 down
    plan = model.plan(task)
    top, bottom = tok.bin_id(tok.num_bins - 1), tok.bin_id(0)
    for row, p in zip(task.data, model.infer(task, task.data)):
        assert p.tokens == [top, top, bottom, bottom]
        assert p.box == pytest.approx([0.0, 0.0, row["width"], row["height"]])
        plan.encode(dict(row, query_box=p.box), 0, training=False)  # the box preprocessor takes it back
    # parse: the corners of any 4 bins, ordered; an ordered box as it was
    grammar = TargetGrammar(plan, tok)
    scale = tok.num_bins - 1
    for bins, box in [((700, 300, 100, 900), (100, 300, 700, 900)), ((100, 900, 700, 300), (100, 300, 700, 900)),
                      ((100, 300, 700, 900), (100, 300, 700, 900)), ((5, 5, 5, 5), (5, 5, 5, 5))]:
        state = _walk(grammar, [tok.bin_id(k) for k in bins])
        assert grammar.parse(state, (scale, 2 * scale))[0]["query_box"] == pytest.approx(
            [box[0], 2 * box[1], box[2], 2 * box[3]])


# ---- 4. ranking and beam search refuse arguments they would misread --------------------------------

@pytest.fixture(scope="module")
def classification(tok):
    task = load_preset("digit_classification", "train", limit=2)
    model = build([task], tok).eval()
    plan = model.plan(task)
    return model, plan, [plan.encode(task.data[0], 0, training=False, inference=True, template=0)]


@pytest.mark.parametrize("candidates, message", [
    ("seven", r"task 'digit_classification': candidates must be a list of answers, got the string 'seven'"),
    ([], r"task 'digit_classification': candidates must be a non-empty list of answers, got \[\]"),
    (["seven", 7], r"task 'digit_classification': candidates must be strings, got 7"),
])
def test_rank_refuses_candidates_that_are_not_a_list_of_answers(classification, candidates, message):
    model, plan, samples = classification
    with pytest.raises(ValueError, match=message):
        rank(model, plan, samples, candidates)
    assert len(rank(model, plan, samples, ["two", "one"])[0].scores) == 2  # a list of its labels is ranked as before


@pytest.mark.parametrize("beams", [0, -3, 2.0])
def test_beam_search_refuses_fewer_than_one_beam(classification, beams):
    model, plan, samples = classification
    with pytest.raises(ValueError, match=rf"task 'digit_classification': beams must be an integer >= 1.*{beams!r}"):
        beam_search(model, plan, samples, beams=beams)


def test_rank_refuses_a_task_whose_answer_is_not_one_text_value(tok):
    """digit_detection answers boxes and labels: a candidate text scored as its first box's tokens
    would rank nothing meaningful."""
    task = load_preset("digit_detection", "train", limit=1)
    model = build([task], tok).eval()
    plan = model.plan(task)
    samples = [plan.encode(task.data[0], 0, training=False, inference=True, template=0)]
    with pytest.raises(ValueError, match=r"task 'digit_detection': candidates rank answers of one text target.*"
                                         r"\[BOX:boxes\] \(box\), \[TEXT:labels\] \(text\)"):
        rank(model, plan, samples, ["one", "two"])


def test_infer_refuses_search_arguments_before_choosing_a_search():
    """Through ``infer``, ``candidates="seven"`` ranked its characters and ``beams=0`` ran greedy
    decoding: ``infer`` turned the candidates into a list and sent beams < 2 to greedy decoding
    before any check."""
    tok = Tokenizer.default()
    task = load_preset("digit_classification", "train", limit=4)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    for kwargs in ({"candidates": "seven"}, {"candidates": []}, {"beams": 0}, {"beams": -3}):
        with pytest.raises(ValueError, match="task 'digit_classification'"):
            model.infer(task, task.data[:1], **kwargs)


# ---- 5. answers that training laid out but decoding could never write back -------------------------

@pytest.mark.parametrize("template, rows", [
    # a closed set after another slot: its empty label is no token, then the answer's EOS
    ("[TEXT:q] -> [TEXT:a] [TEXT:b,closed_set]",
     [{"q": "x", "a": "red", "b": ""}, {"q": "y", "a": "blue", "b": "yes"}]),
    # after a box, in a repetition group: then the next box, or the answer's EOS
    ("[TEXT:q] -> ( [BOX:boxes] [TEXT:labels,closed_set] )*",
     [{"q": "x", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "labels": ["", "yes"], "width": 32, "height": 32},
      {"q": "y", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "labels": ["yes", ""], "width": 32, "height": 32}]),
    # two in a row, both empty: one token (the answer's EOS) skips both
    ("[TEXT:q] -> [TEXT:p] [TEXT:a,closed_set] [TEXT:b,closed_set]",
     [{"q": "x", "p": "red", "a": "", "b": ""}, {"q": "y", "p": "blue", "a": "one", "b": ""},
      {"q": "z", "p": "pink", "a": "", "b": "yes"}]),
])
def test_an_empty_closed_set_label_after_another_slot_reads_back(tok, template, rows):
    """A closed set holding "" that starts after another slot: decoding offers the empty label (what
    follows it, at once), so the tokens training writes for every row parse back to the row."""
    task = Task("empty_label", template, rows)
    plan = task.plan(tok)
    grammar = TargetGrammar(plan, tok)
    for i, row in enumerate(rows):
        sample = plan.encode(row, i, training=False)
        state = _walk(grammar, [t for chunk in sample.decoder for t in chunk.tokens])
        assert state.done
        targets = grammar.parse(state, sample.meta.get("image_size", (1.0, 1.0)))[0]
        assert {k: v for k, v in targets.items() if k != "boxes"} == {
            k: v for k, v in row.items() if k in ("p", "a", "b", "labels")}


def test_an_empty_item_after_the_first_closed_only_by_the_answers_eos_is_refused(tok):
    """In ``( [TEXT:labels] )*`` an empty value is laid out as its closing EOS alone, which after the
    first item decoding reads as the answer's end: the row is refused, naming task, column and row. An
    empty first item (a group decodes at least one) is a value, and reads back."""
    rows = [{"q": "x", "labels": ["", "sun"]}, {"q": "y", "labels": ["cat", "", "dog"]}]
    task = Task("lists", "[TEXT:q] -> ( [TEXT:labels] )*", rows)
    plan = task.plan(tok)
    sample = plan.encode(rows[0], 0, training=False)
    grammar = TargetGrammar(plan, tok)
    state = _walk(grammar, [t for chunk in sample.decoder for t in chunk.tokens])
    assert state.done and grammar.parse(state)[0] == {"labels": ["", "sun"]}
    with pytest.raises(TaskDataError, match=r"task 'lists', column 'labels', row 1: item 2 of repetition group 0 "
                                            r"begins with an empty value .* lone EOS"):
        plan.encode(rows[1], 1)
    # a box after the label tells the items apart: accepted
    boxes = Task("boxed", "[TEXT:q] -> ( [TEXT:labels] [BOX:boxes] )*",
                 [{"q": "x", "labels": ["cat", ""], "boxes": [[1, 2, 3, 4]] * 2, "width": 9, "height": 9}])
    boxes.plan(tok).encode(boxes.data[0], 0)


def test_location_tokens_in_the_text_of_a_box_template_are_refused(tok):
    """'<bin_3>' in a text value encodes as a location token, which free text in a template with boxes
    never decodes: the row is refused, naming task, column and row. Without boxes it is text."""
    import numpy as np

    row = {"img": np.zeros((32, 32, 3), np.uint8), "boxes": [[1, 2, 10, 12]], "labels": ["a <bin_3>"]}
    with pytest.raises(TaskDataError, match=r"task 'det', column 'labels', row 0: the text holds location tokens "
                                            r"\(<bin_3>\)"):
        Task("det", "[IMAGE:img] -> ( [BOX:boxes] [TEXT:labels] )*", [row]).plan(tok).encode(row, 0)
    plain = Task("plain", "[TEXT:q] -> [TEXT:a]", [{"q": "x", "a": "a <bin_3>"}])
    assert tok.bin_id(3) in [t for c in plain.plan(tok).encode(plain.data[0], 0).decoder for t in c.tokens]


# ---- mutation-testing audit (r15): limits, the cache bound, reserved tokens, the scored end ----------------

def _longest(grammar: TargetGrammar, text_token: int) -> int:
    """Steps of the longest answer: every value as long as its limit allows (content first), then
    whatever option comes first (an EOS, the next slot, the end)."""
    state, steps = grammar.start(), 0
    while not state.done:
        options = grammar.options(state)
        option = next((o for o in options if o.action == "content"), options[0])
        token = text_token if option.tokens is None else option.tokens[0]
        state = grammar.advance(state, option, token)
        steps += 1
    return steps


def test_location_tokens_in_the_text_of_an_image_code_template_are_refused(tok):
    """Image codes are location tokens too: a free-text value holding '<bin_3>' in a template with
    image codes could never be decoded back as text, so the row is refused, naming its place."""
    import numpy as np

    row = {"q": "x", "label": "a <bin_3>", "image": np.zeros((28, 28, 3), np.uint8)}
    task = Task("draw", "[TEXT:q] -> [TEXT:label] [IMAGE:image,preprocess=image_vq]", [row])
    with pytest.raises(TaskDataError, match=r"task 'draw', column 'label', row 0: the text holds location tokens "
                                            r"\(<bin_3>\), which in a template with image codes are read only as "
                                            r"image codes"):
        task.plan(tok).encode(row, 0)


def test_an_empty_item_is_refused_only_where_its_start_reads_as_what_follows_the_group(tok):
    """After ``( [TEXT:t] )*`` comes literal text, or a box: an empty later item (its EOS alone, kept
    under ``disable_auto_boseos``, which drops the answer's EOS only) is not what follows the group
    begins with, so it is accepted and reads back. An item of no token at all (a category whose one
    label is "") is refused."""
    boxed = {"q": "x", "t": ["a", ""], "b": [1, 2, 3, 4], "width": 9, "height": 9}
    for template in ("[TEXT:q] -> ( [TEXT:t] )* done", "[TEXT:q] -> ( [TEXT:t] )* [BOX:b,disable_auto_boseos]"):
        plan = Task("lists", template, [boxed]).plan(tok)
        sample = plan.encode(boxed, 0, training=False)
        grammar = TargetGrammar(plan, tok)
        state = _walk(grammar, [t for chunk in sample.decoder for t in chunk.tokens])
        assert state.done and grammar.parse(state, (9, 9))[0]["t"] == ["a", ""]
    bare = Task("bare", "[TEXT:q] -> ( [CATEGORY:c] )* [BOX:b]", [dict(boxed, c=["", ""])])
    with pytest.raises(TaskDataError, match=r"task 'bare', column 'c', row 0: item 2 of repetition group 0 begins "
                                            r"with an empty value of \[CATEGORY:c\], laid out as no token at all"):
        bare.plan(tok).encode(bare.data[0], 0)


def test_a_slots_max_length_bounds_its_values_and_max_steps_bounds_the_longest_answer(tok):
    """A free-text target's ``max_length`` (not ``max_new_tokens``) caps its values: after that many
    tokens only its closing EOS may come; ``max_steps`` (the decoder cache's length) holds the
    longest answer, each closed value's EOS and the literal text included."""
    rows = [{"q": "hi", "a": "one two", "b": "three"}]
    word = tok.encode("hello")[0]
    grammar = TargetGrammar(Task("t", "[TEXT:q] -> [TEXT:a,max_length=3] and [TEXT:b] end", rows).plan(tok), tok,
                            max_new_tokens=5)
    assert grammar.limits[:3:2] == [3, 5]
    state = _walk(grammar, [word] * 3)
    assert [(o.action, o.tokens) for o in grammar.options(state)] == [("close", (tok.eos_id,))]
    state = _walk(grammar, [word] * 2)
    assert [o.action for o in grammar.options(state)] == ["content", "close"]
    literals = len(tok.encode_literal(" and")) + len(tok.encode_literal(" end"))
    longest = _longest(grammar, word)
    assert longest == 3 + 1 + 5 + 1 + literals  # a, its EOS, b, its EOS, the literal text (which ends it)
    assert grammar.max_steps() >= longest
    group = TargetGrammar(Task("g", "[TEXT:q] -> ( [TEXT:a] ; )*", [{"q": "hi", "a": ["x", "y"]}]).plan(tok), tok,
                          max_new_tokens=4, max_items=3)
    assert group.max_steps() >= _longest(group, word) == 3 * (4 + 1 + len(tok.encode_literal(" ;"))) + 1


def test_free_text_takes_location_tokens_only_where_no_box_or_codes_are_decoded(tok):
    """Location tokens written out in text are text a text-only task may train on; only a template
    with boxes or image codes keeps them from free text (they would be read as those)."""
    rows = [{"q": "hi", "a": "one"}]
    grammar = TargetGrammar(Task("t", "[TEXT:q] -> [TEXT:a]", rows).plan(tok), tok)
    claimed = set(grammar.claimed(grammar.options(grammar.start())))
    assert claimed == {tok.eos_id, tok.pad_id, tok.bos_id} | ({tok.unk_id} - {None})
    state = _walk(grammar, [tok.bin_id(3), tok.bin_id(7)])
    assert [t for _, _, t in state.pieces] == [tok.bin_id(3), tok.bin_id(7)]
    boxes = TargetGrammar(load_preset("visual_grounding", "train", limit=1).plan(tok), tok)
    assert set(boxes.bins) <= boxes.reserved


@pytest.mark.parametrize("template, scored", [("[TEXT:q] -> ( [TEXT:a,closed_set] )*", True),
                                              ("[TEXT:q] -> ( [TEXT:a,closed_set] ; )*", False)])
def test_the_answers_eos_is_scored_as_training_scores_it(tok, template, scored):
    """The end option is scored where training puts a loss on the answer's EOS: after a target,
    not after literal text (which training never scores), and never on the masked pass."""
    rows = [{"q": "hi", "a": ["yes", "no"]}, {"q": "ho", "a": ["no"]}]
    plan = Task("t", template, rows).plan(tok)
    assert plan.encode(rows[1], 0, training=False).decoder[-1].loss is scored  # training's EOS chunk
    for score_end, expected in ((True, scored), (False, False)):
        grammar = TargetGrammar(plan, tok, score_end=score_end)
        state = _walk(grammar, tok.encode("no") + ([] if scored else tok.encode_literal(" ;")))
        ends = [o for o in grammar.options(state) if o.action == "end"]
        assert [o.scored for o in ends] == [expected], (template, score_end)


def test_trained_choices_after_an_always_empty_closed_set_are_the_next_slots_labels(tok):
    """Training limits the position after an empty label to what may come next (here the next closed
    set's first label tokens); beam search renormalises over ``trained_choices`` there."""
    rows = [{"q": "hi", "a": "", "b": "yes"}, {"q": "ho", "a": "", "b": "no"}]
    plan = Task("t", "[TEXT:q] -> [TEXT:a,closed_set] [CATEGORY:b,closed_set]", rows).plan(tok)
    trained = next(c for c in plan.encode(rows[0], 0, training=True).decoder if c.tokens).allowed[0]
    grammar = TargetGrammar(plan, tok)
    assert [o.tokens for o in grammar.options(grammar.start())] == [tuple(trained)]
    assert grammar.trained_choices(grammar.start()) == tuple(trained)


def test_an_empty_text_item_laid_out_as_its_boxs_bins_is_refused_before_a_box_after_the_group(tok):
    """``( [TEXT:t] [BOX:b] )* [BOX:z]``: text before a box has no closing EOS, so an empty later t
    is laid out as b's location bins, which decoding reads as z's (item lost, z wrong). It is
    refused like the other empty items, naming the column and item; items with text pass (a missed
    case of the eighteenth audit: the check took a box to begin with no token)."""
    def row(t):
        return {"q": "x", "t": t, "b": [[1, 2, 3, 4], [2, 3, 4, 5]], "z": [1, 1, 6, 6], "width": 9, "height": 9}

    plan = Task("side", "[TEXT:q] -> ( [TEXT:t] [BOX:b] )* [BOX:z]", [row(["a", "c"])]).plan(tok)
    with pytest.raises(TaskDataError, match=r"task 'side', column 't', row 0: item 2 of repetition group 0 begins "
                                            r"with an empty value of \[TEXT:t\], laid out as \[BOX:z\]'s first token, "
                                            r"which decoding would read as the group's end"):
        plan.encode(row(["a", ""]), 0)
    for fine in (["a", "c"], ["", "c"]):  # an empty *first* item is no item boundary
        assert plan.encode(row(fine), 0).decoder
