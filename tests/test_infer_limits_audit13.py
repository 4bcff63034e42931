"""infer's length limits are checked up front, as whole numbers >= 1 (audit 13); the test failed
before the fix."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build

from moe_gen.model.grammar import TargetGrammar
from moe_gen.tasks import Task, Tokenizer

ROWS = [{"q": "red", "a": "fruit", "b": ["x", "y"]}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return Task("free", "[TEXT:q] -> [TEXT:a]", ROWS), Task("group", "[TEXT:q] -> ( [TEXT:b,closed_set] )*", ROWS)


@pytest.fixture(scope="module")
def model(tasks, tok):
    return build(list(tasks), tok).eval()


@pytest.mark.parametrize("name", ["max_new_tokens", "max_items", "max_frames"])
@pytest.mark.parametrize("value", [2.5, 0, -1, "8", True, None])
def test_a_limit_that_is_not_a_whole_number_is_refused_naming_it_and_the_task(model, tasks, name, value):
    """max_items=1.5 crashed deep inside torch, max_new_tokens=2.5 was accepted, "8" failed with a
    TypeError, and 0 was refused without naming the task."""
    with pytest.raises(ValueError, match=rf"task 'group': {name} must be a whole number >= 1, got {value!r}"):
        model.infer(tasks[1], ROWS, **{name: value})


def test_numpy_integers_are_whole_numbers(model, tasks):
    free, group = tasks
    assert model.infer(free, ROWS, max_new_tokens=np.int64(3))[0].tokens == \
        model.infer(free, ROWS, max_new_tokens=3)[0].tokens
    assert model.infer(group, ROWS, max_items=np.int32(1), max_frames=np.uint8(4))[0].targets == \
        model.infer(group, ROWS, max_items=1)[0].targets


def test_the_grammar_checks_its_limits_too(model, tasks, tok):
    with pytest.raises(ValueError, match=r"task 'group': max_items must be a whole number >= 1, got 1.5"):
        TargetGrammar(model.plan(tasks[1]), tok, max_items=1.5)
