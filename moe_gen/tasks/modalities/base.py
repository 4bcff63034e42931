"""The modality registry: what a slot's raw value becomes, and what embeds it.

Shape legend: N feature rows of one slot, F feature width, D model width.

A modality (TEXT, IMAGE, AUDIO, ...) names a default *preprocessor* (raw value → token ids for
text-like modalities, or feature rows for the others) and a default *adapter* (feature rows →
embeddings of width D). A slot picks others with ``preprocess=NAME`` / ``adaptor=NAME``; users
register their own modalities, preprocessors and adapters in the same registries:

    @PREPROCESSORS.register("image_gray")
    class GrayImage(Preprocessor): ...

Every preprocessor returns a ``SlotEncoding``. Feature rows carry ``positions [N, 3]``
(frame, row, column), so the model can add 2-D positions to image patches and frame indices to
video, audio and motion without knowing the modality.
"""

from __future__ import annotations

import dataclasses
import decimal
import numbers
import os
import random
import stat
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from moe_gen.registry import ADAPTERS, MODALITIES, PREPROCESSORS  # noqa: F401  (re-exported)
from moe_gen.tasks.tokenizer import Tokenizer

__all__ = [
    "modality_tag_names", "ModalitySpec", "SlotEncoding", "EncodeContext", "Preprocessor", "Adapter", "SlotValueError",
    "register_modality", "brief", "tensor_to_numpy", "regular_file", "undecoded_media", "is_missing",
    "group_items", "GROUP_VALUES", "WRITTEN_NUMBERS",
]

# The numbers a text slot writes out as their ``str()`` (a closed set's labels and its rows alike):
# Python's and numpy's numbers and booleans, and Decimal (what SQL NUMERIC columns read as). Before
# the fourteenth audit a Decimal label joined the closed set but every row holding it was refused.
WRITTEN_NUMBERS = (numbers.Real, decimal.Decimal, np.bool_)
# What a repetition group's column may hold (``group_items``), as messages name it.
GROUP_VALUES = "a list (or a numpy array or tensor: one item per entry of its first dimension)"


class SlotValueError(ValueError):
    """A raw value that a slot cannot take (wrong kind, corrupt file, bad shape)."""


def is_missing(value: Any) -> bool:
    """Whether a raw value is a missing one: None, or a NaN (Python's, numpy's, Decimal's)."""
    if isinstance(value, decimal.Decimal):
        return value.is_nan()  # (a signalling NaN raises when compared)
    return value is None or (isinstance(value, numbers.Real) and value != value)


def group_items(value: Any) -> Optional[list]:
    """The items a repetition group's column holds, one per entry: a list or tuple as it is, a numpy
    array or tensor of one or more dimensions along its first (labels ``[K]``, boxes ``[K, 4]``, as
    detection datasets and torchvision give them); None for anything else (a text would split into
    characters, a 0-d array holds no items). Training, the label sets and evaluation all read a
    group's columns through it (before the fifteenth audit only lists and tuples were read, and a
    closed set's labels given as an array were refused as "no row holds a valid label")."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, torch.Tensor):
        try:
            value = tensor_to_numpy(value)
        except SlotValueError:  # (sparse, quantized: no items to read)
            return None
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        return list(value)
    return None


def scalar_value(value: Any) -> Any:
    """A 0-d numpy array or torch tensor as the Python value it holds (``torch.tensor(3)``: 3, as
    torch datasets give labels; a label or text value so was refused before the twenty-seventh
    session's audit); any other value as it is."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]  # a numpy scalar, written as numpy writes it
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    return value


def label_text(label: Any) -> Optional[str]:
    """A closed-set label as the text it is known by (the text a TEXT slot makes of it: UTF-8 bytes
    decoded, numbers written out), or None for values that have no valid text (missing values, None
    or NaN; bytes that are not UTF-8; ints too long to write out; lone surrogates): their rows fail
    when encoded, instead of every row failing when the label set is tokenised (or a missing value
    becoming the class "nan")."""
    label = scalar_value(label)
    if is_missing(label) or not isinstance(label, (str, bytes, bytearray, *WRITTEN_NUMBERS)):
        return None  # a list, dict or object is no label (its repr, an address even, would become one)
    try:
        text = bytes(label).decode("utf-8") if isinstance(label, (bytes, bytearray)) else str(label)
        text.encode("utf-8")
    except (ValueError, UnicodeError):
        return None
    return text


def brief(value: Any, limit: int = 60) -> str:
    """A short ``repr`` of a raw value for error messages (never raises: ints too long to write
    out, or objects whose repr fails, are named by their type)."""
    try:
        text = repr(value)
    except Exception:  # e.g. ValueError past sys.get_int_max_str_digits()
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def regular_file(path, kind: str) -> str:
    """``path`` as a string, checked to name a regular file before a reader opens it: a FIFO, device
    or socket would block or stream forever, a directory fails obscurely.

    Raises:
        SlotValueError: naming the path and what it is.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL
        raise SlotValueError(f"cannot open the {kind} file {brief(path)}: {exc}") from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise SlotValueError(f"the {kind} path {brief(path)} is {what}, not a regular file")
    return path


def undecoded_media(value: Mapping, kind: str, decoded: str = "") -> Any:
    """The encoded file a Hugging Face media dict ``{"bytes": ..., "path": ...}`` stands for: its
    bytes, else its path (``datasets``' ``Audio``, ``Image`` and ``Video`` features with
    ``decode=False`` give such dicts, and a dataset's Arrow rows hold them).

    Args:
        value: the dict.
        kind: what the slot reads (``"an IMAGE slot"``), for the message.
        decoded: the other dict the slot reads, for the message (``"{'array', 'sampling_rate'}"``).

    Raises:
        SlotValueError: for a dict with neither, naming the keys read and the keys it has.
    """
    data, path = value.get("bytes"), value.get("path")
    if isinstance(data, (bytes, bytearray)):
        return data
    if data is None and isinstance(path, (str, os.PathLike)):
        return path
    other = f"{decoded} or " if decoded else ""
    keys = ", ".join(brief(k, 30) for k in value) or "none"
    held = f" ('bytes' holds a {type(data).__name__})" if data is not None else \
        f" ('path' holds a {type(path).__name__})" if path is not None else ""
    raise SlotValueError(f"{kind} reads a dict {other}{{'bytes', 'path'}} (a Hugging Face media dict: its bytes, "
                         f"else its path); this one has keys {keys}{held}")


def tensor_to_numpy(value: torch.Tensor):
    """A tensor's values as a numpy array (bfloat16 and float8, which numpy lacks, as float32).

    Raises:
        SlotValueError: for tensors numpy cannot hold (sparse, quantized, ...).
    """
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32, torch.float64):
        value = value.float()
    try:
        return value.numpy()
    except (TypeError, RuntimeError) as exc:
        raise SlotValueError(f"cannot read a {value.dtype} tensor ({exc})") from None


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """A modality's defaults.

    Attributes:
        name: upper-case name used in instructions (``"IMAGE"``).
        text_like: its slots become token ids of the shared vocabulary (adjacent text-like
            slots merge into one token sequence, as in OFASys).
        preprocess: default preprocessor name.
        adaptor: default adapter name (``None`` for text-like modalities: the token embedding).
        continuous_target: on the decoder side it is predicted as feature frames (regression with
            a stop flag) rather than tokens.
        target_adaptor: the default adapter of its decoder-side slots (None: ``adaptor``): frames
            fed back to the decoder get an adapter of their own, not the one every input of the
            modality shares (AUDIO ``audio_tgt_fbank``, MOTION ``motion_tgt``: Tacotron 2's
            pre-net dropout, ``FedBackFrameAdapter``).
        attributes: slot attributes the instruction parser accepts for it (name →
            ``moe_gen.tasks.instruction.AttrSpec``); ``None`` means ``preprocess``, ``adaptor`` and
            ``no_loss``. Built-in modalities use the parser's own table.
    """

    name: str
    text_like: bool
    preprocess: str
    adaptor: Optional[str] = None
    continuous_target: bool = False
    attributes: Optional[Mapping[str, Any]] = None
    target_adaptor: Optional[str] = None


def modality_tag_names() -> list[str]:
    """The modality tag vocabulary: the built-in tag names (``moe_gen.routing.tags.MODALITIES``,
    fixed indices), then user-registered modalities in name order. A model built after a
    registration sizes its routers and modality embedding for it."""
    from moe_gen.routing.tags import MODALITIES as BUILTIN

    return list(BUILTIN) + sorted(set(MODALITIES.list()) - set(BUILTIN))


def register_modality(spec: ModalitySpec) -> ModalitySpec:
    """Registers a modality under ``spec.name``."""
    return MODALITIES.register(spec.name)(spec)


@dataclasses.dataclass
class SlotEncoding:
    """One slot of one sample, preprocessed.

    Attributes:
        modality: the slot's modality name.
        tokens: token ids (text-like slots), else None.
        features: float32 ``[N, F]`` rows (other slots), else None.
        positions: long ``[N, 3]`` (frame, row, column) of each feature row.
        meta: facts later steps need (original image size and resize scale for boxes, sample rate,
            the label set of a closed-set slot, ...).
    """

    modality: str
    tokens: Optional[list[int]] = None
    features: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens) if self.tokens is not None else int(self.features.shape[0])


@dataclasses.dataclass
class EncodeContext:
    """What a preprocessor may read besides its own value.

    Attributes:
        tokenizer: the shared vocabulary.
        rng: the sample's random generator (masking, noise, temporal sampling).
        training: whether training-time changes apply (augmentation of inputs; corruption
            attributes such as ``mask_ratio`` and ``noise_ratio``, which also apply at inference
            to a slot whose column the sample predicts: there the corruption makes the task).
        target: whether the slot being encoded is on the decoder side (predicted, or fed back to
            the decoder); augmentation applies to encoder inputs only. Set per slot by the plan.
        predicted: the columns of the sample's scored decoder slots (its answers).
        slot_name: the name of the slot being encoded (``Template.slot_names``: its column, or
            ``"slot N"`` for one filled by position), which its fitted statistics are kept under.
            Set per slot by the plan.
        row: the whole data row (some slots depend on others, e.g. boxes on their image).
        encoded: slots of this sample already encoded, by ``repr(column)`` (``"slot N"`` for a slot
            without one; ``[k]`` appended for each item of a repeated slot).
        task: task name, and index: row index, for error messages (``place``, where given, is named
            instead of the row: a value that is no data row, such as a ranked candidate).
        max_positions: the most positions one slot may take (``TaskPlan`` checks every slot;
            a preprocessor with costly work, such as resampling audio, refuses earlier).
    """

    tokenizer: Tokenizer
    rng: random.Random
    training: bool = True
    row: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    encoded: dict[str, SlotEncoding] = dataclasses.field(default_factory=dict)
    task: str = "?"
    index: int = -1
    max_positions: Optional[int] = None
    target: bool = False
    predicted: frozenset = frozenset()
    place: Optional[str] = None
    slot_name: Optional[str] = None

    def corrupts(self, column: Optional[str]) -> bool:
        """Whether corruption attributes apply to the slot reading ``column``: to inputs only (a
        corrupted answer would be learned, and a closed set's corrupted label leaves its allowed
        tokens: a NaN loss), in training, and at inference to an input whose column the sample
        predicts (a corrupted copy of the answer: an uncorrupted one would hand the model what it
        is asked for)."""
        return not self.target and (self.training or (column is not None and column in self.predicted))

    def where(self, column: Optional[str]) -> str:
        """"task 'x', column 'c', row 3": the place named in error messages."""
        return f"task {self.task!r}, column {column!r}, {self.place or f'row {self.index}'}"


class Preprocessor:
    """Raw value → ``SlotEncoding``. Subclasses set ``modality`` and implement ``__call__``."""

    modality: str = "TEXT"
    # slot attributes this preprocessor reads as corruption of its input (applied in training, and
    # at inference to a slot reading the sample's answer: EncodeContext.corrupts)
    corruptions: tuple[str, ...] = ()
    # whether its mask_ratio replaces token spans by the tokenizer's sentinels (which it must have)
    masks_with_sentinels: bool = False
    # whether it makes token ids, which the model embeds itself: no adapter reads them, so an
    # adaptor= on its slot is refused (it was ignored)
    makes_tokens: bool = False
    # slot attributes its ``fit`` reads: the slots of one column that share its statistics (in
    # several templates of a task) must agree on them (``Task.fit_statistics`` refuses them otherwise)
    fit_attrs: tuple[str, ...] = ()

    def __call__(self, value: Any, slot, ctx: EncodeContext) -> SlotEncoding:
        raise NotImplementedError

    def feature_dim(self) -> Optional[int]:
        """Width F of the feature rows (None for token slots)."""
        return None

    def rows_to_value(self, rows_NF: torch.Tensor, slot_name: Optional[str]) -> Any:
        """A generated frame target's rows ``[N, F]`` (the frame head's, in this preprocessor's
        encoding) as a value of the slot's column: what ``Prediction.targets`` holds, and the next
        link of a chain reads. The default is the rows themselves, float32 ``[N, F]``; preprocessors
        whose encoding can be undone (stacking, standardisation) undo it.

        Raises:
            ValueError: where the rows cannot be read back (statistics missing or of another width).
        """
        return rows_NF.detach().float().cpu().numpy()

    @classmethod
    def fit(cls, slot, values: Iterable[Any]) -> Optional[dict]:
        """What this preprocessor learns from a task's training values of ``slot`` (items of a
        repetition group one by one), or None when it learns nothing (the default).

        The result must be JSON-serialisable: ``Task.fit_statistics`` collects it per slot name
        (its column, or ``"slot N"`` for a slot filled by position: ``EncodeContext.slot_name``),
        the model saves it (``ModelConfig.preprocessor_statistics``), and plans pass it back as
        the constructor keyword ``statistics={name: result}``, in training and after reloading.
        """
        return None


class Adapter(nn.Module):
    """Feature rows ``[N, F]`` (+ positions ``[N, 3]``) → embeddings ``[N, D]``.

    Attributes:
        exact_features: its rows carry values a narrower float would change, such as integer ids
            (bf16 holds integers exactly only up to 256, fp16 up to 2048): the model hands them over
            in fp32 whatever its own dtype, and the adapter casts what it computes with to its
            weights' dtype itself. False (the default): a model cast to bf16/fp16/fp64 casts the
            rows to the adapter's dtype first (``GeneralistModel.embed``).
    """

    exact_features: bool = False

    def __init__(self, feature_dim: int, d_model: int) -> None:
        super().__init__()
        self.feature_dim, self.d_model = feature_dim, d_model

    def forward(self, features_NF: torch.Tensor, positions_N3: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
