"""Validation rows split off a task's training rows (``Task.split_off``), for choosing a step while
training (``TrainConfig.eval_every``, ``keep_best``, ``patience``) on rows that are neither trained
on nor reported.

Rows are drawn by scikit-learn: at random (``train_test_split``), keeping each label's share
(``stratify``), or keeping every group's rows on one side (``GroupShuffleSplit``: windows of one
clip, turns of one dialogue, crops of one image), so that a near copy of a training row is not
scored as held out.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np

from moe_gen.tasks.plan import TaskDataError

__all__ = ["split_off"]


def _column(task, name: str, what: str) -> list:
    """Every row's ``name`` (as text, so that numbers and labels compare alike); a row without it
    raises ``TaskDataError`` naming the task, the column and the row. A dataset with that column
    (``column_names``) gives it whole, without reading (decoding) its rows one by one."""
    if name in (getattr(task.data, "column_names", None) or ()):
        return [str(value) for value in task.data[name]]
    values = []
    for index in range(len(task)):
        row = task._row(index)
        if not isinstance(row, dict) or name not in row:
            raise TaskDataError(f"task {task.name!r}, row {index}: no column {name!r} to {what} by")
        values.append(str(row[name]))
    return values


def _subset(task, indices: np.ndarray):
    """``task`` over the rows at ``indices`` (in row order; a dataset with ``select`` keeps its lazy
    rows)."""
    indices = sorted(int(i) for i in indices)
    rows = task.data.select(indices) if hasattr(task.data, "select") else [task.data[i] for i in indices]
    return task.with_rows(rows)


def split_off(task, fraction: float, *, seed: int = 0, group: Optional[str] = None,
              stratify: Optional[str] = None) -> tuple[Any, Any]:
    """``(rest, held)``: ``task`` split into two tasks of the same declaration, ``held`` with about
    ``fraction`` of the rows (of the groups, with ``group``), drawn with ``seed``. ``group``: a
    column whose rows stay together; ``stratify``: a column whose values keep their shares on both
    sides (not both). Raises ``ValueError`` naming the task for a fraction outside (0, 1), both
    columns, or too few rows (groups, rows per label) to put some on each side."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ValueError(f"task {task.name!r}: split_off's fraction must be in (0, 1), got {fraction!r}")
    if group is not None and stratify is not None:
        raise ValueError(f"task {task.name!r}: split_off keeps groups together or label shares, not both; give "
                         "group or stratify")
    indices = np.arange(len(task))
    groups = _column(task, group, "group") if group is not None else None  # (a row without it: TaskDataError)
    labels = _column(task, stratify, "stratify") if stratify is not None else None
    try:
        if groups is not None:
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            rest, held = next(splitter.split(indices, groups=groups))
        else:
            rest, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as exc:  # too few rows, groups or rows of a label for this fraction
        raise ValueError(f"task {task.name!r} ({len(task)} rows): cannot split off {fraction:g} of it "
                         f"({exc})") from None
    if len(rest) == 0 or len(held) == 0:
        raise ValueError(f"task {task.name!r} ({len(task)} rows): split_off({fraction:g}) leaves "
                         f"{'no rows to train on' if len(rest) == 0 else 'no rows held out'}")
    return _subset(task, rest), _subset(task, held)
