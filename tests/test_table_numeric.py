"""STRUCT tables as cells: the accepted table forms, malformed cells, statistics fitted on training
rows and saved with the model, mixed and missing values, the cell adapter, the presets that read
tables, and (learning) a numeric table task from scikit-learn's wine data."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import GenerativeObjective
from moe_gen.registry import ADAPTERS
from moe_gen.tasks import Task, Tokenizer, collate, load_preset
from moe_gen.tasks.modalities.table import MISSING, NUMERIC, TEXT
from moe_gen.tasks.modalities.text_like import linearize_table
from moe_gen.tasks.plan import TaskDataError

INSTRUCTION = "[STRUCT:table] which class is this? -> [TEXT:label,closed_set]"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def cells(task: Task, index: int, tok: Tokenizer, statistics=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows ``[N, 4]`` (column id, z, kind, text id) and positions ``[N, 3]`` of a row's table."""
    sample = task.encode(index, tok, training=False, statistics=statistics)
    chunk = next(c for c in sample.encoder if c.modality == "STRUCT")
    assert chunk.adaptor == "struct_cells"
    return chunk.rows, chunk.positions


def test_a_dict_of_single_values_is_a_one_row_table(tok):
    rows = [{"table": {"a": 1.0, "b": "x"}, "label": "p"}, {"table": {"a": 3.0, "b": "x"}, "label": "q"}]
    one_row = Task("t", INSTRUCTION, rows)
    as_columns = Task("t", INSTRUCTION, [{**r, "table": {k: [v] for k, v in r["table"].items()}} for r in rows])
    as_records = Task("t", INSTRUCTION, [{**r, "table": [r["table"]]} for r in rows])
    features, positions = cells(one_row, 0, tok)
    # column ids 1, 2; a = (1 - 2) / 1 = -1; "x" was seen twice, so it has text id 1
    assert features.tolist() == [[1.0, -1.0, NUMERIC, 0.0], [2.0, 0.0, TEXT, 1.0]]
    assert positions.tolist() == [[0, 0, 0], [0, 0, 1]]
    for other in (as_columns, as_records):  # the three forms of one table encode alike
        assert torch.equal(cells(other, 0, tok)[0], features)
    assert linearize_table({"a": 1.0, "b": "x"}) == "a | b ; 1.0 | x"  # struct_text takes it too
    text = Task("t", "[STRUCT:table,preprocess=struct_text] which class is this? -> [TEXT:label,closed_set]", rows)
    chunk = text.encode(0, tok).encoder[0]
    assert chunk.tokens is not None and tok.decode(chunk.tokens) == "a | b ; 1.0 | x"


@pytest.mark.parametrize("table, message", [
    ({"a": [1.0, 2.0], "b": "x"}, "table column 'a' holds a list of cells but column 'b' a single value"),
    ({"a": [1.0, 2.0], "b": ["x"]}, r"the table's columns have different lengths \('a': 2, 'b': 1\)"),
    ("a | b ; 1 | 2", "a STRUCT value must be a list of row dicts, a dict of columns or a dict of single values, "
                      "got str"),
    (5.0, "a STRUCT value must be .* got float"),
    ([{"a": 1.0}, [1.0]], "table row 1 is a list; a table given as a list needs one dict per row"),
    ({"a": [[1.0, 2.0]]}, r"table column 'a', table row 0: a cell must be .* got list \(tables do not nest\)"),
    ([{"a": 1.0}, {"a": {"x": 1}}], "table column 'a', table row 1: a cell must be .* got dict"),
    ({"a": 1.0, "b": np.zeros(3)}, "table column 'b' holds a list of cells but column 'a' a single value"),
    ({"a": [1.0, object()]}, "table column 'a', table row 1: a cell must be .* got object"),
    ({"a": 1.0, "b": math.inf}, "table column 'b', table row 0: the cell is inf; numbers must be finite"),
    ([], "the table has no cells"),
])
def test_malformed_tables_name_task_column_and_row(tok, table, message):
    good = {"table": {"a": 1.0, "b": "x"}, "label": "p"}
    task = Task("tables", INSTRUCTION, [good, good, {"table": table, "label": "p"}])
    with pytest.raises(TaskDataError, match=r"task 'tables', column 'table', row 2: " + message):
        task.encode(2, tok)
    skipping = Task("tables", INSTRUCTION, [good, {"table": table, "label": "p"}], on_error="skip")
    assert len(list(skipping.samples(tok))) == 1 and skipping.skipped == 1


def test_mixed_columns_missing_values_and_unseen_columns(tok):
    train = [{"table": {"size": size, "colour": colour, "note": note}, "label": "p"}
             for size, colour, note in [(1, "red", "a"), ("3", "red", "b"), (None, "blue", "c"),
                                        ("n/a", "blue", None), (float("nan"), "", "d"), (5.0, "blue", "e")]]
    task = Task("mixed", INSTRUCTION, train)
    stats = task.fit_statistics()["struct"]["table"]
    assert stats["columns"] == ["size", "colour", "note"]
    assert stats["mean"] == {"size": 3.0} and stats["std"]["size"] == pytest.approx(math.sqrt(8 / 3))
    # text values seen twice or more get ids; "n/a" (once) and the row-unique notes do not
    assert stats["values"] == {"colour": ["blue", "red"]}
    features, _ = cells(task, 1, tok)  # "3" is a number: the mean
    assert features[0].tolist() == [1.0, 0.0, NUMERIC, 0.0]
    assert features[1].tolist() == [2.0, 0.0, TEXT, 2.0]  # red: the second value of the vocabulary
    assert features[2].tolist() == [3.0, 0.0, TEXT, 0.0]  # "b": text without an id
    for index in (2, 4):  # None, NaN and "" are missing
        kinds = cells(task, index, tok)[0][:, 2].tolist()
        assert kinds[0] == MISSING and (index != 4 or kinds[1] == MISSING)
    assert cells(task, 3, tok)[0][0].tolist() == [1.0, 0.0, TEXT, 0.0]  # "n/a" is text in a numeric column
    assert cells(task, 3, tok)[0][2, 2] == MISSING  # None
    # test-time rows: an unseen column, an unseen value, a number where training had only text
    fitted = task.fit_statistics()
    test = Task("mixed", INSTRUCTION, [{"table": {"size": 11.0, "colour": "green", "note": 99,
                                                  "shape": "round"}, "label": "p"}])
    features, positions = cells(test, 0, tok, statistics=fitted)
    z = (11.0 - 3.0) / math.sqrt(8 / 3)
    assert features[0].tolist() == pytest.approx([1.0, z, NUMERIC, 0.0])
    assert features[1].tolist() == [2.0, 0.0, TEXT, 0.0]  # green: unseen value
    assert features[2].tolist() == pytest.approx([3.0, math.log1p(99.0), NUMERIC, 0.0])  # no numeric statistics
    assert features[3].tolist() == [0.0, 0.0, TEXT, 0.0]  # shape: unseen column
    assert positions[:, 2].tolist() == [0, 1, 2, 3]


def test_slot_attributes_cap_and_hide_cells(tok):
    rows = [{"table": [{"a": float(i), "b": "x"} for i in range(5)], "label": "p"}]
    capped = Task("t", "[STRUCT:table,max_length=3] -> [TEXT:label]", rows)
    features, positions = cells(capped, 0, tok)
    assert features.shape == (3, 4) and positions[:, 1].tolist() == [0, 0, 1]  # row by row
    hidden = Task("t", "[STRUCT:table,mask_ratio=0.5] -> [TEXT:label]", rows)
    kinds = hidden.encode(0, tok, training=True).encoder[0].rows[:, 2]
    assert 0 < int((kinds == MISSING).sum()) < 10  # some cells hidden in training
    assert (cells(hidden, 0, tok)[0][:, 2] != MISSING).all()  # none at evaluation


def test_statistics_come_from_training_rows_and_are_saved_with_the_model(tok, tmp_path):
    # An open-text target: a closed set's labels come from the task's rows, so a task with no rows
    # cannot plan one.
    species = "[STRUCT:table] which species is it? -> [TEXT:species]"
    train = Task("species", species, load_preset("table_species", "train").data)
    test = Task("species", species, load_preset("table_species", "test").data)
    measures = np.array([[row["table"][c] for c in ("sepal length", "petal width")] for row in train.data])
    stats = train.fit_statistics()["struct"]["table"]
    assert stats["mean"]["sepal length"] == pytest.approx(measures[:, 0].mean())
    assert stats["std"]["petal width"] == pytest.approx(measures[:, 1].std())
    assert test.fit_statistics() != train.fit_statistics()  # a test task alone would scale differently
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), [train], tok)
    assert model.config.preprocessor_statistics == {"species": train.fit_statistics()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    objective = GenerativeObjective(model)
    for step in range(20):  # a little training, so predictions depend on the encoding
        batch = collate([train.encode(i, tok, seed=step) for i in range(step * 6 % 100, step * 6 % 100 + 16)],
                        tok, model.task_ids)
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "m"))
    assert loaded.config.preprocessor_statistics == model.config.preprocessor_statistics
    empty = Task("species", species, [])  # no rows to fit anything on
    rows = test.data[:12]
    # the reloaded model encodes a row-less task exactly as the training task did
    plan = empty.plan(loaded.tokenizer, loaded.encoding_statistics(empty))
    for i, row in enumerate(rows):
        reloaded = plan.encode(row, i, training=False).encoder[0].rows
        trained = train.plan(tok).encode(row, i, training=False).encoder[0].rows
        assert torch.equal(reloaded, trained)
    # (without the model's statistics the row-less task would read every column as unseen)
    assert not torch.equal(empty.plan(tok).encode(rows[0], 0, training=False).encoder[0].rows,
                           train.plan(tok).encode(rows[0], 0, training=False).encoder[0].rows)
    expected = model.infer(test, rows)
    got = loaded.infer(empty, rows)
    assert [p.text for p in got] == [p.text for p in expected]
    assert [p.score for p in got] == pytest.approx([p.score for p in expected])


def test_table_presets_plan_train_and_decode(tok):
    names = ("table_species", "table_to_text", "table_qa")
    tasks = [load_preset(n, "train", limit=8) for n in names]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), tasks, tok)
    assert model.config.adapters["struct_cells"] == 4
    batch = collate([s for t in tasks for s in t.samples(tok)], tok, model.task_ids)
    result = GenerativeObjective(model)(batch)
    result["loss"].backward()
    adapter = model.adapters["struct_cells"]
    # numeric tables reach every parameter but the text vocabulary's rows with ids
    assert adapter.number_in.weight.grad.abs().sum() > 0 and adapter.frequencies_K.grad.abs().sum() > 0
    assert adapter.text.weight.grad[0].abs().sum() > 0 and adapter.text.weight.grad[1:].abs().sum() == 0
    answers = model.infer(tasks[0], load_preset("table_species", "test", limit=3).data)
    assert {p.text for p in answers} <= {"setosa", "versicolor", "virginica"}
    assert all(isinstance(p.text, str) for p in model.infer(tasks[1], tasks[1].data[:2], max_new_tokens=4))


def test_cell_adapter_reads_numbers_only_in_numeric_cells():
    adapter = ADAPTERS.get("struct_cells")(4, 32)
    positions = torch.zeros(2, 3, dtype=torch.long)
    text_cells = torch.tensor([[1.0, 0.0, TEXT, 3.0], [1.0, 2.5, TEXT, 3.0]])
    out = adapter(text_cells, positions)
    assert out.shape == (2, 32) and torch.equal(out[0], out[1])  # z is not read for text cells
    numbers = adapter(torch.tensor([[1.0, -1.0, NUMERIC, 0.0], [1.0, 1.0, NUMERIC, 0.0]]), positions)
    assert not torch.allclose(numbers[0], numbers[1])
    with pytest.raises(ValueError, match="struct_cells takes 4 features a cell, got 5"):
        ADAPTERS.get("struct_cells")(5, 32)


def wine_tasks() -> tuple[Task, Task]:
    """scikit-learn's wine data (178 wines, 13 measurements, 3 cultivars) as one-row numeric tables;
    every 5th wine is held out."""
    from sklearn.datasets import load_wine

    data = load_wine()
    rows = [{"table": {name: float(v) for name, v in zip(data.feature_names, x)}, "label": str(data.target_names[y])}
            for x, y in zip(data.data, data.target)]
    train = Task("wine", INSTRUCTION, [r for i, r in enumerate(rows) if i % 5], metrics=("accuracy",))
    test = Task("wine", INSTRUCTION, [r for i, r in enumerate(rows) if i % 5 == 0], metrics=("accuracy",))
    return train, test


@pytest.mark.slow
def test_numeric_table_is_learned(tmp_path):
    """Wine cultivars from 13 numbers (142 training rows, 36 held out), debug flavour with attribute
    routing, 100 steps of 16 through the Trainer. Measured: 100% / 97.2% / 100% held out (seeds 0, 1,
    2; 60 steps: 97.2% / 91.7% / 100%). 100 steps took 38-64 s on this 2-core CPU while other jobs
    shared it (150 steps took 16 s on a quiet machine). Logistic regression on standardised features:
    ~97%. The same task linearised as text (preprocess=struct_text): 44% after 150 steps."""
    from moe_gen.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    train, test = wine_tasks()
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), [train],
                                  Tokenizer.default())
    config = TrainConfig(steps=100, batch_size=16, lr=3e-3, warmup_steps=10, log_every=1000, progress=False,
                         tensorboard=False, eval_limit=None)
    trainer = Trainer(model, [train], config, output_dir=str(tmp_path), eval_tasks=[test])
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    accuracy = trainer.evaluate()["wine"]["accuracy"]
    assert accuracy >= 0.9, (accuracy, seconds)


def test_tables_wider_than_the_adapter_tells_apart_are_warned_of_and_every_column_is_standardised(tok):
    """Columns after the 127th and text values past the 1,023 most frequent read silently as unseen,
    and the later columns' numbers were log-scaled instead of standardised (fourteenth session's
    README audit)."""
    rows = [{"t": {f"c{j}": 1000.0 + 10 * i + j for j in range(130)}, "label": "ab"[i % 2]} for i in range(20)]
    wide = Task("wide", "[STRUCT:t] which? -> [TEXT:label,closed_set]", rows)
    with pytest.warns(UserWarning, match=r"task 'wide', column 't': the tables have 130 columns .* tells 127 "
                                         r"columns \(the first seen\)"):
        statistics = wide.fit_statistics()
    encoded = next(c for c in wide.encode(0, tok, training=False, statistics=statistics).encoder
                   if c.rows is not None).rows
    assert float(encoded[126, 0]) == 127 and float(encoded[127, 0]) == 0  # the 128th column has no id of its own
    assert float(encoded[127, 1]) == pytest.approx(float(encoded[0, 1]), abs=1e-5)  # but its z is standardised
    cities = [{"t": {"city": f"city{i // 2}"}, "label": "ab"[i % 2]} for i in range(2200)]
    with pytest.warns(UserWarning, match=r"1100 text values seen 2\+ times"):
        Task("cities", "[STRUCT:t] which? -> [TEXT:label,closed_set]", cities).fit_statistics()
    with warnings.catch_warnings():  # a table the adapter tells apart: no warning
        warnings.simplefilter("error")
        Task("narrow", "[STRUCT:t] which? -> [TEXT:label,closed_set]",
             [{"t": {"a": float(i)}, "label": "ab"[i % 2]} for i in range(8)]).fit_statistics()


# ---- mutation-testing audit (r15): clipping, signs, booleans, the row limit, ids, cased text ---------------

def test_z_is_clipped_both_ways_and_the_log_scale_keeps_the_sign(tok):
    """z = (x − mean) / std clipped to ±10 on both sides; a column without numeric statistics reads
    sign(x)·log(1 + |x|), so -99 and 99 are told apart."""
    train = [{"table": {"a": a, "b": "x"}, "label": "p"} for a in (-1.0, 1.0)]
    fitted = Task("t", INSTRUCTION, train).fit_statistics()
    test = Task("t", INSTRUCTION, [{"table": {"a": a, "b": b}, "label": "p"}
                                   for a, b in ((-1000.0, -99), (1000.0, 99), (-3.0, 0))])
    z = [z for i in range(3) for z in cells(test, i, tok, statistics=fitted)[0][:, 1].tolist()]
    assert z == pytest.approx([-10.0, -math.log1p(99.0), 10.0, math.log1p(99.0), -3.0, 0.0])


def test_booleans_are_text_cells():
    """True/False (and NumPy's) are text "True"/"False", not the numbers 1 and 0."""
    from moe_gen.tasks.modalities.table import read_cell

    assert [read_cell(v) for v in (True, False, np.bool_(True), 1, 0.0)] == [
        (TEXT, "True"), (TEXT, "False"), (TEXT, "True"), (NUMERIC, 1.0), (NUMERIC, 0.0)]


def test_a_table_of_as_many_rows_as_the_adapter_tells_apart_is_taken(tok):
    from moe_gen.tasks.modalities.table import MAX_TABLE_ROWS

    def table(n: int) -> Task:
        return Task("t", INSTRUCTION, [{"table": {"a": [float(i) for i in range(n)]}, "label": "p"}])

    _, positions = cells(table(MAX_TABLE_ROWS), 0, tok)
    assert positions[:, 1].tolist() == list(range(MAX_TABLE_ROWS))
    with pytest.raises(TaskDataError, match=rf"the table has {MAX_TABLE_ROWS + 1} rows; the table adapter tells "
                                            rf"{MAX_TABLE_ROWS} apart"):
        cells(table(MAX_TABLE_ROWS + 1), 0, tok)


def test_cell_adapter_embeds_the_table_row_not_the_column_index():
    """A cell's row embedding is its table row (positions[:, 1]); its column is read from the column
    id feature, so the column index in positions changes nothing."""
    torch.manual_seed(0)
    adapter = ADAPTERS.get("struct_cells")(4, 32)
    features = torch.tensor([[2.0, 0.5, NUMERIC, 0.0]] * 3)
    out = adapter(features, torch.tensor([[0, 0, 0], [0, 0, 5], [0, 3, 0]]))
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[2] - out[0], adapter.row.weight[3] - adapter.row.weight[0])


def test_text_value_ids_fit_the_adapter_and_uncased_statistics_are_lower_cased():
    """At most MAX_TEXT_VALUES − 1 values get ids 1.. (id 0 is unseen), so every id has its own row
    of the adapter's table; an ``uncased`` slot counts "Red" and "RED" as one value."""
    from moe_gen.tasks.modalities.table import MAX_TEXT_VALUES, fit_table_statistics

    tables = [{"city": f"city{i // 2}"} for i in range(2 * MAX_TEXT_VALUES)]  # 1024 values seen twice
    with pytest.warns(UserWarning, match=rf"{MAX_TEXT_VALUES} text values seen 2\+ times"):
        stats = fit_table_statistics(tables)
    assert len(stats["values"]["city"]) == MAX_TEXT_VALUES - 1
    cased = [{"c": "Red"}, {"c": "RED"}, {"c": "blue"}]
    assert fit_table_statistics(cased, uncased=True)["values"] == {"c": ["red"]}
    assert fit_table_statistics(cased)["values"] == {}
    tok = Tokenizer.default()
    rows = [{"table": t, "label": "p"} for t in cased]
    task = Task("t", "[STRUCT:table,uncased] which class is this? -> [TEXT:label,closed_set]", rows)
    assert task.fit_statistics()["struct"]["table"]["values"] == {"c": ["red"]}
    assert [cells(task, i, tok)[0][0, 3].item() for i in range(3)] == [1.0, 1.0, 0.0]


def test_linearised_tables_write_missing_cells_as_nothing():
    """(mutation-testing audit r17) ``None`` is an empty cell, not the word "None"; a cell 0 stays "0"."""
    assert linearize_table([{"a": None, "b": 2}, {"a": "x", "b": None}, {"a": 0, "b": ""}]) == \
        "a | b ;  | 2 ; x |  ; 0 | "
