"""A repetition group's columns given as numpy arrays or tensors (labels ``[K]``, boxes ``[K, 4]``, as
detection datasets and torchvision give them), fifteenth audit: read item by item as lists are, in
the label sets, in encoding and in evaluation. Labels as an array were refused for the whole task
("none of the 2 rows holds a valid label"), boxes row by row ("needs a list"); each test failed
before the fix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import build

from moe_gen.config import RouterConfig
from moe_gen.model.generate import Prediction
from moe_gen.tasks import Task, TaskDataError, Tokenizer
from moe_gen.trainer.evaluation import evaluate_task

FIND = "[IMAGE:img] find the squares -> ( [BOX:boxes] [TEXT:labels,closed_set] )*"
IMG = np.zeros((48, 64, 3), np.uint8)
LISTS = [{"img": IMG, "boxes": [[8, 4, 24, 16], [30, 20, 46, 32]], "labels": ["red", "green"]},
         {"img": IMG, "boxes": [[0, 0, 16, 12]], "labels": ["green"]}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _as(kind, rows):
    """``rows`` with the group's columns as numpy arrays or tensors (labels as a tensor: their ids)."""
    if kind == "numpy":
        return [dict(r, boxes=np.array(r["boxes"]), labels=np.array(r["labels"])) for r in rows]
    ids = {"red": 0, "green": 1}
    return [dict(r, boxes=torch.tensor(r["boxes"]), labels=torch.tensor([ids[x] for x in r["labels"]])) for r in rows]


def _decoder_tokens(task, tok):
    return [[c.tokens for c in task.encode(i, tok).decoder] for i in range(len(task))]


def test_arrays_encode_and_make_the_label_set_as_lists_do(tok):
    lists = Task("find", FIND, LISTS)
    arrays = Task("find", FIND, _as("numpy", LISTS))
    assert arrays.closed_sets() == lists.closed_sets() == {"labels": ["green", "red"]}
    assert _decoder_tokens(arrays, tok) == _decoder_tokens(lists, tok)
    tensors = Task("find", FIND, _as("torch", LISTS))  # integer labels, written out as text
    assert tensors.closed_sets() == {"labels": ["0", "1"]}
    as_ids = Task("find", FIND, [dict(r, labels=[{"red": 0, "green": 1}[x] for x in r["labels"]]) for r in LISTS])
    assert _decoder_tokens(tensors, tok) == _decoder_tokens(as_ids, tok)


def test_evaluation_reads_array_references_as_lists(tok):
    rows = _as("numpy", LISTS)
    model = build([Task("find", FIND, rows)], tok, router=RouterConfig(strategy="attribute"))

    def perfect(task, rows, **kwargs):
        return [Prediction(groups=[[{"boxes": list(map(float, b)), "labels": str(x)}
                                    for b, x in zip(r["boxes"], r["labels"])]]) for r in rows]

    model.infer = perfect
    pairs = []
    assert evaluate_task(model, Task("find", FIND, rows), pairs=pairs) == {"detection_f1": 1.0}
    assert [len(reference) for _, reference in pairs] == [2, 1]


@pytest.mark.parametrize("value, kind", [("red", "str"), (np.array("red"), "ndarray of shape ()")])
def test_a_group_value_that_holds_no_items_is_refused_naming_its_type(tok, value, kind):
    rows = [LISTS[0], dict(LISTS[1], labels=value)]
    with pytest.raises(TaskDataError, match=r"^task 'find', column 'labels', row 1: a slot in a repetition group "
                                            r"needs a list \(or a numpy array or tensor: one item per entry of its "
                                            rf"first dimension\), got {re.escape(kind)}$"):
        Task("find", FIND, rows).encode(1, tok)
    with pytest.raises(TaskDataError, match=r"column 'labels': none of the 1 rows holds a valid label .*; a "
                                            r"repetition group's column holds a list \(or a numpy array"):
        Task("find", FIND, [dict(LISTS[0], labels={"red": 1})]).closed_sets()


def test_group_items_reads_tuples_like_lists_and_nothing_else():
    """(mutation-testing audit r17) A tuple's items, as a list's; texts, dicts and 0-d arrays hold no items."""
    from moe_gen.tasks.modalities.base import group_items

    assert group_items(("cat", "dog")) == group_items(["cat", "dog"]) == ["cat", "dog"]
    assert [b.tolist() for b in group_items(np.zeros((2, 4)))] == [[0.0] * 4] * 2
    assert group_items(torch.tensor([3, 5])) == [3, 5]
    for value in ("cat", {"a": 1}, np.array(3), 7):
        assert group_items(value) is None, value
