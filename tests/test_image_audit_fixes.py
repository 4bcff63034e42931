"""Image-generation defects found by an audit (2026-12-05, seventh session); each test failed
before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_gen.model.parallel import masked_counts
from moe_gen.tasks.metrics import pixel_mse
from moe_gen.tasks.sources.vision import load_digit_images


def test_an_exact_upscale_of_the_reference_has_no_pixel_error():
    """The prediction was shrunk bilinearly, which blurs: an exact 2x block copy of each 8x8 digit
    scored 0.009, and every 16x16 generated image carried that error."""
    digits = [row["image"] for row in load_digit_images("test")[:20]]
    upscaled = [np.kron(d, np.ones((2, 2), dtype=d.dtype)) if d.ndim == 2 else d.repeat(2, 0).repeat(2, 1)
                for d in digits]
    assert pixel_mse(upscaled, digits) == 0.0


@pytest.mark.parametrize("steps", [True, 2.5, "4", 0])
def test_parallel_steps_must_be_a_whole_number_of_passes(steps):
    with pytest.raises(ValueError, match="whole number of steps >= 1"):
        masked_counts(16, steps)
    assert masked_counts(16, 4)[-1] == 0


def test_every_parallel_decoding_pass_fixes_at_least_one_code():
    """The floor of the cosine schedule could repeat a count, and a pass that fixed no code read the
    same input again (16 codes in 10 passes left 15, 15, ...; 13,020 of the pairs below wasted a pass)."""
    assert masked_counts(16, 10) == [15, 14, 13, 12, 11, 9, 7, 4, 2, 0]  # was [15, 15, 14, 12, ...]
    assert masked_counts(16, 4) == [14, 11, 6, 0] and masked_counts(5, 5) == [4, 3, 2, 1, 0]
    for codes in range(1, 130):
        for steps in range(1, 70):
            left = masked_counts(codes, steps)
            fixed = [before - after for before, after in zip([codes, *left], left)]
            assert len(left) == min(steps, codes), (codes, steps)  # more passes than codes: one a pass
            assert left[-1] == 0 and min(fixed) >= 1, (codes, steps, fixed)
            cosine = [math.floor(codes * math.cos(math.pi / 2 * (t + 1) / len(left))) for t in range(len(left) - 1)]
            assert all(a <= c for a, c in zip(left, cosine)), (codes, steps)  # the schedule, clipped
