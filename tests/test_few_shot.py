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


def test_rows_follow_the_documented_draws():
    """Queries of 2, 3 and 4 words; two worked examples; test queries from every 5th word of the
    sorted vocabulary, the first included; "all" with a seed is that seed's train then test rows."""
    from moe_gen.tasks.sources.fewshot import _vocabulary

    rows = few_shot_rows("train", count=70)
    assert {len(r["query"].split()) for r in rows} == {2, 3, 4}
    assert all(r["examples"].count("input: ") == 2 for r in rows)
    assert task_words("test") == _vocabulary()[::5] and task_words("train")[0] == _vocabulary()[1]
    assert few_shot_rows("all", count=14, seed=3) == few_shot_rows("train", 14, 3) + few_shot_rows("test", 14, 3)


def test_the_seed_and_the_split_draw_other_rows():
    train, test = few_shot_rows("train", count=70), few_shot_rows("test", count=70)
    other = few_shot_rows("train", count=70, seed=1)
    assert sum(a["query"] != b["query"] for a, b in zip(train, other)) > 60
    # the test rows draw from their own stream: no row replays the worked examples of its training twin
    assert not [k for k, (a, b) in enumerate(zip(train, test)) if a["examples"] == b["examples"]]


def test_the_order_of_kinds_is_fixed_by_the_seed_text_alone():
    """``shuffled_cycle`` hashes with crc32, not ``hash``, so rows are the same in every process; each
    block of ``period`` rows holds every kind once."""
    from moe_gen.tasks.sources.order import shuffled_cycle

    assert [shuffled_cycle(k, 7, "fewshot/test/0") for k in range(14)] == [0, 1, 3, 6, 2, 4, 5, 3, 5, 0, 4, 6, 1, 2]
    assert [shuffled_cycle(k, 2, "moving/train/0") for k in range(8)] == [0, 1, 0, 1, 1, 0, 1, 0]
    for seed in ("a", "b"):
        kinds = [shuffled_cycle(k, 5, seed) for k in range(50)]
        assert all(sorted(kinds[i:i + 5]) == list(range(5)) for i in range(0, 50, 5))
