"""Rendered clips of handwritten digits, one moving and one still, for the ``video_qa`` preset:
questions whose answers the rendering fixes exactly (no data files, nothing downloaded).

A clip is 16 RGB pictures of 64 x 64 (as the shipped video clips, ``sources.video``): a grey noisy
background that stays put, a still digit, and a moving digit of another class that slides in a
straight line by 20-40 pixels left, right, up or down over the clip (its position rounded to whole
pixels in each picture). Digits are scikit-learn's 8 x 8 digits (``sources.vision``) drawn at 16 x 16;
the still one never overlaps the moving one's path. Telling which digit moves, or which way, takes
more than one picture: a single picture shows two digits and no motion.

Each pair of rows asks both questions, in an order drawn per pair (``order.shuffled_cycle``):
``DIRECTION_QUESTION`` (answers: left, right, up, down) and ``DIGIT_QUESTION`` (answer: the moving
digit's name). Clips of a split only use that split's digits
(every 5th digit is ``test``); clip ``k`` is drawn from ``random.Random(seed · 100003 + k + split offset)``.
"""

from __future__ import annotations

import random

import numpy as np

from moe_gen.tasks.sources.order import shuffled_cycle

__all__ = ["DIRECTIONS", "DIRECTION_QUESTION", "DIGIT_QUESTION", "moving_digit_rows", "render_clip"]

DIRECTIONS = ("down", "left", "right", "up")
_STEPS = (("down", (0, 1)), ("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)))  # (dx, dy)
DIRECTION_QUESTION = "which way does the moving digit go?"
DIGIT_QUESTION = "which digit moves?"
PICTURES, SIDE, CELL = 16, 64, 16  # pictures per clip, picture side, digit side (8 x 8 drawn at 2x)


def _path(direction: str, rng: random.Random) -> list[tuple[int, int]]:
    """Top-left corners of the moving digit in each picture."""
    dx, dy = dict(_STEPS)[direction]
    distance = rng.randint(20, 40)
    free = SIDE - CELL  # largest corner coordinate
    across = rng.randint(0, free)  # the coordinate that stays fixed
    start = rng.randint(distance, free) if dx + dy < 0 else rng.randint(0, free - distance)
    along = [round(start + (dx + dy) * distance * t / (PICTURES - 1)) for t in range(PICTURES)]
    return [(a, across) if dx else (across, a) for a in along]


def _still_place(path: list[tuple[int, int]], rng: random.Random) -> tuple[int, int]:
    """A corner for the still digit whose box overlaps no box of the moving digit's path."""
    x0, y0 = min(p[0] for p in path), min(p[1] for p in path)
    x1, y1 = max(p[0] for p in path) + CELL, max(p[1] for p in path) + CELL
    while True:
        x, y = rng.randint(0, SIDE - CELL), rng.randint(0, SIDE - CELL)
        if x + CELL <= x0 or x >= x1 or y + CELL <= y0 or y >= y1:
            return x, y


def render_clip(mover: np.ndarray, still: np.ndarray, path: list[tuple[int, int]], still_at: tuple[int, int],
                noise_seed: int) -> np.ndarray:
    """uint8 [PICTURES, SIDE, SIDE, 3]: ``mover`` (8 x 8 grey) at each corner of ``path`` and
    ``still`` at ``still_at``, drawn twice as large over a fixed noisy background."""
    background = 20.0 + 10.0 * np.random.default_rng(noise_seed).random((SIDE, SIDE), dtype=np.float32)
    grow = np.ones((CELL // 8, CELL // 8), dtype=np.float32)
    big_mover, big_still = np.kron(mover.astype(np.float32), grow), np.kron(still.astype(np.float32), grow)
    frames = np.empty((len(path), SIDE, SIDE), dtype=np.float32)
    for t, (x, y) in enumerate(path):
        frame = background.copy()
        sx, sy = still_at
        frame[sy:sy + CELL, sx:sx + CELL] = np.maximum(frame[sy:sy + CELL, sx:sx + CELL], big_still)
        frame[y:y + CELL, x:x + CELL] = np.maximum(frame[y:y + CELL, x:x + CELL], big_mover)
        frames[t] = frame
    return np.repeat(np.clip(frames, 0, 255).astype(np.uint8)[..., None], 3, axis=3)


def moving_digit_rows(split: str = "train", count: int = 600, seed: int = 0) -> list[dict]:
    """Rows ``{"video", "question", "answer", "direction", "mover", "still", "digit_ids", "id"}``:
    ``video`` uint8 [16, 64, 64, 3]; ``digit_ids`` the ids of the moving and the still digit
    (``load_digit_images``); each pair of rows asks the direction once and the moving digit once."""
    from moe_gen.tasks.sources.vision import load_digit_images

    digits = load_digit_images(split)  # checks the split
    rows = []
    for k in range(count):
        rng = random.Random(seed * 100003 + k + (0 if split == "train" else 50000))
        mover = digits[rng.randrange(len(digits))]
        still = mover
        while still["label"] == mover["label"]:
            still = digits[rng.randrange(len(digits))]
        direction = rng.choice(DIRECTIONS)
        path = _path(direction, rng)
        video = render_clip(mover["image"], still["image"], path, _still_place(path, rng), rng.randrange(2**32))
        asks_direction = shuffled_cycle(k, 2, f"moving/{split}/{seed}") == 0
        question, answer = (DIRECTION_QUESTION, direction) if asks_direction else (DIGIT_QUESTION, mover["label"])
        rows.append({"video": video, "question": question, "answer": answer, "direction": direction,
                     "mover": mover["label"], "still": still["label"], "digit_ids": (mover["id"], still["id"]),
                     "id": f"moving/{split}/{k}"})
    return rows
