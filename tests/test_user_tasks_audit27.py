"""Faults found by the twenty-seventh session's audit of user-declared tasks; each test fails on
the code before its fix. Answers are given by a stand-in ``infer`` where what is tested is how
they are scored."""

import collections
import os
import types

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_gen.model import GeneralistModel, flavour  # noqa: E402
from moe_gen.model.generate import Prediction  # noqa: E402
from moe_gen.tasks import Task, Tokenizer  # noqa: E402
from moe_gen.trainer.evaluation import evaluate, evaluate_task  # noqa: E402

TOK = Tokenizer.default()


def _images(n, size=16):
    rng = np.random.default_rng(0)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def _model(task):
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug"), [task], TOK).eval()


def test_every_text_column_of_a_detection_item_is_scored():
    """A group ``( [BOX] [TEXT:labels] [TEXT:colour] )*`` was scored on (box, label) alone: wrong
    colours scored 1.0."""
    rows = [{"img": image, "boxes": [[2, 3, 12, 14]], "labels": ["a"], "colour": ["red"]} for image in _images(3)]
    task = Task("det2", "[IMAGE:img] find -> ( [BOX:boxes] [TEXT:labels,closed_set] [TEXT:colour] )*", rows,
                metrics=("detection_f1",))
    model = _model(task)
    model.infer = lambda t, batch, **kw: [Prediction(groups=[[{"boxes": [2, 3, 12, 14], "labels": "a",
                                                                "colour": "red"}]]) for _ in batch]
    pairs = []
    assert evaluate_task(model, task, pairs=pairs)["detection_f1"] == 1.0
    assert pairs[0][0][0][1] == pairs[0][1][0][1] == ("a", "red")
    wrong = task.with_rows([dict(r, colour=["blue"]) for r in rows])
    assert evaluate_task(model, wrong)["detection_f1"] == 0.0


def test_a_task_of_rows_by_position_is_evaluated_and_names_its_target_alike_in_every_decoding():
    rows = [(image, ["small", "big"][i % 2]) for i, image in enumerate(_images(4, 8))]
    task = Task("pos", "[IMAGE] -> answer: [TEXT]", rows, metrics=("exact_match",))
    model = _model(task)
    greedy = model.infer(task, rows[:1])[0]
    ranked = model.infer(task, rows[:1], candidates=["small", "big"])[0]
    assert list(greedy.targets) == list(ranked.targets) == ["slot 2"]  # was {"1": ...} and {"0": ...}
    model.infer = lambda t, batch, **kw: [Prediction(text="small", targets={"slot 2": "small"}) for _ in batch]
    pairs = []
    assert evaluate(model, [task])["pos"]["exact_match"] == 0.5  # raised "no None column to score against"
    assert evaluate_task(model, task, pairs=pairs) and [r for _, r in pairs] == ["small", "big", "small", "big"]


@pytest.mark.parametrize("mapping", [collections.UserDict, types.MappingProxyType])
def test_rows_that_are_mappings_but_no_dicts_are_scored_as_dicts(mapping):
    rows = [{"img": image, "y": ["cat", "dog"][i % 2]} for i, image in enumerate(_images(4, 8))]
    task = Task("ud", "[IMAGE:img] -> [TEXT:y,closed_set]", rows, metrics=("accuracy",))
    model = _model(task)
    expected = evaluate(model, [task])
    assert evaluate(model, [task.with_rows([mapping(dict(r)) for r in rows])]) == expected


def test_infer_takes_numpy_indices_and_refuses_other_ones():
    rows = [{"img": image, "y": ["cat", "dog"][i % 2]} for i, image in enumerate(_images(3, 8))]
    task = Task("idx", "[IMAGE:img] -> [TEXT:y,closed_set]", rows)
    model = _model(task)
    as_ints = [p.text for p in model.infer(task, rows[:2], indices=[1, 2])]
    assert [p.text for p in model.infer(task, rows[:2], indices=np.arange(1, 3))] == as_ints
    for bad in (["a", "b"], [1.5, 2], [True, False]):
        with pytest.raises(ValueError, match="task 'idx': infer's indices must be whole numbers"):
            model.infer(task, rows[:2], indices=bad)
    with pytest.raises(ValueError, match="infer got 2 rows but 1 indices"):
        model.infer(task, rows[:2], indices=[0])


def test_data_root_with_rows_from_python_is_refused(tmp_path):
    """It confines the media paths of a JSONL file; rows from Python read any path, so it was
    silently ignored."""
    rows = [{"img": str(tmp_path / "outside.png"), "y": "cat"}]
    with pytest.raises(ValueError, match="task 'r': data_root confines the media paths of a JSONL file"):
        Task("r", "[IMAGE:img] -> [TEXT:y,closed_set]", rows, data_root=str(tmp_path / "root"))


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["tensor", "ndarray"])
def test_labels_given_as_0d_tensors_or_arrays_read_as_their_values(make):
    """(Refused before: "none of the rows holds a valid label"; a TEXT value so: "needs text".)"""
    rows = [{"img": image, "y": make(i % 3), "t": make(i)} for i, image in enumerate(_images(6, 8))]
    as_values = [{**r, "y": i % 3, "t": i} for i, r in enumerate(rows)]
    task = Task("zd", "[IMAGE:img] [TEXT:t] -> [TEXT:y,closed_set]", rows)
    plain = Task("zd", "[IMAGE:img] [TEXT:t] -> [TEXT:y,closed_set]", as_values)
    assert task.closed_sets() == plain.closed_sets() == {"y": ["0", "1", "2"]}
    assert [c.tokens for c in task.encode(4, TOK).encoder] == [c.tokens for c in plain.encode(4, TOK).encoder]
    model = _model(task)
    assert evaluate(model, [task]) == evaluate(model, [plain])


def test_a_repetition_group_filled_by_position_is_scored_from_arrays_as_from_lists():
    """References are read by slot name, the group's arrays as lists (as training reads them)."""
    boxes, labels = [[2, 3, 12, 14], [1, 1, 6, 6]], ["a", "b"]
    rows = [(image, np.array(boxes), np.array(labels)) for image in _images(2)]
    task = Task("posdet", "[IMAGE] find -> ( [BOX] [TEXT] )*", rows, metrics=("detection_f1",))
    model = _model(task)
    items = [{"slot 2": box, "slot 3": label} for box, label in zip(boxes, labels)]
    model.infer = lambda t, batch, **kw: [Prediction(groups=[items]) for _ in batch]
    assert evaluate_task(model, task)["detection_f1"] == 1.0
