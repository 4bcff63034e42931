"""The reply_matching preset: sentence pairs from chatterbot-corpus dialogs, each real reply beside a
reply drawn from another pair, split by first turn."""

import collections

import pytest

from moe_gen.quality.baselines import classical_scores
from moe_gen.quality.suite import suite_tasks
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset, preset_info
from moe_gen.tasks.sources.dialog import dialog_pairs, reply_rows, turn_key


def test_pairs_are_the_consecutive_turns_of_the_dialogs():
    pairs = dialog_pairs()
    assert len(pairs) == len(set(pairs)) == 1176  # chatterbot-corpus 1.3.3, English
    assert pairs[0] == ("What is AI?", "Artificial Intelligence is the branch of engineering and science devoted "
                                       "to constructing machines that think.")  # ai.yml, first dialog
    assert ("My system is overheating.", "Ensure air vents aren't blocked and clean any dust.") in pairs
    assert ("Hello", "Hi") in pairs and ("Hi", "How are you doing?") in pairs  # conversations.yml, turns 1-3


def test_every_pair_has_a_true_and_a_false_reply_and_the_splits_are_disjoint():
    train, test = reply_rows("train"), reply_rows("test")
    assert reply_rows("train") == train  # deterministic
    assert len(train) + len(test) == 2 * 1176 and len(test) == 454
    assert not {turn_key(r["first"]) for r in train} & {turn_key(r["first"]) for r in test}  # "Yes." / "Yes?"
    true = collections.defaultdict(set)
    for first, second in dialog_pairs():
        true[first].add(second)
    for rows in (train, test):
        assert collections.Counter(r["answer"] for r in rows) == {"yes": len(rows) // 2, "no": len(rows) // 2}
        for yes, no in zip(rows[::2], rows[1::2]):
            assert yes["first"] == no["first"] and yes["answer"] == "yes" and no["answer"] == "no"
            assert yes["second"] in true[yes["first"]] and no["second"] not in true[no["first"]]
    assert not {r["first"] for r in train} & {r["first"] for r in test}  # a test question is never trained on
    for rows in (train, test):  # a false reply is a true reply of another pair of the same split
        assert {r["second"] for r in rows if r["answer"] == "no"} <= {r["second"] for r in rows if r["answer"] == "yes"}
    row = next(r for r in train + test if r["first"] == "My system is overheating." and r["answer"] == "yes")
    assert row["second"] == "Ensure air vents aren't blocked and clean any dust."
    with pytest.raises(ValueError, match="unknown split"):
        reply_rows("dev")


def test_without_the_corpus_package_the_error_names_the_install_command(monkeypatch):
    import sys

    from moe_gen.tasks.sources import dialog

    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install chatterbot-corpus==1.3.3"):
        dialog._corpus_dir()


def test_the_preset_encodes_and_bad_rows_are_task_data_errors():
    info = preset_info("reply_matching")
    assert info.metrics == ("accuracy",) and "BSD-3-Clause" in info.licence
    tok = Tokenizer.default()
    task = load_preset("reply_matching", "test", limit=4)
    sample = task.encode(0, tok)
    assert sample is not None and task.closed_sets()["answer"] == ["no", "yes"]
    bad = Task("reply_matching", info.instruction, [{"first": "Hello", "answer": "yes"}])  # no second sentence
    with pytest.raises(TaskDataError, match="second"):
        bad.encode(0, tok)


def test_the_classical_baseline_reads_both_sentences():
    suite = suite_tasks(["reply_matching"])[0]
    assert suite.text_features and suite.label_column == "answer"
    assert suite.features([{"first": "Hello", "second": "Hi"}]) == ["Hello ||| Hi"]
    scores = classical_scores(suite, reply_rows("train")[:200], reply_rows("test")[:60])
    assert scores["majority"] == pytest.approx(0.5) and 0 <= scores["logreg"] <= 1


def test_a_false_reply_is_redrawn_until_it_answers_another_sentence(monkeypatch):
    """Nine of the training split's twelve replies answer "b": one redraw is not enough, the
    negative is drawn again until it is not a reply to the first sentence."""
    from moe_gen.tasks.sources import dialog

    pairs = (("a", "a1"), *(("b", f"b{j}") for j in range(9)), ("c", "c1"), ("d", "d1"), ("e", "e1"))
    monkeypatch.setattr(dialog, "dialog_pairs", lambda: pairs)  # first sentence "a" (every 5th) is test
    rows = dialog.reply_rows("train")
    assert [r["second"] for r in rows if r["answer"] == "yes"] == [second for _, second in pairs[1:]]
    assert all(r["second"] in {"c1", "d1", "e1"} for r in rows if r["first"] == "b" and r["answer"] == "no")


def test_split_all_is_train_then_test_ids_are_distinct_and_the_seed_draws_the_false_replies():
    train, test = reply_rows("train"), reply_rows("test")
    assert reply_rows("all") == train + test
    assert len({r["id"] for r in train + test}) == len(train + test)
    other = reply_rows("train", seed=1)
    assert [r for r in other if r["answer"] == "yes"] == [r for r in train if r["answer"] == "yes"]
    changed = sum(a["second"] != b["second"] for a, b in zip(other, train) if a["answer"] == "no")
    assert changed > len(train) // 4


def test_turns_are_one_line_strings_and_empty_turns_are_dropped():
    from moe_gen.tasks.sources.dialog import _turns

    assert _turns(["Hi", None, "  ", 42, "two\n  lines "]) == ["Hi", "42", "two lines"]
