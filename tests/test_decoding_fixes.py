"""Decoding fixes: empty free-text values read back as "", ``min_length`` holds back the next slot too,
a decoded box answers its corners ordered, and ranking / beam search refuse arguments they would misread."""

import pytest
import torch
from helpers import build

from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.generate import TextRules, beam_search, rank
from moe_gen.model.grammar import TargetGrammar
from moe_gen.tasks import Task, Tokenizer, load_preset


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
    assert len(rank(model, plan, samples, ["seven", "one"])[0].scores) == 2  # a list is ranked as before


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
