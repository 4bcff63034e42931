"""Text read as a bag of words: one feature row of TF-IDF weights over a vocabulary fitted on the
task's training rows.

    [TEXT:text,preprocess=bag_of_words] which help topic is this from? -> [TEXT:topic,closed_set]

For text classification with a few hundred rows, a model trained from scratch learns little from
the sentencepiece pieces of long paragraphs, where a linear model on TF-IDF does well (the quality
suite's ``doc_topic``: 826 training paragraphs over 77 topics). This preprocessor gives the model that
representation: the ``vocab_size`` most frequent words of the training values (slot attribute,
default 2,048; scikit-learn's ``TfidfVectorizer``: lower-cased words of two or more letters or
digits), each weighted by (1 + log count) · idf and the row scaled to unit length, exactly as
``TfidfVectorizer(sublinear_tf=True)`` computes it. The vocabulary and idf are statistics of the
training rows (``Preprocessor.fit``), saved with the model, so held-out text is weighted as the
training text was. Word order is not kept. The ``bag_of_words`` adapter (an MLP) projects the row
to one position of the model's width.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from moe_gen.tasks.modalities.base import (
    ADAPTERS,
    PREPROCESSORS,
    Adapter,
    EncodeContext,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    brief,
)

__all__ = ["BagOfWords", "BagOfWordsAdapter", "DEFAULT_VOCAB_SIZE"]

DEFAULT_VOCAB_SIZE = 2048
# Attributes that edit a text's tokens: they have no meaning for a bag of words.
_TOKEN_EDITS = ("mask_ratio", "noise_ratio", "no_punctuation", "max_length")


@functools.cache
def _analyzer():
    """scikit-learn's default word analyzer (lower-cased, words of 2+ word characters)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer().build_analyzer()


def _vocab_size(slot) -> int:
    """The slot's ``vocab_size`` (the instruction parser checked its range)."""
    return int(slot.attrs.get("vocab_size", DEFAULT_VOCAB_SIZE))


@PREPROCESSORS.register("bag_of_words")
class BagOfWords(Preprocessor):
    """Text → one row ``[1, vocab_size]`` of TF-IDF weights (see the module docstring).

    Args:
        statistics: slot name (its column, or ``"slot N"`` for a slot filled by position:
            ``EncodeContext.slot_name``) → ``fit`` result (``{"words": [...], "idf": [...]}``); a
            slot without them cannot be encoded (``SlotValueError``: fit the task's statistics
            first, as ``GeneralistModel.build`` does).
    """

    modality = "TEXT"
    adaptor = "bag_of_words"
    fit_attrs = ("vocab_size",)

    def __init__(self, statistics: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self.statistics = dict(statistics or {})
        self._tables = {}
        for column, fitted in self.statistics.items():
            words, idf = list(fitted.get("words", [])), list(fitted.get("idf", []))
            if len(words) != len(idf):
                raise ValueError(f"bag_of_words statistics of column {column!r}: {len(words)} words but "
                                 f"{len(idf)} idf values")
            self._tables[column] = ({w: i for i, w in enumerate(words)}, idf)

    @classmethod
    def fit(cls, slot, values: Iterable[Any]) -> dict:
        """The ``vocab_size`` most frequent words of the string values (others are passed over)
        and their smoothed idf, in the vocabulary's order."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = [v for v in values if isinstance(v, str)]
        vectorizer = TfidfVectorizer(max_features=_vocab_size(slot), sublinear_tf=True)
        try:
            vectorizer.fit(texts)
        except ValueError:  # no values, or no word in any of them
            return {"words": [], "idf": []}
        words = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
        return {"words": words, "idf": [float(v) for v in vectorizer.idf_]}

    def check_slot(self, where: str, slot) -> None:
        edits = [name for name in _TOKEN_EDITS if name in slot.attrs]
        if edits:
            raise ValueError(f"{where}: bag_of_words reads whole words, not tokens; drop {', '.join(edits)}")

    def __call__(self, value: Any, slot, ctx: EncodeContext) -> SlotEncoding:
        if not isinstance(value, str):
            raise SlotValueError(f"{ctx.where(slot.column)}: bag_of_words needs a str, got {brief(value)}")
        table = self._tables.get(ctx.slot_name)
        if table is None:
            raise SlotValueError(f"{ctx.where(slot.column)}: bag_of_words has no vocabulary for this column; fit "
                                 "it on the training rows first (Task.fit_statistics, which a model runs when "
                                 "it is built)")
        index, idf = table
        size = _vocab_size(slot)
        if len(index) > size:
            raise SlotValueError(f"{ctx.where(slot.column)}: the fitted vocabulary has {len(index)} words but "
                                 f"the slot says vocab_size={size}")
        counts = collections.Counter(word for word in _analyzer()(value) if word in index)
        row_1V = torch.zeros(1, size)
        for word, count in counts.items():
            i = index[word]
            row_1V[0, i] = (1.0 + math.log(count)) * idf[i]
        norm = row_1V.norm()
        if norm > 0:
            row_1V /= norm
        return SlotEncoding("TEXT", features=row_1V, positions=torch.zeros(1, 3, dtype=torch.long))


@ADAPTERS.register("bag_of_words")
class BagOfWordsAdapter(Adapter):
    """A bag-of-words row ``[N, V]`` → ``[N, D]``: an MLP whose first layer holds one learned
    vector per word (the row's TF-IDF weights sum them)."""

    def __init__(self, feature_dim: int, d_model: int) -> None:
        super().__init__(feature_dim, d_model)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, features_NF: torch.Tensor, positions_N3: torch.Tensor) -> torch.Tensor:
        return self.mlp(features_NF)
