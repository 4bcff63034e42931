"""A task: a name, a one-line instruction, data, and how it is scored.

    task = Task("caption_digits", "[IMAGE:image] what digit is this? -> [TEXT:label,closed_set]",
                data=[{"image": array, "label": "seven"}, ...], metrics=("accuracy",))
    plan = task.plan(tokenizer)
    samples = list(task.samples(tokenizer))

``data`` may be a list of dicts, a Hugging Face ``datasets`` dataset (anything with ``__len__``
and ``__getitem__`` returning dicts), or the path of a JSONL file whose media fields (IMAGE, AUDIO
and VIDEO slots) hold arrays (as nested lists), paths of regular files (relative to the JSONL
file; ``data_root`` confines them) or base64 bytes (``{"base64": ...}``).
A row that fails to encode raises ``TaskDataError`` naming the task, column and row, or, with
``on_error="skip"``, is skipped and counted in ``task.skipped``. Every failure of a row is one:
values a slot cannot take, rows a dataset cannot read, features that come out non-finite, slots
longer than ``max_slot_positions`` (default 4096) positions, and any other exception a
preprocessor raises (wrapped, with its type and message, as ``__cause__``).

Some preprocessors learn from the training rows (the STRUCT cell encoding: column ids, means and
stds, text vocabularies). ``task.fit_statistics()`` fits them on this task's rows; a model keeps
what it was trained with and passes it back (``task.plan(tokenizer, statistics)``), so a test
task, or one built with no rows, encodes exactly as the training task did.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import math
import numbers
import os
import random
import stat
import warnings
import zlib
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from moe_gen.registry import MODALITIES, PREPROCESSORS, did_you_mean
from moe_gen.tasks.instruction import Instruction, InstructionError, Slot
from moe_gen.tasks.modalities.base import GROUP_VALUES, SlotValueError, group_items, label_text
from moe_gen.tasks.modalities.signals import motion_frames
from moe_gen.tasks.plan import MAX_SLOT_POSITIONS, Sample, TaskDataError, TaskPlan, _modality_attributes
from moe_gen.tasks.tokenizer import Tokenizer

__all__ = ["Task", "task_list", "load_jsonl", "media_columns", "MEDIA_MODALITIES", "CLOSED_SETS",
           "MOTION_NORMALISATION"]


MEDIA_MODALITIES = ("IMAGE", "AUDIO", "VIDEO")  # modalities whose values may name files
MAX_ERRORS = 100  # error messages a task keeps (task.skipped counts them all)
MAX_PLANS = 8  # plans a task keeps, one per (tokenizer, statistics) pair, the most recently used
# Entries of ``fit_statistics`` that are not a preprocessor's: the label sets of closed-set slots,
# and the per-feature mean and std that normalise MOTION frames.
CLOSED_SETS = "closed_sets"
MOTION_NORMALISATION = "motion_normalisation"


def task_list(tasks: Any, what: str) -> list:
    """``tasks`` as a list of ``Task`` objects, or a ``ValueError`` naming ``what`` took them and what
    it got (one Task, a task name, None: a raw TypeError or AttributeError from inside before the
    twenty-sixth session's audit)."""
    if isinstance(tasks, (Task, str, bytes)) or not isinstance(tasks, Iterable):
        hint = " (one task: pass [task])" if isinstance(tasks, Task) else ""
        raise ValueError(f"{what} takes a list of Task objects, got {type(tasks).__name__}{hint}")
    tasks = list(tasks)
    for i, task in enumerate(tasks):
        if not isinstance(task, Task):
            hint = " (a preset name: load_preset(name, split) makes its Task)" if isinstance(task, str) else ""
            raise ValueError(f"{what} takes a list of Task objects; item {i} is a {type(task).__name__}{hint}")
    return tasks


def _place(name: str, slot: Slot) -> str:
    """Where a slot's trouble is, for error messages: ``column 'x'``, or ``slot N`` for a slot filled
    by position."""
    return f"column {name!r}" if slot.column is not None else name


def media_columns(instruction: Instruction) -> set[str]:
    """The columns of ``instruction``'s media slots (``MEDIA_MODALITIES``): the only values
    ``load_jsonl`` reads as file paths."""
    return {slot.column for template in instruction.templates for slot in template.encoder + template.decoder
            if slot.modality in MEDIA_MODALITIES and slot.column}


def load_jsonl(path: str, media: Iterable[str] = (), *, root: Optional[str] = None,
               line_numbers: Optional[list] = None, skipped: Optional[list] = None) -> list[dict]:
    """Rows of a JSONL file (``line_numbers``, when given, gets each row's 1-based line appended;
    ``skipped``, when given, gets the message of each line that fails, which is then left out
    instead of raised: ``Task(on_error="skip")``).

    ``{"base64": s}`` values become bytes. String values of the ``media`` columns (``media_columns``
    of the task's instruction; or lists of strings,
    for repetition groups) are file paths relative to the JSONL file's folder and become absolute
    paths; each must name a regular file (a FIFO or device would block or fail its reader) and,
    with ``root``, lie under ``root`` once symlinks are resolved (``../`` and absolute paths that
    leave it are refused). Every other value is kept as written, text that happens to name a
    file included.

    Raises:
        TaskDataError: naming the file and line (and column) of a line that is not UTF-8 or not a
            JSON object, of bad base64, and of a media path that is missing, not a regular file,
            or outside ``root``.
    """
    columns = set(media)
    base = os.path.dirname(os.path.abspath(path))
    confine = None if root is None else os.path.realpath(root)
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                row = _jsonl_row(raw, number, f"{path}, line {number}", columns, base, confine)
            except TaskDataError as exc:
                if skipped is None:
                    raise
                skipped.append(str(exc))
                continue
            if row is None:  # a blank line
                continue
            rows.append(row)
            if line_numbers is not None:
                line_numbers.append(number)
    return rows


def _jsonl_row(raw: bytes, number: int, where: str, columns: set, base: str, confine) -> Optional[dict]:
    """One line of a JSONL file as a row (None for a blank line); ``TaskDataError`` naming ``where``."""
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at byte "
                            f"{exc.start + 1} of the line)") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{where}: not JSON ({exc.msg} at character {exc.colno})") from None
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}: a row must be a JSON object")
    for key, value in row.items():
        if isinstance(value, dict) and set(value) == {"base64"}:
            row[key] = _base64_bytes(value["base64"], f"{where}, column {key!r}")
        elif key in columns and (isinstance(value, str) or _path_dict(value)):
            row[key] = _media_value(value, base, confine, f"{where}, column {key!r}")
        elif key in columns and isinstance(value, list) and value and all(
                isinstance(v, str) or _path_dict(v) for v in value):
            row[key] = [_media_value(v, base, confine, f"{where}, column {key!r}") for v in value]
    return row


def _path_dict(value: Any) -> bool:
    """Whether ``value`` is Hugging Face's undecoded media ``{"bytes": null, "path": "..."}`` (JSON
    holds no bytes: the file is read from the path)."""
    return (isinstance(value, dict) and set(value) <= {"bytes", "path"} and isinstance(value.get("path"), str)
            and value.get("bytes") is None)


def _media_value(value: Any, base: str, confine: Optional[str], where: str) -> Any:
    """A media path, or the path of an undecoded media dict, resolved and checked by ``_media_path``."""
    if isinstance(value, str):
        return _media_path(value, base, confine, where)
    return {**value, "path": _media_path(value["path"], base, confine, where)}


def _base64_bytes(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise TaskDataError(f"{where}: base64 must be a string, got {type(text).__name__}")
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks allowed, nothing else
    except binascii.Error as exc:
        raise TaskDataError(f"{where}: bad base64 ({exc})") from None


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _media_path(value: str, base: str, confine: Optional[str], where: str) -> str:
    """``value`` as an absolute path (relative to ``base``), checked as ``load_jsonl`` documents."""
    resolved = os.path.abspath(os.path.join(base, value))
    if confine is not None:
        real = os.path.realpath(resolved)
        if os.path.commonpath([real, confine]) != confine:
            raise TaskDataError(f"{where}: {value!r} lies outside the data root {confine}")
    try:
        mode = os.stat(resolved).st_mode
    except OSError as exc:
        raise TaskDataError(f"{where}: cannot use the file {value!r} ({exc.strerror}: {resolved})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise TaskDataError(f"{where}: {value!r} is {kind}, not a regular file ({resolved})")
    return resolved


def _metric_names(task: str, metrics) -> tuple[str, ...]:
    """``metrics`` as a tuple of registered metric names (one name alone is one metric: a string was
    split into its letters, and the task failed only when evaluated, after training)."""
    from moe_gen.registry import METRICS

    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"task {task!r}: unknown metrics {unknown}{did_you_mean(unknown, METRICS.list())}; "
                         f"known: {', '.join(METRICS.list())}")
    return names


def _objective_and_weight(task: str, objective: Any, weight: Any) -> tuple[str, float]:
    """A registered objective and a finite sampling weight >= 0 (a misspelt objective was run as a
    generative task by ``infer`` and evaluation without a word, and the Trainer refused it only after
    adding the task to the model)."""
    from moe_gen.registry import OBJECTIVES

    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"task {task!r}: unknown objective {objective!r}"
                         f"{did_you_mean([objective], OBJECTIVES.list())}; known: {', '.join(OBJECTIVES.list())}")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
        raise ValueError(f"task {task!r}: weight must be a finite number >= 0, got {weight!r}")
    return objective, float(weight)


def _rows_of(task: str, data: Any) -> Any:
    """The task's data as something indexed by row: columns (a dict of equally long lists, or a
    pandas DataFrame) become row dicts; lists, datasets and other sequences stay as they are."""
    if hasattr(data, "columns") and hasattr(data, "to_dict"):  # a pandas DataFrame
        return data.to_dict("records")
    if isinstance(data, Mapping):
        lengths = {column: len(values) if hasattr(values, "__len__") and not isinstance(values, (str, bytes, Mapping))
                   else None for column, values in data.items()}
        if None in lengths.values() or len(set(lengths.values())) > 1:
            raise ValueError(f"task {task!r}: data given as a dict must map each column to a list of its values, "
                             f"all equally long (got lengths {lengths}); or give a list of rows")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ValueError(f"task {task!r}: data must be a list of rows, a dict of columns, a dataset or a JSONL path")
    return data


class Task:
    """A task declared by instruction.

    Args:
        name: unique task name (its index in the model's task vocabulary is the ``task`` tag).
        instruction: the instruction text (or a parsed ``Instruction``).
        data: rows (list of dicts, HF dataset, or JSONL path), or columns (a dict of equally long
            lists, a pandas DataFrame).
        objective: a registered objective (``moe_gen.registry.OBJECTIVES``): ``generative``,
            ``contrastive``, ``masked`` or ``parallel``.
        metrics: metric names (``moe_gen.tasks.metrics``).
        weight: the task's sampling weight under ``TrainConfig(mixing="weights")`` where
            ``task_weights`` does not name it (other mixings do not read it, and warn; loss
            weights are ``TrainConfig.loss_weights``).
        on_error: ``raise`` or ``skip`` rows that fail to encode (``skipped`` counts the distinct rows
            skipped, ``errors`` keeps the first ``MAX_ERRORS`` messages).
        preprocessor_options: keyword arguments per preprocessor name.
        max_slot_positions: the most positions (tokens or feature rows) one slot of a row may take
            (``moe_gen.tasks.plan.MAX_SLOT_POSITIONS``); a longer one fails its row.
        data_root: with a JSONL path as ``data``, media paths must lie under this folder
            (``load_jsonl``'s ``root``); refused with rows given otherwise.
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
        data_root: Optional[str] = None,
        max_slot_positions: int = MAX_SLOT_POSITIONS,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if isinstance(max_slot_positions, bool) or not isinstance(max_slot_positions, int) or max_slot_positions < 1:
            raise ValueError(f"max_slot_positions must be a positive int, got {max_slot_positions!r}")
        self.max_slot_positions = max_slot_positions
        self.name = name
        try:
            self.instruction = (instruction if isinstance(instruction, Instruction)
                                else Instruction.parse(instruction, modalities=_modality_attributes()))
        except InstructionError as exc:
            raise InstructionError(f"task {name!r}: {exc.message}", exc.instruction, exc.position) from None
        self._lines: Optional[tuple[str, list[int], Any]] = None  # (JSONL path, line of each row, its rows)
        failed: list[str] = []  # messages of the JSONL lines left out (on_error="skip")
        if data_root is not None and not isinstance(data, (str, os.PathLike)):
            # (ignored before the twenty-seventh session's audit: rows from Python read any path)
            raise ValueError(f"task {name!r}: data_root confines the media paths of a JSONL file given as data; "
                             f"these rows ({type(data).__name__}) are read as given. Check their paths before, or "
                             "write them to a JSONL file")
        if isinstance(data, (str, os.PathLike)):
            path, numbers = os.fspath(data), []
            try:
                data = load_jsonl(path, media_columns(self.instruction), root=data_root, line_numbers=numbers,
                                  skipped=failed if on_error == "skip" else None)
            except OSError as exc:  # (the task was not named before the twenty-sixth session's audit)
                exc.add_note(f"task {name!r}: its rows could not be read from {path}")
                raise
            self._lines = (path, numbers, data)
        self.data = _rows_of(name, data)
        self.objective, self.weight = _objective_and_weight(name, objective, weight)
        self.metrics = _metric_names(name, metrics)
        self.on_error = on_error
        self.preprocessor_options = preprocessor_options or {}
        unknown = sorted(set(self.preprocessor_options) - set(PREPROCESSORS.list()))
        if unknown:  # (a misspelt name's options were silently not applied)
            raise ValueError(f"task {name!r}: preprocessor_options names no preprocessor: {unknown}"
                             f"{did_you_mean(unknown, PREPROCESSORS.list())}; known: {', '.join(PREPROCESSORS.list())}")
        # distinct rows that failed to encode, and lines of a JSONL file left out (on_error="skip")
        self._skipped_lines = len(failed)
        self.skipped = self._skipped_lines
        self.errors: list[str] = failed[:MAX_ERRORS]  # the first MAX_ERRORS messages
        self._skipped_rows: set[int] = set()
        self._plans: list[tuple[Tokenizer, Any, TaskPlan]] = []  # (tokenizer, statistics, plan)
        self._statistics: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {str(self.instruction)!r}, {len(self)} rows)"

    def with_rows(self, rows: Any) -> "Task":
        """The same task (name, instruction, objective, metrics, weight, error policy, preprocessor
        options, slot length limit) over other ``rows``: a subset to score, say."""
        return Task(self.name, self.instruction, rows, objective=self.objective, metrics=self.metrics,
                    weight=self.weight, on_error=self.on_error, preprocessor_options=self.preprocessor_options,
                    max_slot_positions=self.max_slot_positions)

    def split_off(self, fraction: float, *, seed: int = 0, group: Optional[str] = None,
                  stratify: Optional[str] = None) -> tuple["Task", "Task"]:
        """``(rest, held)``: validation rows split off this task (``moe_gen.tasks.splits``): about
        ``fraction`` of the rows at random, each ``stratify`` value keeping its share, or whole
        ``group``s (a column whose rows stay on one side, e.g. the clip of a motion window)."""
        from moe_gen.tasks.splits import split_off

        return split_off(self, fraction, seed=seed, group=group, stratify=stratify)

    def closed_sets(self) -> dict[str, list[str]]:
        """Label sets of closed-set slots (``closed_set`` or CATEGORY), collected from the data.

        Raises:
            TaskDataError: when the task has rows but none with a valid label in a closed set's
                column (ints too long to write out and lone surrogates are not labels); a task
                without rows has empty label sets.
        """
        repeated = {s.column: s.repeat is not None for t in self.instruction.templates for s in t.decoder
                    if s.column and (s.attrs.get("closed_set") or s.modality == "CATEGORY")}
        labels: dict[str, set] = {c: set() for c in repeated}
        for _, row in self._readable_rows(len(self.data) if repeated else 0):
            for c in repeated:
                if isinstance(row, Mapping) and c in row:
                    # a repetition group's column holds one label per item (group_items: a list or an array)
                    items = group_items(row[c]) if repeated[c] else None
                    for label in [row[c]] if items is None else items:
                        text = label_text(label)
                        if text is not None:
                            labels[c].add(text)
        for c in repeated:
            if len(self.data) and not labels[c]:
                held = f"; a repetition group's column holds {GROUP_VALUES} of labels" if repeated[c] else ""
                raise TaskDataError(f"task {self.name!r}, column {c!r}: none of the {len(self.data)} rows holds a "
                                    "valid label for this closed set (text or a number; missing values, ints too long "
                                    f"to write out and lone surrogates are not{held})")
        return {c: sorted(v) for c, v in labels.items()}

    def motion_statistics(self, max_rows: int = 256, column: Optional[str] = None) -> Optional[dict]:
        """Per-feature mean and std of the task's MOTION slots (or of ``column`` alone: a column, or
        ``"slot N"`` for a slot filled by position, ``Template.slot_names``) over up to ``max_rows``
        rows spread evenly over the data, so every clip is normalised alike (a task with several
        MOTION slots saves each one's own: ``fit_statistics``); a repetition group's clips count
        one by one.

        Values that are not frames ``[T, J]`` of finite numbers are passed over (their rows fail
        when encoded). None when there are no frames; when clips differ in width J, the statistics of
        the most common width (a clip of another width is refused when encoded).

        Raises:
            ValueError: for a ``column`` that no MOTION slot of the task reads.
            TaskDataError: when the rows read hold MOTION values but none of them is usable (it
                says how many were passed over, and why the first one was).
        """
        motion = self._motion_slots()
        if column is not None and column not in motion:
            raise ValueError(f"task {self.name!r}: no MOTION slot reads {column!r}; its MOTION slots read "
                             f"{', '.join(map(repr, motion)) or 'nothing'}")
        chosen = motion if column is None else {column: motion[column]}
        frames, bad, first_error = [], 0, None
        rows = min(len(self.data), max_rows) if chosen else 0
        for _, (slot, position) in sorted(chosen.items()):
            for i, value in self._slot_values(slot, position, rows):
                try:
                    frames.append(motion_frames(value, np.float64))
                except SlotValueError as exc:
                    bad += 1
                    first_error = first_error or f"row {i}: {exc}"
        if bad and not frames:
            where = ", ".join(_place(name, slot) for name, (slot, _) in sorted(chosen.items()))
            raise TaskDataError(f"task {self.name!r}, {where}: none of the {bad} MOTION values in the {rows} rows "
                                f"read is usable for the normalisation statistics ({first_error})")
        if not frames:
            return None
        # the usual frame width: a clip of another width is refused when it is encoded
        width = collections.Counter(f.shape[1] for f in frames).most_common(1)[0][0]
        stacked = np.concatenate([f for f in frames if f.shape[1] == width])
        # float64, as the frames are standardised: in float32 a mean of 1e6 rounded to 0.0625 (and the
        # frames as well), so data on a large offset lost its variation before the fifteenth audit
        return {"mean": stacked.mean(0), "std": stacked.std(0)}

    def fit_statistics(self, max_rows: int = 10_000) -> dict[str, dict]:
        """What the task's slots learn from its rows, JSON-serialisable (cached; empty when no slot
        learns anything): preprocessor name → slot name → statistics (``Preprocessor.fit`` over
        ``max_rows`` rows spread evenly over the data; a slot's name is its column, or ``"slot N"``
        for a slot filled by position, ``Template.slot_names``), and under ``CLOSED_SETS`` the
        label sets of closed-set slots (``closed_sets``, all rows) and under
        ``MOTION_NORMALISATION`` the MOTION frames' mean and std (``motion_statistics``). A model
        saves them, so it encodes new rows and decodes closed sets as it was trained, whatever
        rows (or none) a task holds at inference: held-out clips are normalised with the training
        clips' statistics, not their own.

        Raises:
            TaskDataError: naming the task and column (or slot) when a preprocessor's ``fit`` fails
                (it should pass over values it cannot read; their rows then fail on their own).
        """
        if self._statistics is not None:
            return self._statistics
        slots: dict[tuple[str, str], tuple[Slot, Optional[int]]] = {}
        for slot_name, slot, position in self._data_slots():
            if slot.modality in MODALITIES:
                name = str(slot.attrs.get("preprocess", MODALITIES.get(slot.modality).preprocess))
                if name in PREPROCESSORS:
                    first = slots.setdefault((name, slot_name), (slot, position))[0]
                    self._check_shared_fit(name, slot_name, first, slot)
        statistics: dict[str, dict] = {}
        for (name, slot_name), (slot, position) in slots.items():
            # lazily: a preprocessor that learns nothing reads no rows
            values = (value for _, value in self._slot_values(slot, position, max_rows))
            where = f"task {self.name!r}, {_place(slot_name, slot)}"
            try:
                with warnings.catch_warnings(record=True) as caught:  # re-issued naming task and column
                    warnings.simplefilter("always")
                    fitted = PREPROCESSORS.get(name).fit(slot, values)
            except Exception as exc:  # a fit that fails on some value fails every row: name the column
                raise TaskDataError(f"{where}: the {name!r} preprocessor cannot learn from the rows "
                                    f"({type(exc).__name__}: {exc})") from exc
            for warning in caught:
                warnings.warn(f"{where}: {warning.message}", warning.category, stacklevel=2)
            if fitted is not None:
                statistics.setdefault(name, {})[slot_name] = fitted
        labels = self.closed_sets()
        if labels:
            statistics[CLOSED_SETS] = labels
        motion = self._motion_normalisation()
        if motion is not None:
            statistics[MOTION_NORMALISATION] = motion
        self._statistics = statistics
        return statistics

    def _check_shared_fit(self, name: str, slot_name: str, first: Slot, slot: Slot) -> None:
        """Two slots of one column (in two templates) share what the ``name`` preprocessor learns
        from it: they must agree on the attributes its ``fit`` reads (a table's ``uncased``, a bag of
        words' ``vocab_size``), or one of them would read every value against statistics fitted
        another way (before the twenty-sixth session's audit, a second template's ``uncased`` table
        read each text cell as unseen)."""
        for attr in PREPROCESSORS.get(name).fit_attrs:
            a, b = first.attrs.get(attr), slot.attrs.get(attr)
            if a != b:
                shown = [f"{attr}={v}" if v is not None else f"no {attr}" for v in (a, b)]
                raise TaskDataError(f"task {self.name!r}, {_place(slot_name, slot)}: two slots of this column "
                                    f"read it with the {name!r} preprocessor, one with {shown[0]} and one with "
                                    f"{shown[1]}; they share the statistics it learns from the column, so give "
                                    "both the same")

    def _data_slots(self) -> Iterator[tuple[str, Slot, Optional[int]]]:
        """``(name, slot, position)`` of every data slot of every template: its name
        (``Template.slot_names``: its column, or ``"slot N"``) and, for a slot filled by position,
        the index of its value in a row."""
        for template in self.instruction.templates:
            slots = template.encoder + template.decoder
            for name, slot, position in zip(template.slot_names(), slots, template.positions()):
                if name is not None:
                    yield name, slot, position

    def _motion_slots(self) -> dict[str, tuple[Slot, Optional[int]]]:
        """The task's MOTION slots by name, each with its position in a row filled by position (the
        first template's slot, where several read one column)."""
        slots: dict[str, tuple[Slot, Optional[int]]] = {}
        for name, slot, position in self._data_slots():
            if slot.modality == "MOTION":
                slots.setdefault(name, (slot, position))
        return slots

    def _motion_normalisation(self) -> Optional[dict]:
        """``MOTION_NORMALISATION``: ``{"mean", "std"}`` for a task with one MOTION slot name; with
        several, ``{"columns": {name: {"mean", "std"}}}`` (pooled, a column of other widths failed
        every row and one of another scale was read in the other's units)."""
        names = sorted(self._motion_slots())
        if len(names) <= 1:
            motion = self.motion_statistics()
            return None if motion is None else {k: v.tolist() for k, v in motion.items()}
        per_name = {c: self.motion_statistics(column=c) for c in names}
        return {"columns": {c: {k: v.tolist() for k, v in m.items()} for c, m in per_name.items() if m is not None}}

    def _slot_values(self, slot: Slot, position: Optional[int], max_rows: int) -> Iterator[tuple[int, Any]]:
        """``(row index, value)`` of ``slot`` over ``max_rows`` rows spread evenly over the data: its
        column's value, or for a slot filled by position the value at ``position`` of a sequence
        row (a repetition group's items one by one)."""
        for i, row in self._readable_rows(max_rows):
            if slot.column is not None:
                if not isinstance(row, Mapping) or slot.column not in row:
                    continue
                value = row[slot.column]
            elif isinstance(row, (list, tuple)) and position is not None and position < len(row):
                value = row[position]
            else:
                continue
            items = group_items(value) if slot.repeat is not None else None
            for item in [value] if items is None else items:
                yield i, item

    def plan(self, tokenizer: Tokenizer, statistics: Optional[Mapping[str, Mapping]] = None) -> TaskPlan:
        """The task plan for this vocabulary (cached).

        Args:
            tokenizer: the shared vocabulary.
            statistics: what the slots learned from training rows (``fit_statistics``'s form; a
                model passes its saved ones); None fits them on this task's own rows. They
                replace any ``statistics`` given in ``preprocessor_options``; their closed sets,
                where they hold any, replace the labels of this task's rows (statistics saved
                before closed sets were kept hold none).
        """
        for i, (known, known_statistics, plan) in enumerate(self._plans):  # by identity (the entry holds both)
            if known is tokenizer and known_statistics is statistics:
                self._plans.append(self._plans.pop(i))  # the most recently used last
                return plan
        options = {name: dict(value) for name, value in self.preprocessor_options.items()}
        fitted = self.fit_statistics() if statistics is None else statistics
        saved = fitted.get(MOTION_NORMALISATION)
        if saved is None:
            saved = self._motion_normalisation()
        if saved is not None:  # under the user's own motion options (their mean and std win)
            stats = ({"columns": {c: {k: np.asarray(v, np.float64) for k, v in m.items()}
                                  for c, m in saved["columns"].items()}} if "columns" in saved
                     else {k: np.asarray(v, np.float64) for k, v in saved.items()})
            own = options.get("motion", {})
            if "mean" in own or "std" in own:
                stats.pop("columns", None)
            options["motion"] = {**stats, **own}
        labels = fitted.get(CLOSED_SETS) or self.closed_sets()
        for name, per_column in fitted.items():
            if name not in (CLOSED_SETS, MOTION_NORMALISATION):
                options[name] = {**options.get(name, {}), "statistics": per_column}
        plan = TaskPlan(self.name, self.instruction, tokenizer, closed_sets=labels,
                        preprocessor_options=options, max_slot_positions=self.max_slot_positions)
        self._plans.append((tokenizer, statistics, plan))
        # the MAX_PLANS most recently used: every model loaded or merged brings its own tokenizer and
        # statistics objects, and a task scored on each checkpoint of a run kept one plan per model
        # (and its encoders' caches) for good before the fourteenth audit
        del self._plans[:-MAX_PLANS]
        return plan

    def encode(self, index: int, tokenizer: Tokenizer, *, seed: int = 0, training: bool = True,
               statistics: Optional[Mapping[str, Mapping]] = None, plan: Optional[TaskPlan] = None) -> Optional[Sample]:
        """Row ``index`` encoded, or None when it fails and ``on_error="skip"`` (``statistics``: as
        for ``plan``; ``plan``: one of this task's plans to encode with instead, such as the model's,
        ``GeneralistModel.plan``, which holds the model's own image tokenizers: the trainer's sampler
        keeps it, since the task's cache keeps only its most recently used plans).

        Raises:
            TaskDataError: for a row that fails (``on_error="raise"``); any exception other than
                ``TaskDataError`` met while encoding the row is wrapped in one naming the task and
                row, with its type and message, and kept as ``__cause__``.
        """
        # a task-level error (no closed-set label at all, labels that clash) is no row's: raised
        # whatever on_error says (skipped, it failed every row, re-planning the task for each one)
        plan = plan if plan is not None else self.plan(tokenizer, statistics)
        try:
            row = self._row(index)
            try:
                return plan.encode(row, index, rng=self._rng(index, seed), training=training)
            except TaskDataError:
                raise
            except Exception as exc:  # the plan wraps preprocessor errors with the column; this is the backstop
                raise TaskDataError(f"task {self.name!r}, row {index}: encoding failed: {type(exc).__name__}: "
                                    f"{exc}") from exc
        except TaskDataError as exc:
            path, lines, rows = self._lines or (None, (), None)
            if self.data is rows and len(rows) == len(lines) and 0 <= index < len(lines):
                # the rows are still those of the JSONL file: say where the row is written
                exc.args = (f"{exc} ({path}, line {lines[index]})",)
            if self.on_error == "raise":
                raise
            self.skip_row(index, exc)
            return None

    def skip_row(self, index: int, error: Exception) -> None:
        """Counts row ``index`` as skipped (once, however often it fails) and keeps its message
        while fewer than ``MAX_ERRORS`` are kept."""
        if index not in self._skipped_rows:
            self._skipped_rows.add(index)
            self.skipped = self._skipped_lines + len(self._skipped_rows)
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(str(error))

    def probe(self, tokenizer: Tokenizer, max_rows: int = 64) -> list[Sample]:
        """For each template, the sample of the first of the first ``max_rows`` rows that encodes
        with it (not training; failures are not counted as skipped): what a model reads its feature
        widths from, so a bad first row does not hide a slot's adapter. Empty for a task without rows.

        Raises:
            TaskDataError: when none of those rows encodes, naming the first failure.
        """
        plan = self.plan(tokenizer)
        samples, first_error = [], None
        rows = min(len(self.data), max_rows)
        for template in range(len(plan.templates)):
            for i in range(rows):
                try:
                    samples.append(plan.encode(self._row(i), i, rng=self._rng(i), training=False, template=template))
                    break
                except TaskDataError as exc:
                    first_error = first_error or str(exc)
        if rows and not samples:
            raise TaskDataError(f"task {self.name!r}: none of its first {rows} rows encode; the first failure: "
                                f"{first_error}")
        return samples

    def _rng(self, index: int, seed: int = 0) -> random.Random:
        # crc32, not hash(): str hashes change from process to process.
        return random.Random(zlib.crc32(f"{self.name}/{index}/{seed}".encode()))

    def _readable_rows(self, limit: int) -> Iterator[tuple[int, Any]]:
        """``(index, row)`` of ``limit`` rows spread evenly over the data (every row when there are no
        more; data is often ordered, by clip or class, so the first rows alone may miss whole
        groups), passing over rows the dataset fails to read (what is learned from the rows does not
        depend on them; they fail when encoded)."""
        n = len(self.data)
        for i in (range(n) if limit >= n else (j * n // limit for j in range(max(limit, 0)))):
            try:
                row = self.data[i]
            except Exception:
                continue
            yield i, row

    def _row(self, index: int) -> Any:
        """Row ``index`` of the data; a dataset that fails to read it (a corrupt shard, an
        undecodable image column) fails that row with ``TaskDataError``."""
        try:
            return self.data[index]
        except IndexError:  # an index past the end is the caller's mistake, not the row's
            raise IndexError(f"task {self.name!r} has {len(self.data)} rows; there is no row {index}") from None
        except Exception as exc:
            raise TaskDataError(f"task {self.name!r}, row {index}: cannot read the row "
                                f"({type(exc).__name__}: {exc})") from exc

    def samples(self, tokenizer: Tokenizer, *, seed: int = 0, training: bool = True,
                statistics: Optional[Mapping[str, Mapping]] = None) -> Iterator[Sample]:
        """Every row encoded, in order (failed rows skipped and counted under ``on_error="skip"``)."""
        for i in range(len(self.data)):
            sample = self.encode(i, tokenizer, seed=seed, training=training, statistics=statistics)
            if sample is not None:
                yield sample
