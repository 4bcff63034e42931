"""A column predicted by two answer slots of one template (audit 13): refused when the task is planned,
naming the task, both slots and the column; it failed before the fix (the decoded answer, keyed by column,
kept only the second slot's value)."""

from __future__ import annotations

import pytest

from moe_gen.tasks import Task, Tokenizer

ROWS = [{"x": "one", "a": "yes", "b": ["p", "q"]}, {"x": "two", "a": "no", "b": ["r"]}]


@pytest.mark.parametrize("answer", [
    "[TEXT:a,closed_set] [TEXT:a,closed_set]",
    "[TEXT:a] and [CATEGORY:a]",
    "( [TEXT:a] , )* and [TEXT:a]",
    "( [TEXT:a] [TEXT:a] , )*",
])
def test_two_answer_slots_of_one_column_are_refused(answer):
    task = Task("dup", f"[TEXT:x] which? -> {answer}", ROWS)
    with pytest.raises(ValueError, match=r"task 'dup': slots \[.*:a.*\] and \[.*:a.*\] both predict column 'a'"):
        task.plan(Tokenizer.default())


@pytest.mark.parametrize("instruction", [
    "[TEXT:x] -> ( [TEXT:b] , )*",  # one slot of a repetition group: its items are one list's values
    "[TEXT:x] -> [TEXT:a,no_loss] [TEXT:b]",  # a given prefix, then the answer
    "[TEXT:x] -> [TEXT:a] ||| [TEXT:x] says -> [TEXT:a]",  # one per template
])
def test_one_slot_per_column_per_template_is_planned(instruction):
    rows = [{"x": "one", "a": "yes", "b": ["p", "q"]}] if "( [TEXT:b]" in instruction else \
        [{"x": "one", "a": "yes", "b": "p"}]
    Task("ok", instruction, rows).plan(Tokenizer.default())
