"""Task metrics, registered by name (``METRICS``); every metric takes predictions and references
(lists) and returns a float, higher is better unless the name says otherwise (wer, l1, mse).

Detection metrics take, per image, a list of ``(box, label)`` pairs (``label`` None matches any
label; a ``box`` of None, as from an answer cut short, matches nothing)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_gen.registry import METRICS
from moe_gen.tasks.modalities.box import box_iou

__all__ = ["accuracy", "exact_match", "bleu", "chrf", "rouge_l", "wer", "iou_accuracy", "detection_f1",
           "detection_counts", "l1", "mse", "compute"]


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


@METRICS.register("sudoku_valid")
def sudoku_valid(predictions: Sequence, references: Sequence) -> float:
    """Share of predicted grids that are complete, valid sudokus of the reference's size (every row,
    column and box holds 1..n once); ``exact_match`` says whether it is the puzzle's one solution."""
    from moe_gen.tasks.sources.puzzles import is_valid_solution, parse_grid

    _check(predictions, references)
    valid = 0
    for prediction, reference in zip(predictions, references):
        grid, expected = parse_grid(prediction), parse_grid(reference)
        valid += grid is not None and expected is not None and len(grid) == len(expected) and is_valid_solution(grid)
    return valid / len(references)


@METRICS.register("sudoku_cells")
def sudoku_cells(predictions: Sequence, references: Sequence) -> float:
    """Mean share of the solution's cells a predicted grid gets right (a grid of another shape: 0)."""
    from moe_gen.tasks.sources.puzzles import parse_grid

    _check(predictions, references)
    scores = []
    for prediction, reference in zip(predictions, references):
        grid, expected = parse_grid(prediction), parse_grid(reference)
        if grid is None or expected is None or len(grid) != len(expected):
            scores.append(0.0)
            continue
        cells = [a == b for row, want in zip(grid, expected) for a, b in zip(row, want)]
        scores.append(sum(cells) / len(cells))
    return float(np.mean(scores))


@METRICS.register("execution_accuracy")
def execution_accuracy(predictions: Sequence, references: Sequence) -> float:
    """Share of predicted SQL queries that run on the ``text_to_sql`` database (read-only) and return
    what the reference query returns (``moe_gen.tasks.sources.sql``)."""
    from moe_gen.tasks.sources.sql import flowers_database, same_result

    _check(predictions, references)
    conn = flowers_database()
    try:
        return float(np.mean([same_result(conn, str(p), str(r)) for p, r in zip(predictions, references)]))
    finally:
        conn.close()


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


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


@METRICS.register("rouge_l")
def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (Lin 2004: longest common subsequence, beta = 1), 0–100, over
    lower-cased tokens of letters and digits (the tokenisation of Google's rouge-score, without
    stemming); an empty prediction or reference scores 0."""
    import re

    _check(predictions, references)
    scores = []
    for prediction, reference in zip(predictions, references):
        got, want = re.findall(r"[a-z0-9]+", str(prediction).lower()), re.findall(r"[a-z0-9]+", str(reference).lower())
        common = _lcs_length(got, want)
        scores.append(0.0 if common == 0 else 2 * common / (len(got) + len(want)))  # F1 = 2PR / (P + R)
    return 100.0 * float(np.mean(scores))


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


def _matches(predicted: Sequence, expected: Sequence, threshold: float) -> int:
    """True positives of one image: the most one-to-one pairs of a prediction and a reference with
    the same label and IoU >= threshold (Hungarian assignment; among equally many, the larger
    total IoU)."""
    from scipy.optimize import linear_sum_assignment

    if not predicted or not expected:
        return 0
    iou_PR = np.zeros((len(predicted), len(expected)))
    for i, (box, label) in enumerate(predicted):
        for j, (ref_box, ref_label) in enumerate(expected):
            same = label is None or ref_label is None or str(label) == str(ref_label)
            if box is not None and same:
                iou_PR[i, j] = box_iou(box, ref_box)
    valid_PR = iou_PR >= threshold
    # Every match outweighs any IoU bonus (each bonus < 1 and at most min(P, R) - 1 matches can be lost).
    weight_PR = np.where(valid_PR, min(iou_PR.shape) + 1 + iou_PR, 0.0)
    rows, cols = linear_sum_assignment(weight_PR, maximize=True)
    return int(valid_PR[rows, cols].sum())


def detection_counts(predictions: Sequence, references: Sequence, threshold: float = 0.5) -> tuple[int, int, int]:
    """(true positives, false positives, misses) pooled over images; a duplicate of a matched
    prediction is a false positive."""
    _check(predictions, references)
    tp = fp = fn = 0
    for predicted, expected in zip(predictions, references):
        hits = _matches(list(predicted), list(expected), threshold)
        tp, fp, fn = tp + hits, fp + len(predicted) - hits, fn + len(expected) - hits
    return tp, fp, fn


@METRICS.register("detection_f1")
def detection_f1(predictions: Sequence, references: Sequence, threshold: float = 0.5) -> float:
    """F1 of class-aware detection at IoU >= ``threshold`` with one-to-one matching, pooled over
    images: 2·TP / (2·TP + FP + FN); 1.0 when nothing was expected or predicted."""
    tp, fp, fn = detection_counts(predictions, references, threshold)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


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
