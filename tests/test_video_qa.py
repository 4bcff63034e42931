"""The video_qa preset: rendered clips of a moving and a still digit, with questions whose answers
the rendering fixes (which way, which digit)."""

import collections

import numpy as np
import pytest

from moe_gen.quality.baselines import classical_scores
from moe_gen.quality.suite import suite_tasks
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset, preset_info
from moe_gen.tasks.sources.moving_digits import (
    DIGIT_QUESTION,
    DIRECTION_QUESTION,
    DIRECTIONS,
    moving_digit_rows,
    render_clip,
)
from moe_gen.tasks.sources.vision import load_digit_images


def _centre_of_change(video):
    """Centre (x, y) of the moving digit in the first and last pictures: the pixels that change."""
    grey = video[..., 0].astype(np.float32)
    moving = grey.std(0) > 0
    centres = []
    for frame in (grey[0], grey[-1]):
        weight = np.where(moving, frame - 30, 0).clip(0)  # ink above the background (20..30)
        ys, xs = np.indices(frame.shape)
        centres.append((float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum())))
    return centres


def test_a_clip_by_hand():
    ink = np.full((8, 8), 255, np.uint8)
    video = render_clip(ink, np.zeros((8, 8), np.uint8), [(0, 0), (4, 0)], (40, 40), noise_seed=0)
    assert video.shape == (2, 64, 64, 3) and video.dtype == np.uint8
    assert (video[0, 0:16, 0:16] == 255).all() and (video[1, 0:16, 4:20] == 255).all()
    assert (video[1, 0:16, 0:4] < 31).all()  # the digit left: background again
    assert (video[0, 20:] == video[1, 20:]).all()  # below it nothing changes


def test_answers_follow_the_rendering():
    rows = moving_digit_rows("train", count=80) + moving_digit_rows("test", count=40)
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for row in rows:
        assert row["video"].shape == (16, 64, 64, 3) and row["mover"] != row["still"]
        (x0, y0), (x1, y1) = _centre_of_change(row["video"])
        dx, dy = steps[row["direction"]]
        assert (x1 - x0) * dx + (y1 - y0) * dy >= 15, (row["id"], x0, y0, x1, y1)  # 20-40 px that way
        assert abs((x1 - x0) * dy) + abs((y1 - y0) * dx) < 1e-6  # and not across
        answers = {DIRECTION_QUESTION: row["direction"], DIGIT_QUESTION: row["mover"]}
        assert row["answer"] == answers[row["question"]]
    for k in range(0, len(rows) - 1, 2):  # each pair of rows asks both questions
        assert {rows[k]["question"], rows[k + 1]["question"]} == {DIRECTION_QUESTION, DIGIT_QUESTION}


def test_splits_use_their_own_digits_and_are_deterministic():
    test = moving_digit_rows("test", count=20)
    again = moving_digit_rows("test", count=20)
    assert all((a["video"] == b["video"]).all() and a["answer"] == b["answer"] for a, b in zip(test, again))
    for split, rows in (("train", moving_digit_rows("train", count=40)), ("test", test)):
        own = {d["id"] for d in load_digit_images(split)}
        assert all(set(r["digit_ids"]) <= own for r in rows)
    answers = collections.Counter(r["answer"] for r in moving_digit_rows("train", count=200))
    assert set(DIRECTIONS) <= set(answers) and len(answers) == 14  # four directions, ten digits
    with pytest.raises(ValueError, match="unknown split"):
        moving_digit_rows("dev")


def test_the_preset_encodes_its_baseline_runs_and_bad_videos_are_task_data_errors():
    info = preset_info("video_qa")
    assert info.metrics == ("accuracy",) and "CC BY 4.0" in info.licence
    tok = Tokenizer.default()
    task = load_preset("video_qa", "test", limit=4)
    assert task.encode(0, tok) is not None
    bad = Task("video_qa", info.instruction, [{"video": np.zeros((4, 8), np.uint8), "question": DIGIT_QUESTION,
                                              "answer": "one"}])
    with pytest.raises(TaskDataError, match="video"):
        bad.encode(0, tok)
    suite = suite_tasks(["video_qa"])[0]
    scores = classical_scores(suite, moving_digit_rows("train", count=120), moving_digit_rows("test", count=30))
    cv = scores.pop("cv")  # cross-validated on the training rows
    assert set(scores) == {"majority", "logreg", "knn"} and all(0 <= v <= 1 for v in scores.values())
    assert set(cv) == {"logreg", "knn"} and all(0 <= v <= 1 for v in cv.values())


@pytest.mark.parametrize("limit", [20, 25, 50])
def test_both_questions_are_among_the_evenly_spaced_rows_evaluation_scores(limit):
    """Even rows asked the direction and odd rows the digit: 50 rows spaced over 100 asked only the
    direction (fourteenth session's split audit)."""
    from moe_gen.trainer.evaluation import spaced_indices

    questions = [row["question"] for row in moving_digit_rows("test", count=100)]
    asked = collections.Counter(questions[i] for i in spaced_indices(len(questions), limit))
    assert min(asked[DIRECTION_QUESTION], asked[DIGIT_QUESTION]) >= limit // 4, asked


def test_paths_move_20_to_40_pixels_inside_the_picture_and_the_still_digit_stays_off_them():
    import random

    from moe_gen.tasks.sources.moving_digits import _path, _still_place

    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    distances = set()
    for seed in range(100):
        rng = random.Random(seed)
        for direction in DIRECTIONS:
            path = _path(direction, rng)
            (x0, y0), (x1, y1) = path[0], path[-1]
            dx, dy = steps[direction]
            distance = (x1 - x0) * dx + (y1 - y0) * dy
            assert len(path) == 16 and 20 <= distance <= 40 and (x1 - x0) * dy == (y1 - y0) * dx == 0
            assert all(0 <= c <= 48 for corner in path for c in corner)  # a 16-pixel digit inside 64
            distances.add(distance)
            sx, sy = _still_place(path, rng)
            assert all(abs(sx - x) >= 16 or abs(sy - y) >= 16 for x, y in path), (direction, seed)
    assert {20, 40} <= distances


def test_the_background_is_the_noise_seeds_and_dark_digits_leave_it_alone():
    blank = np.zeros((8, 8), np.uint8)
    video = render_clip(blank, blank, [(0, 0), (30, 10), (48, 48)], (40, 0), noise_seed=5)
    assert (video == video[0]).all() and 20 <= video.min() and video.max() < 30  # no box drawn
    assert (render_clip(blank, blank, [(0, 0)], (40, 0), noise_seed=5) == video[:1]).all()
    assert (render_clip(blank, blank, [(0, 0)], (40, 0), noise_seed=6) != video[:1]).any()


def test_clip_k_draws_from_the_documented_seed():
    """Clip ``k`` of a split is drawn from ``random.Random(seed * 100003 + k + offset)`` (offset 0 for
    train, 50000 for test): its moving digit is the stream's first draw from the split's digits."""
    import random

    for split, offset in (("train", 0), ("test", 50000)):
        digits = load_digit_images(split)
        for row, k in zip(moving_digit_rows(split, count=6, seed=2), range(6)):
            rng = random.Random(2 * 100003 + k + offset)
            assert row["digit_ids"][0] == digits[rng.randrange(len(digits))]["id"], (split, k)
