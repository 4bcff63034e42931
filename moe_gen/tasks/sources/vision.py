"""Images and boxes from data that installed packages ship: scikit-learn's 1,797 handwritten
8×8 digits (``load_digits``), and canvases with digits pasted at known places, which give exact
boxes for grounding, grounded captioning, counting and detection.

Splits are deterministic: digit i is in "test" when i % 5 == 0 (20%), else "train"; canvases of
a split only use that split's digits, and canvas k of a split is drawn from
``Random(seed · 100003 + k)``, plus 50,000 for the test split's.
"""

from __future__ import annotations

import functools
import random
from typing import TypedDict

import numpy as np

__all__ = ["DIGIT_NAMES", "load_digit_images", "make_canvases", "canvas_questions", "count_hypothesis", "DigitRow",
           "CanvasRow", "SPLITS"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test", "all")


class DigitRow(TypedDict):
    image: np.ndarray  # uint8 [8, 8] grey, 0..255
    label: str  # "seven"
    digit: int
    id: str


class CanvasRow(TypedDict):
    image: np.ndarray  # uint8 [size, size, 3]
    boxes: list  # [[x0, y0, x1, y1], ...] pixels
    labels: list  # ["seven", ...], one per box
    count: str  # number of digits as a word
    query: str  # the name of one digit on the canvas that appears exactly once (the first one where none does)
    query_box: list  # its box
    width: int
    height: int
    id: str


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(data.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values are 0..16
    return images, data.target.astype(np.int64)


def load_digit_images(split: str = "train") -> list[DigitRow]:
    """The scikit-learn digits as rows (8×8 grey uint8 images with their names)."""
    _check_split(split)
    images, targets = _digits()
    keep = [i for i in range(len(images)) if split == "all" or (i % 5 == 0) == (split == "test")]
    return [DigitRow(image=images[i].copy(), label=DIGIT_NAMES[targets[i]], digit=int(targets[i]),
                     id=f"digits/{i}") for i in keep]


def make_canvases(split: str = "train", count: int = 200, size: int = 64, scale: int = 2,
                  max_digits: int = 3, seed: int = 0) -> list[CanvasRow]:
    """Canvases of ``size``² pixels with 1..max_digits digits (each 8·scale px) at non-overlapping
    places on a noisy grey background; boxes are exact by construction."""
    _check_split(split)
    cell = 8 * scale
    if not 1 <= max_digits < len(DIGIT_NAMES) or cell > size:
        raise ValueError(f"make_canvases: max_digits must be 1 to {len(DIGIT_NAMES) - 1} and the digits ({cell} px) "
                         f"no larger than the canvas ({size} px); got max_digits={max_digits}")
    digits = load_digit_images(split)
    rows = []
    for k in range(count):
        rng = random.Random(seed * 100003 + k + (0 if split == "train" else 50000))
        noise = np.random.default_rng(rng.randrange(2**32)).random((size, size), dtype=np.float32)
        canvas = 20.0 + 10.0 * noise
        n = rng.randint(1, max_digits)
        boxes, labels, taken = [], [], []
        tries = 0
        while len(boxes) < n:
            x, y = rng.randrange(0, size - cell + 1), rng.randrange(0, size - cell + 1)
            if any(abs(x - a) < cell and abs(y - b) < cell for a, b in taken):
                tries += 1
                if tries > 10_000:  # the places taken leave no room (it looped forever)
                    raise ValueError(f"make_canvases: {n} digits of {cell} px do not fit on a {size} px canvas "
                                     f"(canvas {k}); use fewer digits, a smaller scale or a larger size")
                continue
            digit = digits[rng.randrange(len(digits))]
            patch = np.kron(digit["image"].astype(np.float32), np.ones((scale, scale), dtype=np.float32))
            canvas[y:y + cell, x:x + cell] = np.maximum(canvas[y:y + cell, x:x + cell], patch)
            taken.append((x, y))
            boxes.append([x, y, x + cell, y + cell])
            labels.append(digit["label"])
        unique = [i for i, lab in enumerate(labels) if labels.count(lab) == 1]
        q = unique[rng.randrange(len(unique))] if unique else 0
        image = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        rows.append(CanvasRow(image=image, boxes=boxes, labels=labels, count=DIGIT_NAMES[n],
                              query=labels[q], query_box=boxes[q], width=size, height=size,
                              id=f"canvas/{split}/{k}"))
    return rows


def count_hypothesis(n: int) -> str:
    """The visual-entailment hypothesis that a canvas holds ``n`` digits."""
    return "there is one digit" if n == 1 else f"there are {DIGIT_NAMES[n]} digits"


def canvas_questions(split: str = "train", count: int = 200, seed: int = 0) -> list[dict]:
    """Canvases (``make_canvases``) with questions whose answers their contents fix exactly: VQA
    (``asked``: a digit name, ``answer``: "yes" if it is on the canvas; half of the questions ask
    for a digit that is there) and visual entailment (``hypothesis``: "there are N digits" with N
    the true count half of the time, ``relation``: "entailment" or "contradiction")."""
    rows = []
    for k, row in enumerate(make_canvases(split, count=count, seed=seed)):
        # a stream of its own: seeded like the canvas's (seed·7919 + k is k for seed 0), the coin below
        # followed the canvas's digit count, and the hypothesis alone predicted the answer (0.66 held out)
        rng = random.Random(f"questions/{seed}/{split}/{k}")
        present = sorted(set(row["labels"]))
        absent = [name for name in DIGIT_NAMES if name not in present]
        yes = rng.random() < 0.5
        n = DIGIT_NAMES.index(row["count"])
        claimed = n if rng.random() < 0.5 else rng.choice([m for m in (1, 2, 3) if m != n])
        rows.append({**row, "asked": rng.choice(present if yes else absent), "answer": "yes" if yes else "no",
                     "hypothesis": count_hypothesis(claimed),
                     "relation": "entailment" if claimed == n else "contradiction"})
    return rows


QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def hide_quadrant(image: np.ndarray, quadrant: int, fill: int = 128) -> np.ndarray:
    """A copy of ``image`` with one quadrant (index into ``QUADRANTS``) painted ``fill`` grey."""
    out = np.array(image, copy=True)
    H, W = out.shape[:2]
    rows = slice(0, H // 2) if quadrant < 2 else slice(H // 2, H)
    cols = slice(0, W // 2) if quadrant % 2 == 0 else slice(W // 2, W)
    out[rows, cols] = fill
    return out


def masked_digits(split: str = "train") -> list[dict]:
    """The digits of ``split`` for image infilling: ``masked`` is the digit with quadrant
    ``i % 4`` of row i of its split painted grey (``hidden`` names it), ``image`` the whole digit;
    ``"all"``: the train rows, then the test rows (numbered over all the digits before the
    thirteenth audit, so most rows of ``"all"`` hid another quadrant than in their split)."""
    if split == "all":
        return masked_digits("train") + masked_digits("test")
    rows = []
    for i, row in enumerate(load_digit_images(split)):
        quadrant = i % 4
        rows.append({"masked": hide_quadrant(row["image"], quadrant), "hidden": QUADRANTS[quadrant],
                     "image": row["image"], "label": row["label"], "digit": row["digit"], "id": row["id"]})
    return rows
