"""Chained generation (4M's any-to-any chaining): generate one modality, feed it as the input of the
next task, and so on, through ``model.infer``.

    rows = chain(model, [{"label": "seven"}], [
        Link("text_to_image", {"image": "image"}),             # label -> generated image
        Link("digit_classification", {"label": "read_back"}),  # generated image -> label
    ])
    rows[0]["image"], rows[0]["read_back"]

Each link answers every row with ``model.infer`` and copies the chosen target columns of its
answers into the rows, under new names where asked, so the next link reads them as inputs.
"""

from __future__ import annotations

import dataclasses
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


def chain(model, rows: Sequence[Mapping[str, Any]], links: Sequence[Link]) -> list[dict[str, Any]]:
    """Runs ``links`` in order over ``rows`` and returns the rows with every link's outputs added
    (the input rows are not modified).

    Raises:
        ValueError: when a link's answer lacks a target column it should pass on (naming link,
            column and row), or a row failed to encode (``on_error="skip"`` answers None).
    """
    current = [dict(row) for row in rows]
    for number, link in enumerate(links):
        answers = model.infer(link.task, current, **dict(link.options))
        for index, (row, answer) in enumerate(zip(current, answers)):
            row.update(_outputs(link, number, index, answer))
    return current


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
