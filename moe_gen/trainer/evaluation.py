"""Per-task evaluation: decode every row with ``model.infer`` and score it with the task's metrics.

The reference of a row is its first scored decoder slot: the column's text for text and closed-set
targets, the box for box targets, and the encoded target rows (the model's own feature space) for
continuous targets (audio, motion). Tasks without declared metrics get a default per target kind.
"""

from __future__ import annotations

from typing import Optional, Sequence

from moe_gen.tasks import metrics as metric_fns
from moe_gen.tasks.task import Task

__all__ = ["evaluate_task", "evaluate", "DEFAULT_METRICS", "LOWER_IS_BETTER"]

DEFAULT_METRICS = {"text": ("exact_match",), "closed_set": ("accuracy",), "box": ("iou_accuracy",),
                   "frames": ("l1",)}
LOWER_IS_BETTER = {"wer", "l1", "mse"}


def _target(task: Task, tokenizer):
    plan = task.plan(tokenizer)
    scored = [p for p in plan.templates[0][1] if p.loss]
    if not scored:
        raise ValueError(f"task {task.name!r} has no scored decoder slot to evaluate")
    return plan, scored[0]


def evaluate_task(model, task: Task, *, limit: Optional[int] = None, batch_size: int = 64) -> dict[str, float]:
    """Metrics of ``model`` on ``task``'s rows (the first ``limit``)."""
    plan, target = _target(task, model.tokenizer)
    kind = target.decode.kind
    names = task.metrics or DEFAULT_METRICS[kind]
    count = len(task) if limit is None else min(limit, len(task))
    if count == 0:
        raise ValueError(f"task {task.name!r} has no rows to evaluate")
    column = target.slot.column
    rows = [task.data[i] for i in range(count)]
    predictions, references = [], []
    for start in range(0, count, batch_size):
        chunk = rows[start:start + batch_size]
        for offset, (row, prediction) in enumerate(zip(chunk, model.infer(task, chunk))):
            index = start + offset
            if kind == "frames":
                sample = task.encode(index, model.tokenizer, training=False,
                                     statistics=model.encoding_statistics(task))
                reference = next(c.rows for c in sample.decoder if c.loss and c.rows is not None)
                predictions.append(prediction.frames.numpy())
                references.append(reference.numpy())
                continue
            if not isinstance(row, dict) or column not in row:
                raise ValueError(f"task {task.name!r}, row {index}: no {column!r} column to score against")
            if kind == "box":
                predictions.append(prediction.box)
                references.append(row[column])
            else:
                predictions.append(prediction.text)
                references.append(row[column])
    return metric_fns.compute(names, predictions, references)


def evaluate(model, tasks: Sequence[Task], *, limit: Optional[int] = None, batch_size: int = 64) -> dict:
    """``{task name: {metric: value}}`` for every task."""
    return {task.name: evaluate_task(model, task, limit=limit, batch_size=batch_size) for task in tasks}
