"""A task: a name, a one-line instruction, data, and how it is scored.

    task = Task("caption_digits", "[IMAGE:image] what digit is this? -> [TEXT:label,closed_set]",
                data=[{"image": array, "label": "seven"}, ...], metrics=("accuracy",))
    plan = task.plan(tokenizer)
    samples = list(task.samples(tokenizer))

``data`` may be a list of dicts, a Hugging Face ``datasets`` dataset (anything with ``__len__``
and ``__getitem__`` returning dicts), or the path of a JSONL file whose media fields hold arrays
(as nested lists), file paths (relative to the JSONL file) or base64 bytes (``{"base64": ...}``).
A row that fails to encode raises ``TaskDataError`` naming the task, column and row, or, with
``on_error="skip"``, is skipped and counted in ``task.skipped``.

Some preprocessors learn from the training rows (the STRUCT cell encoding: column ids, means and
stds, text vocabularies). ``task.fit_statistics()`` fits them on this task's rows; a model keeps
what it was trained with and passes it back (``task.plan(tokenizer, statistics)``), so a test
task, or one built with no rows, encodes exactly as the training task did.
"""

from __future__ import annotations

import base64
import json
import os
import random
import zlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from moe_gen.registry import MODALITIES, PREPROCESSORS
from moe_gen.tasks.instruction import Instruction
from moe_gen.tasks.plan import Sample, TaskDataError, TaskPlan, _modality_attributes
from moe_gen.tasks.tokenizer import Tokenizer

__all__ = ["Task", "load_jsonl"]


def load_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; ``{"base64": s}`` values become bytes, and string values naming an
    existing file relative to the JSONL file become absolute paths."""
    rows = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}, line {number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}, line {number}: a row must be a JSON object")
            for key, value in row.items():
                if isinstance(value, dict) and set(value) == {"base64"}:
                    row[key] = base64.b64decode(value["base64"])
                elif isinstance(value, str) and (os.sep in value or "." in value):
                    candidate = os.path.join(base, value)
                    if os.path.isfile(candidate):
                        row[key] = candidate
            rows.append(row)
    return rows


class Task:
    """A task declared by instruction.

    Args:
        name: unique task name (its index in the model's task vocabulary is the ``task`` tag).
        instruction: the instruction text (or a parsed ``Instruction``).
        data: rows (list of dicts, HF dataset, or JSONL path).
        objective: ``generative``, ``contrastive`` or ``masked`` (issue 4 runs them).
        metrics: metric names (``moe_gen.tasks.metrics``).
        weight: sampling/loss weight for the trainer.
        on_error: ``raise`` or ``skip`` rows that fail to encode.
        preprocessor_options: keyword arguments per preprocessor name.
    """

    def __init__(
        self,
        name: str,
        instruction: Any,
        data: Any,
        *,
        objective: str = "generative",
        metrics: Sequence[str] = (),
        weight: float = 1.0,
        on_error: str = "raise",
        preprocessor_options: Optional[dict] = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name = name
        self.instruction = (instruction if isinstance(instruction, Instruction)
                            else Instruction.parse(instruction, modalities=_modality_attributes()))
        self.data = load_jsonl(data) if isinstance(data, (str, os.PathLike)) else data
        if not hasattr(self.data, "__len__") or not hasattr(self.data, "__getitem__"):
            raise ValueError(f"task {name!r}: data must be a list of rows, a dataset or a JSONL path")
        self.objective, self.metrics, self.weight = objective, tuple(metrics), float(weight)
        self.on_error = on_error
        self.preprocessor_options = preprocessor_options or {}
        self.skipped = 0
        self.errors: list[str] = []
        self._plans: dict[tuple, tuple[Any, TaskPlan]] = {}
        self._statistics: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {str(self.instruction)!r}, {len(self)} rows)"

    def closed_sets(self) -> dict[str, list[str]]:
        """Label sets of closed-set slots (``closed_set`` or CATEGORY), collected from the data."""
        columns = {s.column for t in self.instruction.templates for s in t.decoder
                   if s.column and (s.attrs.get("closed_set") or s.modality == "CATEGORY")}
        labels: dict[str, set] = {c: set() for c in columns}
        for i in range(len(self.data)):
            row = self.data[i]
            for c in columns:
                if isinstance(row, dict) and c in row:
                    value = row[c]
                    # a repetition group's column holds one label per item
                    labels[c].update(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
        return {c: sorted(v) for c, v in labels.items()}

    def motion_statistics(self, max_rows: int = 256) -> Optional[dict]:
        """Per-feature mean and std of the task's MOTION columns over up to ``max_rows`` rows, so
        every clip is normalised alike (and generated frames can be mapped back)."""
        columns = {s.column for t in self.instruction.templates for s in t.encoder + t.decoder
                   if s.modality == "MOTION" and s.column}
        frames = [np.asarray(self.data[i][c], dtype=np.float64) for i in range(min(len(self.data), max_rows))
                  for c in columns if isinstance(self.data[i], dict) and c in self.data[i]]
        frames = [f for f in frames if f.ndim == 2 and len(f)]
        if not frames or len({f.shape[1] for f in frames}) != 1:
            return None
        stacked = np.concatenate(frames)
        return {"mean": stacked.mean(0).astype(np.float32), "std": stacked.std(0).astype(np.float32)}

    def fit_statistics(self, max_rows: int = 10_000) -> dict[str, dict]:
        """What the preprocessors of this task's slots learn from its first ``max_rows`` rows
        (``Preprocessor.fit``): preprocessor name → slot column → JSON-serialisable statistics
        (cached; empty when no slot learns anything). Slots without a column are not fitted."""
        if self._statistics is not None:
            return self._statistics
        slots: dict[tuple[str, str], Any] = {}
        for template in self.instruction.templates:
            for slot in template.encoder + template.decoder:
                if slot.is_literal or slot.column is None or slot.modality not in MODALITIES:
                    continue
                name = str(slot.attrs.get("preprocess", MODALITIES.get(slot.modality).preprocess))
                if name in PREPROCESSORS:
                    slots.setdefault((name, slot.column), slot)
        statistics: dict[str, dict] = {}
        for (name, column), slot in slots.items():
            # lazily: a preprocessor that learns nothing reads no rows
            fitted = PREPROCESSORS.get(name).fit(slot, self._column_values(column, slot.repeat is not None, max_rows))
            if fitted is not None:
                statistics.setdefault(name, {})[column] = fitted
        self._statistics = statistics
        return statistics

    def _column_values(self, column: str, repeated: bool, max_rows: int) -> Iterator[Any]:
        """The column's values over the first ``max_rows`` rows (a repetition group's items one by one)."""
        for i in range(min(len(self.data), max_rows)):
            row = self.data[i]
            if isinstance(row, Mapping) and column in row:
                value = row[column]
                yield from value if repeated and isinstance(value, (list, tuple)) else [value]

    def plan(self, tokenizer: Tokenizer, statistics: Optional[Mapping[str, Mapping]] = None) -> TaskPlan:
        """The task plan for this vocabulary (cached).

        Args:
            tokenizer: the shared vocabulary.
            statistics: what the preprocessors learned from training rows (``fit_statistics``'s
                form; a model passes its saved ones); None fits them on this task's own rows.
                They replace any ``statistics`` given in ``preprocessor_options``.
        """
        # Keyed by identity; the cached entry holds the statistics object so its id stays unique.
        key = (id(tokenizer), None if statistics is None else id(statistics))
        if key not in self._plans:
            options = {name: dict(value) for name, value in self.preprocessor_options.items()}
            if "motion" not in options:
                stats = self.motion_statistics()
                if stats is not None:
                    options["motion"] = stats
            fitted = self.fit_statistics() if statistics is None else statistics
            for name, per_column in fitted.items():
                options[name] = {**options.get(name, {}), "statistics": per_column}
            plan = TaskPlan(self.name, self.instruction, tokenizer, closed_sets=self.closed_sets(),
                            preprocessor_options=options)
            self._plans[key] = (statistics, plan)
        return self._plans[key][1]

    def encode(self, index: int, tokenizer: Tokenizer, *, seed: int = 0, training: bool = True,
               statistics: Optional[Mapping[str, Mapping]] = None) -> Optional[Sample]:
        """Row ``index`` encoded, or None when it fails and ``on_error="skip"`` (``statistics``: as
        for ``plan``)."""
        # crc32, not hash(): str hashes change from process to process.
        rng = random.Random(zlib.crc32(f"{self.name}/{index}/{seed}".encode()))
        try:
            return self.plan(tokenizer, statistics).encode(self.data[index], index, rng=rng, training=training)
        except TaskDataError as exc:
            if self.on_error == "raise":
                raise
            self.skipped += 1
            self.errors.append(str(exc))
            return None

    def samples(self, tokenizer: Tokenizer, *, seed: int = 0, training: bool = True,
                statistics: Optional[Mapping[str, Mapping]] = None) -> Iterator[Sample]:
        """Every row encoded, in order (failed rows skipped and counted under ``on_error="skip"``)."""
        for i in range(len(self.data)):
            sample = self.encode(i, tokenizer, seed=seed, training=training, statistics=statistics)
            if sample is not None:
                yield sample
