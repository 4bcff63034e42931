"""The few_shot_instructions preset: a task definition, two worked examples and a query over real
words; seven exactly computed tasks; test queries use held-out words only."""

import collections

import pytest

from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset, preset_info
from moe_gen.tasks.metrics import compute
from moe_gen.tasks.sources.fewshot import FEW_SHOT_TASKS, few_shot_rows, task_words

# the answers, written again independently of the module
EXPECTED = {
    "reverse": lambda w: " ".join(w[::-1]), "first": lambda w: w[0], "last": lambda w: w[-1],
    "initials": lambda w: " ".join(x[:1] for x in w), "count": lambda w: str(len(w)),
    "sort": lambda w: " ".join(sorted(w)), "longest": lambda w: sorted(w, key=len)[-1],
}


def test_answers_are_exact_for_every_task():
    assert [key for key, _, _ in FEW_SHOT_TASKS] == ["reverse", "first", "last", "initials", "count", "sort",
                                                     "longest"]
    words = ["yield", "class", "import"]
    by_hand = {"reverse": "import class yield", "first": "yield", "last": "import", "initials": "y c i",
               "count": "3", "sort": "class import yield", "longest": "import"}
    assert {key: answer(words) for key, _, answer in FEW_SHOT_TASKS} == by_hand
    for row in few_shot_rows("train", count=140) + few_shot_rows("test", count=70):
        words = row["query"].split()
        assert 2 <= len(words) <= 4 and len(set(words)) == len(words)
        assert row["answer"] == EXPECTED[row["task"]](words), row
        for shot in row["examples"].split(" ; "):  # "input: a b output: b a"
            given, _, answer = shot.removeprefix("input: ").partition(" output: ")
            assert answer == EXPECTED[row["task"]](given.split())
        if row["task"] == "longest":
            lengths = sorted(map(len, words))
            assert lengths[-1] > lengths[-2]  # one longest word


def test_splits_differ_and_test_queries_use_held_out_words():
    train, test = few_shot_rows("train"), few_shot_rows("test")
    assert len(train) == 3500 and len(test) == 350 and few_shot_rows("test") == test
    assert collections.Counter(r["task"] for r in test) == {key: 50 for key, _, _ in FEW_SHOT_TASKS}
    held_out, seen = set(task_words("test")), set(task_words("train"))
    assert not held_out & seen and len(held_out) + len(seen) == 1957
    assert all(set(r["query"].split()) <= held_out for r in test)
    assert all(set(r["query"].split()) <= seen for r in train)
    shot_words = {w for r in train + test for shot in r["examples"].split(" ; ")
                  for w in shot.removeprefix("input: ").partition(" output: ")[0].split()}
    assert shot_words <= seen
    with pytest.raises(ValueError, match="unknown split"):
        task_words("all")


def test_the_preset_encodes_and_scores_by_exact_match():
    info = preset_info("few_shot_instructions")
    assert info.metrics == ("exact_match",) and "PSF" in info.licence
    tok = Tokenizer.default()
    task = load_preset("few_shot_instructions", "test", limit=7)
    assert task.encode(0, tok) is not None
    rows = few_shot_rows("train") + few_shot_rows("test")
    assert max(len(tok.encode(r["answer"])) for r in rows) <= 24  # the target's max_length
    answers = [r["answer"] for r in task.data]
    assert compute(("exact_match",), answers, answers)["exact_match"] == 1.0
    bad = Task("few_shot_instructions", info.instruction, [{"definition": "x", "examples": "y", "answer": "z"}])
    with pytest.raises(TaskDataError, match="query"):
        bad.encode(0, tok)


@pytest.mark.parametrize("limit", [40, 50, 100])
def test_every_task_is_among_the_evenly_spaced_rows_evaluation_scores(limit):
    """Row k asked task k mod 7, so the 100 rows evaluation spaces over the 350 test rows (3.5 apart)
    held two tasks, reverse and initials, and 50 rows one (fourteenth session's split audit)."""
    from moe_gen.trainer.evaluation import spaced_indices

    for split in ("train", "test"):
        rows = few_shot_rows(split)
        counts = collections.Counter(rows[i]["task"] for i in spaced_indices(len(rows), limit))
        assert set(counts) == {key for key, _, _ in FEW_SHOT_TASKS}, (split, counts)
        assert min(counts.values()) >= limit // 20 and max(counts.values()) <= limit // 4, (split, counts)
