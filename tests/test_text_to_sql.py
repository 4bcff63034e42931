"""The text_to_sql preset: template questions with exact SQL over a read-only in-memory SQLite
database, scored by execution; a target's max_length bounds its decoding."""

import torch

from moe_gen.tasks import Tokenizer, load_preset, preset_info
from moe_gen.tasks.metrics import compute
from moe_gen.tasks.sources.sql import execute, flowers_database, same_result, text_to_sql_rows


def test_questions_are_split_and_every_gold_query_runs():
    train, test = text_to_sql_rows("train"), text_to_sql_rows("test")
    assert len(train) > 400 and len(test) > 100
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    conn = flowers_database()
    assert execute(conn, "select count(*) from flowers") == [(150,)]
    assert all(execute(conn, row["query"]) is not None for row in train + test)
    assert execute(conn, "select count(*) from flowers where species = 'setosa'") == [(50,)]


def test_the_database_is_read_only_and_runaway_queries_stop():
    conn = flowers_database()
    assert execute(conn, "drop table flowers") is None
    assert execute(conn, "insert into flowers values (999, 1, 1, 1, 1, 'x')") is None
    assert execute(conn, "attach database ':memory:' as other") is None
    endless = "with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) from r"
    assert execute(conn, endless) is None
    assert execute(conn, "select count(*) from flowers") == [(150,)]  # still intact


def test_execution_accuracy_compares_results_not_text():
    gold = "select count(*) from flowers where species = 'setosa'"
    same = "SELECT COUNT(id) FROM flowers WHERE species='setosa'"  # other text, same rows
    conn = flowers_database()
    assert same_result(conn, same, gold) and not same_result(conn, "select 1", gold)
    scores = compute(("execution_accuracy", "exact_match"), [same, gold, "not sql", "drop table flowers"], [gold] * 4)
    assert scores["execution_accuracy"] == 0.5 and scores["exact_match"] == 0.25


def test_the_target_decodes_up_to_its_max_length():
    from moe_gen.model import GeneralistModel, flavour

    info = preset_info("text_to_sql")
    assert info.metrics[0] == "execution_accuracy" and "max_length=48" in info.instruction
    tok = Tokenizer.default()
    task = load_preset("text_to_sql", "train", limit=4)
    assert max(len(tok.encode(r["query"])) for r in text_to_sql_rows("all")) <= 48
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    answers = model.infer(task, task.data[:2])  # an untrained model runs to the slot's limit, past 32
    assert all(32 < len(p.tokens) <= 48 for p in answers), [len(p.tokens) for p in answers]


def _iris_answer(question: str):
    """The answer to a template question computed from scikit-learn's iris arrays, without SQL."""
    import re

    import numpy as np
    from sklearn.datasets import load_iris

    data = load_iris()
    species = data.target_names[data.target]
    measures = dict(zip(("sepal length", "sepal width", "petal length", "petal width"), np.round(data.data, 1).T))
    name = "|".join(measures)
    if m := re.fullmatch(rf"what is the (largest|smallest|average) ({name}) of (\w+) flowers\?", question):
        values = measures[m[2]][species == m[3]]
        return {"largest": values.max(), "smallest": values.min(), "average": values.mean()}[m[1]]
    if m := re.fullmatch(rf"which species has the flower with the (longest|shortest) ({name})\?", question):
        values = measures[m[2]]
        extreme = values.max() if m[1] == "longest" else values.min()
        return set(species[values == extreme])  # any species that reaches the extreme
    if m := re.fullmatch(rf"how many (?:(\w+) )?flowers have a ({name}) (above|below) ([\d.]+)\?", question):
        values, v = measures[m[2]], float(m[4])
        chosen = (values > v) if m[3] == "above" else (values < v)
        return int((chosen & ((species == m[1]) if m[1] else True)).sum())
    if m := re.fullmatch(r"how many flowers are (\w+)\?", question):
        return int((species == m[1]).sum())
    raise AssertionError(f"no template matches {question!r}")


def test_every_gold_query_answers_its_question():
    import pytest

    rows = text_to_sql_rows("all")
    assert len(rows) == 567 and len({r["question"] for r in rows}) == 567
    conn = flowers_database()
    for row in rows:
        want, got = _iris_answer(row["question"]), execute(conn, row["query"])
        assert got is not None and len(got) == 1 and len(got[0]) == 1, row
        if isinstance(want, set):
            assert got[0][0] in want, row
        else:
            assert got[0][0] == pytest.approx(want, abs=1e-9), row
    assert sum(r["question"].startswith("how many flowers are ") for r in rows) == 3
    assert text_to_sql_rows("test") == rows[::5]
    assert text_to_sql_rows("train") == [r for i, r in enumerate(rows) if i % 5]


def test_the_table_keeps_scikit_learns_row_numbers():
    conn = flowers_database()
    assert execute(conn, "select * from flowers where id = 0") == [(0, 5.1, 3.5, 1.4, 0.2, "setosa")]
    assert execute(conn, "select min(id), max(id) from flowers") == [(0, 149)]


def test_results_compare_rounded_and_in_any_order_and_failures_never_match():
    conn = flowers_database()
    assert same_result(conn, "select 0.1 + 0.2", "select 0.3")  # 0.30000000000000004: rounded to 6 digits
    assert not same_result(conn, "select 0.3001", "select 0.3")
    assert same_result(conn, "select id from flowers order by id desc", "select id from flowers")
    assert not same_result(conn, "not sql", "not sql") and not same_result(conn, "select 1", "not sql")  # bad gold
    assert execute(conn, "select '\ud800'") is None  # text that cannot be encoded fails like bad SQL


def test_the_step_budget_is_for_execute_only():
    conn = flowers_database()
    big = "select count(*) from flowers a, flowers b, flowers c"  # 3.4 million rows: past execute's budget
    assert execute(conn, big) is None and execute(conn, "select 1") == [(1,)]
    assert conn.execute(big).fetchall() == [(3_375_000,)]  # the connection itself is left unlimited
