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
