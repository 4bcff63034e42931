"""Numerical edge cases found by the fifteenth audit; each test failed before its fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build

from moe_gen.config import RouterConfig
from moe_gen.model.generate import Prediction
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.modalities.box import dequantize_box, quantize_box
from moe_gen.trainer.evaluation import evaluate_task

IMG = np.zeros((10, 10, 3), np.uint8)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _decoded(box, tok):
    """What an answer of exactly ``box``'s location tokens decodes to on IMG."""
    return dequantize_box(quantize_box(box, 10, 10, tok.num_bins), 10, 10, tok.num_bins)


# ---- 1: a box of no area answered with its exact location tokens scores 1 --------------------------

@pytest.mark.parametrize("box", [[5, 5, 5, 5], [2, 2, 2, 8], [2, 2, 3, 8]])
def test_a_box_answered_with_its_exact_tokens_scores_one(tok, box):
    """The decoded answer (bins mapped back to pixels: 5.005) was compared with the raw reference
    (5): a point or a line, whose IoU with anything but itself is 0, scored 0 when exactly right."""
    task = Task("point", "[IMAGE:img] where is the dot? -> [BOX:pt]", [{"img": IMG, "pt": box}] * 2)
    model = build([task], tok, router=RouterConfig(strategy="attribute"))
    model.infer = lambda task, rows, **kw: [Prediction(box=_decoded(r["pt"], tok)) for r in rows]
    pairs = []
    assert evaluate_task(model, task, pairs=pairs) == {"iou_accuracy": 1.0}
    assert pairs[0][1] == _decoded(box, tok)


def test_detection_boxes_of_no_area_answered_with_their_exact_tokens_score_one(tok):
    """The detection path paired the decoded items with the raw row boxes likewise (F1 0.0)."""
    rows = [{"img": IMG, "boxes": [[5, 5, 5, 5], [2, 2, 2, 8]], "labels": ["dot", "line"]}] * 2
    task = Task("det", "[IMAGE:img] find -> ( [BOX:boxes] [TEXT:labels] )*", rows)
    model = build([task], tok, router=RouterConfig(strategy="attribute"))

    def exact(task, rows, **kwargs):
        return [Prediction(groups=[[{"boxes": _decoded(b, tok), "labels": label}
                                    for b, label in zip(r["boxes"], r["labels"])]]) for r in rows]

    model.infer = exact
    pairs = []
    assert evaluate_task(model, task, pairs=pairs) == {"detection_f1": 1.0}
    assert pairs[0][1] == [(_decoded([5, 5, 5, 5], tok), "dot"), (_decoded([2, 2, 2, 8], tok), "line")]


# ---- 2: MOTION features far outside the training range are clipped, as table numbers are -----------

def _motion_rows(scale=1.0, offset=0.0, dtype=np.float32):
    rs = np.random.RandomState(0)
    return [{"m": (offset + scale * rs.randn(6, 3)).astype(dtype), "w": "x" if i % 2 else "y"} for i in range(8)]


def _held_out(task, instruction, frames, tok):
    """``frames`` encoded as a held-out row of ``instruction``, with ``task``'s statistics."""
    held_out = Task(task.name, instruction, [{"m": frames, "w": "x"}])
    return held_out.encode(0, tok, training=False, statistics=task.fit_statistics()).encoder[0].rows


@pytest.mark.parametrize("preprocess", ["motion", "pose_summary"])
def test_motion_far_outside_the_training_range_is_clipped(tok, preprocess):
    """(frames - mean) / std was unbounded: a clip of 1e37 fed the adapter 1e37 (NaN scores), one of
    3e38 made pose_summary statistics beyond float32 (a refused row)."""
    instruction = f"[MOTION:m,preprocess={preprocess}] which? -> [TEXT:w,closed_set]"
    task = Task("mot", instruction, _motion_rows())
    for value in (1e5, 1e37, 3e38, -3e38):
        features = _held_out(task, instruction, np.full((6, 3), value, np.float32), tok)
        assert bool(torch.isfinite(features).all()) and float(features.abs().max()) == 10.0
    inside = _held_out(task, instruction, _motion_rows()[0]["m"], tok)
    assert float(inside.abs().max()) < 10.0  # a clip like the training ones is not touched


@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e37), (torch.float32, 3e38), (torch.float16, 1e5)])
def test_a_model_scores_motion_far_outside_the_training_range(tok, dtype, value):
    """The score was NaN and the answer arbitrary, silently."""
    tasks = [Task(name, f"[MOTION:m,preprocess={name}] which? -> [TEXT:w,closed_set]", _motion_rows())
             for name in ("motion", "pose_summary")]
    model = build(tasks, tok, router=RouterConfig(strategy="attribute")).to(dtype).eval()
    for task in tasks:
        answer = model.infer(task, [{"m": np.full((6, 3), value, np.float32), "w": "x"}])[0]
        assert np.isfinite(answer.score) and answer.text in ("x", "y")


# ---- 3: MOTION standardisation takes a feature as constant relative to its magnitude ---------------

@pytest.mark.parametrize("preprocess", ["motion", "pose_summary"])
@pytest.mark.parametrize("unit", [1e-7, 1e-20, 1e20])
def test_motion_data_in_any_unit_encodes_alike(tok, preprocess, unit):
    """A std under an absolute 1e-6 was taken as constant and divided by 1: data in units 10x
    smaller than 1e-6 was encoded near 0, and the model could not tell its clips apart."""
    instruction = f"[MOTION:m,preprocess={preprocess}] which? -> [TEXT:w,closed_set]"

    def encoded(scale):
        task = Task("mot", instruction, _motion_rows(scale))
        return torch.cat([task.encode(i, tok, training=False).encoder[0].rows for i in range(len(task))])

    torch.testing.assert_close(encoded(unit), encoded(1.0), rtol=1e-4, atol=1e-5)


def test_a_motion_feature_constant_for_its_magnitude_is_divided_by_one(tok):
    """Relative to the feature: 1000 ± 1e-10 is constant (divided by 1), 1e-12 ± 1e-12 is not."""
    from moe_gen.tasks.modalities.signals import feature_scale

    np.testing.assert_array_equal(feature_scale([1e-10, 1e-12, 0.0], [1000.0, 1e-12, 0.0]), [1.0, 1e-12, 1.0])


# ---- 4: float64 MOTION frames on a large offset keep their variation -------------------------------

@pytest.mark.parametrize("offset", [1e5, 1e6, -1e7])
def test_float64_motion_frames_on_a_large_offset_are_standardised_exactly(tok, offset):
    """The frames were cast to float32 before the mean was subtracted (and the mean stored as
    float32): at an offset of 1e6, steps of 0.0625 against a std of 0.05 left a few coarse values."""
    rows = _motion_rows(scale=0.05, offset=offset, dtype=np.float64)
    task = Task("mot", "[MOTION:m] which? -> [TEXT:w,closed_set]", rows)
    every_frame = np.concatenate([row["m"] for row in rows])
    saved = json.loads(json.dumps(task.fit_statistics()))  # as a model saves them
    for statistics in (None, saved):
        got = task.encode(0, tok, training=False, statistics=statistics).encoder[0].rows.reshape(-1, 3)
        exact = (rows[0]["m"] - every_frame.mean(0)) / every_frame.std(0)
        np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-5)


# ---- 5: a table column of subnormal numbers divides by 1 --------------------------------------------

@pytest.mark.parametrize("tiny", [[0.0, 5e-324], [5e-324, 1e-323]])
def test_a_table_column_of_subnormal_numbers_encodes_every_row(tok, tiny):
    """Its deviation, spread × scale, rounded to 0.0: every row failed with a ZeroDivisionError."""
    rows = [{"t": {"a": tiny[i % 2], "b": float(i)}, "w": "x" if i % 2 else "y"} for i in range(4)]
    task = Task("tab", "[STRUCT:t] which? -> [TEXT:w,closed_set]", rows)
    assert task.fit_statistics()["struct"]["t"]["std"]["a"] > 0.0
    for i in range(len(rows)):
        cells = task.encode(i, tok, training=False).encoder[0].rows
        assert bool(torch.isfinite(cells).all())
