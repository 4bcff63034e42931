"""Numerical edge cases found by the fifteenth audit; each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
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
