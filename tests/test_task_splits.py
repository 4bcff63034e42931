"""Validation rows split off a task (``Task.split_off``): sizes, disjoint sides, whole groups,
label shares, the seed, and the refusals."""

from __future__ import annotations

import collections

import pytest

from moe_gen.tasks import Task, TaskDataError, load_preset

INSTRUCTION = "[TEXT:text] which class is this? -> [TEXT:label,closed_set]"


def _task(n: int = 40, **extra) -> Task:
    rows = [{"text": f"row {i}", "label": "ab"[i % 4 == 0], "clip": f"c{i // 5}", **extra} for i in range(n)]
    return Task("toy", INSTRUCTION, rows, metrics=("accuracy",))


def _texts(task: Task) -> list[str]:
    return [row["text"] for row in task.data]


def test_the_two_sides_part_the_rows_in_order_and_keep_the_declaration():
    task = _task()
    rest, held = task.split_off(0.25, seed=3)
    assert len(held) == 10 and len(rest) == 30
    assert sorted(_texts(rest) + _texts(held), key=lambda t: int(t.split()[1])) == _texts(task)
    assert _texts(held) == sorted(_texts(held), key=lambda t: int(t.split()[1]))  # row order kept
    assert (rest.name, str(rest.instruction), held.metrics) == ("toy", str(task.instruction), ("accuracy",))
    again, _ = task.split_off(0.25, seed=3)
    other, _ = task.split_off(0.25, seed=4)
    assert _texts(again) == _texts(rest) and _texts(other) != _texts(rest)


def test_groups_stay_on_one_side():
    rest, held = _task().split_off(0.25, group="clip")
    clips = {row["clip"] for row in held.data}
    assert len(clips) == 2 and len(held) == 10  # two of the eight clips, all five rows of each
    assert not clips & {row["clip"] for row in rest.data}


def test_stratify_keeps_each_labels_share():
    rest, held = _task().split_off(0.2, stratify="label", seed=1)
    assert collections.Counter(r["label"] for r in held.data) == {"a": 6, "b": 2}
    assert collections.Counter(r["label"] for r in rest.data) == {"a": 24, "b": 8}


def test_a_motion_presets_windows_split_by_clip():
    task = load_preset("motion_classification", "train", limit=60)
    rest, held = task.split_off(0.3, group="clip", seed=0)
    assert len(rest) + len(held) == len(task) and len(held) > 0
    assert not {r["clip"] for r in held.data} & {r["clip"] for r in rest.data}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"fraction": 0}, ValueError, r"task 'toy': split_off's fraction must be in \(0, 1\), got 0"),
    ({"fraction": 1.5}, ValueError, "fraction must be in"),
    ({"fraction": 1}, ValueError, r"split_off's fraction must be in \(0, 1\), got 1"),
    ({"fraction": 0.2, "group": "clip", "stratify": "label"}, ValueError, "group or stratify"),
    ({"fraction": 0.2, "group": "speaker"}, TaskDataError, r"task 'toy', row 0: no column 'speaker' to group by"),
    ({"fraction": 0.5, "stratify": "text"}, ValueError,
     r"task 'toy' \(40 rows\): cannot split off 0.5 of it \(.+\)$"),
])
def test_bad_requests_are_refused_naming_the_task(kwargs, error, message):
    with pytest.raises(error, match=message):
        _task().split_off(**kwargs)


def test_too_few_rows_are_refused():
    with pytest.raises(ValueError, match=r"task 'toy' \(1 rows\)"):
        _task(1).split_off(0.5)


def test_the_seed_draws_the_groups():
    task = _task()
    clips = [{row["clip"] for row in task.split_off(0.25, group="clip", seed=seed)[1].data} for seed in range(4)]
    assert clips[0] == {row["clip"] for row in task.split_off(0.25, group="clip", seed=0)[1].data}
    assert len({frozenset(c) for c in clips}) > 1


@pytest.mark.parametrize("column, what", [("clip", "group"), ("label", "stratify")])
def test_a_row_without_the_column_is_named(column, what):
    task = _task(8)
    rows = list(task.data)
    del rows[3][column]
    with pytest.raises(TaskDataError, match=rf"task 'toy', row 3: no column '{column}' to {what} by"):
        task.with_rows(rows).split_off(0.5, **{what: column})


class _Lazy(list):
    """Rows with ``select`` (as a ``datasets.Dataset``): the split asks it for the rows of each side."""

    def select(self, indices):
        return _Lazy(self[i] for i in indices)


def test_rows_with_select_are_selected_in_row_order():
    task = _task()
    lazy = task.with_rows(_Lazy(task.data))
    rest, held = lazy.split_off(0.25, seed=3)
    assert isinstance(held.data, _Lazy) and isinstance(rest.data, _Lazy)
    plain_rest, plain_held = task.split_off(0.25, seed=3)
    assert (_texts(rest), _texts(held)) == (_texts(plain_rest), _texts(plain_held))


def test_a_datasets_column_is_read_whole_not_row_by_row():
    """A dataset with ``column_names`` gives the group column in one read; its rows (images to
    decode, say) are not read to split it."""

    class Dataset:
        column_names = ["text", "label", "clip"]

        def __init__(self, rows):
            self.rows, self.row_reads = rows, 0

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, key):
            if isinstance(key, str):
                return [row[key] for row in self.rows]
            self.row_reads += 1
            return self.rows[key]

        def select(self, indices):
            return Dataset([self.rows[i] for i in indices])

    data = Dataset(list(_task().data))
    rest, held = Task("toy", INSTRUCTION, data).split_off(0.25, group="clip")
    assert data.row_reads == 0 and len(held) == 10 and len(rest) == 30
    assert not {r["clip"] for r in held.data.rows} & {r["clip"] for r in rest.data.rows}
