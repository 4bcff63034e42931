"""The committed motion and video sets: fields, dtypes, shapes, value ranges, splits, no pickles."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from moe_gen.tasks.sources import motion, video

# --------------------------------------------------------------------------- motion


def test_motion_archive_has_no_pickles():
    # Every member must be a plain .npy that loads with allow_pickle=False (object arrays would raise).
    with zipfile.ZipFile(motion.DATA_FILE) as zf:
        names = zf.namelist()
    with np.load(motion.DATA_FILE, allow_pickle=False) as z:
        for key in z.files:
            assert z[key].dtype != object, key
    assert all(n.endswith(".npy") for n in names)
    assert motion.DATA_FILE.stat().st_size < 2_000_000


@pytest.mark.parametrize("split", ["train", "test", "all", "whole"])
def test_motion_rows_fields_and_ranges(split):
    rows = motion.load_motion_clips(split)
    assert rows
    for row in rows:
        assert set(row) == {"motion", "fps", "label", "text", "clip", "start", "id"}
        m = row["motion"]
        assert m.dtype == np.float32 and m.shape == (motion.WINDOW, motion.NUM_FEATURES)
        assert np.isfinite(m).all()
        assert row["fps"] == motion.FPS
        assert row["label"] in motion.motion_labels() and row["text"]
        # Root x/z re-centred at the first frame; the height stays as recorded (crawl goes down to ~0.1 m).
        assert m[0, 0] == 0.0 and m[0, 2] == 0.0
        assert 0.0 < m[:, 1].min() and m[:, 1].max() < 1.5
        for sl in motion.QUATERNION_SLICES.values():
            np.testing.assert_allclose(np.linalg.norm(m[:, sl], axis=1), 1.0, atol=1e-5)
            # Sign-continuous: no frame-to-frame flip to the opposite hemisphere.
            assert (np.sum(m[1:, sl] * m[:-1, sl], axis=1) > 0).all()
        for col in motion.ANGLE_COLUMNS.values():
            assert np.abs(m[:, col]).max() < np.pi
    assert len({row["id"] for row in rows}) == len(rows)


def test_motion_splits_disjoint_complete_and_deterministic():
    train, test = motion.load_motion_clips("train"), motion.load_motion_clips("test")
    assert len(train) == 311 and len(test) == 85
    # No frame of a clip is in both splits, whatever the window.
    for window in (motion.WINDOW, 20, None):
        frames = {
            split: {(r["clip"], r["start"] + t) for r in motion.load_motion_clips(split, window=window)
                    for t in range(len(r["motion"]))}
            for split in ("train", "test")
        }  # fmt: skip
        assert not frames["train"] & frames["test"]
    labels = motion.motion_labels()
    assert len(labels) == 15 and {"walk", "run", "jump", "kick", "cartwheel"} <= set(labels)
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(labels)
    again = motion.load_motion_clips("train")
    assert [r["id"] for r in again] == [r["id"] for r in train]
    assert all(np.array_equal(a["motion"], b["motion"]) for a, b in zip(again, train))


def test_motion_whole_parts_and_validation():
    parts = motion.load_motion_clips("whole", window=None)
    assert len(parts) == 20 and sum(len(p["motion"]) for p in parts) == 1209
    assert len(motion.load_motion_clips("whole")) == 499  # windows across the split point too
    split = motion.load_motion_clips("all", window=None)  # each clip's train part, then each one's test part
    assert len(split) == 40 and sum(len(p["motion"]) for p in split) == 1209
    assert len(motion.motion_feature_names()) == motion.NUM_FEATURES
    for n in (25, 38, 133):
        assert 0 < motion.split_point(n) < n
    rows = motion.load_motion_clips("train")
    rows[0]["motion"][:] = 0.0  # rows are copies: the cache must not change
    assert motion.load_motion_clips("train")[0]["motion"][:, 1].min() > 0
    with pytest.raises(ValueError, match="known splits"):
        motion.load_motion_clips("valid")


# --------------------------------------------------------------------------- video


def test_video_archive_has_no_pickles():
    with np.load(video.DATA_FILE, allow_pickle=False) as z:
        for key in z.files:
            assert z[key].dtype != object, key
    assert video.DATA_FILE.stat().st_size < 4_000_000


@pytest.mark.parametrize("split", ["train", "test", "whole", "all"])
def test_video_rows_fields_and_ranges(split):
    rows = video.load_video_clips(split)
    assert rows
    for row in rows:
        assert set(row) == {"video", "fps", "label", "text", "clip", "start", "id"}
        v = row["video"]
        assert v.dtype == np.uint8 and v.shape == (video.NUM_PICTURES, video.SIDE, video.SIDE, 3)
        assert v.std() > 5.0  # real pictures, not a blank
        assert row["label"] in video.video_labels() and row["text"]
        assert row["fps"] > 1.0 and row["start"] >= 0
        assert row["id"].startswith(row["clip"] + "/")
    assert len({row["id"] for row in rows}) == len(rows)


def test_video_splits_disjoint_complete_and_deterministic():
    counts = {split: len(video.load_video_clips(split)) for split in video.SPLITS}
    assert counts == {"train": 17, "test": 8, "whole": 4, "all": 25}  # "all": train + test (29 before)
    train, test = video.load_video_clips("train"), video.load_video_clips("test")
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(video.video_labels())

    # Windows cover 32 source frames; a clip's test windows must not touch its train windows, and the
    # two carphone versions must share one split (the distorted copy of a test window is a near-copy).
    def spans(rows):
        return {
            (r["clip"].replace("_distorted", "_pristine"), f)
            for r in rows
            for f in range(r["start"], r["start"] + 32)
        }

    assert not spans(train) & spans(test)
    again = video.load_video_clips("train")
    assert [r["id"] for r in again] == [r["id"] for r in train]
    assert all(np.array_equal(a["video"], b["video"]) for a, b in zip(again, train))
    with pytest.raises(ValueError, match="known splits"):
        video.load_video_clips("valid")
