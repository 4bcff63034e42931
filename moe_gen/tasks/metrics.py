"""Task metrics, registered by name (``METRICS``); every metric takes predictions and references
(lists) and returns a float, higher is better unless the name says otherwise (wer, l1, mse)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_gen.registry import METRICS
from moe_gen.tasks.modalities.box import box_iou

__all__ = ["accuracy", "exact_match", "bleu", "chrf", "wer", "iou_accuracy", "l1", "mse", "compute"]


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("a metric needs at least one reference")


def _norm(text) -> str:
    return " ".join(str(text).lower().split())


@METRICS.register("accuracy")
def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Share of predictions equal to their reference (as strings)."""
    _check(predictions, references)
    return float(np.mean([str(p) == str(r) for p, r in zip(predictions, references)]))


@METRICS.register("exact_match")
def exact_match(predictions: Sequence, references: Sequence) -> float:
    """Share equal after lower-casing and white-space folding."""
    _check(predictions, references)
    return float(np.mean([_norm(p) == _norm(r) for p, r in zip(predictions, references)]))


@METRICS.register("bleu")
def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation), 0–100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(map(str, predictions)), [list(map(str, references))]).score)


@METRICS.register("chrf")
def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu), 0–100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_chrf(list(map(str, predictions)), [list(map(str, references))]).score)


@METRICS.register("wer")
def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate (jiwer) over the corpus; lower is better."""
    import jiwer

    _check(predictions, references)
    return float(jiwer.wer([_norm(r) or "<empty>" for r in references],
                          [_norm(p) or "<empty>" for p in predictions]))


@METRICS.register("iou_accuracy")
def iou_accuracy(predictions: Sequence, references: Sequence, threshold: float = 0.5) -> float:
    """Acc@0.5: share of predicted boxes whose IoU with the reference is at least ``threshold``."""
    _check(predictions, references)
    return float(np.mean([box_iou(p, r) >= threshold for p, r in zip(predictions, references)]))


def _frames_error(predictions, references, power: int) -> float:
    _check(predictions, references)
    errors = []
    for p, r in zip(predictions, references):
        p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
        n = min(len(p), len(r))  # compare the overlapping frames; length is scored elsewhere
        if n == 0:
            raise ValueError("an empty frame sequence cannot be scored")
        errors.append(np.mean(np.abs(p[:n] - r[:n]) ** power))
    return float(np.mean(errors))


@METRICS.register("l1")
def l1(predictions, references) -> float:
    """Mean absolute error over the overlapping frames; lower is better."""
    return _frames_error(predictions, references, 1)


@METRICS.register("mse")
def mse(predictions, references) -> float:
    """Mean squared error over the overlapping frames; lower is better."""
    return _frames_error(predictions, references, 2)


def compute(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Every named metric on the same predictions."""
    return {name: METRICS.get(name)(predictions, references) for name in names}
