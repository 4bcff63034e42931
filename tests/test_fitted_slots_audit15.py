"""What slots learn from the training rows (``Task.fit_statistics``), fifteenth audit: a MOTION
slot in a repetition group is normalised with the statistics of every clip of its lists (the
whole list was read as one clip, refused, and the task could not be planned)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gen.tasks import Task
from moe_gen.tasks.task import MOTION_NORMALISATION


def _clip_lists(rows: int = 6, clips: int = 2, seed: int = 0) -> list[dict]:
    """Rows of ``clips`` clips each (frames [12, 6] around 5, spread 2) with a label per clip."""
    rng = np.random.default_rng(seed)
    return [{"clips": [rng.normal(5, 2, (12, 6)) for _ in range(clips)], "labels": ["walk", "run"][:clips],
             "label": "walk"} for _ in range(rows)]


@pytest.mark.parametrize("instruction", [
    "what moves? ( [MOTION:clips] )* -> [TEXT:label]",
    "( [MOTION:clips] [TEXT:labels] )* what are these? -> [TEXT:label]",
])
def test_a_motion_slot_in_a_repetition_group_is_normalised_by_all_its_clips(tok, instruction):
    rows = _clip_lists()
    task = Task("motion_list", instruction, rows)
    fitted = task.fit_statistics()[MOTION_NORMALISATION]
    every_frame = np.concatenate([clip for row in rows for clip in row["clips"]])
    np.testing.assert_allclose(fitted["mean"], every_frame.mean(0), rtol=1e-5)
    np.testing.assert_allclose(fitted["std"], every_frame.std(0), rtol=1e-5)
    sample = task.encode(0, tok, training=False)
    clips = [chunk.rows for chunk in sample.encoder if chunk.rows is not None]
    assert len(clips) == 2
    assert abs(float(np.concatenate([c.numpy() for c in clips]).mean())) < 1.0  # around 5 before


def test_pose_summary_in_a_repetition_group_encodes_each_clip(tok):
    task = Task("pose_list", "what moves? ( [MOTION:clips,preprocess=pose_summary] )* -> [TEXT:label]",
                _clip_lists())
    assert len(task.fit_statistics()["pose_summary"]["clips"]["mean"]) == 3 * 6
    sample = task.encode(0, tok, training=False)
    assert [tuple(c.rows.shape) for c in sample.encoder if c.rows is not None] == [(1, 18), (1, 18)]
