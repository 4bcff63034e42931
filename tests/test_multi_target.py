"""Answers with several target slots and repetition groups: the training layout, decoding every
slot and item (scripted, and checked against teacher-forced passes of a real model), the
detection metric, and evaluating detection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_gen.model.generate as generate_module
from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.grammar import TargetGrammar
from moe_gen.objectives import GenerativeObjective
from moe_gen.tasks import Task, TaskDataError, Tokenizer, collate, load_preset
from moe_gen.tasks.metrics import METRICS, detection_counts, detection_f1
from moe_gen.tasks.modalities.base import modality_tag_names
from moe_gen.tasks.modalities.box import box_iou
from moe_gen.tasks.plan import TARGET, Chunk
from moe_gen.trainer.evaluation import evaluate

CLOSED_DETECTION = "[IMAGE:image] what are the digits and where? -> ( [BOX:boxes] [TEXT:labels,closed_set] )*"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def detection():
    return load_preset("digit_detection", "train", limit=4)


def build(tasks, tok) -> GeneralistModel:
    torch.manual_seed(0)
    config = flavour("debug", moe={"router": RouterConfig(strategy="attribute")})
    return GeneralistModel.build(config, tasks, tok).eval()


# ---- the training layout ---------------------------------------------------------------------


def test_repetition_groups_interleave_and_free_text_before_text_is_closed(tok, detection):
    row = detection.data[0]
    sample = detection.plan(tok).encode(row, 0, training=False)
    n = len(row["boxes"])
    assert [c.modality for c in sample.decoder] == ["BOX", "TEXT"] * n + ["TEXT"]  # box, label, ..., EOS
    assert [tok.decode(c.tokens) for c in sample.decoder[1:-1:2]] == row["labels"]
    assert sample.decoder[-1].tokens == [tok.eos_id]
    # text before text (or literal text) ends with its own EOS; text before a box or at the end does not
    two = Task("two", "[TEXT:q] -> [TEXT:a] and [TEXT:b]", [{"q": "hi", "a": "one two", "b": "three"}])
    assert two.plan(tok).closing_eos() == {0}  # decoder slot 0, a
    chunks = two.encode(0, tok, training=False).decoder
    assert [c.tokens for c in chunks] == [tok.encode("one two"), [tok.eos_id], tok.encode("and"),
                                          tok.encode("three"), [tok.eos_id]]
    assert [c.loss for c in chunks] == [True, True, False, True, True]
    assert detection.plan(tok).closing_eos() == frozenset()


def test_only_slots_that_leave_the_next_item_open_lend_their_tags(tok, detection):
    """``open_ends``: free text without its own EOS, closed sets, a group's last slot. After a text
    value closed by its own EOS the next item is settled, so it keeps its own tags (``Chunk.lead``
    None); after a category that may go on, the next value leads with the category's tags."""
    closed = Task("two", "[TEXT:q] -> [TEXT:a] and [TEXT:b]", [{"q": "hi", "a": "one two", "b": "three"}])
    assert closed.plan(tok).open_ends() == {2}  # a (0) ends with its EOS; b (2, after the literal) runs on
    assert [c.lead for c in closed.encode(0, tok, training=False).decoder] == [None] * 5
    category = Task("k", "[TEXT:q] -> [CATEGORY:k] [TEXT:a]", [{"q": "hi", "k": "red", "a": "sky"}])
    assert category.plan(tok).open_ends() == {0, 1}
    chunks = category.encode(0, tok, training=False).decoder  # k, a, EOS
    assert [c.lead for c in chunks] == [None, ("CATEGORY", TARGET), None]  # (the EOS: a's own tags)
    assert detection.plan(tok).open_ends() == {1}  # ( [BOX] [TEXT,closed_set] )*: the labels, the group's last


# ---- decoding, scripted ----------------------------------------------------------------------


class ScriptedDecoder:
    """Stands in for the cached decoder: every row's log-probabilities put (almost) all the mass on
    the next token of its script, whatever the tags; the tags of every fed position are recorded."""

    scripts: list[list[int]] = []
    last: "ScriptedDecoder"

    def __init__(self, model, samples, modality, enc_batch, memory, limit, placeholder=None,
                 pass_name: str = "generative") -> None:
        self.vocab = model.tokenizer.vocab_size
        self.at = [0] * len(samples)
        first = (modality_tag_names().index(modality), TARGET)  # the placeholder's tags
        self.tags: list[list[tuple[int, int]]] = [[first] for _ in samples]
        ScriptedDecoder.last = self

    def _log_probs(self) -> torch.Tensor:
        logp = torch.full((len(self.at), self.vocab), -50.0)
        for row, at in enumerate(self.at):
            if at < len(self.scripts[row]):
                logp[row, self.scripts[row][at]] = 0.0
        return logp

    def prefill(self):
        return None

    def log_probs(self, hidden):
        return self._log_probs()

    def reorder(self, parents) -> None:
        assert parents == list(range(len(parents)))  # greedy keeps its rows

    def step(self, tokens, tags, active):
        for row, (token, tag, on) in enumerate(zip(tokens, tags, active)):
            if on:
                assert token == self.scripts[row][self.at[row]]
                self.at[row] += 1
                self.tags[row].append(tag)
        return self._log_probs()


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(generate_module, "CachedDecoder", ScriptedDecoder)
    return ScriptedDecoder


def _training_tokens(task, tok, rows):
    """Every decoder token of each row's training sequence (literal text and EOS included)."""
    plan = task.plan(tok)
    return [[t for c in plan.encode(row, i, training=False).decoder for t in c.tokens] for i, row in enumerate(rows)]


def _training_tags(task, tok, row, index, model):
    """``(modality, role)`` of every decoder position of the row's training sequence."""
    batch = collate([task.plan(tok).encode(row, index, training=False)], tok, model.task_ids)
    valid = ~batch.decoder.padding_mask[0]
    tags = batch.decoder.tags
    return list(zip(tags.modality[0][valid].tolist(), tags.role[0][valid].tolist()))


def test_scripted_detection_decodes_every_box_and_label_in_order(tok, detection, scripted):
    model = build([detection], tok)
    rows = detection.data[:3]
    scripted.scripts = _training_tokens(detection, tok, rows)
    assert sorted(len(r["boxes"]) for r in rows) != [1, 1, 1]  # several items somewhere
    predictions = model.infer(detection, rows)
    for row, script, prediction in zip(rows, scripted.scripts, predictions):
        assert prediction.tokens == script[:-1]  # everything but the final EOS
        assert prediction.targets["labels"] == row["labels"]
        assert len(prediction.targets["boxes"]) == len(row["boxes"])
        for box, expected in zip(prediction.targets["boxes"], row["boxes"]):
            assert box == pytest.approx(expected, abs=0.1)  # 1000 bins over 64 pixels
        assert [item["labels"] for item in prediction.items] == row["labels"]
        assert prediction.items[0]["boxes"] == prediction.targets["boxes"][0]
        assert prediction.text is None and prediction.box is None  # single-target fields stay empty
    # every position is tagged as in training; after a label (more label, another box or the end)
    # that is the label's TEXT, not the BOX that may follow
    names = modality_tag_names()
    text, box = (names.index("TEXT"), TARGET), (names.index("BOX"), TARGET)
    for i, row in enumerate(rows):
        expected = _training_tags(detection, tok, row, i, model)
        assert scripted.last.tags[i] == expected  # one position per decoded token, EOS included
        labels = len(tok.encode(row["labels"][0]))
        assert expected[:4 + labels + 1] == [box] * 4 + [text] * labels + [text]  # box 2 leads as TEXT


def test_scripted_group_with_literal_text(tok, detection, scripted):
    task = Task("digit_detection", "[IMAGE:image] where? -> ( [BOX:boxes] is [TEXT:labels] , )*", detection.data)
    model = build([task], tok)
    rows = [r for r in detection.data if len(r["boxes"]) >= 2][:1]
    scripted.scripts = _training_tokens(task, tok, rows)
    assert scripted.scripts[0].count(tok.encode(",")[0]) == len(rows[0]["boxes"])
    prediction = model.infer(task, rows)[0]
    assert prediction.targets["labels"] == rows[0]["labels"]
    assert prediction.tokens == scripted.scripts[0][:-1]


def test_scripted_detection_stops_at_max_items(tok, detection, scripted):
    model = build([detection], tok)
    row = next(r for r in detection.data if len(r["boxes"]) >= 2)
    script = _training_tokens(detection, tok, [row])[0]
    first_item = 4 + len(tok.encode(row["labels"][0]))
    scripted.scripts = [script[:first_item] + [tok.eos_id]]
    prediction = model.infer(detection, [row], max_items=1)[0]
    assert prediction.targets["labels"] == row["labels"][:1] and len(prediction.items) == 1


@pytest.mark.parametrize("end, items", [(0.3, 2), (0.6, 1)])
def test_another_item_competes_with_its_total_probability(tok, detection, scripted, monkeypatch, end, items):
    """Where box 2 may start, EOS gets ``end`` and the rest is spread over 100 location tokens: each
    bin is far less likely than EOS, but another box as a whole is more likely when end < 0.5."""
    model = build([detection], tok)
    row = next(r for r in detection.data if len(r["boxes"]) == 2)
    script = _training_tokens(detection, tok, [row])[0]
    second = 4 + len(tok.encode(row["labels"][0]))  # where box 2 starts
    scripted.scripts = [script]
    plain = ScriptedDecoder._log_probs

    def spread(self):
        logp = plain(self)
        if self.at[0] == second:
            logp[0] = float("-inf")
            logp[0, tok.eos_id] = torch.tensor(end).log()
            bins = script[second] + torch.arange(-50, 50)
            logp[0, bins] = torch.tensor((1 - end) / 101).log()
            logp[0, script[second]] = torch.tensor(2 * (1 - end) / 101).log()  # the scripted bin is the best
        return logp

    monkeypatch.setattr(ScriptedDecoder, "_log_probs", spread)
    prediction = model.infer(detection, [row])[0]
    assert len(prediction.items) == items
    assert prediction.targets["labels"] == row["labels"][:items]


@pytest.mark.parametrize("between", ["", " and"])
def test_scripted_two_text_targets_decode_both(tok, scripted, between):
    task = Task("two", f"[TEXT:q] -> [TEXT:a]{between} [TEXT:b]", [{"q": "hi", "a": "one two", "b": "three"}])
    model = build([task], tok)
    scripted.scripts = _training_tokens(task, tok, task.data)
    prediction = model.infer(task, task.data)[0]
    assert prediction.targets == {"a": "one two", "b": "three"}
    assert prediction.groups == [] and prediction.text is None


EMPTY_ROWS = [{"q": "hi", "a": "one two", "b": "", "c": "x"}, {"q": "hi", "a": "", "b": "three", "c": ""},
              {"q": "ho", "a": "", "b": "", "c": ""}]


@pytest.mark.parametrize("instruction", ["[TEXT:q] -> [TEXT:a] and [TEXT:b]", "[TEXT:q] -> [TEXT:a] [TEXT:b] [TEXT:c]",
                                         "[TEXT:q] -> [TEXT:a] [TEXT:b] [BOX:c]"])
def test_an_empty_text_target_after_the_first_trains_its_end_and_decodes_as_trained(tok, scripted, instruction):
    """An empty free-text value trains the end of its value right where it begins (its EOS, or the
    box after it), the first target's as any other's; decoding let only the first one be empty
    (after a slot the next free text had to begin with a token), so a model could never write
    the b = "" it was trained on, and inference went off the script."""
    rows = EMPTY_ROWS if "BOX" not in instruction else [dict(r, c=[1, 2, 5, 6], width=10, height=10)
                                                        for r in EMPTY_ROWS]
    task = Task("two", instruction, rows)
    model = build([task], tok)
    batch = collate([task.plan(tok).encode(r, i, training=False) for i, r in enumerate(rows)], tok, model.task_ids)
    for b, script in enumerate(_training_tokens(task, tok, rows)):
        valid = ~batch.decoder.padding_mask[b]
        fed, labels = batch.decoder.tokens[b][valid].tolist(), batch.labels[b][valid].tolist()
        assert fed[1:] == script[:-1]  # one position per item: the empty values take none
        literal = tok.encode_literal(" and")
        assert [t for t in labels if t != -100] == [t for t in script if t not in literal]  # every EOS scored
    model.train()
    loss = GenerativeObjective(model)(batch)["loss"]
    assert torch.isfinite(loss)
    model.eval()
    for i, row in enumerate(rows):
        scripted.scripts = _training_tokens(task, tok, [row])
        prediction = model.infer(task, [row])[0]
        assert prediction.tokens == scripted.scripts[0][:-1]
        assert {k: v for k, v in prediction.targets.items() if k != "c" or "BOX" not in instruction} == {
            k: row[k] for k in prediction.targets if k != "c" or "BOX" not in instruction}
        tags, trained = scripted.last.tags[0], _training_tags(task, tok, row, i, model)
        assert tags == trained[:len(tags)] and len(trained) - len(tags) == ("BOX" in instruction)  # (no EOS step)


_BOXES = dict(b=[[1, 2, 5, 6], [2, 2, 4, 4]], width=10, height=10)


@pytest.mark.parametrize("instruction, rows", [
    ("[TEXT:q] -> [CATEGORY:k] [TEXT:a]", [dict(q="x", k="red", a=""), dict(q="y", k="red", a="sky")]),
    ("[TEXT:q] -> ( [TEXT:t] [BOX:b] )*",
     [dict(q="x", t=["one", ""], **_BOXES), dict(q="y", t=["one", "two"], **_BOXES)]),
    ("[TEXT:q] -> [CATEGORY:k] [TEXT:a] [TEXT:b]",  # a's EOS alone decides it is empty, after the category
     [dict(q="x", k="red", a="", b="sky"), dict(q="y", k="red", a="sea", b="sky")]),
])
def test_an_empty_value_after_an_open_ended_slot_is_decided_under_the_tag_decoding_gives_it(
        tok, scripted, instruction, rows):
    """After a slot that leaves what comes next open (a category that may go on, a group's last
    slot), the position deciding whether a free-text value is empty is tagged like that slot, as
    decoding tags it; an empty value had lost the lead (its chunk has no position), so training
    tagged the deciding position by its outcome and a tag-routed model never saw the empty
    choice under the tag it decodes with."""
    task = Task("open", instruction, rows)
    model = build([task], tok).eval()
    for i, row in enumerate(rows):
        scripted.scripts = _training_tokens(task, tok, [row])
        prediction = model.infer(task, [row])[0]
        assert prediction.tokens == scripted.scripts[0][:-1]
        tags, trained = scripted.last.tags[0], _training_tags(task, tok, row, i, model)
        assert tags == trained[:len(tags)] and len(trained) - len(tags) <= 1


def test_a_lone_eos_after_a_group_is_the_empty_label_after_it_and_an_empty_item_there_is_refused(tok, scripted):
    """After ``( [TEXT:t] )*`` a category holding the empty label "" writes no token, so k = "" and
    the answer's end are a lone EOS, as is another item of t left empty (its closing EOS). Decoding
    reads it one way, as k's empty label and the end: greedy decoding of each row's training tokens
    gives the row back, under the tags training gives them, and a row with an empty later item is
    refused, naming task, column and row. (Before, decoding read it as another empty item: a row
    with k = "" went on past its answer, and the empty item was trained.)"""
    rows = [dict(q="x", t=["a"], k=""), dict(q="y", t=["", "b"], k=""), dict(q="z", t=["a", "b"], k="yes")]
    task = Task("lists", "[TEXT:q] -> ( [TEXT:t] )* [CATEGORY:k]", rows)
    model = build([task], tok)
    for i, row in enumerate(rows):
        scripted.scripts = _training_tokens(task, tok, [row])
        prediction = model.infer(task, [row])[0]
        assert prediction.tokens == scripted.scripts[0][:-1]
        assert prediction.targets == {"t": row["t"], "k": row["k"]}
        tags, trained = scripted.last.tags[0], _training_tags(task, tok, row, i, model)
        assert tags == trained[:len(tags)] and len(trained) - len(tags) <= 1
    for k in ("", "yes"):
        with pytest.raises(TaskDataError, match=r"task 'lists', column 't', row 3: item 2 of repetition group 0 "
                                                r"begins with an empty value of \[TEXT:t\], laid out as a lone EOS, "
                                                r"the token that ends the answer after the group \(past the empty "
                                                r"label \"\" of \[CATEGORY:k\]\)"):
            task.plan(tok).encode(dict(q="w", t=["a", ""], k=k), 3)


@pytest.mark.parametrize("instruction, row", [
    ("[TEXT:q] -> [TEXT:a] [TEXT:b] [BOX:c,disable_auto_boseos]", dict(q="x", a="one", b="two")),
    ("[TEXT:q] -> [TEXT:a] and [BOX:c,disable_auto_boseos]", dict(q="x", a="one")),
    ("[TEXT:q] -> ( [TEXT:t] )* [BOX:c,disable_auto_boseos]", dict(q="x", t=["one", "two", ""])),
])
def test_disable_auto_boseos_drops_the_answers_eos_and_keeps_the_eos_closing_each_text(tok, scripted, instruction,
                                                                                         row):
    """``disable_auto_boseos`` drops the answer's end marker only: a free-text value that more text
    follows keeps the EOS that closes it, which decoding waits for, so greedy decoding of the
    training tokens gives the row back, under the tags training gives them. (Before, training dropped
    those EOS too: "one" and "two" ran together, and decoding read them, the literal and the box's
    location tokens as one text value that never ended.)"""
    row = dict(row, c=[1, 2, 5, 6], width=10, height=10)
    task = Task("boseos", instruction, [row])
    model = build([task], tok)
    scripted.scripts = _training_tokens(task, tok, [row])
    assert scripted.scripts[0].count(tok.eos_id) == len(row.get("t", [None]))  # one per text value, none at the end
    prediction = model.infer(task, [row])[0]
    assert prediction.tokens == scripted.scripts[0]
    assert {k: v for k, v in prediction.targets.items() if k != "c"} == {k: row[k] for k in ("a", "b", "t") if k in row}
    assert prediction.targets["c"] == pytest.approx(row["c"], abs=0.01)
    tags, trained = scripted.last.tags[0], _training_tags(task, tok, row, 0, model)
    assert tags == trained


def test_min_length_keeps_a_later_text_target_from_being_empty(tok):
    from moe_gen.model.generate import TextRules

    task = Task("two", "[TEXT:q] -> [TEXT:a] and [TEXT:b]", EMPTY_ROWS[:1])
    grammar = TargetGrammar(task.plan(tok), tok)
    state = grammar.start()
    for token in tok.encode("one two") + [tok.eos_id] + tok.encode_literal(" and"):
        options = grammar.options(state)
        option = next((o for o in options if o.tokens is not None and token in o.tokens), options[0])
        state = grammar.advance(state, option, token)
    options = grammar.options(state)  # b's first token, or the answer's EOS: b empty
    assert [(o.action, o.tokens, o.empty) for o in options] == [("start", None, None), ("end", (tok.eos_id,), 2)]
    end = grammar.advance(state, options[1], tok.eos_id)
    assert end.done and grammar.parse(end)[0] == {"a": "one two", "b": ""}
    assert TextRules(min_length=1).allowed(grammar, state, options) == options[:1]


def test_grammar_walk_parses_structure_exactly(tok):
    """The state machine alone, driven by a fixed token sequence."""
    rows = [{"image": torch.zeros(16, 16, 3, dtype=torch.uint8).numpy(), "boxes": [[0, 0, 8, 8], [8, 8, 16, 16]],
             "labels": ["one", "two"]}]
    task = Task("det", CLOSED_DETECTION, rows)
    plan = task.plan(tok)
    grammar = TargetGrammar(plan, tok, max_items=4)
    bins = [tok.bin_id(k) for k in (0, 0, 499, 499, 500, 500, 999, 999)]
    sequence = bins[:4] + tok.encode("one") + bins[4:] + tok.encode("two") + [tok.eos_id]
    state = grammar.start()
    for token in sequence:
        options = [o for o in grammar.options(state) if o.tokens is not None and token in o.tokens]
        assert len(options) == 1, token
        state = grammar.advance(state, options[0], token)
    assert state.done and grammar.options(state) == []
    targets, groups = grammar.parse(state, (16, 16))
    assert targets["labels"] == ["one", "two"]
    assert groups[0][1]["labels"] == "two" and len(groups[0][1]["boxes"]) == 4
    assert groups[0][0]["boxes"][0] < 0.1 and groups[0][1]["boxes"][2] > 15.9


def test_grammar_rejects_what_it_cannot_decode(tok):
    ambiguous = Task("amb", "[TEXT:q] -> ( [TEXT:a] )* [TEXT:b]", [{"q": "x", "a": ["y"], "b": "z"}])
    with pytest.raises(ValueError, match="two free-text slots may start"):
        TargetGrammar(ambiguous.plan(Tokenizer.default()), Tokenizer.default())


# ---- decoding with a model: every choice is the training likelihood --------------------------


def _teacher_forced(model, task, index, chunks):
    """Log-probabilities ``[L, V]`` of a teacher-forced pass over the inference prefix plus ``chunks``,
    with the batch's labels."""
    tok = model.tokenizer
    sample = task.plan(tok).encode(task.data[index], index, training=False, inference=True, template=0)
    batch = collate([dataclasses.replace(sample, decoder=sample.decoder + chunks)], tok, model.task_ids)
    with torch.no_grad():
        return model(batch).logits.float().log_softmax(-1)[0], batch.labels[0]


@pytest.mark.parametrize("beams", [1, 2])
def test_detection_scores_are_teacher_forced_likelihoods(tok, beams):
    """Decoded boxes and labels, laid out and tagged as in training (box, label, box, ..., EOS; the
    position after a label tagged like the label), have exactly the decoder's score as their
    log-likelihood; greedy location tokens are the argmax over the bins there."""
    rows = load_preset("digit_detection", "train", limit=3).data
    task = Task("digit_detection", CLOSED_DETECTION, rows)
    model = build([task], tok)
    predictions = model.infer(task, rows, max_items=2, beams=beams)
    bins = [tok.bin_id(k) for k in range(tok.num_bins)]
    for i, prediction in enumerate(predictions):
        tokens, chunks = prediction.tokens, []
        while tokens:
            label = next((j for j in range(4, len(tokens)) if tok.bin_index(tokens[j]) is not None), len(tokens))
            lead = ("TEXT", TARGET) if chunks else None  # after a label, a box leads as the label
            chunks += [Chunk("BOX", TARGET, True, tokens=tokens[:4], lead=lead),
                       Chunk("TEXT", TARGET, True, tokens=tokens[4:label])]
            tokens = tokens[label:]
        assert 1 <= len(chunks) // 2 <= 2 and all(it["labels"] in {r for row in rows for r in row["labels"]}
                                                  for it in prediction.items)
        chunks.append(Chunk("TEXT", TARGET, True, tokens=[tok.eos_id]))
        logp, labels = _teacher_forced(model, task, i, chunks)
        scored = (labels != -100).nonzero().squeeze(1)
        assert prediction.score == pytest.approx(float(logp[scored, labels[scored]].sum()), abs=1e-3)
        if beams == 1:
            for position in scored.tolist():
                if tok.bin_index(int(labels[position])) is not None:
                    assert int(labels[position]) == bins[int(logp[position, bins].argmax())]


def test_two_text_targets_score_as_in_training(tok):
    task = Task("two", "[TEXT:q] -> [TEXT:a] [TEXT:b]", [{"q": "hi there", "a": "one two", "b": "three"}])
    model = build([task], tok)
    prediction = model.infer(task, task.data, max_new_tokens=3)[0]
    assert set(prediction.targets) == {"a", "b"}
    cut = prediction.tokens.index(tok.eos_id)  # the EOS that ends a
    a, b = prediction.tokens[:cut], prediction.tokens[cut + 1:]
    assert tok.decode(a) == prediction.targets["a"] and tok.decode(b) == prediction.targets["b"]
    ends = [tok.eos_id] if len(b) < 3 else []  # text cut at max_new_tokens has no EOS
    chunks = [Chunk("TEXT", TARGET, True, tokens=part) for part in (a, [tok.eos_id], b + ends) if part]
    logp, labels = _teacher_forced(model, task, 0, chunks)
    scored = (labels != -100).nonzero().squeeze(1)
    assert prediction.score == pytest.approx(float(logp[scored, labels[scored]].sum()), abs=1e-3)


# ---- the detection metric ----------------------------------------------------------------------

A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]


def test_detection_f1_hand_computed():
    assert "detection_f1" in METRICS.list()
    truth = [[(A, "one"), (B, "two")], [(C, "three")]]
    assert detection_f1(truth, truth) == 1.0
    # one missed: TP 2, FN 1 -> 2*2 / (2*2 + 0 + 1)
    assert detection_f1([[(A, "one"), (B, "two")], []], truth) == pytest.approx(4 / 5)
    # one wrong class: TP 2, FP 1, FN 1 -> 4 / 6
    assert detection_f1([[(A, "one"), (B, "seven")], [(C, "three")]], truth) == pytest.approx(4 / 6)
    assert detection_counts([[(A, "one"), (B, "seven")], [(C, "three")]], truth) == (2, 1, 1)
    # extra predictions are false positives, unmatched references misses (not the other way round)
    assert detection_counts([[(A, "one"), (B, "one"), (C, "one")]], [[(A, "one")]]) == (1, 2, 0)
    assert detection_counts([[(A, "one")]], [[(A, "one"), (B, "two"), (C, "three")]]) == (1, 0, 2)
    # duplicates: the second copy is a false positive: TP 3, FP 2 -> 6 / 8
    doubled = [[(A, "one"), (A, "one"), (B, "two")], [(C, "three"), (C, "three")]]
    assert detection_f1(doubled, truth) == pytest.approx(6 / 8)
    # IoU below 0.5 is a miss and a false positive: [5, 0, 15, 10] vs A: 50 / 150
    shifted = [5, 0, 15, 10]
    assert box_iou(shifted, A) == pytest.approx(1 / 3)
    assert detection_f1([[(shifted, "one")]], [[(A, "one")]]) == 0.0
    # IoU 0.6 is a hit: [0, 0, 10, 6] vs A: 60 / 100
    assert detection_f1([[([0, 0, 10, 6], "one")]], [[(A, "one")]]) == 1.0
    # a box cut short (None) matches nothing; nothing expected and nothing predicted is perfect
    assert detection_f1([[(None, "one")]], [[(A, "one")]]) == 0.0
    assert detection_f1([[]], [[]]) == 1.0
    assert detection_f1([[(A, None)]], [[(A, "one")]]) == 1.0  # no label: class-agnostic


def test_detection_matches_as_many_pairs_as_possible_then_the_larger_iou():
    # Pairing by the largest total IoU would take P1-R2 (0.89) and P2-R1 (0.875) and leave P3 (which
    # only R2 matches) out: 2 hits. The most pairs: P3-R2 (0.5), P1-R1 (0.55), P2-R3 (0.57).
    P = [[3, 0, 12, 10], [2, 0, 9, 10], [6, 0, 16, 10]]
    R = [[1, 0, 9, 10], [4, 0, 12, 10], [3, 0, 7, 10]]
    assert box_iou(P[0], R[1]) + box_iou(P[1], R[0]) > box_iou(P[2], R[1]) + box_iou(P[0], R[0]) + box_iou(P[1], R[2])
    assert detection_counts([[(p, "x") for p in P]], [[(r, "x") for r in R]]) == (3, 0, 0)


def test_detection_hits_at_the_threshold_and_a_reference_without_label_matches_any():
    assert detection_f1([[([0, 0, 10, 5], "one")]], [[(A, "one")]]) == 1.0  # IoU 50 / 100, exactly 0.5
    assert detection_f1([[([0, 0, 10, 4], "one")]], [[(A, "one")]]) == 0.0  # 0.4
    assert detection_f1([[(A, "one")]], [[(A, None)]]) == 1.0
    assert detection_f1([[(A, b"one")]], [[(A, "one")]]) == 1.0


def test_detection_matching_is_one_to_one_and_optimal():
    # P overlaps R1 (IoU 80/120) and R2 (70/130); Q overlaps R1 (60/100) and R2 (30/130). Greedy by IoU
    # pairs P with R1 and leaves Q and R2 unmatched (F1 1/2); the assignment pairs P-R2 and Q-R1 (F1 1).
    r1, r2 = [0, 0, 10, 10], [5, 0, 15, 10]
    p, q = [2, 0, 12, 10], [0, 0, 10, 6]
    assert box_iou(p, r1) == pytest.approx(80 / 120) and box_iou(p, r2) == pytest.approx(70 / 130)
    assert box_iou(q, r1) == pytest.approx(0.6) and box_iou(q, r2) == pytest.approx(30 / 130)
    assert detection_f1([[(p, "a"), (q, "a")]], [[(r1, "a"), (r2, "a")]]) == 1.0


# ---- evaluation --------------------------------------------------------------------------------


def test_evaluate_digit_detection_runs(tok, monkeypatch):
    held_out = load_preset("digit_detection", "test", limit=4)
    model = build([held_out], tok)
    scores = evaluate(model, [held_out])["digit_detection"]
    assert set(scores) == {"detection_f1"} and 0.0 <= scores["detection_f1"] <= 1.0
    # the score reads the predicted items: each row's own items score 1, and one label wrong of the
    # n items scores the F1 of n - 1 matches among n predictions and n references
    from moe_gen.model.generate import Prediction

    def answers(wrong: int):
        def infer(task, rows, **kwargs):
            out = []
            for i, row in enumerate(rows):
                labels = list(row["labels"])
                if i == 0:
                    labels[:wrong] = ["nine" if label != "nine" else "eight" for label in labels[:wrong]]
                out.append(Prediction(targets={}, groups=[[{"boxes": b, "labels": label}
                                                           for b, label in zip(row["boxes"], labels)]]))
            return out
        return infer

    n = sum(len(row["labels"]) for row in held_out.data)
    monkeypatch.setattr(model, "infer", answers(0))
    assert evaluate(model, [held_out])["digit_detection"] == {"detection_f1": 1.0}
    monkeypatch.setattr(model, "infer", answers(1))
    assert evaluate(model, [held_out])["digit_detection"]["detection_f1"] == pytest.approx((n - 1) / n)


@pytest.mark.parametrize("answer", ["( [BOX:boxes] [TEXT:labels,closed_set] )*",
                                    "( [TEXT:labels,closed_set] [BOX:boxes] )*"])
def test_where_a_list_of_labels_may_go_on_or_end_training_weighs_both(detection, tok, answer):
    """Where decoding chooses between another item and the end, training's softmax must hold both:
    a closed set's restriction to its labels left the EOS that ends a list with no loss (a list
    ending in a label: decoding never stopped) or out of the positions that go on (a list starting
    with one: it stopped early). Now the EOS logit gets a gradient at every such position."""
    from moe_gen.objectives import GenerativeObjective

    rows = detection.data[:3]
    task = Task("det", f"[IMAGE:image] where? -> {answer}", rows)
    model = build([task], tok)
    plan = model.plan(task)
    sample = plan.encode(rows[0], 0, training=False)
    batch = collate([sample], tok, model.task_ids)
    out = model(batch)
    logits = out.logits.detach().requires_grad_(True)
    GenerativeObjective(model).loss(batch, dataclasses.replace(out, logits=logits))["token_loss"].backward()
    grammar = TargetGrammar(plan, tok)
    state = grammar.start()
    choices, restricted = 0, set(batch.allowed_index.tolist())
    for position, token in enumerate(t for chunk in sample.decoder for t in chunk.tokens):
        options = grammar.options(state)
        if {"end", "start"} <= {o.action for o in options}:
            choices += 1
            assert position not in restricted and logits.grad[0, position, tok.eos_id] != 0, position
        option = next(o for o in options if o.tokens is not None and token in o.tokens)
        state = grammar.advance(state, option, token)
    assert choices == len(rows[0]["boxes"])  # after every item
    first_label = next(p for p, (chunk, j) in enumerate((c, j) for c in sample.decoder for j in range(len(c)))
                       if chunk.column == "labels")
    assert first_label in restricted  # the first item's label: labels are all that may come there


def test_a_given_decoder_slot_before_the_target_is_a_prefix_at_inference(tok):
    """A ``no_loss`` decoder slot before the first target is given by the row and forced (it trains
    as context); inference raised AttributeError on it before 2026-12-05."""
    rows = [{"q": "hi", "p": "the prompt", "a": "one two"}, {"q": "hello there", "p": "x", "a": "three"}]
    task = Task("given", "[TEXT:q] -> [TEXT:p,no_loss] : [TEXT:a]", rows)
    model = build([task], tok)
    plan = model.plan(task)
    prefix = plan.encode(rows[0], 0, training=False, inference=True).decoder
    assert [c.column for c in prefix][0] == "p" and not any(c.loss for c in prefix)
    answers = model.infer(task, rows, max_new_tokens=3)
    assert all(set(a.targets) == {"a"} and 1 <= len(a.tokens) <= 4 for a in answers)


def test_several_targets_with_numbers_in_their_rows_score_the_text_the_model_writes(tok, monkeypatch):
    """A text target's value trains as ``str(value)``; a perfect answer to a row holding numbers
    scored 0 before 2026-12-05 (the dict of strings was compared with the dict of ints)."""
    from moe_gen.model.generate import Prediction
    from moe_gen.trainer.evaluation import evaluate_task

    rows = [{"q": "two plus one and four", "sum": 3, "other": 4}, {"q": "one plus one and five", "sum": 2, "other": 5}]
    task = Task("arith", "[TEXT:q] -> [TEXT:sum,closed_set] and [TEXT:other]", rows)
    model = build([task], tok)
    perfect = [Prediction(targets={"other": str(r["other"]), "sum": str(r["sum"])}) for r in rows]
    monkeypatch.setattr(model, "infer", lambda task, chunk, indices, **options: [perfect[i] for i in indices])
    assert evaluate_task(model, task) == {"exact_match": 1.0}
    perfect[1] = Prediction(targets={"sum": "2", "other": "6"})
    assert evaluate_task(model, task) == {"exact_match": 0.5}


def test_evaluation_lets_free_text_run_as_long_as_its_longest_reference(tok, monkeypatch):
    """Answers were cut at infer's default 32 tokens, under references of up to 53 (video captions)."""
    from moe_gen.model.generate import Prediction
    from moe_gen.trainer.evaluation import evaluate_task

    long = " ".join(f"word{i}" for i in range(40))
    rows = [{"q": "short", "a": "a b"}, {"q": "long", "a": long}]
    task = Task("echo", "[TEXT:q] -> [TEXT:a]", rows)
    model = build([task], tok)
    asked = []

    def infer(task, chunk, indices, max_new_tokens=32, **options):
        asked.append(max_new_tokens)
        return [Prediction(text=rows[i]["a"]) for i in indices]

    monkeypatch.setattr(model, "infer", infer)
    assert evaluate_task(model, task) == {"exact_match": 1.0}
    assert asked == [len(tok.encode(long)) + 8] and asked[0] > 32
    capped = Task("echo", "[TEXT:q] -> [TEXT:a,max_length=16]", rows)  # declared: the grammar's limit rules
    asked.clear()
    evaluate_task(model, capped)
    assert asked == [32]


def test_normalised_targets_train_their_label_set_and_are_scored_as_trained(tok, monkeypatch):
    """``uncased`` (``no_punctuation``, ``max_length``) change the text a target trains on: the label
    trie held the raw labels (a NaN loss for "Cat" trained as "cat"), and references were compared
    raw (a perfect answer to "Hello, World!" scored 0)."""
    from moe_gen.model.generate import Prediction
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.trainer.evaluation import evaluate_task

    rows = [{"q": "a small pet that meows", "label": "Cat"}, {"q": "a pet that barks", "label": "Dog"}]
    pets = Task("pets", "[TEXT:q] -> [TEXT:label,closed_set,uncased]", rows)
    model = build([pets], tok)
    batch = collate([pets.encode(i, tok) for i in range(2)], tok, model.task_ids)
    assert torch.isfinite(GenerativeObjective(model)(batch)["loss"])
    assert {a.text for a in model.infer(pets, rows)} <= {"Cat", "Dog"}  # the labels themselves, as given
    greet = [{"q": "greet", "a": "Hello, World! Nice day."}, {"q": "bye", "a": "Good-bye, Mr. Smith."}]
    task = Task("greet", "[TEXT:q] -> [TEXT:a,uncased,no_punctuation]", greet)
    written = ["hello world nice day", "good bye mr smith"]  # what training taught
    monkeypatch.setattr(model, "infer", lambda task, chunk, indices, **options: [Prediction(text=written[i])
                                                                                  for i in indices])
    assert evaluate_task(model, task) == {"exact_match": 1.0}


def test_references_are_read_through_the_tokenizer_as_training_reads_them(tok, monkeypatch):
    """sentencepiece folds whitespace and applies NFKC before it tokenises, so a model trained on
    "Hello,  world" writes "Hello, world": its perfect answers scored 0 against the raw string."""
    from moe_gen.model.generate import Prediction
    from moe_gen.trainer.evaluation import evaluate_task

    rows = [{"q": "greet", "a": "Hello,  world"}, {"q": "fine", "a": "\ufb01ne\tday "}]
    task = Task("greet", "[TEXT:q] -> [TEXT:a]", rows)
    model = build([task], tok)
    taught = [tok.decode(next(c.tokens for c in task.encode(i, tok).decoder if c.column == "a")) for i in range(2)]
    assert taught == ["Hello, world", "fine day"]
    monkeypatch.setattr(model, "infer", lambda task, chunk, indices, **options: [Prediction(text=taught[i])
                                                                                  for i in indices])
    assert evaluate_task(model, task) == {"exact_match": 1.0}


def _advance(grammar: TargetGrammar, state, token: int):
    options = [o for o in grammar.options(state) if o.tokens is not None and token in o.tokens]
    options = options or [o for o in grammar.options(state) if o.tokens is None]
    return grammar.advance(state, options[0], token)


@pytest.mark.parametrize("template, rows", [
    ("[TEXT:q] -> [TEXT:label,closed_set]", [{"q": "a", "label": "new"}, {"q": "b", "label": "new york"},
                                              {"q": "c", "label": "old"}]),
    # (such a closed set right before free text, which could begin with "york", is refused:
    # test_text_audit_fixes)
    ("[TEXT:q] -> ( [TEXT:labels,closed_set] )*", [{"q": "a", "labels": ["new", "old"]},
                                                   {"q": "b", "labels": ["new york"]}]),
    # after "new" the next closed set's first token competes with "york": the whole vocabulary
    ("[TEXT:q] -> [TEXT:c,closed_set] [TEXT:d,closed_set]", [{"q": "a", "c": "new", "d": "red"},
                                                              {"q": "b", "c": "new york", "d": "blue"},
                                                              {"q": "c", "c": "boston", "d": "red"}]),
    # the empty label "" of a closed set after another slot: no token, then what follows
    ("[TEXT:q] -> [TEXT:a] [TEXT:b,closed_set]", [{"q": "a", "a": "red", "b": ""}, {"q": "b", "a": "x", "b": "yes"}]),
    ("[TEXT:q] -> [TEXT:p] [TEXT:c,closed_set] [TEXT:d,closed_set]", [
        {"q": "a", "p": "x", "c": "", "d": ""}, {"q": "b", "p": "y", "c": "new", "d": ""},
        {"q": "c", "p": "z", "c": "", "d": "red"}]),
    ("[TEXT:q] -> ( [BOX:boxes] [TEXT:labels,closed_set] )*", [
        {"q": "a", "boxes": [[1, 2, 3, 4]] * 2, "labels": ["", "new"], "width": 9, "height": 9},
        {"q": "b", "boxes": [[1, 2, 3, 4]] * 2, "labels": ["new", ""], "width": 9, "height": 9}]),
])
def test_scores_read_every_position_over_the_tokens_training_reads_it_over(tok, template, rows):
    """Beam search and ranked candidates compare answers with log-probabilities over what training's
    softmax holds at each position (``TargetGrammar.trained_choices``), a label that is the start of
    another ("new", "new york") included: where it ends the answer, training reads {EOS, "york"}."""
    task = Task("places", template, rows)
    model = build([task], tok)
    assert len(tok.encode("new york")) > len(tok.encode("new"))
    grammar = TargetGrammar(task.plan(tok), tok, modality_ids=model.modality_ids)
    for i in range(len(rows)):
        batch = collate([task.encode(i, tok)], tok, model.task_ids)
        trained = {int(p): sorted(t for t in ts.tolist() if t >= 0)
                   for p, ts in zip(batch.allowed_index, batch.allowed_tokens)}
        state = grammar.start()
        for position in (batch.labels[0] != -100).nonzero().squeeze(1).tolist():
            choices = grammar.trained_choices(state)
            assert (sorted(choices) if choices is not None else None) == trained.get(position), (i, position)
            token = int(batch.labels[0, position])
            state = _advance(grammar, state, token)
        assert state.done


class _CostlyScript(ScriptedDecoder):
    """A script whose every token has log-probability -1 (the rest -50)."""

    def _log_probs(self) -> torch.Tensor:
        logp = super()._log_probs()
        return torch.where(logp == 0.0, torch.tensor(-1.0), logp)


def test_literal_text_between_targets_is_not_part_of_the_score(tok, monkeypatch):
    """``score`` sums the log-probabilities training scores: every target token and EOS, not the
    literal decoder text between the targets (forced, or chosen as the end of the value before it)."""
    monkeypatch.setattr(generate_module, "CachedDecoder", _CostlyScript)
    task = Task("two", "[TEXT:q] -> [TEXT:a] and then [TEXT:b]", [{"q": "hi", "a": "one two", "b": "three"}])
    model = build([task], tok)
    _CostlyScript.scripts = _training_tokens(task, tok, task.data)
    prediction = model.infer(task, task.data)[0]
    assert prediction.targets == {"a": "one two", "b": "three"}
    batch = collate([task.plan(tok).encode(task.data[0], 0, training=False)], tok, model.task_ids)
    scored = int((batch.labels[0] != -100).sum())
    literal = tok.encode_literal(" and then")
    assert scored == len(_CostlyScript.scripts[0]) - len(literal) and len(literal) >= 2
    assert prediction.score == pytest.approx(-1.0 * scored)
