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


# --------------------------------------------------------------------------- from mutation testing


def _fake_motion_archive(path, clip_lengths=(10, 30), **override):
    """A tiny archive in the committed layout: clips of the given lengths, every frame standing still."""
    num = sum(clip_lengths)
    frame = np.zeros(motion.NUM_FEATURES, np.float32)
    frame[1] = 0.9
    for sl in motion.QUATERNION_SLICES.values():
        frame[sl.start] = 1.0
    arrays = {
        "format_version": np.int64(motion.FORMAT_VERSION),
        "fps": np.float32(motion.FPS),
        "frames": np.tile(frame, (num, 1)),
        "offsets": np.cumsum([0, *clip_lengths]).astype(np.int64),
        "names": np.array([f"clip{i}" for i in range(len(clip_lengths))]),
        "labels": np.array(["walk"] * len(clip_lengths)),
        "texts": np.array(["a person walks"] * len(clip_lengths)),
        "feature_names": np.array([f"f{i}" for i in range(motion.NUM_FEATURES)]),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def motion_archive(tmp_path, monkeypatch):
    """Point the loader at a fake archive written by the returned function (the cache cleared around)."""

    def use(**override):
        monkeypatch.setattr(motion, "DATA_FILE", _fake_motion_archive(tmp_path / "m.npz", **override))
        motion._read.cache_clear()

    yield use
    motion._read.cache_clear()


def test_motion_all_is_train_then_test_for_any_window_and_stride():
    for window, stride in ((motion.WINDOW, motion.STRIDE), (20, 5), (None, 1)):
        rows = motion.load_motion_clips("all", window=window, stride=stride)
        parts = [motion.load_motion_clips(s, window=window, stride=stride) for s in ("train", "test")]
        assert [r["id"] for r in rows] == [r["id"] for r in parts[0] + parts[1]], (window, stride)


def test_motion_split_point_and_argument_checks():
    # The last max(12, ceil(0.3 n)) frames are "test"; a clip of 12 frames or fewer is all "test".
    assert [motion.split_point(n) for n in (5, 12, 13, 25, 40, 41, 100)] == [0, 0, 1, 13, 28, 28, 70]
    with pytest.raises(ValueError, match="window must be a positive number of frames or None, got 0"):
        motion.load_motion_clips("train", window=0)
    with pytest.raises(ValueError, match="stride must be a positive number of frames, got 0"):
        motion.load_motion_clips("train", stride=0)
    with pytest.raises(ValueError, match="known splits: train, test, all, whole"):
        motion.load_motion_clips("valid")


def test_motion_ids_texts_and_labels():
    for row in motion.load_motion_clips("train", stride=7):
        assert row["id"] == f"{row['clip']}/{row['start']:03d}"
    for split in ("train", "test", "whole"):
        for row in motion.load_motion_clips(split, window=None):
            assert row["id"] == f"{row['clip']}/{split}"
    # the text is the clip's English description, not its name or kind
    walk = [r for r in motion.load_motion_clips("whole", window=None) if r["clip"] == "humanoid3d_walk"]
    assert len(walk) == 1 and walk[0]["label"] == "walk"
    assert walk[0]["text"].startswith("a person ") and "walk" in walk[0]["text"]
    labels = motion.motion_labels()
    assert labels == sorted(labels) and labels[:2] == ["backflip", "cartwheel"] and labels[-1] == "walk"


def test_motion_archive_checks_and_clips_shorter_than_the_test_part(motion_archive):
    motion_archive()  # clip0: 10 frames, all "test"; clip1: 30 frames, 18 + 12
    parts = {s: motion.load_motion_clips(s, window=None) for s in ("train", "test")}
    assert [(r["id"], len(r["motion"])) for r in parts["train"]] == [("clip1/train", 18)]
    assert [(r["id"], len(r["motion"])) for r in parts["test"]] == [("clip0/test", 10), ("clip1/test", 12)]
    assert [r["start"] for r in motion.load_motion_clips("test", window=10, stride=10)] == [0, 18]
    motion_archive(format_version=np.int64(2))
    with pytest.raises(ValueError, match="format 2 at 30.0 fps, this loader reads format 1"):
        motion.load_motion_clips("train")
    motion_archive(fps=np.float32(25.0))
    with pytest.raises(ValueError, match="format 1 at 25.0 fps"):
        motion.load_motion_clips("train")
    motion_archive(offsets=np.array([0, 10, 39]))
    with pytest.raises(ValueError, match="do not match; the file is damaged"):
        motion.load_motion_clips("train")


def _fake_video_archive(path, num_frames=2, side=video.SIDE, index_max=1, version=video.FORMAT_VERSION):
    sample_frames = np.zeros((1, video.NUM_PICTURES), np.int32)
    sample_frames[0, -1] = index_max
    frames = np.zeros((num_frames, side, side, 3), np.uint8)
    np.savez(path, format_version=np.int64(version), frames=frames, sample_frames=sample_frames)
    return path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"version": 2}, "format 2, this loader reads format 1"),
        ({"index_max": 2}, "pictures and sample indices do not match"),  # one past the last picture
        ({"side": 32}, "pictures and sample indices do not match"),
    ],
    ids=["format", "index", "shape"],
)
def test_video_damaged_archives_are_refused(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setattr(video, "DATA_FILE", _fake_video_archive(tmp_path / "v.npz", **kwargs))
    video._read.cache_clear()
    try:
        with pytest.raises(ValueError, match=message):
            video.load_video_clips("train")
    finally:
        video._read.cache_clear()


def test_video_all_ids_captions_and_labels():
    train, test = video.load_video_clips("train"), video.load_video_clips("test")
    assert [r["id"] for r in video.load_video_clips("all")] == [r["id"] for r in train + test]
    for row in train + test:
        assert row["id"] == f"{row['clip']}/{row['start']:03d}"
        assert row["text"] != row["label"] and len(row["text"].split()) >= 5  # a caption, not the label
    assert [r["id"] for r in video.load_video_clips("whole")] == [
        f"{c}/whole" for c in ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")
    ]
    assert video.video_labels() == ["animation", "street", "talking_head"]
    with pytest.raises(ValueError, match="known splits: train, test, whole, all"):
        video.load_video_clips("valid")


def test_video_windows_hold_every_second_source_frame_in_time_order():
    # A window starting d (even) source frames after another of its clip is that one shifted by d/2 pictures.
    rows = video.load_video_clips("all")
    pairs = [(a, b, (b["start"] - a["start"]) // 2) for a in rows for b in rows
             if a["clip"] == b["clip"] and 0 < b["start"] - a["start"] < 32 and b["start"] % 2 == a["start"] % 2]
    assert len(pairs) >= 10
    for a, b, k in pairs:
        assert np.array_equal(a["video"][k:], b["video"][: video.NUM_PICTURES - k]), (a["id"], b["id"])
    assert len({r["video"].tobytes() for r in rows}) == len(rows)
