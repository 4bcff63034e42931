"""The error a data row gets when it does not fit its task."""

from __future__ import annotations

__all__ = ["TaskDataError"]


class TaskDataError(ValueError):
    """A data row that does not fit the task (missing column, wrong kind of value, bad media).

    Attributes:
        row: the index of the row the message names, where the raiser knows it (``infer`` sets it:
            ``indices[i]`` for ``rows[i]``); None otherwise.
    """

    row = None
