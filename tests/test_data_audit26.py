"""The twenty-sixth session's audit of the data layer: slots of one column that would share
statistics fitted another way, table column names that collide as text, digit separators read as
numbers, NaN cells written as "nan", and a missing answer scored as the word "None"."""

from __future__ import annotations

import math
import warnings

import pytest

from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.metrics import bleu, chrf, exact_match, rouge_l, wer
from moe_gen.tasks.modalities.base import SlotValueError
from moe_gen.tasks.modalities.table import MISSING, NUMERIC, TEXT, read_cell, table_rows
from moe_gen.tasks.modalities.text_like import linearize_table
from moe_gen.tasks.plan import TaskDataError


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_two_templates_reading_a_table_column_alike_share_its_statistics(tok):
    rows = [{"t": {"color": ["Red", "Blue"]}, "y": "x"}] * 4
    task = Task("same", "[STRUCT:t,uncased] a -> [TEXT:y] ||| [STRUCT:t,uncased] b -> [TEXT:y]", rows)
    plan = task.plan(tok)
    ids = [plan.encode(rows[0], 0, training=False, template=t).encoder[0].rows[:, 3].tolist() for t in (0, 1)]
    assert ids[0] == ids[1] and 0 not in ids[0]  # every text cell has its own id in both templates


@pytest.mark.parametrize("instruction, attr", [
    # the second template lower-cased its cells against a case-sensitive vocabulary: every one unseen
    ("[STRUCT:t] a -> [TEXT:y] ||| [STRUCT:t,uncased] b -> [TEXT:y]", "uncased"),
    ("[TEXT:q,preprocess=bag_of_words] a -> [TEXT:y] ||| [TEXT:q,preprocess=bag_of_words,vocab_size=8] b -> [TEXT:y]",
     "vocab_size"),
])
def test_slots_of_one_column_that_would_fit_its_statistics_differently_are_refused(tok, instruction, attr):
    rows = [{"t": {"color": ["Red", "Blue"]}, "q": "red blue green", "y": "x"}] * 4
    task = Task("mixed", instruction, rows)
    with pytest.raises(TaskDataError, match=rf"task 'mixed', column '[tq]': .*{attr}"):
        task.plan(tok)


@pytest.mark.parametrize("table", [
    {1: [5.0, 7.0], "1": [6.0, 8.0]},  # a dict of columns (pandas to_dict() keys beside JSON ones)
    [{1: 5.0, "1": 6.0}],  # a list of rows
])
def test_column_names_that_read_the_same_as_text_are_refused(table):
    with pytest.raises(SlotValueError, match=r"columns 1 and '1'.* same name '1'"):
        table_rows(table)


def test_a_collision_names_task_column_and_row(tok):
    rows = [{"t": {"a": [1.0, 2.0]}, "y": "x"}, {"t": {1: [5.0], "1": [6.0]}, "y": "x"}]
    task = Task("collide", "[STRUCT:t] -> [TEXT:y]", rows)
    with pytest.raises(TaskDataError, match=r"task 'collide', column 't', row 1: table columns 1 and '1'"):
        task.encode(1, tok, training=False)


def test_text_with_digit_separators_is_text_not_a_number():
    assert read_cell("12_34") == (TEXT, "12_34")  # float() would read 1234.0
    assert read_cell(" 1e3 ") == (NUMERIC, 1000.0)
    assert read_cell("5.1") == (NUMERIC, 5.1)


def test_an_id_column_with_underscores_is_one_text_column(tok):
    rows = [{"t": {"code": ["12_34", "A_1", "12_34", "A_1"]}, "y": "x"}] * 2
    stats = Task("ids", "[STRUCT:t] -> [TEXT:y]", rows).fit_statistics()["struct"]["t"]
    assert stats["mean"] == {}
    assert sorted(stats["values"]["code"]) == ["12_34", "A_1"]


def test_linearised_tables_write_missing_cells_as_nothing(tok):
    table = [{"a": 1.5, "b": float("nan")}, {"a": None, "b": 3.0}]
    assert linearize_table(table) == "a | b ; 1.5 |  ;  | 3.0"
    assert read_cell(float("nan")) == (MISSING, None)  # as the cell encoding reads it
    rows = [{"t": table, "y": "x"}]
    encoded = Task("text", "[STRUCT:t,preprocess=struct_text] -> [TEXT:y]", rows).encode(0, tok, training=False)
    assert "nan" not in tok.decode(encoded.encoder[0].tokens)


def test_a_missing_answer_scores_as_the_empty_text_in_every_text_metric():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert chrf([None], ["None"]) == 0.0  # was 100: None was scored as the word "None"
        assert rouge_l([None], ["None"]) == 0.0
        assert wer([None], ["none"]) == 1.0  # was 0
        assert bleu([None], ["None"]) == 0.0
        assert chrf([float("nan")], ["nan"]) == 0.0
        # the same as an empty answer, and as the answer metrics read None (no answer)
        assert chrf([None], ["a b"]) == chrf([""], ["a b"])
        assert wer([None], ["a b"]) == wer([""], ["a b"])
    assert exact_match([None], ["None"]) == 0.0
    assert not math.isnan(rouge_l([None, "a b"], ["x", "a b"]))


def test_a_suite_of_tasks_that_share_texts_across_their_splits_warns():
    """language_identification's English test turns are chatterbot turns that reply_matching trains on."""
    from moe_gen.quality.suite import suite_tasks

    with pytest.warns(UserWarning, match=r"42 of its 60 also reply_matching training inputs"):
        suite_tasks(["language_identification", "reply_matching"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        suite_tasks(["language_identification", "doc_topic"])


@pytest.mark.parametrize("preset, words", [("sudoku_4x4", "299 of the 300 test answers"),
                                           ("doc_topic", "5 of the 170 test paragraphs are near copies"),
                                           ("video_classification", "bigbuckbunny/084")])
def test_presets_say_where_their_test_rows_are_close_to_training_rows(preset, words):
    from moe_gen.tasks import preset_info

    assert words in preset_info(preset).source
