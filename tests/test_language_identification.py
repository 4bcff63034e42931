"""The language_identification preset: dialog turns of ten Latin-alphabet languages of
chatterbot-corpus, split by turn, none shared between languages (names, "Hallo")."""

import collections

import pytest

from moe_gen.quality.baselines import classical_scores
from moe_gen.quality.suite import suite_tasks
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset, preset_info
from moe_gen.tasks.sources.dialog import (
    LANGUAGES,
    PER_LANGUAGE,
    dialog_pairs,
    language_rows,
    language_turns,
    turn_key,
    unaccented_key,
)


def test_turns_are_distinct_per_language_and_never_shared_between_languages():
    turns = language_turns()
    assert tuple(turns) == LANGUAGES
    owner = {}
    for language, kept in turns.items():
        assert 0 < len(kept) <= PER_LANGUAGE and len(set(kept)) == len(kept)
        for turn in kept:
            assert owner.setdefault(turn.casefold(), language) == language  # in one language only
    assert turns["dutch"][0] == "Goedemorgen, hoe gaat het met je?"  # the dutch folder's first file, first turn
    kept = {t.casefold() for language in turns.values() for t in language}
    assert "hallo" not in kept and "thomas edison." not in kept  # in Dutch and German dialogs (and more)
    assert len(turns["english"]) == PER_LANGUAGE
    assert len(dialog_pairs()) == 1176  # reply_matching reads the same files, unchanged
    with pytest.raises(TypeError):  # the cached turns cannot be changed by a caller
        turns["dutch"] = ()


def test_every_fifth_turn_is_test_and_the_splits_are_disjoint():
    train, test = language_rows("train"), language_rows("test")
    assert language_rows("train") == train  # deterministic
    assert len(train) + len(test) == sum(len(t) for t in language_turns().values())
    assert not {turn_key(r["text"]) for r in train} & {turn_key(r["text"]) for r in test}  # "Hola!" / "Hola"
    # nor a turn typed without its accents ("Voie Lactee" / "Voie Lactée") within one language
    seen = {(r["language"], unaccented_key(r["text"])) for r in train}
    assert not [r["text"] for r in test if (r["language"], unaccented_key(r["text"])) in seen]
    assert unaccented_key("Le téléscope spatial Hubble, lancé") == unaccented_key("Le telescope spatial Hubble lance")
    assert {r["language"] for r in train} == {r["language"] for r in test} == set(LANGUAGES)
    assert all(int(r["id"].split("/")[1]) % 5 == 0 for r in test)
    assert sorted(language_rows("all"), key=lambda r: r["id"]) == sorted(train + test, key=lambda r: r["id"])
    counts = collections.Counter(r["language"] for r in test)
    assert max(counts.values()) / len(test) == pytest.approx(0.12, abs=0.001)  # majority baseline
    with pytest.raises(ValueError, match="unknown split"):
        language_rows("dev")


def test_the_preset_encodes_its_closed_set_and_bad_rows_are_task_data_errors():
    info = preset_info("language_identification")
    assert info.metrics == ("accuracy",) and "BSD-3-Clause" in info.licence
    tok = Tokenizer.default()
    task = load_preset("language_identification", "train")
    assert task.encode(0, tok) is not None and task.closed_sets()["language"] == sorted(LANGUAGES)
    bad = Task("language_identification", info.instruction, [{"language": "dutch"}])  # no text
    with pytest.raises(TaskDataError, match="text"):
        bad.encode(0, tok)


def test_the_classical_baseline_reads_the_turn():
    suite = suite_tasks(["language_identification"])[0]
    assert suite.text_features and suite.label_column == "language"
    train, test = language_rows("train"), language_rows("test")
    scores = classical_scores(suite, train, test)
    assert scores["majority"] == pytest.approx(0.12, abs=0.001) and scores["logreg"] > 0.5
