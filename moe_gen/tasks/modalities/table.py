"""STRUCT: tables as one embedded position per cell, with numbers the model can compare.

Shape legend: N cells of one table (rows × columns), F = 4 cell features, D model width,
K Fourier frequencies.

Linearising a table to text turns ``5.1`` into the digit pieces ``5 . 1``; a small model trained
from scratch cannot read magnitudes from those and memorises rows instead. The default STRUCT
preprocessor (``struct``) therefore emits one feature row per cell,

    [column id, z, kind, text id]       positions (0, table row, column index in this table)

and the ``struct_cells`` adapter embeds it as column embedding + kind embedding + text-value
embedding + table-row embedding + (numeric cells) an MLP of periodic features of z
(Gorishniy et al. 2022, "On Embeddings for Numerical Features in Tabular Deep Learning": sin/cos
of learned frequencies make magnitudes and thresholds easy to learn).

What a cell is:

- **numeric**: ints and floats (numpy ones too) and strings that ``float()`` reads as a finite
  number (``"5.1"``, ``" 1e3 "``). z = (x − mean) / std of the column's numeric training cells,
  clipped to ±10. Numbers in a column without numeric training cells (an unseen column, a column
  that held only text, a plan made without statistics) are scaled by sign(x)·log(1 + |x|) instead.
- **missing**: ``None``, float NaN, strings that ``float()`` reads as NaN (``"nan"``) and empty or
  blank strings, and a column absent from a row of a list-of-dicts table.
- **text**: any other string, and booleans (``"True"``/``"False"``). Its text id is the value's
  index in the column's vocabulary (values seen at least twice in the training rows, so a
  row-unique name cannot be memorised); unseen values and unseen columns get id 0 ("unknown").
  A column may mix numbers and text: each cell is read on its own.
- anything else (lists, dicts, arrays, objects as cells, ±inf) is malformed: ``SlotValueError``,
  which the plan reports as ``TaskDataError`` naming task, column and row (and the table's own
  column and row).

The column ids, means, stds and vocabularies are fitted on the task's training rows
(``StructPreprocessor.fit``, called by ``Task.fit_statistics``) and saved with the model
(``ModelConfig.preprocessor_statistics``), so a model reloaded from disk encodes a task built with
no rows exactly as it did in training. Ids are per task: two tasks' column 1 share an embedding,
told apart by the task tag and the prompt. The linearised text encoding remains available as
``preprocess=struct_text``.

Accepted tables: a list of row dicts (columns are the union of their keys), a dict of equally
long column lists, or a dict of single values (a one-row table: ``{"sepal length": 5.1, ...}``).
"""

from __future__ import annotations

import collections
import decimal
import math
import numbers
import warnings
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from moe_gen.registry import ADAPTERS, PREPROCESSORS
from moe_gen.tasks.modalities.base import (
    Adapter,
    EncodeContext,
    ModalitySpec,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    brief,
    register_modality,
)

__all__ = ["table_rows", "read_cell", "fit_table_statistics", "StructPreprocessor", "StructCellsAdapter",
           "MISSING", "NUMERIC", "TEXT", "CELL_FEATURES", "MAX_COLUMNS", "MAX_TEXT_VALUES", "MAX_TABLE_ROWS"]

register_modality(ModalitySpec("STRUCT", text_like=False, preprocess="struct", adaptor="struct_cells"))

# Cell kinds (feature 2).
MISSING, NUMERIC, TEXT = 0, 1, 2
CELL_FEATURES = 4  # column id, z, kind, text id
# Sizes of the adapter's tables; id 0 of columns and text values means "unseen".
MAX_COLUMNS, MAX_TEXT_VALUES, MAX_TABLE_ROWS = 128, 1024, 128
Z_CLIP = 10.0  # |z| beyond this is an outlier; clipping keeps the periodic features in range
MIN_TEXT_COUNT = 2  # a text value needs this many training cells to get its own id


def table_rows(table: Any) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Column names and rows (dicts by column name) of a table in any accepted form.

    Raises:
        SlotValueError: for a value that is not a table, rows that are not dicts, a dict mixing
            column lists with single values, or column lists of different lengths.
    """
    if isinstance(table, Mapping):
        columns = _column_names(table)
        values = list(table.values())
        is_list = [isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0) for v in values]
        if all(is_list):  # a dict of columns (an empty dict is an empty table)
            lengths = {c: len(v) for c, v in zip(columns, values)}
            if len(set(lengths.values())) > 1:
                described = ", ".join(f"{c!r}: {n}" for c, n in lengths.items())
                raise SlotValueError(f"the table's columns have different lengths ({described})")
            return columns, [dict(zip(columns, cells)) for cells in zip(*values)]
        if not any(is_list):  # {column: value}: a one-row table
            return columns, [dict(zip(columns, values))]
        listed = columns[is_list.index(True)]
        single = columns[is_list.index(False)]
        raise SlotValueError(f"table column {listed!r} holds a list of cells but column {single!r} a single "
                             "value; give every column a list (a dict of columns) or every column one value "
                             "(a one-row table)")
    if isinstance(table, (list, tuple)):
        for r, row in enumerate(table):
            if not isinstance(row, Mapping):
                raise SlotValueError(f"table row {r} is a {type(row).__name__}; a table given as a list needs "
                                     "one dict per row")
        rows = []
        for r, row in enumerate(table):
            names = _column_names(row, f" in row {r}")
            rows.append(dict(zip(names, row.values())))
        return list(dict.fromkeys(k for row in rows for k in row)), rows
    raise SlotValueError(f"a STRUCT value must be a list of row dicts, a dict of columns or a dict of single "
                         f"values, got {type(table).__name__}")


def _column_names(mapping: Mapping, where: str = "") -> list[str]:
    """The keys of ``mapping`` as column names (text); two keys that read the same (``1`` and
    ``"1"``, as a pandas ``to_dict()`` mixed with JSON may give) would make one column of two."""
    names = [_column_name(key) for key in mapping]
    if len(set(names)) < len(names):
        keys = list(mapping)
        first = {}
        for key, name in zip(keys, names):
            if name in first:
                raise SlotValueError(f"table columns {first[name]!r} and {key!r}{where} have the same name "
                                     f"{name!r} as text; rename one")
            first[name] = key
    return names


def _column_name(name: Any) -> str:
    try:
        return str(name)
    except ValueError:  # ints past sys.get_int_max_str_digits()
        raise SlotValueError(f"a table column name must be text, got a {type(name).__name__} too long to "
                             "write out") from None


def read_cell(value: Any) -> tuple[int, Any]:
    """``(kind, value)`` of one cell: ``(NUMERIC, float)``, ``(TEXT, str)`` or ``(MISSING, None)``.
    Text that reads as a finite number is a number, unless it has ``_`` in it (``float`` would read
    ``"12_34"`` as 1234); None, NaN and blank text are missing.

    Raises:
        SlotValueError: for nested lists/dicts, arrays, other objects and ±inf.
    """
    if value is None:
        return MISSING, None
    if isinstance(value, (bool, np.bool_)):
        return TEXT, str(bool(value))
    if isinstance(value, (numbers.Real, decimal.Decimal)):  # int, float, numpy numbers; SQL NUMERIC cells
        try:
            number = float(value)
        except OverflowError:
            raise SlotValueError(f"the number {brief(value)} does not fit a float") from None
        except ValueError:  # Decimal("sNaN"): a not-a-number that refuses float()
            return MISSING, None
        if math.isnan(number):
            return MISSING, None
        if math.isinf(number):
            raise SlotValueError(f"the cell is {number}; numbers must be finite (use None for a missing value)")
        return NUMERIC, number
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SlotValueError("the cell holds bytes that are not UTF-8 text") from None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return MISSING, None
        if "_" in text:  # float() reads "12_34" (Python's digit separators) as 1234: an id, not a number
            return TEXT, text
        try:
            number = float(text)
        except ValueError:
            return TEXT, text
        if math.isnan(number):
            return MISSING, None
        return (NUMERIC, number) if math.isfinite(number) else (TEXT, text)
    raise SlotValueError(f"a cell must be a number, text, a boolean or None, got {type(value).__name__}"
                         + (" (tables do not nest)" if isinstance(value, (list, tuple, dict, np.ndarray)) else ""))


def _cells(table: Any, uncased: bool = False):
    """``(table row, column index, column, kind, value)`` of every cell, row by row.

    Raises:
        SlotValueError: naming the table's column and row of a malformed cell.
    """
    columns, rows = table_rows(table)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            try:
                kind, value = read_cell(row.get(column))
            except SlotValueError as exc:
                raise SlotValueError(f"table column {column!r}, table row {r}: {exc}") from None
            if kind == TEXT and uncased:
                value = value.lower()
            yield r, c, column, kind, value


def fit_table_statistics(tables: Iterable[Any], *, uncased: bool = False) -> dict:
    """What the cell encoding learns from a column of training tables.

    Tables that are not well formed are passed over (their rows fail when encoded).

    Returns:
        ``{"columns": [names in first-seen order], "mean": {column: float}, "std": {column: float},
        "values": {column: [text values, most frequent first]}}``, JSON-serialisable. Only numeric
        cells count towards mean and std (kept for every column); a constant column gets std 1. At
        most ``MAX_COLUMNS − 1`` columns (the first seen) and ``MAX_TEXT_VALUES − 1`` text values (the
        most frequent) get ids; a warning says when there are more.
    """
    columns: dict[str, None] = {}
    numbers_by_column: dict[str, list[float]] = collections.defaultdict(list)
    counts: collections.Counter = collections.Counter()
    for table in tables:
        try:
            cells = list(_cells(table, uncased))
        except SlotValueError:
            continue
        for _, _, column, kind, value in cells:
            columns.setdefault(column)
            if kind == NUMERIC:
                numbers_by_column[column].append(value)
            elif kind == TEXT:
                counts[column, value] += 1
    names = list(columns)[:MAX_COLUMNS - 1]
    mean, std = {}, {}
    for column in columns:  # every column's numbers standardised, those without an id too
        values = np.asarray(numbers_by_column.get(column, ()), dtype=np.float64)
        if len(values):
            mean[column], std[column] = _mean_and_scale(values)
    order = {c: i for i, c in enumerate(names)}
    frequent = sorted(((-n, order[c], v) for (c, v), n in counts.items() if n >= MIN_TEXT_COUNT and c in order))
    vocab: dict[str, list[str]] = {}
    for _, i, value in frequent[:MAX_TEXT_VALUES - 1]:
        vocab.setdefault(names[i], []).append(value)
    if len(columns) > len(names) or len(frequent) > MAX_TEXT_VALUES - 1:
        warnings.warn(f"the tables have {len(columns)} columns and {len(frequent)} text values seen "
                      f"{MIN_TEXT_COUNT}+ times; the table adapter tells {MAX_COLUMNS - 1} columns (the first "
                      f"seen) and {MAX_TEXT_VALUES - 1} text values (the most frequent) apart, and reads the "
                      "others as one unseen column or value (their numbers are still standardised per column)",
                      UserWarning, stacklevel=2)
    return {"columns": names, "mean": mean, "std": std, "values": {c: vocab[c] for c in names if c in vocab}}


def _mean_and_scale(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a column's numbers, computed on the numbers divided by their
    largest magnitude, so that neither columns on a 1e-13 scale (taken as constant by an absolute
    test) nor ones near 1e160 (whose squares overflow to an infinite deviation) lose their scale;
    a column constant to 1e-9 of its magnitude gets deviation 1, and so does one whose deviation
    underflows to 0 (subnormal numbers such as 0 and 5e-324: before the fifteenth audit every row
    then failed with a ZeroDivisionError)."""
    scale = float(np.abs(values).max())
    if scale == 0.0:
        return 0.0, 1.0
    unit = values / scale
    spread = float(unit.std())
    deviation = spread * scale
    return float(unit.mean()) * scale, (deviation if spread > 1e-9 and deviation > 0.0 else 1.0)


class _TableLookup:
    """Fitted statistics of one slot column, as lookups."""

    def __init__(self, statistics: Mapping[str, Any]) -> None:
        self.column_ids = {c: i + 1 for i, c in enumerate(statistics.get("columns", ()))}
        self.mean, self.std = dict(statistics.get("mean", {})), dict(statistics.get("std", {}))
        self.text_ids: dict[tuple[str, str], int] = {}
        for column, values in statistics.get("values", {}).items():
            for value in values:
                self.text_ids[column, value] = len(self.text_ids) + 1

    def z(self, column: str, number: float) -> float:
        if column in self.mean:
            return max(-Z_CLIP, min(Z_CLIP, (number - self.mean[column]) / self.std[column]))
        return _log_scale(number)


def _log_scale(number: float) -> float:
    """sign(x)·log(1 + |x|): the scale of numbers without statistics. Not clipped like z (a clip at
    10 made every number above 22,025 the same); the largest finite float gives 709.8."""
    return math.copysign(math.log1p(abs(number)), number)


@PREPROCESSORS.register("struct")
class StructPreprocessor(Preprocessor):
    """A table → one feature row per cell ``[column id, z, kind, text id]`` (see the module docstring).

    Slot attributes: ``max_length`` caps the cells (row by row), ``mask_ratio`` hides each cell as
    missing with that probability in training (and at inference when the task predicts the
    table), ``uncased`` lower-cases text values.
    (``no_punctuation`` and ``noise_ratio`` apply to ``preprocess=struct_text`` only.)

    Args:
        statistics: slot name (its column, or ``"slot N"`` for a slot filled by position:
            ``EncodeContext.slot_name``) → ``fit_table_statistics`` result; a slot without them
            reads every table column as unseen.
    """

    modality = "STRUCT"
    corruptions = ("mask_ratio",)
    fit_attrs = ("uncased",)

    def __init__(self, statistics: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self.statistics = dict(statistics or {})
        self._lookups = {column: _TableLookup(s) for column, s in self.statistics.items()}
        self._unfitted = _TableLookup({})

    @classmethod
    def fit(cls, slot, values: Iterable[Any]) -> dict:
        return fit_table_statistics(values, uncased=bool(slot.attrs.get("uncased")))

    def feature_dim(self) -> int:
        return CELL_FEATURES

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        lookup = self._lookups.get(ctx.slot_name, self._unfitted)
        mask_ratio = float(slot.attrs.get("mask_ratio", 0.0)) if ctx.corrupts(slot.column) else 0.0
        features, positions = [], []
        try:
            for r, c, column, kind, cell in _cells(value, bool(slot.attrs.get("uncased"))):
                if mask_ratio and ctx.rng.random() < mask_ratio:
                    kind, cell = MISSING, None
                z = lookup.z(column, cell) if kind == NUMERIC else 0.0
                text_id = lookup.text_ids.get((column, cell), 0) if kind == TEXT else 0
                features.append((float(lookup.column_ids.get(column, 0)), z, float(kind), float(text_id)))
                positions.append((0, r, c))
        except SlotValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        if not features:
            raise SlotValueError(f"{ctx.where(slot.column)}: the table has no cells")
        limit = slot.attrs.get("max_length")
        if limit is not None:
            features, positions = features[:int(limit)], positions[:int(limit)]
        rows = 1 + max(r for _, r, _ in positions)
        if rows > MAX_TABLE_ROWS:  # (the adapter's row embedding held row 127 for every row after it)
            raise SlotValueError(f"{ctx.where(slot.column)}: the table has {rows} rows; the table adapter tells "
                                 f"{MAX_TABLE_ROWS} apart (split the table, or cut it with max_length=)")
        return SlotEncoding("STRUCT", features=torch.tensor(features, dtype=torch.float32),
                            positions=torch.tensor(positions, dtype=torch.long),
                            meta={"cells": len(features)})


@ADAPTERS.register("struct_cells")
class StructCellsAdapter(Adapter):
    """Cell rows ``[N, 4]`` → ``[N, D]``: column + kind + text value + table row embeddings, plus for
    numeric cells ``MLP([z, sin 2πfz, cos 2πfz] + column bias)`` with K learned frequencies f.

    The column bias inside the MLP lets one shared MLP bend each column's scale differently (a
    per-column nonlinearity at the cost of one embedding table).

    Its rows hold column, kind and text-value ids as floats (text ids up to ``MAX_TEXT_VALUES``,
    past bf16's exact 256), so they reach it in fp32 in a cast model (``exact_features``) and it casts
    only z to its weights' dtype.
    """

    exact_features = True

    def __init__(self, feature_dim: int, d_model: int, frequencies: int = 16, sigma: float = 1.0) -> None:
        super().__init__(feature_dim, d_model)
        if feature_dim != CELL_FEATURES:
            raise ValueError(f"struct_cells takes {CELL_FEATURES} features a cell, got {feature_dim}")
        self.column = nn.Embedding(MAX_COLUMNS, d_model)
        self.kind = nn.Embedding(3, d_model)
        self.text = nn.Embedding(MAX_TEXT_VALUES, d_model)
        self.row = nn.Embedding(MAX_TABLE_ROWS, d_model)
        # Frequencies ~ N(0, sigma²) on standardised z, as in the paper's periodic embeddings.
        self.frequencies_K = nn.Parameter(torch.randn(frequencies) * sigma)
        self.number_in = nn.Linear(1 + 2 * frequencies, d_model)
        self.number_column = nn.Embedding(MAX_COLUMNS, d_model)
        self.number_out = nn.Linear(d_model, d_model)
        # Token embeddings start at std D^-1/2 (GeneralistModel); the cell embeddings start alike so
        # a cell's sum of five terms is not louder than a word.
        for table in (self.column, self.kind, self.text, self.row, self.number_column):
            nn.init.normal_(table.weight, std=d_model ** -0.5)

    def forward(self, features_NF: torch.Tensor, positions_N3: torch.Tensor) -> torch.Tensor:
        column_N = features_NF[:, 0].round().long().clamp(0, MAX_COLUMNS - 1)
        z_N1 = features_NF[:, 1:2].to(self.number_in.weight.dtype)  # (fp32 unless the model was cast)
        kind_N = features_NF[:, 2].round().long().clamp(0, 2)
        text_N = features_NF[:, 3].round().long().clamp(0, MAX_TEXT_VALUES - 1)
        angle_NK = 2 * math.pi * z_N1 * self.frequencies_K
        periodic_N = torch.cat([z_N1, angle_NK.sin(), angle_NK.cos()], dim=-1)
        hidden_ND = nn.functional.gelu(self.number_in(periodic_N) + self.number_column(column_N))
        number_ND = self.number_out(hidden_ND) * (kind_N == NUMERIC).unsqueeze(-1)
        row_N = positions_N3[:, 1].clamp(0, MAX_TABLE_ROWS - 1)
        return self.column(column_N) + self.kind(kind_N) + self.text(text_N) + self.row(row_N) + number_ND
