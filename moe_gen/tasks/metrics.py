"""Task metrics, registered by name (``METRICS``); every metric takes predictions and references
(lists) and returns a float, higher is better unless the name says otherwise (wer, l1, mse).

Detection metrics take, per image, a list of ``(box, label)`` pairs (``label`` None matches any
label, a tuple of labels, from an item with several text columns, matches as a whole; a ``box``
of None, as from an answer cut short, matches nothing).

The metrics of text (``TEXT_METRICS``) read one text per answer and refuse dicts and lists (their
``str()`` would share braces, quotes and column names with every reference: empty answers scored
BLEU 5.4 and chrF 30.2 on a task with two text targets before the thirteenth audit); evaluation scores
answers with several target slots per text column. ``accuracy`` and ``exact_match`` compare whole
answers, dicts and lists value by value (``ANSWER_METRICS``)."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from moe_gen.registry import METRICS
from moe_gen.tasks.modalities.base import brief, is_missing, label_text
from moe_gen.tasks.modalities.box import box_iou

__all__ = ["TEXT_METRICS", "ANSWER_METRICS", "VALUE_METRICS", "accuracy", "exact_match", "bleu", "chrf", "rouge_l",
           "wer", "iou_accuracy", "detection_f1", "detection_counts", "l1", "mse", "pixel_mse", "digit_accuracy",
           "digit_fid", "digit_classifier", "compute"]


TEXT_METRICS = frozenset({"bleu", "chrf", "rouge_l", "wer", "execution_accuracy", "sudoku_valid", "sudoku_cells"})
"""Built-in metrics of one text per answer (evaluation scores answers with several target slots
with them per text column)."""
ANSWER_METRICS = frozenset({"accuracy", "exact_match"})
"""Built-in metrics that compare whole answers of any shape (a dict by column, a list)."""
VALUE_METRICS = frozenset({"iou_accuracy", "detection_f1", "l1", "mse", "pixel_mse", "digit_accuracy", "digit_fid"})
"""Built-in metrics of one box, detection list, frame sequence or image per answer."""


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if len(references) == 0:  # (not "not references": a numpy array of several has no truth value)
        raise ValueError("a metric needs at least one reference")


def _text(value) -> str:
    """A prediction or reference as text, as a TEXT slot reads it (UTF-8 bytes decoded); None (no
    answer: ``infer`` gives it for a row it skips) or a NaN is the empty text, not ``"None"``. A dict
    or list is no text: its ``str()`` would be scored (see the module's docstring)."""
    if is_missing(value):
        return ""
    if isinstance(value, (dict, list, tuple, set)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        raise ValueError(f"a metric of text got a {type(value).__name__} ({brief(value)}), not a text; answers "
                         "with several target slots are scored per text column (evaluate_task)")
    text = label_text(value)
    return str(value) if text is None else text


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0)


def _same(prediction, reference, read: Callable) -> bool:
    """Whether an answer equals its reference, each value as ``read`` gives its text: dicts (the
    answers of tasks with several target slots) column by column, lists (boxes, a repetition
    group's values) item by item; None (no answer) equals only None."""
    if prediction is None or reference is None:
        return prediction is None and reference is None
    if isinstance(prediction, dict) or isinstance(reference, dict):
        return (isinstance(prediction, dict) and isinstance(reference, dict) and prediction.keys() == reference.keys()
                and all(_same(prediction[k], reference[k], read) for k in reference))
    if _is_list(prediction) or _is_list(reference):
        return (_is_list(prediction) and _is_list(reference) and len(prediction) == len(reference)
                and all(_same(p, r, read) for p, r in zip(prediction, reference)))
    return read(prediction) == read(reference)


def _norm(text) -> str:
    return " ".join(_text(text).lower().split())


@METRICS.register("accuracy")
def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Share of predictions equal to their reference (as text; UTF-8 bytes decoded; dicts and lists
    value by value)."""
    _check(predictions, references)
    return float(np.mean([_same(p, r, _text) for p, r in zip(predictions, references)]))


@METRICS.register("exact_match")
def exact_match(predictions: Sequence, references: Sequence) -> float:
    """Share equal after lower-casing and white-space folding (dicts and lists value by value)."""
    _check(predictions, references)
    return float(np.mean([_same(p, r, _norm) for p, r in zip(predictions, references)]))


@METRICS.register("sudoku_valid")
def sudoku_valid(predictions: Sequence, references: Sequence) -> float:
    """Share of predicted grids that are complete, valid sudokus of the reference's size (every row,
    column and box holds 1..n once); ``exact_match`` says whether it is the puzzle's one solution."""
    from moe_gen.tasks.sources.puzzles import is_valid_solution, parse_grid

    _check(predictions, references)
    valid = 0
    for prediction, reference in zip(predictions, references):
        grid, expected = parse_grid(_text(prediction)), parse_grid(_text(reference))
        valid += grid is not None and expected is not None and len(grid) == len(expected) and is_valid_solution(grid)
    return valid / len(references)


@METRICS.register("sudoku_cells")
def sudoku_cells(predictions: Sequence, references: Sequence) -> float:
    """Mean share of the solution's cells a predicted grid gets right (a grid of another shape: 0)."""
    from moe_gen.tasks.sources.puzzles import parse_grid

    _check(predictions, references)
    scores = []
    for prediction, reference in zip(predictions, references):
        grid, expected = parse_grid(_text(prediction)), parse_grid(_text(reference))
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
        return float(np.mean([same_result(conn, _text(p), _text(r)) for p, r in zip(predictions, references)]))
    finally:
        conn.close()


@METRICS.register("bleu")
def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation), 0–100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(map(_text, predictions)), [list(map(_text, references))]).score)


@METRICS.register("chrf")
def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu), 0–100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_chrf(list(map(_text, predictions)), [list(map(_text, references))]).score)


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
        got, want = (re.findall(r"[a-z0-9]+", _text(value).lower()) for value in (prediction, reference))
        common = _lcs_length(got, want)
        scores.append(0.0 if common == 0 else 2 * common / (len(got) + len(want)))  # F1 = 2PR / (P + R)
    return 100.0 * float(np.mean(scores))


@METRICS.register("wer")
def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate over the corpus (jiwer's alignment, after lower-casing and white-space
    folding): (substitutions + deletions + insertions) / the references' words; lower is better.
    Every word predicted for an empty reference is an insertion (before 2026-12-06 an empty text
    stood for a placeholder word, which added a word to the count, made an insertion a substitution,
    and scored a prediction of that placeholder perfect). When no reference has a word, the rate is
    0 if no prediction has one either, else ``inf``."""
    import jiwer

    _check(predictions, references)
    pairs = [(_norm(r), _norm(p)) for p, r in zip(predictions, references)]
    spoken = [(r, p) for r, p in pairs if r]
    inserted = sum(len(p.split()) for r, p in pairs if not r)
    if not spoken:
        return 0.0 if inserted == 0 else float("inf")
    out = jiwer.process_words([r for r, _ in spoken], [p for _, p in spoken])
    words = sum(len(r.split()) for r, _ in spoken)
    return (out.substitutions + out.deletions + out.insertions + inserted) / words


@METRICS.register("iou_accuracy")
def iou_accuracy(predictions: Sequence, references: Sequence, threshold: float = 0.5) -> float:
    """Acc@0.5: share of predicted boxes whose IoU with the reference is at least ``threshold`` (a
    box of None, as from an answer cut short, is a miss)."""
    _check(predictions, references)
    return float(np.mean([p is not None and box_iou(p, r) >= threshold for p, r in zip(predictions, references)]))


def _label(value) -> str | tuple:
    """A detection item's label as text; a tuple of labels (an item with several text columns)
    as a tuple of texts, matched as a whole."""
    return tuple(map(_text, value)) if isinstance(value, tuple) else _text(value)


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
            same = label is None or ref_label is None or _label(label) == _label(ref_label)
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


def _float_array(value) -> np.ndarray:
    """Frames as float64 numpy: a tensor of any dtype (a bf16 model's frames are bf16, which numpy
    cannot read: a raw TypeError before the twenty-seventh session's audit) or an array-like."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _frames_error(predictions, references, power: int) -> float:
    """Mean over answers of the error summed over the longer of the two frame sequences and divided
    by the reference's values (its frames × the values a frame holds): a frame the answer lacks, or
    one it adds, counts against the zero frame (the normalised mean), so an answer that stops early
    or runs on is not scored on its overlap alone, and extra frames cannot dilute the error (divided
    by the longer sequence, 64 zero frames scored 0.14 against a 12-frame reference's 0.78). NaN in
    a reference marks a value that is no target (the zeros that pad a last row of stacked frames:
    evaluation writes them so), left out of both the error and the count."""
    _check(predictions, references)
    errors = []
    for p, r in zip(predictions, references):
        p, r = _float_array(p), _float_array(r)
        n = max(len(p), len(r))
        if len(r) == 0:
            raise ValueError("an empty reference frame sequence cannot be scored")
        if p.size and p.shape[1:] != r.shape[1:]:
            raise ValueError(f"predicted frames of shape {p.shape[1:]} against reference frames of {r.shape[1:]}")
        padded_p, padded_r = np.zeros((n, *r.shape[1:])), np.zeros((n, *r.shape[1:]))
        padded_p[:len(p)], padded_r[:len(r)] = p.reshape(len(p), *r.shape[1:]), r
        target = np.isfinite(padded_r)
        if not np.isfinite(r).any():
            raise ValueError("a reference frame sequence holds no target value")
        error = np.where(target, np.abs(padded_p - np.where(target, padded_r, 0.0)) ** power, 0.0)
        errors.append(float(error.sum()) / int(np.isfinite(r).sum()))
    return float(np.mean(errors))


@METRICS.register("l1")
def l1(predictions, references) -> float:
    """Mean absolute error of the frames, missing or extra ones against the zero frame; lower is better."""
    return _frames_error(predictions, references, 1)


@METRICS.register("mse")
def mse(predictions, references) -> float:
    """Mean squared error of the frames, missing or extra ones against the zero frame; lower is better."""
    return _frames_error(predictions, references, 2)


# ---- generated digit images --------------------------------------------------------------------

def _digit_pixels(images: Sequence, where: str = "image", indices: Optional[Sequence[int]] = None) -> np.ndarray:
    """Images (anything an IMAGE slot takes, any size: ``_grey``) → grey 8×8 pixels in [0, 1],
    ``[B, 64]`` (box-filtered down, as the scikit-learn digits were made). An image that cannot be
    read is refused as ``where`` and its index (``indices[k]`` for ``images[k]``; default ``k``)."""
    from PIL import Image

    out = []
    for k, image in enumerate(images):
        pixels = _grey(image, where=f"{where} {k if indices is None else indices[k]}")
        grey = Image.fromarray((pixels * 255).round().astype(np.uint8)).resize((8, 8), Image.BOX)
        out.append(np.asarray(grey, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(out)


def _grey(image, size: Optional[tuple[int, int]] = None, *, where: str = "image") -> np.ndarray:
    """An image as grey float pixels in [0, 1], resized (bilinear) to ``size`` = (W, H). Anything an
    IMAGE slot takes (an array, a tensor, a PIL image, encoded bytes, an image file's path), read
    as the slot reads it (``load_image``: float arrays in [0, 1] scaled by 255; clipping them as
    bytes made white read as black). ``where`` names it in errors (``"pixel_mse: reference 3"``)."""
    from PIL import Image

    from moe_gen.tasks.modalities.base import SlotValueError
    from moe_gen.tasks.modalities.visual import load_image

    try:
        array = np.asarray(load_image(image), dtype=np.float32)
    except SlotValueError as exc:
        raise ValueError(f"{where}: cannot read the image: {exc}") from None
    if array.ndim == 3:
        array = array[..., :3].mean(-1)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"{where}: expected an image [H, W] or [H, W, C], got shape {array.shape}")
    grey = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if size is not None and grey.size != size:  # box averaging, as the digits were made (bilinear blurred:
        grey = grey.resize(size, Image.BOX)     # an exact 2x upscale of the reference scored 0.009)
    return np.asarray(grey, dtype=np.float32) / 255.0


@METRICS.register("pixel_mse")
def pixel_mse(predictions: Sequence, references: Sequence) -> float:
    """Mean squared error of grey pixels in [0, 1], each prediction resized to its reference's size;
    lower is better. A missing image (None) scores 1, the worst error."""
    _check(predictions, references)
    errors = []
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        truth = _grey(reference, where=f"pixel_mse: reference {i}")
        errors.append(1.0 if prediction is None else float(((_grey(
            prediction, (truth.shape[1], truth.shape[0]), where=f"pixel_mse: prediction {i}") - truth) ** 2).mean()))
    return float(np.mean(errors))


@functools.lru_cache(maxsize=1)
def _digit_models():
    """The independent reference models, fitted once on the real digits' training split: a
    logistic regression on 8×8 pixels, a 16-component PCA for the feature distance, and an exact
    lookup of every real digit's label by its pixels."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from moe_gen.tasks.sources.vision import load_digit_images

    train = load_digit_images("train")
    X, y = _digit_pixels([r["image"] for r in train]), np.array([r["digit"] for r in train])
    classifier = LogisticRegression(max_iter=2000).fit(X, y)
    pca = PCA(n_components=16, random_state=0).fit(X)
    labels = {row["image"].tobytes(): row["digit"] for row in load_digit_images("all")}
    return classifier, pca, labels


def digit_classifier() -> Callable[[Sequence], list[int]]:
    """The independent digit classifier: images → predicted digits (a logistic regression on the
    real training digits' 8×8 pixels; ~0.97 on the real test digits)."""
    classifier = _digit_models()[0]
    return lambda images: [int(d) for d in classifier.predict(_digit_pixels(images))]


@METRICS.register("digit_accuracy")
def digit_accuracy(predictions: Sequence, references: Sequence) -> float:
    """Share of generated images (predictions) that the independent classifier
    (``digit_classifier``) reads as the digit of their reference, a real scikit-learn digit image
    whose label is looked up exactly by its grey pixels. References and predictions are read as
    an IMAGE slot reads them (``_grey``: arrays, image files, bytes; before the fifteenth audit a
    reference given as a file failed with a bare numpy error). An answer that is not an image
    (None) counts as wrong."""
    _check(predictions, references)
    classifier, _, labels = _digit_models()
    truth = []
    for i, reference in enumerate(references):
        key = (_grey(reference, where=f"digit_accuracy: reference {i}") * 255).round().astype(np.uint8).tobytes()
        if key not in labels:
            raise ValueError(f"digit_accuracy: reference {i} is not a scikit-learn digit image (8x8 grey pixels)")
        truth.append(labels[key])
    scored = [i for i, p in enumerate(predictions) if p is not None]
    if not scored:
        return 0.0
    read = classifier.predict(_digit_pixels([predictions[i] for i in scored], "digit_accuracy: prediction", scored))
    return sum(int(read[j] == truth[i]) for j, i in enumerate(scored)) / len(references)


@METRICS.register("digit_fid")
def digit_fid(predictions: Sequence, references: Sequence) -> float:
    """Fréchet distance between the generated and the reference images, in a 16-dimensional PCA of
    real digit pixels (the FID recipe with a small fixed feature map); lower is better, 0 for
    identical sets. NaN for a single image: a covariance needs two (before the fifteenth audit
    it raised, and an evaluation of one row, ``limit=1``, lost every task's results with it). A
    missing image (None) is refused."""
    from scipy import linalg

    _check(predictions, references)
    missing = [i for i, p in enumerate(predictions) if p is None]
    if missing:
        raise ValueError(f"digit_fid: prediction {missing[0]} is missing (None); the distance needs every image")
    if len(predictions) < 2:
        return float("nan")
    pca = _digit_models()[1]
    a = pca.transform(_digit_pixels(predictions, "digit_fid: prediction"))
    b = pca.transform(_digit_pixels(references, "digit_fid: reference"))
    eps = 1e-6 * np.eye(a.shape[1])  # the usual FID offset: identical images make a singular covariance
    cov_a, cov_b = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root  # sqrtm's imaginary part is rounding here
    distance = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    return max(distance, 0.0)  # rounding can leave identical sets a hair below 0


def compute(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Every named metric on the same predictions."""
    return {name: METRICS.get(name)(predictions, references) for name in names}
