"""Evaluation checks a repetition group's reference columns as training does (audit 13); the test
failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build

from moe_gen.config import RouterConfig
from moe_gen.model.generate import Prediction
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.plan import TaskDataError
from moe_gen.trainer.evaluation import evaluate_task

DETECT = "[IMAGE:img] where are the digits? -> ( [BOX:boxes] [TEXT:labels] )*"
IMG = np.zeros((64, 64, 3), np.uint8)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _perfect(task, rows, **kwargs):
    """A model that answers each row with its own items, wherever the columns agree."""
    answers = []
    for row in rows:
        items = [{"boxes": box, "labels": label} for box, label in zip(row["boxes"], row["labels"])]
        answers.append(Prediction(targets={}, groups=[items]))
    return answers


GOOD = {"img": IMG, "boxes": [[2, 16, 18, 32], [31, 25, 47, 41]], "labels": ["two", "one"]}
MORE_BOXES = dict(GOOD, boxes=GOOD["boxes"] + [[40, 40, 60, 60]])  # 3 boxes, 2 labels: the third was lost
LABEL_STRING = dict(GOOD, labels="tw")  # a string, not a list: it was zipped as 't', 'w'


@pytest.mark.parametrize("bad, why", [
    (MORE_BOXES, r"the columns of repetition group 0 have different lengths \('boxes': 3, 'labels': 2\)"),
    (LABEL_STRING, r"column 'labels' is in repetition group 0, so it needs a list \(or a numpy array or tensor"
                   r".*\) to score against, got str"),
])
def test_detection_refuses_a_reference_training_refuses(tok, bad, why):
    """A row with more boxes than labels was scored against its first two boxes, and a labels string
    was split into characters; training refuses both rows, and now evaluation does (or skips them)."""
    rows = [GOOD, bad, GOOD]
    with pytest.raises(TaskDataError, match="repetition group"):
        Task("det", DETECT, rows).encode(1, tok)  # training refuses the row
    model = build([Task("det", DETECT, rows)], tok, router=RouterConfig(strategy="attribute"))
    model.infer = _perfect
    with pytest.raises(TaskDataError, match=rf"task 'det', row 1: {why}"):
        evaluate_task(model, Task("det", DETECT, rows))
    skipping = Task("det", DETECT, rows, on_error="skip")
    pairs = []
    assert evaluate_task(model, skipping, pairs=pairs) == {"detection_f1": 1.0, "skipped": 1}
    assert [len(reference) for _, reference in pairs] == [2, 2]  # the good rows, whole
    assert skipping.skipped == 1 and "row 1" in skipping.errors[0]


def test_structured_group_of_unequal_lists_is_refused(tok):
    """The check holds for any repetition group scored, not only detection."""
    rows = [{"q": "a", "w": ["x", "y"], "v": ["1", "2"]}, {"q": "b", "w": ["x"], "v": ["1", "2"]}]
    task = Task("pairs", "[TEXT:q] -> ( [TEXT:w] [TEXT:v] )*", rows)
    model = build([task], tok, router=RouterConfig(strategy="attribute"))
    model.infer = lambda task, rows, **kw: [Prediction(targets={"w": r["w"], "v": r["v"]}) for r in rows]
    with pytest.raises(TaskDataError, match=r"task 'pairs', row 1: the columns of repetition group 0 have "
                                            r"different lengths \('w': 1, 'v': 2\)"):
        evaluate_task(model, task)


def test_a_caption_beside_a_detection_group_is_scored(tok):
    """A text target beside the detection group made the task 'detection': the caption was never
    scored (exact match 1.0 with every caption wrong) and BLEU on it was refused."""
    ins = "[IMAGE:img] describe and locate -> [TEXT:caption] ( [BOX:boxes] [TEXT:labels] )*"
    rows = [dict(GOOD, caption="two digits on black"), dict(GOOD, caption="one digit")]
    model = build([Task("capdet", ins, rows)], tok, router=RouterConfig(strategy="attribute"))

    def wrong_captions(task, rows, **kwargs):
        return [Prediction(targets={"caption": "completely wrong", "boxes": r["boxes"], "labels": r["labels"]},
                           groups=[[{"boxes": b, "labels": label} for b, label in zip(r["boxes"], r["labels"])]])
                for r in rows]

    model.infer = wrong_captions
    assert evaluate_task(model, Task("capdet", ins, rows, metrics=("exact_match",))) == {"exact_match": 0.0}
    assert evaluate_task(model, Task("capdet", ins, rows, metrics=("bleu",))) == {"bleu": 0.0, "bleu/caption": 0.0}


@pytest.mark.parametrize("instruction, row, column", [
    ("[TEXT:q] echo -> [TEXT:a]", {"q": "hello", "a": None}, "a"),
    ("[TEXT:q] echo -> [TEXT:a]", {"q": "hello", "a": float("nan")}, "a"),
    ("[IMAGE:img] where? -> [BOX:box]", {"img": IMG, "box": None}, "box"),
    ("[IMAGE:img] where? -> [BOX:box]", {"img": IMG, "box": [10, 10, 2, 2]}, "box"),
])
def test_a_missing_reference_value_is_a_named_data_error_or_skipped(tok, instruction, row, column):
    """Training refuses such a row; evaluation scored a text target against the text "None" and
    crashed on a box with a bare TypeError, also under on_error="skip"."""
    good = {"q": "world", "a": "world"} if "q" in row else {"img": IMG, "box": [2, 16, 18, 32]}
    model = build([Task("t", instruction, [good])], tok, router=RouterConfig(strategy="attribute"))
    why = "holds no box" if isinstance(row.get(column), list) else "has a missing value"
    with pytest.raises(TaskDataError, match=rf"row 1: column '{column}' {why}"):
        evaluate_task(model, Task("t", instruction, [good, row]))
    skipping = Task("t", instruction, [good, row], on_error="skip")
    assert evaluate_task(model, skipping)["skipped"] == 1
