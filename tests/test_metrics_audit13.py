"""Metrics of text on answers with several target slots score each text column, never the ``str()``
of the answer dicts (audit 13); the tests failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build

from moe_gen.cli import metric_table
from moe_gen.model.generate import Prediction
from moe_gen.tasks import Task, Tokenizer, metrics
from moe_gen.trainer.evaluation import evaluate_task

TWO_TEXTS = "[TEXT:x] describe -> [TEXT:title] [TEXT:summary]"
ROWS = [{"x": f"item {i}", "title": f"the quick brown fox number {i}",
         "summary": f"jumps over the lazy dog {i} times"} for i in range(6)]


@pytest.fixture(scope="module")
def model():
    return build([Task("two_texts", TWO_TEXTS, ROWS)], Tokenizer.default())


def _answering(model, answer):
    """``model`` with an ``infer`` that answers every row with ``answer(row)`` as its targets."""
    model.infer = lambda task, rows, **kwargs: [Prediction(targets=answer(row)) for row in rows]
    return model


def test_empty_answers_score_nothing_per_column(model):
    """Empty answers scored BLEU 5.4 and chrF 30.2: the braces, quotes and column names of the
    printed dicts counted as matched n-grams."""
    task = Task("two_texts", TWO_TEXTS, ROWS, metrics=["bleu", "chrf", "rouge_l", "exact_match"])
    scores = evaluate_task(_answering(model, lambda row: {"title": "", "summary": None}), task)
    assert scores == {"bleu": 0.0, "bleu/title": 0.0, "bleu/summary": 0.0, "chrf": 0.0, "chrf/title": 0.0,
                      "chrf/summary": 0.0, "rouge_l": 0.0, "rouge_l/title": 0.0, "rouge_l/summary": 0.0,
                      "exact_match": 0.0}


def test_each_text_column_is_scored_on_its_own_values(model):
    """A right title and an empty summary: BLEU 100 and 0, their mean 50; the answer is not exact."""
    task = Task("two_texts", TWO_TEXTS, ROWS, metrics=["bleu", "wer", "exact_match"])
    pairs = []
    scores = evaluate_task(_answering(model, lambda row: {"title": row["title"], "summary": ""}), task, pairs=pairs)
    assert scores["bleu/title"] == pytest.approx(100.0) and scores["bleu/summary"] == 0.0
    assert scores["bleu"] == pytest.approx(50.0)
    assert scores["wer/title"] == 0.0 and scores["wer/summary"] == 1.0 and scores["wer"] == 0.5
    assert scores["exact_match"] == 0.0
    assert pairs[0][1] == {"title": "the quick brown fox number 0", "summary": "jumps over the lazy dog 0 times"}
    right = evaluate_task(_answering(model, lambda row: {c: row[c].upper() for c in ("title", "summary")}), task)
    assert right["exact_match"] == 1.0 and right["bleu"] < 100.0  # BLEU is case-sensitive, exact match not
    assert "| two_texts | wer/title (lower is better) | 0.000 |" in metric_table({"two_texts": scores})


@pytest.mark.parametrize("instruction, metric, why", [
    ("[IMAGE:img] where? -> [TEXT:title] [BOX:where]", "iou_accuracy", "scores one box per answer"),
    ("[IMAGE:img] where? -> [BOX:a] [BOX:b]", "bleu", "has no text or closed-set target outside a repetition group"),
    ("[TEXT:x] list -> ( [TEXT:items] )*", "chrf", "has no text or closed-set target outside a repetition group"),
    ("[IMAGE:img] digits? -> ( [BOX:boxes] [TEXT:labels] )*", "bleu", "has no text or closed-set target"),
    ("[IMAGE:img] digits? -> ( [BOX:boxes] [TEXT:labels] )*", "iou_accuracy", "scores one box per answer"),
])
def test_a_metric_that_cannot_score_the_answers_is_refused(instruction, metric, why):
    """Refused with the task and metric named, before any row is decoded (they scored ``str(dict)``)."""
    image = np.zeros((32, 32, 3), np.uint8)
    rows = [{"x": "a", "img": image, "title": "t", "where": [1, 2, 8, 9], "a": [1, 2, 8, 9], "b": [2, 3, 9, 9],
             "items": ["p", "q"], "boxes": [[1, 2, 8, 9]], "labels": ["one"]}]
    task = Task("multi", instruction, rows, metrics=[metric])
    model = build([task], Tokenizer.default())
    model.infer = None  # not reached
    with pytest.raises(ValueError, match=rf"task 'multi': metric '{metric}' .*{why}"):
        evaluate_task(model, task)


def test_metrics_of_text_refuse_dicts_and_lists():
    """``_text`` wrote a dict or list as its ``str()``, which every metric of text then scored."""
    for metric in ("bleu", "chrf", "rouge_l", "wer"):
        with pytest.raises(ValueError, match="a metric of text got a dict"):
            metrics.compute([metric], [{"title": ""}], [{"title": "a fox"}])
        with pytest.raises(ValueError, match="a metric of text got a list"):
            metrics.compute([metric], [["a", "fox"]], [["a", "fox"]])
        with pytest.raises(ValueError, match="a metric of text got a ndarray"):  # a 1-D array too
            metrics.compute([metric], [np.array(["a", "fox"])], ["a fox"])


def test_exact_match_and_accuracy_compare_structured_answers_value_by_value():
    answer = {"title": b"A  Fox", "where": (1.0, 2.0, 8.0, 9.0), "labels": ["one", "two"]}
    reference = {"title": "a fox", "where": [1.0, 2.0, 8.0, 9.0], "labels": ["one", "two"]}
    assert metrics.exact_match([answer], [reference]) == 1.0
    assert metrics.accuracy([answer], [reference]) == 0.0  # accuracy keeps case and spacing
    assert metrics.accuracy([dict(answer, title="a fox")], [reference]) == 1.0
    assert metrics.exact_match([dict(answer, labels=["one"])], [reference]) == 0.0
    assert metrics.exact_match([dict(answer, title=None)], [dict(reference, title="None")]) == 0.0
    assert metrics.exact_match([{"title": "a fox"}], [reference]) == 0.0  # a column missing
    # no answer (None) equals only no answer, in a column as for a whole answer
    assert metrics.accuracy([{"title": None}, None, None], [{"title": None}, None, "x"]) == pytest.approx(2 / 3)
    assert metrics.exact_match([{"title": "a"}], [{"title": None}]) == 0.0


def test_every_built_in_metric_is_sorted_for_structured_answers():
    """Evaluation needs to know how each built-in metric reads an answer (a new one must be sorted)."""
    built_in = {name for name in metrics.METRICS.list() if metrics.METRICS.get(name).__module__ == metrics.__name__}
    kinds = (metrics.TEXT_METRICS, metrics.ANSWER_METRICS, metrics.VALUE_METRICS)
    assert set().union(*kinds) == built_in and sum(map(len, kinds)) == len(built_in)
