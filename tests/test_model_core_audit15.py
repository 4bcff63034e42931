"""The model core, fifteenth audit: masked-pass answers scored as that objective trains them, a
long answer failing only its own row, tasks of one name, and a refused backend switch."""

from __future__ import annotations

import pytest
import torch
from helpers import build

from moe_gen.config import RouterConfig
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_masked_pass_answers_do_not_score_the_end_marker_that_objective_never_predicts(tok):
    task = load_preset("digit_masked_modeling", "train", limit=8)
    labels = sorted(set(task.closed_sets()["label"]))
    model = build([task], tok, router=RouterConfig(strategy="attribute"), predict_all_features=True)
    with torch.no_grad():  # (an untrained model's EOS log-probability is far from zero: the term shows)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    rows = task.data[:4]
    ranked = model.infer(task, rows, candidates=labels)
    for answers in (model.infer(task, rows), model.infer(task, rows, beams=2)):
        for answer, scores in zip(answers, ranked):
            assert answer.score == pytest.approx(scores.scores[labels.index(answer.text)], abs=1e-4)
    # a beam over every label picks what ranking every label picks (both without the end marker)
    wide = model.infer(task, rows, beams=len(labels))
    assert [a.text for a in wide] == [r.text for r in ranked]


@pytest.mark.parametrize("layout", ["decoder-only", "encoder-decoder"])
def test_an_answer_running_past_the_position_table_fails_its_own_row_only(tok, layout):
    rows = [{"text": "a short note", "summary": "short"}, {"text": "another short note", "summary": "note"}]
    long_row = {"text": " ".join(["word"] * 40), "summary": "words"}
    task = Task("notes", "[TEXT:text] summary? -> [TEXT:summary]", rows)
    model = build([task], tok, max_positions=64, layout=layout).eval()
    alone = [p.text for p in model.infer(task, rows, max_new_tokens=20, min_length=20)]
    mixed = [rows[0], long_row, rows[1]]
    if layout == "encoder-decoder":  # (its decoder positions start at 0: the long row fits)
        assert [p.text for p in model.infer(task, mixed, max_new_tokens=20, min_length=20)][::2] == alone
        return
    with pytest.raises(TaskDataError, match="task 'notes', row 1: decoding reached position 64"):
        model.infer(task, mixed, max_new_tokens=20, min_length=20)
    skipping = Task("notes", "[TEXT:text] summary? -> [TEXT:summary]", rows, on_error="skip")
    answers = model.infer(skipping, mixed, max_new_tokens=20, min_length=20)
    assert answers[1] is None and [answers[0].text, answers[2].text] == alone and skipping.skipped == 1


def test_two_different_tasks_of_one_name_are_refused_when_built_or_added(tok):
    sentiment = Task("topic", "[TEXT:text] sentiment? -> [TEXT:label,closed_set]",
                     [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    kind = Task("topic", "[TEXT:text] kind? -> [TEXT:label,closed_set]",
                [{"text": "cat", "label": "animal"}, {"text": "car", "label": "vehicle"}])
    with pytest.raises(ValueError, match="build: two different tasks are named 'topic'"):
        build([sentiment, kind], tok)
    model = build([sentiment, sentiment], tok)  # the same task twice is one task
    assert model.config.tasks == ("topic",)
    other = Task("other", "[TEXT:text] other? -> [TEXT:label,closed_set]", [{"text": "x", "label": "y"}])
    with pytest.raises(ValueError, match="add_tasks: two different tasks are named 'topic'"):
        build([other], tok).add_tasks([sentiment, kind])


def test_a_refused_backend_switch_leaves_every_layer_as_it_was(tok):
    task = load_preset("table_species", "train", limit=8)
    model = build([task], tok, router=RouterConfig(strategy="attribute"),
                  decoder_router=RouterConfig(strategy="hybrid"))
    with pytest.raises(ValueError, match=r"layer decoder\.blocks\.0\.ffn: .*content-dependent; no layer was switched"):
        model.set_backend("merged")
    from moe_gen.moe import MoE

    assert {m.config.backend for m in model.modules() if isinstance(m, MoE)} == {model.config.moe.backend}
    with pytest.raises(ValueError, match="unknown"):
        model.set_backend("nonsense")
