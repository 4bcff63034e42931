"""Boxes as location tokens: quantisation to ``<bin_k>`` relative to the image, and back.

A box ``(x0, y0, x1, y1)`` in pixels of an image of size (width, height) becomes 4 bin indices
``round(x / width · (num_bins - 1))`` (likewise for y), so the same box keeps its tokens when the
image is resized; decoding maps bins back to the ORIGINAL image's pixels. OFA uses 1000 bins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from typing import Sequence

from moe_gen.tasks.modalities.base import brief

__all__ = ["check_box", "quantize_box", "dequantize_box", "scale_box", "box_iou"]


def check_box(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Validates a pixel box ``(x0, y0, x1, y1)`` against the image size; returns it as floats."""
    # A string or a dict would iterate to characters or keys; a set has no order.
    if isinstance(box, (str, bytes, bytearray, Mapping, Set)):
        coordinates = None
    else:
        try:
            coordinates = [float(v) for v in box]
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
            coordinates = None
    if coordinates is None or len(coordinates) != 4:
        raise ValueError(f"a box must be 4 numbers (x0, y0, x1, y1), got {brief(box)}")
    x0, y0, x1, y1 = coordinates
    if not all(math.isfinite(v) for v in coordinates):
        raise ValueError(f"box {brief(box)} has non-finite coordinates")
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"image size must be positive and finite, got {width}x{height}")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {brief(box)} has x1 < x0 or y1 < y0 (expected x0, y0, x1, y1)")
    tolerance = 1e-6 * max(width, height)
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise ValueError(f"box {brief(box)} lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def quantize_box(box: Sequence[float], width: float, height: float, num_bins: int = 1000) -> list[int]:
    """4 bin indices in ``[0, num_bins)`` for a pixel box of an image of ``width × height``."""
    x0, y0, x1, y1 = check_box(box, width, height)
    scale = num_bins - 1
    return [
        min(scale, max(0, round(v / size * scale)))
        for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))
    ]


def dequantize_box(bins: Sequence[int], width: float, height: float, num_bins: int = 1000) -> list[float]:
    """Pixel box of an image of ``width × height`` from 4 bin indices (inverse of quantize_box)."""
    if len(bins) != 4:
        raise ValueError(f"a box is exactly 4 location tokens, got {len(bins)}")
    scale = num_bins - 1
    x0, y0, x1, y1 = (int(b) / scale for b in bins)
    return [x0 * width, y0 * height, x1 * width, y1 * height]


def scale_box(box: Sequence[float], scale_x: float, scale_y: float) -> list[float]:
    """The box after the image is resized by (scale_x, scale_y)."""
    x0, y0, x1, y1 = box
    return [x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes. Two boxes of no area (a point or a
    line, which a box may be) have no union: 1 when they are the same box, else 0."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union > 0:
        return inter / union
    return 1.0 if [float(v) for v in a] == [float(v) for v in b] else 0.0
