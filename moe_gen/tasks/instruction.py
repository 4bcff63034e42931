"""Parser of one-line task instructions: ``encoder sentence -> decoder sentence``.

An instruction says which data columns a task reads, in which modality, on which side of the
model, and with which literal prompt text around them (the OFASys grammar, arXiv 2212.04408)::

    [IMAGE:img] what does the image describe? -> [TEXT:cap]
    [IMAGE:img] what are the objects? -> ( [BOX:boxes] [TEXT:labels] )*
    [AUDIO:wav] transcribe: -> [TEXT:text] ||| [AUDIO:wav] what was said? -> [TEXT:text]

Grammar (whitespace between elements is free)::

    instruction := template ( '|||' template )*      one template is sampled per example
    template    := sentence '->' sentence            exactly one '->'; either side may be empty
    sentence    := ( literal | slot | group )*
    group       := '(' slot ( literal | slot )* ')*'  repetition (extension, see below)
    slot        := '[' TYPE ( ':' column )? ( ',' attribute )* ']'
    attribute   := name ( '=' value )?               value: bare or "quoted"

Rules chosen (OFASys behaviour noted where it differs):

* The first item after ``:`` is always the column, as in OFASys's slot regular expression;
  attributes without a column follow the type after a comma: ``[IMAGE,preprocess=image_vqgan]``.
  A column containing ``=`` is rejected with that hint instead of silently becoming a column name.
  Columns are ``[A-Za-z0-9_][A-Za-z0-9_.-]*`` (OFASys: ``[A-Za-z0-9_]+``).
* Attribute values are bare (``[A-Za-z0-9_.+/-]+``) or, as an extension, double-quoted with ``\\"``
  and ``\\\\`` escapes, so they may hold commas, brackets, ``->`` or ``=``. Values are converted
  and checked against the modality's ``AttrSpec``; OFASys keeps them as unchecked strings.
  ``adapter``/``preprocessor`` are accepted as spellings of ``adaptor``/``preprocess``.
* Literal text: as in OFASys, the text between two slots (or a slot and a sentence end) is one
  literal piece with its surrounding whitespace stripped; empty pieces are dropped; inner
  whitespace and quote characters are kept. OFASys leaves any bracket that fails its regular
  expression as literal text; here every ``[`` opens a slot, so a stray, nested or unclosed
  bracket, an unknown modality or a malformed slot is an error with its position.
* Repetition (documented by OFASys, never built): ``(`` opens a group only when the next
  non-space character is ``[``, and the group must end with ``)*`` in the same sentence.
  Any other parenthesis ("what (if any) is shown?") is literal text, as is a ``)`` inside a group
  that is not followed by ``*``. Groups do not nest; a ``)*`` outside a group is an error.
  Slots (and literals) of a group carry ``repeat`` = the group's index in its template,
  counted from 0 over the encoder then the decoder.
* Several decoder target slots are allowed (OFASys uses only the last one).

Whether a named preprocessor or adaptor exists is left to the task planner.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Mapping, Optional, Union

__all__ = ["AttrSpec", "AttrValue", "BUILTIN_SLOT_ATTRIBUTES", "Instruction", "InstructionError", "Slot",
           "Template"]

AttrValue = Union[bool, int, float, str]

_BARE_VALUE = re.compile(r"[A-Za-z0-9_.\-/+]+")
_NOT_BARE = re.compile(r"[^A-Za-z0-9_.\-/+]")
_COLUMN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_ATTR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# Other spellings seen in OFASys docs and code, mapped to the one the parser stores.
_ATTR_ALIASES = {"adapter": "adaptor", "preprocessor": "preprocess"}


class InstructionError(ValueError):
    """An instruction that does not parse.

    Attributes:
        message: what is wrong.
        instruction: the full instruction text.
        position: 0-based character offset of the fault in ``instruction``.
    """

    def __init__(self, message: str, instruction: str, position: int) -> None:
        super().__init__(message, instruction, position)
        self.message = message
        self.instruction = instruction
        self.position = position

    def __str__(self) -> str:
        text, pos = self.instruction, self.position
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        line = re.sub("[\ud800-\udfff]", "?", text[start : end if end >= 0 else len(text)])  # printable
        # Keep tabs so the caret lines up however the terminal expands them.
        pad = "".join(c if c == "\t" else " " for c in line[: pos - start])
        return f"{self.message} (at position {pos})\n    {line}\n    {pad}^"


@dataclass(frozen=True)
class AttrSpec:
    """What one slot attribute accepts.

    Args:
        kind: ``flag`` (no value), ``int``, ``float``, ``name`` (a bare identifier-like value such
            as a preprocessor name) or ``str`` (any text, quoted when needed).
        minimum: lower bound for ``int``/``float``, or None.
        maximum: upper bound for ``int``/``float``, or None.
        inclusive: whether the bounds themselves are allowed.
        help: one line for error messages and documentation.
        applied: False for attributes parsed so that OFASys instructions read unchanged but not
            applied by moe_gen; a task that sets one is warned (``TaskPlan``).
    """

    kind: Literal["flag", "int", "float", "name", "str"]
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    inclusive: bool = True
    help: str = ""
    applied: bool = True

    def describe(self) -> str:
        """Human-readable kind and range, e.g. ``float in [0, 1]`` or ``int >= 1``."""
        lo, hi = self.minimum, self.maximum
        if self.kind not in ("int", "float") or (lo is None and hi is None):
            return self.kind
        if lo is None or hi is None:
            sign = (">" if hi is None else "<") + ("=" if self.inclusive else "")
            return f"{self.kind} {sign} {lo if hi is None else hi:g}"
        brackets = "[]" if self.inclusive else "()"
        return f"{self.kind} in {brackets[0]}{lo:g}, {hi:g}{brackets[1]}"

    def convert(self, raw: str) -> AttrValue:
        """Turn the written value into a typed one.

        Raises:
            ValueError: with a message naming the expected kind when ``raw`` does not fit.
        """
        if self.kind == "flag":
            raise ValueError("a flag takes no value")
        if self.kind == "str":
            return raw
        if self.kind == "name":
            if not _BARE_VALUE.fullmatch(raw):
                raise ValueError(f"expected a name of [A-Za-z0-9_.+/-], got {raw!r}")
            return raw
        expected = f"expected {self.describe()}, got {raw!r}"
        if not (_INT if self.kind == "int" else _FLOAT).fullmatch(raw):
            raise ValueError(expected)
        try:  # very long digit strings overflow int() and float()
            value: Union[int, float] = int(raw) if self.kind == "int" else float(raw)
        except (ValueError, OverflowError):
            raise ValueError(expected) from None
        lo, hi, closed = self.minimum, self.maximum, self.inclusive
        below = lo is not None and (value < lo or (value == lo and not closed))
        above = hi is not None and (value > hi or (value == hi and not closed))
        # A float spelled with a huge exponent reads as inf, which would not print back as written.
        if below or above or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(expected)
        return value


def _modality(**specific: AttrSpec) -> dict[str, AttrSpec]:
    """Every modality may name its preprocessor and adaptor (checked later by the planner)."""
    return {
        "preprocess": AttrSpec("name", help="preprocessor turning raw data into tensors or tokens"),
        "adaptor": AttrSpec("name", help="adaptor turning tensors into embeddings"),
        **specific,
    }


_FLAG = AttrSpec("flag")
_RATIO = AttrSpec("float", 0.0, 1.0, help="fraction of tokens or patches to corrupt (in training; at "
                 "inference too on an input whose column the task predicts)")
_LENGTH = AttrSpec("int", 1, help="cap on the number of tokens, codes or frames")
# Attributes of slots that become token sequences: OFASys reads them in its text preprocessor,
# which the STRUCT and BOX preprocessors subclass; moe_gen merges PHONE into the same sequences.
_TOKENS = {"no_loss": _FLAG, "disable_auto_boseos": _FLAG}
_TEXTUAL = {**_TOKENS, "uncased": _FLAG, "no_punctuation": _FLAG, "max_length": _LENGTH,
            "mask_ratio": _RATIO, "noise_ratio": _RATIO}

_OFASYS_ONLY = AttrSpec("flag", help="OFASys's; parsed, not applied", applied=False)

BUILTIN_SLOT_ATTRIBUTES: dict[str, dict[str, AttrSpec]] = {
    "TEXT": _modality(**_TEXTUAL, closed_set=_FLAG, is_label=_OFASYS_ONLY,
                      subword_sampling=AttrSpec("float", 0.0, 1.0, help="alpha: each training read of an input "
                                                "draws a segmentation into pieces (subword regularisation; "
                                                "smaller: more varied)"),
                      vocab_size=AttrSpec("int", 1, 1 << 16, help="words of the vocabulary (preprocess=bag_of_words)")),
    "STRUCT": _modality(**_TEXTUAL),
    "BOX": _modality(**_TOKENS),
    "PHONE": _modality(**_TOKENS, mask_ratio=AttrSpec("float", 0.0, 1.0, help="OFASys's; parsed, not applied",
                                                     applied=False)),
    "CATEGORY": _modality(no_loss=_FLAG, closed_set=_FLAG, is_label=_OFASYS_ONLY, uncased=_FLAG,
                          no_punctuation=_FLAG),
    # mask_ratio: image infilling; length: OFASys's number of VQ codes of an image target (parsed, not
    # applied: moe_gen's image tokenizer fixes the number of codes); region: the
    # row's box column whose crop the slot adds as a closer look (a second frame); augment: random
    # mirrors, rotations or shifts of training inputs (checked by the planner); stride: pixels between
    # patches for this slot (the image preprocessor checks that they tile).
    "IMAGE": _modality(mask_ratio=_RATIO,
                       length=AttrSpec("int", 1, help="OFASys's; parsed, not applied (the image tokenizer's "
                                       "grid fixes an image target's codes)", applied=False),
                       region=AttrSpec("name", help="box column whose crop is added as a second view"),
                       augment=AttrSpec("name", help="mirror, dihedral, shift or e.g. dihedral+shift: random "
                                                   "flips/rotations/moves in training"),
                       stride=AttrSpec("int", 1, help="pixels between patches (< patch: overlapping patches)")),
    "AUDIO": _modality(n_frames_per_step=AttrSpec("int", 1, help="OFASys's; parsed, not applied (frames a row: "
                                                   "preprocessor_options={'audio_fbank': {'frames_per_row': k}})",
                                                   applied=False),
                       use_mask=_OFASYS_ONLY),
    "VIDEO": _modality(),
    # The motion window: subsample, crop to max_length frames (a training window: a random length of
    # min_length or more). OFASys's trim, re-anchoring and window flag parse but are not applied.
    "MOTION": _modality(
        min_length=AttrSpec("int", 1, help="shortest training window, in frames: each training read takes a "
                            "random length from it up to max_length (evaluation: the full window)"),
        max_length=_LENGTH, sample_rate=AttrSpec("int", 1),
        soft_trim=AttrSpec("float", 0.0, 1.0, inclusive=False, help="OFASys's; parsed, not applied", applied=False),
        window=_OFASYS_ONLY, anchor_frame=AttrSpec("int", 0, help="OFASys's; parsed, not applied", applied=False),
        feature_noise=AttrSpec("float", 0.0, help="std of Gaussian noise added to each standardised window "
                               "statistic in training (preprocess=pose_summary)"),
    ),
}


# modality name -> attribute name -> spec, the shape of BUILTIN_SLOT_ATTRIBUTES
_Modalities = Mapping[str, Mapping[str, AttrSpec]]


class _FrozenAttrs(dict):
    """A read-only, hashable dict with keys in sorted order (so equal attributes print equally)."""

    def __init__(self, items: Union[Mapping[str, AttrValue], Iterable[tuple[str, AttrValue]]] = ()) -> None:
        super().__init__(sorted(dict(items).items()))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __reduce__(self):
        return (_FrozenAttrs, (dict(self),))

    def _read_only(self, *args, **kwargs):
        raise TypeError("slot attributes are read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]


def _format_value(value: AttrValue) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest text that float() reads back exactly
    text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Slot:
    """One element of a sentence: a data slot or a piece of literal prompt text.

    Args:
        modality: upper-case modality name; ``TEXT`` for literal text.
        column: the data field that fills the slot, or None (filled by position).
        attrs: attribute name -> value (True for flags); stored read-only with sorted keys.
        is_literal: whether this is literal prompt text rather than a data slot.
        text: the literal text, None for data slots.
        repeat: index of the repetition group holding the slot in its template, or None.
    """

    modality: str
    column: Optional[str] = None
    attrs: Mapping[str, AttrValue] = field(default_factory=_FrozenAttrs)
    is_literal: bool = False
    text: Optional[str] = None
    repeat: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.attrs, _FrozenAttrs):
            object.__setattr__(self, "attrs", _FrozenAttrs(self.attrs))

    @classmethod
    def literal(cls, text: str, repeat: Optional[int] = None) -> "Slot":
        """A piece of literal prompt text."""
        return cls("TEXT", is_literal=True, text=text, repeat=repeat)

    def __str__(self) -> str:
        if self.is_literal:
            return self.text or ""
        head = self.modality + (f":{self.column}" if self.column is not None else "")
        attrs = "".join(f",{k}" if v is True else f",{k}={_format_value(v)}" for k, v in self.attrs.items())
        return f"[{head}{attrs}]"


def _sentence(slots: tuple[Slot, ...]) -> str:
    """Canonical text of one side: elements joined by one space, groups wrapped in ``( ... )*``."""
    parts: list[str] = []
    for i, slot in enumerate(slots):
        if slot.repeat is not None and (i == 0 or slots[i - 1].repeat != slot.repeat):
            parts.append("(")
        parts.append(str(slot))
        if slot.repeat is not None and (i + 1 == len(slots) or slots[i + 1].repeat != slot.repeat):
            parts.append(")*")
    return " ".join(parts)


@dataclass(frozen=True)
class Template:
    """One ``encoder -> decoder`` alternative of an instruction.

    Args:
        encoder: the slots and literals of the encoder sentence, in order.
        decoder: the slots and literals of the decoder sentence, in order.
    """

    encoder: tuple[Slot, ...] = ()
    decoder: tuple[Slot, ...] = ()

    @property
    def encoder_slots(self) -> tuple[Slot, ...]:
        return self.encoder

    @property
    def decoder_slots(self) -> tuple[Slot, ...]:
        return self.decoder

    @property
    def columns(self) -> frozenset[str]:
        """Column names read by the data slots of both sides."""
        return frozenset(s.column for s in self.encoder + self.decoder if s.column is not None)

    def positions(self) -> tuple[Optional[int], ...]:
        """Per slot of ``encoder + decoder``: the index of its value in a row filled by position (the
        data slots without a column take the row's values in order), None for a slot with a column
        and for literal text."""
        out, taken = [], 0
        for slot in self.encoder + self.decoder:
            by_position = slot.column is None and not slot.is_literal
            out.append(taken if by_position else None)
            taken += by_position
        return tuple(out)

    def slot_names(self) -> tuple[Optional[str], ...]:
        """Per slot of ``encoder + decoder``: the name its values go by, its column or, for a slot
        filled by position, ``"slot N"`` (the N-th value of the row; no column name holds a space),
        None for literal text. What a slot learns from the training rows is kept under this name
        (``Task.fit_statistics``), so a model saved and loaded reads it back for the same slot."""
        return tuple(slot.column if position is None else f"slot {position + 1}"
                     for slot, position in zip(self.encoder + self.decoder, self.positions()))

    def __str__(self) -> str:
        return f"{_sentence(self.encoder)} -> {_sentence(self.decoder)}".strip()


@dataclass(frozen=True)
class Instruction:
    """A task instruction: one or more templates, one sampled per example.

    Args:
        templates: the alternatives joined by ``|||`` in the text.
    """

    templates: tuple[Template, ...]

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("an instruction needs at least one template")

    @property
    def encoder_slots(self) -> tuple[Slot, ...]:
        """Encoder elements of the first template."""
        return self.templates[0].encoder

    @property
    def decoder_slots(self) -> tuple[Slot, ...]:
        """Decoder elements of the first template."""
        return self.templates[0].decoder

    def __str__(self) -> str:
        return " ||| ".join(str(t) for t in self.templates)

    def sample_template(self, rng: random.Random) -> Template:
        """Pick one template uniformly with ``rng``."""
        return rng.choice(self.templates)

    def prompt_words(self) -> tuple[str, ...]:
        """The distinct lower-case words (runs of letters and digits) of the literal prompt text of
        every template, both sides, sorted: what the ``instruction`` routing strategy reads
        besides the slots' modalities."""
        text = " ".join(s.text or "" for t in self.templates for s in t.encoder + t.decoder if s.is_literal)
        return tuple(sorted(set(re.findall(r"[^\W_]+", text.lower()))))

    @classmethod
    def parse(cls, text: str, *, modalities: Optional[_Modalities] = None) -> Instruction:
        """Parse an instruction.

        Args:
            text: the instruction, e.g. ``"[IMAGE:img] what is it? -> [TEXT:cap]"``.
            modalities: modality name -> accepted attributes; replaces ``BUILTIN_SLOT_ATTRIBUTES``.

        Returns:
            The parsed instruction; ``str()`` of it is canonical and parses back to an equal one.

        Raises:
            InstructionError: with the position of the first fault.
            TypeError: if ``text`` is not a str.
        """
        return _Parser(text, BUILTIN_SLOT_ATTRIBUTES if modalities is None else modalities).run()


class _Parser:
    """One left-to-right pass over the text: tokens, then slots, groups, sides and templates."""

    def __init__(self, text: str, modalities: _Modalities) -> None:
        if not isinstance(text, str):
            raise TypeError(f"an instruction is a str, got {type(text).__name__}")
        self.text = text
        self.modalities = modalities

    def error(self, message: str, position: int) -> InstructionError:
        return InstructionError(message, self.text, position)

    def run(self) -> Instruction:
        text = self.text
        lone = re.search("[\ud800-\udfff]", text)
        if lone:  # not encodable as UTF-8: no tokenizer could read the literal text around it
            raise self.error(f"a lone surrogate U+{ord(lone.group()):04X} is not text", lone.start())
        templates: list[Template] = []
        sides: list[list[Slot]] = [[]]
        template_start = 0
        group_start: Optional[int] = None  # position of the open '(' of the current group
        n_groups = 0
        for kind, start, end in [*self.tokens(), ("end", len(text), len(text))]:
            repeat = None if group_start is None else n_groups - 1
            if kind == "literal":
                piece = text[start:end].strip()
                if piece:
                    sides[-1].append(Slot.literal(piece, repeat))
            elif kind == "slot":
                sides[-1].append(self.slot(start, end, repeat))
            elif kind == "open":
                if group_start is not None:
                    raise self.error("repetition groups cannot be nested", start)
                group_start, n_groups = start, n_groups + 1
            elif kind == "close":
                if group_start is None:
                    raise self.error("')*' closes a repetition group that was never opened with '( ['", start)
                group_start = None
            else:  # '->', '|||' or the end: a side or a whole template is complete
                if group_start is not None:
                    raise self.error("repetition group is not closed with ')*' in its sentence", group_start)
                if kind == "arrow":
                    if len(sides) == 2:
                        raise self.error("a template has exactly one '->'; found another", start)
                    sides.append([])
                    continue
                if len(sides) == 1 and template_start > 0 and not text[template_start:start].strip():
                    raise self.error("empty template after '|||'", template_start - 3)
                if len(sides) == 1:
                    raise self.error("template has no '->' (expected 'encoder sentence -> decoder sentence')",
                                     self.strip(template_start, start)[0])
                templates.append(Template(tuple(sides[0]), tuple(sides[1])))
                sides, template_start, n_groups = [[]], end, 0
        return Instruction(tuple(templates))

    def tokens(self) -> Iterator[tuple[str, int, int]]:
        """Yield (kind, start, end): literal, slot, open, close, arrow or bar, in text order."""
        text, i, literal_start = self.text, 0, 0
        while i < len(text):
            if text.startswith("|||", i):
                kind, end = "bar", i + 3
            elif text.startswith("->", i):
                kind, end = "arrow", i + 2
            elif text[i] == "[":
                kind, end = "slot", self.slot_end(i) + 1
            elif text[i] == "]":
                raise self.error("unbalanced ']' without an opening '['", i)
            elif text[i] == "(" and self.next_non_space(i + 1) == "[":
                kind, end = "open", i + 1
            elif text.startswith(")*", i):
                kind, end = "close", i + 2
            else:
                i += 1
                continue
            if literal_start < i:
                yield "literal", literal_start, i
            yield kind, i, end
            i = literal_start = end
        if literal_start < len(text):
            yield "literal", literal_start, len(text)

    def next_non_space(self, i: int) -> str:
        while i < len(self.text) and self.text[i].isspace():
            i += 1
        return self.text[i : i + 1]

    def slot_end(self, start: int) -> int:
        """Index of the ']' closing the slot opened at ``start``, skipping quoted values."""
        i = start + 1
        while i < len(self.text):
            c = self.text[i]
            if c == '"':
                i = self.quote_end(i)
            elif c == "[":
                raise self.error(f"nested '[' inside a slot: is the slot opened at position {start} missing "
                                 "its ']'?", i)
            elif c == "]":
                return i
            i += 1
        raise self.error("unbalanced '[': the slot is never closed with ']'", start)

    def quote_end(self, start: int) -> int:
        """Index of the '"' closing the quoted value opened at ``start``."""
        i = start + 1
        while i < len(self.text):
            if self.text[i] == "\\":
                i += 2
                continue
            if self.text[i] == '"':
                return i
            i += 1
        raise self.error("unterminated quoted value", start)

    def split(self, start: int, end: int, sep: str) -> list[tuple[int, int]]:
        """Spans of ``text[start:end]`` between separators outside quotes."""
        spans, i, piece_start = [], start, start
        while i < end:
            if self.text[i] == '"':
                i = self.quote_end(i)
            elif self.text[i] == sep:
                spans.append((piece_start, i))
                piece_start = i + 1
            i += 1
        return [*spans, (piece_start, end)]

    def strip(self, start: int, end: int) -> tuple[int, int]:
        """Shrink a span to exclude surrounding whitespace."""
        while start < end and self.text[start].isspace():
            start += 1
        while end > start and self.text[end - 1].isspace():
            end -= 1
        return start, end

    def slot(self, start: int, end: int, repeat: Optional[int]) -> Slot:
        """Parse ``text[start:end]`` = ``[TYPE:column,attr,...]``."""
        text = self.text
        if not text[start + 1 : end - 1].strip():
            raise self.error("empty slot: expected [TYPE], [TYPE:column] or [TYPE:column,attr,...]", start)
        head, *items = self.split(start + 1, end - 1, ",")
        name_span, *column_span = self.split(*head, ":")
        n0, n1 = self.strip(*name_span)
        modality = text[n0:n1]
        if modality not in self.modalities:
            known = ", ".join(sorted(self.modalities))
            what = f"unknown modality {modality!r}" if modality else "missing modality name"
            raise self.error(f"{what}; known: {known}", n0)
        column = None
        if column_span:
            c0, c1 = self.strip(column_span[0][0], head[1])  # a second ':' makes the column invalid
            column = text[c0:c1]
            if "=" in column:
                raise self.error(
                    f"the first item after ':' is the column name, got {column!r}; "
                    f"write attributes without a column as [{modality},key=value]", c0)
            if not _COLUMN.fullmatch(column):
                raise self.error(f"bad column name {column!r}: use letters, digits, '_', '.', '-'", c0)
        specs = self.modalities[modality]
        attrs: dict[str, AttrValue] = {}
        for item in items:
            key, value = self.attribute(*item, modality, specs)
            if key in attrs:
                raise self.error(f"duplicate attribute {key!r}", self.strip(*item)[0])
            attrs[key] = value
        return Slot(modality, column, attrs, repeat=repeat)

    def attribute(
        self, start: int, end: int, modality: str, specs: Mapping[str, AttrSpec]
    ) -> tuple[str, AttrValue]:
        """Parse one ``name`` or ``name=value`` item of a slot."""
        text = self.text
        start, end = self.strip(start, end)
        if start == end:
            raise self.error("empty attribute between commas", start)
        key_span, *value_span = self.split(start, end, "=")
        k0, k1 = self.strip(*key_span)
        key = text[k0:k1]
        if not _ATTR_NAME.fullmatch(key):
            raise self.error(f"bad attribute name {key!r}", k0)
        if key not in specs and _ATTR_ALIASES.get(key) in specs:
            key = _ATTR_ALIASES[key]
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise self.error(f"unknown attribute {key!r} for {modality}; known: {known}", k0)
        spec = specs[key]
        if not value_span:
            if spec.kind != "flag":
                raise self.error(f"attribute {key!r} needs a value ({spec.describe()})", k0)
            return key, True
        v0, v1 = self.strip(value_span[0][0], end)  # a second '=' belongs to the value
        if spec.kind == "flag":
            raise self.error(f"attribute {key!r} is a flag and takes no value", v0 if v0 < v1 else k0)
        raw = self.value(v0, v1, key)
        try:
            return key, spec.convert(raw)
        except ValueError as e:
            raise self.error(f"bad value for {key!r}: {e}", v0) from None

    def value(self, start: int, end: int, key: str) -> str:
        """The text of a bare or quoted value at ``text[start:end]`` (already stripped)."""
        text = self.text
        if start == end:
            raise self.error(f"missing value after '{key}='", start)
        if text[start] != '"':
            bad = _NOT_BARE.search(text, start, end)
            if bad:
                message = f"character {bad.group()!r} is not allowed in a bare value; quote it: {key}=\"...\""
                raise self.error(message, bad.start())
            return text[start:end]
        close = self.quote_end(start)
        if close != end - 1:
            raise self.error("unexpected text after the quoted value", close + 1)
        out, i = [], start + 1
        while i < close:
            c = text[i]
            if c == "\\":
                if text[i + 1] not in '"\\':
                    raise self.error('unknown escape in a quoted value: use \\" or \\\\', i)
                c, i = text[i + 1], i + 1
            out.append(c)
            i += 1
        return "".join(out)
