"""What a task plan encodes a data row into (``TaskPlan.encode``): a ``Sample`` of encoder and
decoder ``Chunk``s, runs of token ids or feature rows each with its modality, role and loss flag,
which ``moe_gen.tasks.batch.collate`` turns into batches with routing tags."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

__all__ = ["Chunk", "Sample"]


@dataclasses.dataclass
class Chunk:
    """A run of positions from one slot: token ids or feature rows.

    Attributes:
        modality: modality name.
        role: index in ``ROLES``.
        loss: whether these positions are scored (decoder targets).
        tokens: token ids, or None.
        rows: float32 ``[n, F]`` feature rows, or None; ``positions`` long ``[n, 3]``.
        adaptor: the adapter that embeds ``rows``.
        column: the source column (None for literals).
        allowed: for closed-set targets, the tokens the label trie allows at each position (the
            loss is a softmax over these only, as decoding is); None at a position where the
            answer could also go on otherwise (``TaskPlan.choice_starts``).
        lead: ``(modality, role)`` tags of the chunk's first position when the slot before it
            leaves open what comes next (``TaskPlan.open_ends``); None: the chunk's own.
        position_ids: the position of each item in its sample, where it is not its place in the
            sequence (a masked sample's items keep their place in the whole sample: which image
            code a position holds or predicts); None: in sequence.
        padded_values: values at the end of the last row that only pad it (frames stacked
            ``frames_per_row`` a row, the last row filled with zeros): no target, neither in the
            loss nor in the metric.
        ends: its last row ends the signal (the stop flag's target); False for a masked sample's
            rows picked from the middle of one.
    """

    modality: str
    role: int
    loss: bool
    tokens: Optional[list[int]] = None
    rows: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    adaptor: Optional[str] = None
    column: Optional[str] = None
    allowed: Optional[list[Optional[list[int]]]] = None
    lead: Optional[tuple[str, int]] = None
    position_ids: Optional[list[int]] = None
    padded_values: int = 0
    ends: bool = True

    def __len__(self) -> int:
        return len(self.tokens) if self.tokens is not None else int(self.rows.shape[0])


@dataclasses.dataclass
class Sample:
    """One encoded example: encoder and decoder chunks plus what the tags need."""

    task: str
    index: int
    encoder: list[Chunk]
    decoder: list[Chunk]
    task_modalities: tuple[str, ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def lengths(self) -> tuple[int, int]:
        """(encoder positions, decoder positions)."""
        return sum(map(len, self.encoder)), sum(map(len, self.decoder))
