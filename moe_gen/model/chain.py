"""Chained generation (4M's any-to-any chaining): generate one modality, feed it as the input of the
next task, and so on, through ``model.infer``.

    rows = chain(model, [{"label": "seven"}], [
        Link("text_to_image", {"image": "image"}),             # label -> generated image
        Link("digit_classification", {"label": "read_back"}),  # generated image -> label
    ])
    rows[0]["image"], rows[0]["read_back"]

Each link answers every row with ``model.infer`` and copies the chosen target columns of its
answers into the rows, under new names where asked, so the next link reads them as inputs (a
frame target's as ``Prediction.targets`` holds it: a MOTION clip ``[T, J]`` in the data's units,
which a MOTION input reads; AUDIO filterbank features, which no AUDIO input reads). Every
link is checked (the task known to the model, the columns it passes on among the task's targets,
its options among ``infer``'s) before any runs: a mistake in the last link costs no inference.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Optional, Sequence

__all__ = ["Link", "chain"]


@dataclasses.dataclass(frozen=True)
class Link:
    """One step of a chain.

    Attributes:
        task: a ``Task`` or preset name the model knows.
        outputs: the task's target column → the row column its answer is written to.
        options: keyword arguments for ``model.infer`` (``temperature``, ``parallel_steps``, ...).
    """

    task: Any
    outputs: Mapping[str, str]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.outputs, Mapping):  # (a name or list failed after the link's inference ran)
            raise ValueError(f"a chain link ({self.task!r}): outputs maps the task's target columns to row columns, "
                             f"e.g. {{'image': 'image'}}; got {type(self.outputs).__name__} {self.outputs!r}")
        if not self.outputs:
            raise ValueError(f"a chain link ({self.task!r}) must name at least one target column to pass on")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"a chain link ({self.task!r}): options maps infer's keyword arguments to values, e.g. "
                             f"{{'parallel_steps': 4}}; got {type(self.options).__name__} {self.options!r}")


def chain(model, rows: Sequence[Mapping[str, Any]], links: Sequence[Link]) -> list[dict[str, Any]]:
    """Runs ``links`` in order over ``rows`` and returns the rows with every link's outputs added
    (the input rows are not modified).

    Raises:
        ValueError: before any link runs, for ``rows`` that are not a list of dicts by column (one
            dict: pass ``[row]``) and for a link (named by number and task) whose task the model
            does not know, that passes on a column that is not one of the task's targets, or whose
            options ``infer`` does not take (before the fifteenth audit each was found only when
            the chain reached it, after the earlier links' inference, and never without rows);
            while running, when a link's answer lacks a target column it should pass on (naming
            link, column and row), or a row failed to encode (``on_error="skip"`` answers None).
    """
    if isinstance(rows, (Mapping, str)):
        raise ValueError(f"chain takes a list of rows, got one {type(rows).__name__}; pass [row] for a single row")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"chain: row {index} is a {type(row).__name__}, not a dict by column (each link "
                             "reads its inputs and writes its outputs by column)")
    for number, link in enumerate(links):
        _check_link(model, link, number)
    current = [dict(row) for row in rows]
    for number, link in enumerate(links):
        answers = model.infer(link.task, current, **dict(link.options))
        for index, (row, answer) in enumerate(zip(current, answers)):
            row.update(_outputs(link, number, index, answer))
    return current


def _check_link(model, link: Link, number: int) -> None:
    """Raises ``ValueError`` naming link ``number`` and its task for a task the model does not know,
    options ``infer`` does not take, or an output column that is not one of the task's target
    columns (the keys of ``Prediction.targets``: a slot's column, or its index without one; a frame
    target's too, since the fifteenth audit: a motion clip in the data's units, audio features)."""
    where = f"chain link {number} ({getattr(link.task, 'name', link.task)!r})"
    try:
        task = model._known_task(link.task)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    parameters = inspect.signature(type(model).infer).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        known = sorted(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
        unknown = sorted(set(link.options) - set(known))
        if unknown:
            raise ValueError(f"{where}: infer takes no option {', '.join(map(repr, unknown))}; its options are "
                             f"{', '.join(known)}")
    decoder = model.plan(task).templates[0][1]
    columns = [p.name for p in decoder if p.loss]  # a column, or "slot N" for a slot filled by position
    for column in link.outputs:
        if column not in columns:
            raise ValueError(f"{where}: the task has no target column {column!r} to pass on; its target columns "
                             f"are {columns}")


def _outputs(link: Link, number: int, index: int, answer: Optional[Any]) -> dict[str, Any]:
    name = getattr(link.task, "name", link.task)
    if answer is None:
        raise ValueError(f"chain link {number} ({name!r}): row {index} could not be encoded")
    out = {}
    for column, destination in link.outputs.items():
        if column not in answer.targets:
            raise ValueError(f"chain link {number} ({name!r}): the answer for row {index} has no target column "
                             f"{column!r}; it has {sorted(answer.targets)}")
        out[destination] = answer.targets[column]
    return out
