"""Text-to-SQL over a SQLite database the package builds (no files): scikit-learn's iris flowers as
table ``flowers(id, sepal_length, sepal_width, petal_length, petal_width, species)``.

Questions come from templates with their exact SQL, written in lower case (counts, extremes,
averages, thresholds, orderings, by species and measure); every 5th distinct question is ``test``. Predictions are
scored by *execution*: a predicted query is run on the same database (read-only: an authorizer
allows reading and functions only, and a progress handler stops runaway queries) and counts when
its result rows equal the gold query's (order-insensitive, numbers rounded to 6 digits).
"""

from __future__ import annotations

import collections
import functools
import sqlite3

__all__ = ["flowers_database", "text_to_sql_rows", "execute", "same_result", "COLUMNS"]

COLUMNS = {"sepal length": "sepal_length", "sepal width": "sepal_width", "petal length": "petal_length",
           "petal width": "petal_width"}
_SPECIES = ("setosa", "versicolor", "virginica")
_MAX_STEPS = 200  # progress-handler calls (each every 1,000 virtual machine instructions)


@functools.lru_cache(maxsize=1)
def _flowers() -> tuple[tuple, ...]:
    from sklearn.datasets import load_iris

    data = load_iris()
    return tuple((i, *(round(float(v), 1) for v in values), str(data.target_names[t]))
                 for i, (values, t) in enumerate(zip(data.data, data.target)))


def flowers_database() -> sqlite3.Connection:
    """A fresh in-memory database holding the ``flowers`` table, read-only from then on."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE flowers (id INTEGER PRIMARY KEY, sepal_length REAL, sepal_width REAL, "
                 "petal_length REAL, petal_width REAL, species TEXT)")
    conn.executemany("INSERT INTO flowers VALUES (?, ?, ?, ?, ?, ?)", _flowers())
    conn.commit()
    reading = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in reading else sqlite3.SQLITE_DENY)
    return conn


def execute(conn: sqlite3.Connection, query: str):
    """The rows of ``query`` on ``conn`` (None when it fails, writes, or runs too long)."""
    steps = [0]

    def budget() -> int:
        steps[0] += 1
        return int(steps[0] > _MAX_STEPS)  # non-zero interrupts the query

    conn.set_progress_handler(budget, 1000)
    try:
        return conn.execute(str(query)).fetchall()
    except (sqlite3.Error, ValueError, OverflowError):
        return None
    finally:
        conn.set_progress_handler(None, 0)


def _normal(rows) -> collections.Counter:
    """The rows as a multiset (order ignored, repeats counted), floats to 6 places. A multiset, not
    a sorted list: rows mixing NULL, numbers and text (a predicted ``union``) cannot be sorted, and
    raised a TypeError that stopped the whole evaluation."""
    return collections.Counter(tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows)


def same_result(conn: sqlite3.Connection, predicted: str, gold: str) -> bool:
    """Whether ``predicted`` runs and returns what ``gold`` returns (rows in any order)."""
    got, want = execute(conn, predicted), execute(conn, gold)
    return got is not None and want is not None and _normal(got) == _normal(want)


def _questions() -> list[tuple[str, str]]:
    out = []
    for name, col in COLUMNS.items():
        for sp in _SPECIES:
            out += [(f"what is the largest {name} of {sp} flowers?",
                     f"select max({col}) from flowers where species = '{sp}'"),
                    (f"what is the smallest {name} of {sp} flowers?",
                     f"select min({col}) from flowers where species = '{sp}'"),
                    (f"what is the average {name} of {sp} flowers?",
                     f"select avg({col}) from flowers where species = '{sp}'")]
        out += [(f"which species has the flower with the longest {name}?",
                 f"select species from flowers order by {col} desc limit 1"),
                (f"which species has the flower with the shortest {name}?",
                 f"select species from flowers order by {col} asc limit 1")]
        for tenths in range(2, 80, 3):
            v = tenths / 10
            out += [(f"how many flowers have a {name} above {v}?",
                     f"select count(*) from flowers where {col} > {v}"),
                    (f"how many flowers have a {name} below {v}?",
                     f"select count(*) from flowers where {col} < {v}")]
            for sp in _SPECIES:
                out.append((f"how many {sp} flowers have a {name} above {v}?",
                            f"select count(*) from flowers where species = '{sp}' and {col} > {v}"))
    for sp in _SPECIES:
        out.append((f"how many flowers are {sp}?", f"select count(*) from flowers where species = '{sp}'"))
    return out


def text_to_sql_rows(split: str) -> list[dict]:
    """Rows ``{"question", "query"}``; every 5th question is ``test``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; known: train, test, all")
    return [{"question": q, "query": sql} for i, (q, sql) in enumerate(_questions())
            if split == "all" or (i % 5 == 0) == (split == "test")]
