"""Box quantisation to location tokens and back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_gen.tasks.modalities.box import box_iou, dequantize_box, quantize_box, scale_box


def test_quantize_by_hand():
    assert quantize_box([0, 0, 640, 480], 640, 480) == [0, 0, 999, 999]
    assert quantize_box([320, 120, 480, 240], 640, 480) == [500, 250, 749, 500]  # 499.5 rounds to 500
    assert dequantize_box([0, 0, 999, 999], 640, 480) == [0.0, 0.0, 640.0, 480.0]


@settings(max_examples=200, deadline=None)
@given(w=st.integers(8, 2000), h=st.integers(8, 2000), data=st.data())
def test_round_trip_error_is_below_one_bin_and_resizing_keeps_tokens(w, h, data):
    xs = sorted(data.draw(st.lists(st.floats(0, w), min_size=2, max_size=2)))
    ys = sorted(data.draw(st.lists(st.floats(0, h), min_size=2, max_size=2)))
    box = [xs[0], ys[0], xs[1], ys[1]]
    bins = quantize_box(box, w, h)
    back = dequantize_box(bins, w, h)
    for v, b, size in zip(box, back, (w, h, w, h)):
        assert abs(v - b) <= 0.5 * size / 999 + 1e-9
    # the same box on the image resized by 2x keeps its tokens
    assert quantize_box(scale_box(box, 2.0, 2.0), 2 * w, 2 * h) == bins


def test_bad_boxes_are_named():
    with pytest.raises(ValueError, match="4 numbers"):
        quantize_box([1, 2, 3], 10, 10)
    with pytest.raises(ValueError, match="x1 < x0"):
        quantize_box([5, 0, 1, 4], 10, 10)
    with pytest.raises(ValueError, match="outside the 10x10 image"):
        quantize_box([0, 0, 11, 4], 10, 10)
    with pytest.raises(ValueError, match="exactly 4 location tokens"):
        dequantize_box([1, 2], 10, 10)


def test_iou():
    assert box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert box_iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    # boxes of no area (a point, a line): the same box matches, another does not
    assert box_iou([3, 4, 3, 4], [3.0, 4.0, 3.0, 4.0]) == 1.0 and box_iou([0, 1, 5, 1], [0, 1, 5, 1]) == 1.0
    assert box_iou([3, 4, 3, 4], [3, 5, 3, 5]) == 0.0 and box_iou([3, 4, 3, 4], [0, 0, 8, 8]) == 0.0


def test_boxes_apart_on_one_axis_have_no_intersection_however_much_the_other_overlaps():
    # side by side (same rows, columns apart) and stacked (same columns, rows apart): IoU 0, never negative
    assert box_iou([0, 0, 1, 1], [2, 0, 3, 1]) == 0.0
    assert box_iou([0, 0, 1, 1], [0, 2, 1, 3]) == 0.0
    assert box_iou([0, 0, 4, 4], [5, 1, 9, 3]) == 0.0


def test_scale_box_scales_x_by_scale_x_and_y_by_scale_y():
    assert scale_box([1, 2, 3, 4], 2.0, 3.0) == [2.0, 6.0, 6.0, 12.0]
    assert scale_box([1, 2, 3, 4], 0.5, 1.0) == [0.5, 2.0, 1.5, 4.0]


def test_an_image_of_infinite_size_is_refused():
    for width, height in ((math.inf, 10), (10, math.inf)):
        with pytest.raises(ValueError, match="positive and finite"):
            quantize_box([0, 0, 1, 1], width, height)


def test_bins_stay_in_range_on_a_long_thin_image_where_the_edge_tolerance_spans_a_bin():
    """The edge tolerance is relative to the image's longer side (1e-3 px on a 1x1000 image): on the
    short side it reaches past half a bin, so the clamp to ``[0, num_bins)`` is what keeps the bins."""
    assert quantize_box([-1e-3, 0, 1 + 1e-3, 1000], 1, 1000) == [0, 0, 999, 999]


def test_iou_accuracy_counts_a_box_at_the_threshold_as_a_hit():
    from moe_gen.tasks.metrics import iou_accuracy

    reference = [0, 0, 10, 10]
    assert iou_accuracy([[0, 0, 10, 5]], [reference]) == 1.0  # IoU 50 / 100, exactly 0.5
    assert iou_accuracy([[0, 0, 10, 4]], [reference]) == 0.0
    assert iou_accuracy([[0, 0, 10, 5], None], [reference, reference]) == 0.5  # a box cut short: a miss
    assert iou_accuracy([[0, 0, 10, 8]], [reference], threshold=0.8) == 1.0


def test_a_box_target_sized_by_the_rows_width_and_height_decodes_in_its_pixels():
    """Without an IMAGE slot a box is measured against the row's ``width`` and ``height``; decoding
    mapped it back to the unit square (a perfect answer scored IoU 0) before 2026-12-05."""
    from moe_gen.model.grammar import TargetGrammar
    from moe_gen.tasks import Task, Tokenizer
    from moe_gen.tasks.metrics import iou_accuracy
    from moe_gen.tasks.plan import TaskDataError

    tok = Tokenizer.default()
    rows = [{"q": "the left one", "box": [10.0, 20.0, 30.0, 160.0], "width": 100, "height": 200}]
    plan = Task("textbox", "[TEXT:q] -> [BOX:box]", rows).plan(tok)
    asked = plan.encode(rows[0], 0, training=False, inference=True, template=0)
    assert asked.meta["image_size"] == (100.0, 200.0)
    grammar = TargetGrammar(plan, tok)
    state = grammar.start()
    for token in plan.encode(rows[0], 0, training=False).decoder[0].tokens:
        state = grammar.advance(state, grammar.options(state)[0], token)
    box = grammar.parse(state, asked.meta["image_size"])[0]["box"]
    assert box == pytest.approx(rows[0]["box"], abs=0.2) and iou_accuracy([box], [rows[0]["box"]]) == 1.0
    with pytest.raises(TaskDataError, match="width"):
        plan.encode({"q": "no size"}, 1, training=False, inference=True, template=0)


def test_a_box_past_the_edge_by_float_rounding_is_accepted_relative_to_the_image_size():
    """Coordinates read back from normalised ones (x · width) overshoot an edge by rounding: the
    tolerance scales with the image (1e-6 of its longer side), so 640.0001 on a 640-pixel image is
    the edge, while a whole pixel past it is refused."""
    from moe_gen.tasks.modalities.box import check_box

    assert check_box([0, 0, 640.0001, 480.0001], 640, 480) == (0.0, 0.0, 640.0001, 480.0001)
    assert quantize_box([-0.0001, 0, 640.0001, 480], 640, 480) == [0, 0, 999, 999]
    with pytest.raises(ValueError, match="lies outside the 640x480 image"):
        check_box([0, 0, 641, 480], 640, 480)


@pytest.mark.parametrize("box", [[5, 2, 1, 8], [1, 8, 5, 2]])
def test_a_box_with_its_corners_swapped_on_either_axis_is_refused(box):
    from moe_gen.tasks.modalities.box import check_box

    with pytest.raises(ValueError, match="has x1 < x0 or y1 < y0"):
        check_box(box, 10, 10)
