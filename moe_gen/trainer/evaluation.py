"""Per-task evaluation: decode every row with ``model.infer`` and score it with the task's metrics.

The reference of a single-target row is its scored decoder slot: the label for closed-set targets,
the column's value as the slot's preprocessor trains it, decoded, for free text (a PHONE target's
phones, a ``struct_text`` table's linearised text), the box for box targets, and the encoded target
rows (the model's own feature space) for continuous targets (audio, motion). Detection (a repetition
group with one box slot, e.g. ``( [BOX:boxes] [TEXT:labels] )*``) compares per row the lists of
``(box, label)`` pairs of the prediction's items and of the row (``detection_f1``). Other tasks with
several target slots compare ``Prediction.targets`` with the row's target columns, as dicts (a box
as its location bins decode on the row's image, an image-code target as the slot's image
tokenizer reconstructs the row's image: as a right answer does): ``accuracy`` and
``exact_match`` compare the dicts value by value; a metric of text (BLEU, chrF, ROUGE-L, WER, ...:
``TEXT_METRICS``) is computed per text column outside a repetition group, reported as
``<metric>/<column>`` with ``<metric>`` their mean; the metrics of one box, frame sequence or image
are refused with the task named; a metric registered outside moe_gen receives the dicts (before the
thirteenth audit metrics of text scored the ``str()`` of the dicts, whose braces, quotes and column
names every answer shares). Tasks without declared metrics get a default per target kind. Answers
are decoded with room for the longest reference scored: its tokens, its items (above ``infer``'s 8)
and its frame rows (above 64).

Rows that fail to encode (or have no reference to score against, or a repetition group whose
reference columns are not lists of one length, as training refuses them) raise ``TaskDataError`` naming
the row, or, for tasks with ``on_error="skip"``, are left out and counted: their metrics then
include ``skipped`` (rows left out of the ``limit`` chosen), and ``task.skipped`` / ``task.errors``
say which failed and why.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from moe_gen.tasks import metrics as metric_fns
from moe_gen.tasks.modalities.base import GROUP_VALUES, brief, group_items
from moe_gen.tasks.plan import TaskDataError, TaskPlan
from moe_gen.tasks.task import Task

__all__ = ["evaluate_task", "evaluate", "eval_score", "spaced_indices", "DEFAULT_METRICS", "LOWER_IS_BETTER"]

DEFAULT_METRICS = {"text": ("exact_match",), "closed_set": ("accuracy",), "box": ("iou_accuracy",),
                   "frames": ("l1",), "codes": ("pixel_mse",), "features": (), "detection": ("detection_f1",),
                   "structured": ("exact_match",)}
LOWER_IS_BETTER = {"wer", "l1", "mse", "digit_fid", "pixel_mse"}


def _targets(task: Task, model) -> tuple[str, list, TaskPlan]:
    """The kind of answer to score (a decode kind, ``detection`` or ``structured``), the scored
    decoder slots of the first template and the plan (the one ``model.infer`` uses: nothing is
    fitted on the rows scored; its preprocessors make the references of free text)."""
    plan = model.plan(task)
    scored = [p for p in plan.templates[0][1] if p.loss]
    if not scored:
        raise ValueError(f"task {task.name!r} has no scored decoder slot to evaluate")
    if len(scored) == 1 and scored[0].slot.repeat is None:
        return scored[0].decode.kind, scored, plan
    # detection: the group's items are the whole answer (a caption beside the group went unscored)
    alone = len({p.slot.repeat for p in scored}) == 1
    return ("detection" if alone and _detection_slots(scored) else "structured"), scored, plan


def _detection_slots(scored: list) -> Optional[tuple[int, str, list[str]]]:
    """For the first repetition group with exactly one box slot: its position among the groups,
    the box column and the columns of its text and closed-set slots, in slot order (each item's
    label is all of them: before the twenty-seventh session's audit only the first was scored, and
    a group's second text column went unchecked)."""
    groups = sorted({p.slot.repeat for p in scored if p.slot.repeat is not None})
    for position, group in enumerate(groups):
        members = [p for p in scored if p.slot.repeat == group]
        boxes = [p for p in members if p.decode.kind == "box"]
        if len(boxes) == 1:
            return position, boxes[0].name, [p.name for p in members
                                                    if p.decode.kind in ("text", "closed_set")]
    return None


def _item_label(values: Sequence) -> Any:
    """A detection item's label from its text columns' values: None without one, the value with
    one, their tuple with several (matched as a whole)."""
    return None if not values else values[0] if len(values) == 1 else tuple(values)


def _structured(prediction, row: dict, index: int, scored: list, kind: str, plan: TaskPlan,
                image_size=None) -> tuple[Any, Any]:
    """(prediction, reference) of a multi-target row: text values as the slots train them, and
    (``structured``) boxes as their location tokens decode on an image of ``image_size``, images
    as their codes decode (``_target_reference``)."""
    texts = {p.name: p for p in scored if p.decode.kind in ("text", "closed_set")}
    if kind == "structured":  # in slot order
        reference = {p.name: _target_reference(plan, p, row[p.name], index, image_size)
                     for p in scored}
        return {p.name: prediction.targets.get(p.name) for p in scored}, reference
    position, box, labels = _detection_slots(scored)
    items = prediction.groups[position] if position < len(prediction.groups) else []
    predicted = [(item.get(box), _item_label([item.get(label) for label in labels])) for item in items]
    written = [_reference(plan, texts[label], row[label], index) for label in labels]
    references = [_item_label([column[i] for column in written]) for i in range(len(row[box]))]
    return predicted, list(zip([_box_reference(item, image_size, plan.tokenizer) for item in row[box]], references))


def _target_reference(plan: TaskPlan, target, value: Any, index: int, image_size) -> Any:
    """One target column's reference in a multi-target row, as a right answer decodes it: text
    as the slot trains it (``_reference``), a box quantised (``_box_reference``), an image as the
    slot's image tokenizer reconstructs it (``_image_reference``)."""
    kind = target.decode.kind
    if kind in ("text", "closed_set"):
        return _reference(plan, target, value, index)
    if kind == "box":
        return _box_reference(value, image_size, plan.tokenizer)
    if kind == "codes":
        return _image_reference(plan, target, value, index)
    return value


def _image_reference(plan: TaskPlan, target, value: Any, index: int) -> Any:
    """An image-code target's image (each item of a repetition group's column) as a right answer
    decodes: its codes as training encodes them (``TaskPlan.target_tokens``), decoded by the slot's
    image tokenizer, ``uint8 [S, S, 3]``. Before the fifteenth audit exact match compared the
    decoded answer with the row's raw image (another size: never equal), so a perfect answer
    scored 0.0.

    Raises:
        TaskDataError: naming task, column and row, for a value the slot refuses.
    """
    render = plan.preprocessor(target).to_image

    def one(item):
        return render([plan.tokenizer.bin_index(t) for t in plan.target_tokens(target, item, index)])

    return [one(item) for item in value] if target.slot.repeat is not None else one(value)


def _box_reference(value: Any, image_size, tokenizer) -> Any:
    """A box (or, for a repeated column, each box) as a right answer decodes: quantised to its
    location bins and mapped back to pixels of the image (exact match compares it with the
    decoded box, which a raw integer box never equals; a point or line box, of no area, has IoU 0
    with anything but itself, so before the fifteenth audit a right answer scored 0 against the raw
    box in IoU accuracy and detection F1)."""
    from moe_gen.tasks.modalities.box import dequantize_box, quantize_box

    if image_size is None or value is None:
        return value
    width, height = image_size
    if len(value) and isinstance(value[0], (list, tuple, np.ndarray)):
        return [_box_reference(box, image_size, tokenizer) for box in value]
    return dequantize_box(quantize_box(value, width, height, tokenizer.num_bins), width, height, tokenizer.num_bins)


def _item_budget(rows: Sequence, scored: list) -> int:
    """Items a repetition group may decode for evaluation: ``infer``'s default of 8, or one more than
    the longest reference list among the rows scored where that is more (one more, so an answer that
    runs past its reference shows it and is not cut to the right length; answers were cut at 8 items
    before 2026-12-06, however long the references)."""
    longest = 0
    for p in scored:
        if p.slot.repeat is None:
            continue
        for row in rows:
            value = row.get(p.name) if isinstance(row, Mapping) else None
            if isinstance(value, (list, tuple)):
                longest = max(longest, len(value))
    return max(8, longest + 1)


def _text_budget(rows: Sequence, indices: Sequence[int], scored: list, plan: TaskPlan) -> int:
    """Tokens a free-text value may take when decoded for evaluation: ``infer``'s default of 32,
    or the longest reference among the rows scored plus 8 where that is more (a length budget
    only; before 2026-12-05 answers were cut at 32 tokens, and a perfect model scored BLEU 75 on
    video captioning, whose captions run to 53). A reference counts the tokens its slot trains on
    (``TaskPlan.target_tokens``: a PHONE target's phones, not its text's pieces). A slot's
    ``max_length`` rules where declared."""
    longest = 0
    for p in scored:
        if p.decode.kind != "text" or p.slot.attrs.get("max_length"):
            continue
        for row, index in zip(rows, indices):
            value = row.get(p.name) if isinstance(row, Mapping) else None
            for item in value if p.slot.repeat is not None and isinstance(value, (list, tuple)) else [value]:
                try:
                    longest = max(longest, len(plan.target_tokens(p, item, index)))
                except TaskDataError:  # (no reference: the row fails, or is skipped, where it is scored)
                    continue
    return max(32, longest + 8)


def _read_rows(task: Task, indices: list[int]) -> tuple[list, list[int], int]:
    """The rows at ``indices`` the dataset can read, their indices, and how many it could not (each
    counted as skipped with ``on_error="skip"``; otherwise the first raises ``TaskDataError``)."""
    rows, kept, skipped = [], [], 0
    for index in indices:
        try:
            rows.append(task._row(index))
        except TaskDataError as exc:
            if task.on_error != "skip":
                raise
            task.skip_row(index, exc)
            skipped += 1
            continue
        kept.append(index)
    return rows, kept, skipped


def _listed_groups(row: Any, scored: list) -> Any:
    """``row`` with its repetition groups' scored columns as lists where ``group_items`` reads them
    (labels or boxes given as a numpy array or tensor), so the references are read, checked and
    budgeted as training reads them; a row without such a column as it is."""
    columns = [p.name for p in scored if p.slot.repeat is not None]
    if not isinstance(row, Mapping) or not any(c in row for c in columns):
        return row
    listed = dict(row)
    for column in columns:
        items = group_items(row[column]) if column in row else None
        if items is not None:
            listed[column] = items
    return listed


def _by_name(row: Any, plan: TaskPlan) -> Any:
    """``row`` as the references are read from it: by slot name (``SlotPlan.name``), a dict of its
    columns, or, for a row filled by position (a tuple or list), of ``"slot N"`` for its N-th value.
    (Before the twenty-seventh session's audit a task of rows by position could not be evaluated,
    and rows that are mappings but no dict, ``UserDict``, had "no column to score against".)"""
    if isinstance(row, Mapping):
        return dict(row)
    if not isinstance(row, (list, tuple)):
        return row
    encoder, decoder = plan.templates[0]
    by_position = [p.name for p in encoder + decoder if p.slot.column is None and not p.slot.is_literal]
    return dict(zip(by_position, row))


def spaced_indices(n: int, count: int) -> list[int]:
    """``count`` indices (``count <= n``) evenly spaced over ``range(n)``, starting at 0."""
    return [(i * n) // count for i in range(count)]


def _frame_reference(sample) -> np.ndarray:
    """The target frame rows of an encoded sample, NaN where a value only pads the last row (the
    metrics leave those out)."""
    target = next(c for c in sample.decoder if c.loss and c.rows is not None)
    reference = target.rows.numpy().copy()
    if target.padded_values:
        reference[-1, -target.padded_values:] = np.nan
    return reference


def _encoded_targets(model, task: Task, kind: str, scored: list, rows: list, indices: list[int]) -> tuple[dict, set]:
    """``{index: encoded sample}`` of the rows whose reference needs the training encoding (frame
    targets: the target rows; answers with a box: the image size its bins decode on), and the
    indices whose targets failed to encode (``on_error="skip"``; ``task.encode`` counts them). A
    row without a reference to score is left to ``_pair``, which names what it lacks."""
    boxes = kind in ("box", "detection") or (kind == "structured" and any(p.decode.kind == "box" for p in scored))
    if kind != "frames" and not boxes:
        return {}, set()
    samples, dropped = {}, set()
    statistics, plan = model.encoding_statistics(task), model.plan(task)
    for row, index in zip(rows, indices):
        if kind != "frames" and _reference_problem(row, scored):
            continue
        sample = task.encode(index, model.tokenizer, training=False, statistics=statistics, plan=plan)
        if sample is None:
            dropped.add(index)
        else:
            samples[index] = sample
    return samples, dropped


def _budgets(rows: Sequence, indices: Sequence[int], scored: list, plan: TaskPlan, samples: dict) -> dict[str, int]:
    """``infer``'s length limits fitted to the references scored: ``max_new_tokens`` always, and
    ``max_items`` and ``max_frames`` where the longest reference list or frame target is longer
    than ``infer``'s defaults (8 items, 64 frame rows), with room past it (an item, 8 rows) for an
    answer that runs on to be scored as running on."""
    budgets = {"max_new_tokens": _text_budget(rows, indices, scored, plan)}
    items = _item_budget(rows, scored)
    if items > 8:
        budgets["max_items"] = items
    frames = max((len(_frame_reference(sample)) for sample in samples.values()
                  if any(c.loss and c.rows is not None for c in sample.decoder)), default=0)
    if frames + 8 > 64:
        budgets["max_frames"] = frames + 8
    return budgets


def evaluate_task(model, task: Task, *, limit: Optional[int] = None, batch_size: int = 64,
                  pairs: Optional[list] = None) -> dict[str, float]:
    """Metrics of ``model`` on ``task``'s rows: all of them, or ``limit`` rows evenly spaced over them
    (a test split may be ordered by label, e.g. pydoc topics alphabetically, so its first rows would
    not be a fair sample). With ``on_error="skip"``, rows that fail are left out and the metrics
    include ``skipped``, their number. ``pairs``, when given, receives ``(prediction, reference)``
    of every scored row, in row order (what the metrics compared, e.g. the answer text and the
    row's label). ``limit`` and ``batch_size`` are whole numbers >= 1 (``True``, ``2.5`` and ``"3"``
    raised TypeErrors from inside, or scored one row, before the twenty-sixth session's audit)."""
    if (limit is not None and not _whole(limit)) or not _whole(batch_size):
        raise ValueError(f"task {task.name!r}: evaluation needs limit >= 1 (or None: every row) and batch_size >= 1, "
                         f"whole numbers; got limit={limit!r}, batch_size={batch_size!r}")
    kind, scored, plan = _targets(task, model)
    names = task.metrics or DEFAULT_METRICS[kind]
    columns = _text_columns(task, kind, names, scored)
    count = len(task) if limit is None else min(limit, len(task))
    if count == 0:
        raise ValueError(f"task {task.name!r} has no rows to evaluate")
    rows, indices, skipped = _read_rows(task, spaced_indices(len(task), count))
    samples, dropped = _encoded_targets(model, task, kind, scored, rows, indices)
    if dropped:  # their targets failed to encode (on_error="skip"; counted in task.skipped)
        kept = [i for i, index in enumerate(indices) if index not in dropped]
        rows, indices, skipped = [rows[i] for i in kept], [indices[i] for i in kept], skipped + len(dropped)
    views = [_listed_groups(_by_name(row, plan), scored) for row in rows]  # the references, by slot name
    budgets = _budgets(views, indices, scored, plan, samples)
    predictions, references = [], []
    # an image-code answer: whole-answer metrics compare it with what a right answer decodes to
    rebuilt = [] if kind == "codes" and metric_fns.ANSWER_METRICS & set(names) else None
    for start in range(0, len(rows), batch_size):
        chunk, chunk_indices = rows[start:start + batch_size], indices[start:start + batch_size]
        chunk_views = views[start:start + batch_size]
        # (parallel-objective tasks decode in parallel)
        answers = model.infer(task, chunk, indices=chunk_indices, **budgets)
        for row, index, prediction in zip(chunk_views, chunk_indices, answers):
            if prediction is None:  # it failed to encode (on_error="skip"; counted in task.skipped)
                skipped += 1
                continue
            try:
                predicted, expected = _pair(kind, prediction, row, index, scored, plan, samples)
            except TaskDataError as error:  # no reference to score against
                if task.on_error != "skip":
                    raise
                task.skip_row(index, error)
                skipped += 1
                continue
            predictions.append(predicted)
            references.append(expected)
            if rebuilt is not None:
                rebuilt.append(_image_reference(plan, scored[0], expected, index))
    if not predictions:
        raise TaskDataError(f"task {task.name!r}: none of the {count} rows evaluated could be scored "
                            f"({skipped} skipped; first error: {task.errors[0] if task.errors else '?'})")
    results = _scores(names, predictions, references, columns, rebuilt)
    if pairs is not None:
        pairs.extend(zip(predictions, references))
    if task.on_error == "skip":
        results["skipped"] = skipped
    return results


def _text_columns(task: Task, kind: str, names: Sequence[str], scored: list) -> Optional[list[str]]:
    """For answers with several target slots (``kind`` detection or structured): the text and
    closed-set columns outside a repetition group, which the metrics of text score one by one;
    ValueError, the task and metric named, for a metric that cannot score such answers (a metric
    of one box, frame sequence or image; a metric of text without a text column to score, or on
    a detection task's item lists). None for single-target answers (scored whole)."""
    if kind not in ("detection", "structured"):
        return None
    columns = [p.name for p in scored if p.decode.kind in ("text", "closed_set") and p.slot.repeat is None]
    targets = [p.name for p in scored]
    instead = "detection_f1, exact_match or accuracy" if kind == "detection" else "exact_match or accuracy"
    for name in names:
        if name in metric_fns.VALUE_METRICS and not (kind == "detection" and name == "detection_f1"):
            raise ValueError(f"task {task.name!r}: metric {name!r} scores one {_VALUE_OF[name]} per answer, and this "
                             f"task's answers have several target slots ({targets}); use {instead}, or a "
                             "metric of text for its text columns")
        if name in metric_fns.TEXT_METRICS and (kind == "detection" or not columns):
            raise ValueError(f"task {task.name!r}: metric {name!r} scores text, one text column at a time, and "
                             f"this task has no text or closed-set target outside a repetition group ({targets}); "
                             f"use {instead}")
    return columns


_VALUE_OF = {"iou_accuracy": "box", "detection_f1": "detection list", "l1": "frame sequence", "mse": "frame sequence",
             "pixel_mse": "image", "digit_accuracy": "image", "digit_fid": "image"}


def _scores(names: Sequence[str], predictions: list, references: list, columns: Optional[list[str]],
            rebuilt: Optional[list] = None) -> dict[str, float]:
    """Every named metric: on the whole answers, or (``columns`` given: answers with several
    target slots) a metric of text on each text column's values, as ``<metric>/<column>``, and
    their mean as ``<metric>`` (an answer without a column's value wrote no text for it).
    ``rebuilt``: for image-code answers, the references as a right answer decodes them
    (``_image_reference``), which ``exact_match`` and ``accuracy`` compare with; the image metrics
    compare with the row's own image. (Before the twenty-seventh session's audit a single
    image-code target was matched against the row's image, of another size: a right answer
    scored 0.0.)"""
    if columns is None:
        if rebuilt is None:
            return metric_fns.compute(names, predictions, references)
        return {name: metric_fns.compute([name], predictions,
                                         rebuilt if name in metric_fns.ANSWER_METRICS else references)[name]
                for name in names}
    results = {}
    for name in names:
        if name not in metric_fns.TEXT_METRICS:  # exact_match, accuracy (value by value), metrics of one's own
            results[name] = metric_fns.compute([name], predictions, references)[name]
            continue
        per_column = {f"{name}/{column}": metric_fns.compute(
            [name], ["" if p.get(column) is None else p[column] for p in predictions],
            [r[column] for r in references])[name] for column in columns}
        results[name] = float(np.mean(list(per_column.values())))
        results.update(per_column)
    return results


def _reference_problem(row, scored: list) -> Optional[str]:
    """Why ``row`` cannot be scored against (None when it can): a scored column missing, a value
    missing or not a box where one is scored (``_value_problem``), or a repetition group whose
    columns are not lists of one length (inference encodes the inputs only,
    so the targets are checked here as training's ``TaskPlan._check_groups`` checks them: a box
    list longer than its labels would otherwise lose its last boxes, a label string would split
    into characters)."""
    missing = [p.name for p in scored if not isinstance(row, Mapping) or p.name not in row]
    if missing:
        return f"no {missing[0]!r} column to score against"
    lengths: dict[int, dict[str, int]] = {}
    for p in scored:
        value = row[p.name]
        if p.slot.repeat is None:
            problem = _value_problem(p, value)
            if problem:
                return f"column {p.name!r} {problem} to score against"
            continue
        if not isinstance(value, (list, tuple)):  # (_listed_groups made lists of the arrays group_items reads)
            return (f"column {p.name!r} is in repetition group {p.slot.repeat}, so it needs {GROUP_VALUES} "
                    f"to score against, got {type(value).__name__}")
        lengths.setdefault(p.slot.repeat, {})[p.name] = len(value)
    for group, sizes in lengths.items():
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{column!r}: {size}" for column, size in sizes.items())
            return f"the columns of repetition group {group} have different lengths ({listed})"
    for p in scored:  # each item of a group's columns, as training checks each
        for item in row[p.name] if p.slot.repeat is not None else ():
            problem = _value_problem(p, item)
            if problem:
                return f"an item of column {p.name!r} {problem} to score against"
    return None


def _value_problem(plan, value) -> Optional[str]:
    """Why one target value cannot be a reference (None when it can): missing (None, NaN: training
    refuses the row; scored, it became the text "None"), a closed set's value that is no label
    (a list, outside a repetition group), or a box training would refuse (not 4 finite numbers,
    corners reversed: the IoU failed with a bare TypeError)."""
    from moe_gen.tasks.modalities.base import label_text
    from moe_gen.tasks.modalities.box import check_box

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"has a missing value ({value})"
    if plan.decode is not None and plan.decode.kind == "closed_set" and label_text(value) is None:
        return f"holds no label ({brief(value)})"
    if plan.decode is not None and plan.decode.kind == "box":
        try:  # (the image's size is checked where the answer is decoded: any size here)
            check_box(value, sys.float_info.max, sys.float_info.max)
        except ValueError as exc:
            return f"holds no box ({exc})"
    return None


def _pair(kind: str, prediction, row, index: int, scored: list, plan: TaskPlan, samples: dict) -> tuple:
    """(what the metric compares, its reference) for a token answer of ``kind`` to row ``index``
    (``samples``: its encoded targets, where ``_encoded_targets`` encoded them).

    Raises:
        TaskDataError: naming task and row, for a row without a reference to score against.
    """
    if kind == "frames":
        return prediction.frames.float().numpy(), _frame_reference(samples[index])  # (a bf16 model answers bf16)
    problem = _reference_problem(row, scored)
    if problem:
        raise TaskDataError(f"task {plan.name!r}, row {index}: {problem}")
    if kind in ("detection", "structured"):
        size = samples[index].meta.get("image_size") if index in samples else None
        return _structured(prediction, row, index, scored, kind, plan, size)
    if kind == "box":  # as the reference's location tokens decode on the sample's image
        size = samples[index].meta.get("image_size") if index in samples else None
        return prediction.box, _box_reference(row[scored[0].name], size, plan.tokenizer)
    if kind == "codes":
        return prediction.image, row[scored[0].name]
    return prediction.text, _reference(plan, scored[0], row[scored[0].name], index)


def _reference(plan: TaskPlan, target, value: Any, index: int) -> Any:
    """A text or closed-set target's value (of row ``index``) as a right answer writes it: a closed
    set's label itself (its labels are distinct as the slot writes them); free text as the slot's
    own preprocessor encodes it for training (``TaskPlan.target_tokens``: ``uncased``,
    ``max_length``...; a PHONE slot's phones, a ``struct_text`` table's linearised text),
    decoded as inference decodes it. Each item of a repetition group's column.

    Raises:
        TaskDataError: naming task, column and row, for a value the slot refuses.
    """
    from moe_gen.tasks.modalities.base import label_text

    def one(item):
        if target.decode.kind == "closed_set":
            return label_text(item)
        return plan.tokenizer.decode(plan.target_tokens(target, item, index))

    return [one(item) for item in value] if target.slot.repeat is not None else one(value)


def evaluate(model, tasks: Sequence[Task], *, limit: Optional[int] = None, batch_size: int = 64) -> dict:
    """``{task name: {metric: value}}`` for every task (``evaluate_task``)."""
    from moe_gen.tasks.task import task_list

    return {task.name: evaluate_task(model, task, limit=limit, batch_size=batch_size)
            for task in task_list(tasks, "evaluate")}


def _whole(value) -> bool:
    """Whether ``value`` is a whole number >= 1 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _signed(metric: str, value: float) -> float:
    """``value`` with higher better: losses and error rates (``LOWER_IS_BETTER``) negated."""
    return -float(value) if metric.split("/")[0] in LOWER_IS_BETTER else float(value)


def eval_score(results: dict, metric: str = "mean") -> float:
    """One number, higher better, from ``evaluate``'s ``{task: {metric: value}}``: ``mean`` (each
    task's first metric, negated for losses and error rates, averaged over the tasks) or
    ``<task>/<metric>`` (that value, negated likewise). Raises ``ValueError`` naming what the
    results hold when the task or metric is not among them."""
    if metric == "mean":
        firsts = [_signed(*next((k, v) for k, v in scores.items() if k != "skipped")) for scores in results.values()]
        if not firsts:
            raise ValueError("eval_score: the results hold no task")
        return sum(firsts) / len(firsts)
    task, name = metric.split("/", 1)
    if task not in results:
        raise ValueError(f"best_metric {metric!r}: task {task!r} is not evaluated; the eval tasks are "
                         f"{', '.join(results)}")
    if name not in results[task]:
        raise ValueError(f"best_metric {metric!r}: task {task!r} has no metric {name!r}; it has "
                         f"{', '.join(k for k in results[task] if k != 'skipped')}")
    return _signed(name, results[task][name])
