"""Small, real, offline human motion-capture data for the built-in motion tasks.

``moe_gen/tasks/data/motion_clips.npz`` holds the 20 humanoid reference motions that pybullet ships
(DeepMimic clips: walk, run, jump, kick, cartwheel, ...); ``scripts/make_motion_data.py`` extracted them
once, resampled to 30 fps. Loading needs numpy only (no pybullet, no pickles).

``load_motion_clips`` cuts every clip into fixed-length windows (default `WINDOW` = 12 frames, 0.4 s,
every `STRIDE` = 2 frames), which gives 311 train and 85 test rows from 1,209 frames (40 s) of motion;
``window=None`` gives one row per clip part instead (motion of varying length, for text-to-motion).

Every row is a dict (`MotionRow`)::

    motion  float32 (frames, 43)  poses, layout below; root x and z re-centred at the row's first frame
    fps     float                 30.0
    label   str                   the motion kind, one of 15 (`motion_labels()`)
    text    str                   one English sentence describing the whole clip
    clip    str                   source clip, e.g. "humanoid3d_walk", "walker_turn_left0"
    start   int                   first frame of the row in its clip (30 fps frames)
    id      str                   "<clip>/<start, 3 digits>", or "<clip>/<split>" for whole parts

Frame layout (43 features; y is up, metres and radians; quaternions are (w, x, y, z), unit norm, and
sign-continuous over time; every joint rotation is relative to its parent)::

    0:3    root (pelvis) position x, y, z      y is the height (about 0.85 m standing)
    3:7    root orientation                    7:11   chest        11:15  neck
    15:19  right hip        19  right knee angle   20:24  right ankle   24:28  right shoulder
    28     right elbow angle
    29:33  left hip         33  left knee angle    34:38  left ankle    38:42  left shoulder
    42     left elbow angle

The root's x and z say where on the floor the body is, which grows with time for any locomotion clip, so
a row's x and z are taken relative to its first frame: the row keeps how far it travels, not where it
started. Height, orientation and joint angles are as recorded.

Split rule: by time within each clip, so the two splits share no frame. A clip of n frames gives its last
``max(12, ceil(0.3 n))`` frames to "test" and the rest to "train" (`split_point`); windows never cross
that point. The rule does not depend on the window size, so changing `window` cannot move a frame from
one split to the other. With the default window every label (and every clip) has rows in both splits;
the shortest clip (run, 25 frames) gives one window to each. ``"all"`` is the train rows, then the test
rows. ``"whole"`` windows whole clips, ignoring the split point (499 windows, which overlap both splits:
for splits of one's own, such as ``moe_gen.quality``'s held-out clips); before the thirteenth audit that
was ``"all"``, so the presets' ``"all"`` held 158 windows of neither split and missed 55 test ones.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TypedDict

import numpy as np

__all__ = [
    "ANGLE_COLUMNS",
    "FPS",
    "MotionRow",
    "NUM_FEATURES",
    "QUATERNION_SLICES",
    "SPLITS",
    "STRIDE",
    "WINDOW",
    "load_motion_clips",
    "motion_feature_names",
    "motion_labels",
    "split_point",
]

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "motion_clips.npz"
FORMAT_VERSION = 1
FPS = 30.0
NUM_FEATURES = 43
WINDOW = 12  # frames per window (0.4 s): the longest for which every clip has train and test windows
STRIDE = 2  # frames between window starts
SPLITS = ("train", "test", "all", "whole")
TEST_FRACTION = 0.3  # share of each clip's frames, at its end, that goes to "test"
MIN_TEST_FRAMES = 12  # ...but at least this many, so that the test part holds one default window
# Where each quaternion starts, by joint; the 1-DoF joints' columns. See the layout in the docstring.
QUATERNION_SLICES: dict[str, slice] = {
    joint: slice(start, start + 4)
    for joint, start in (
        ("root", 3), ("chest", 7), ("neck", 11), ("right_hip", 15), ("right_ankle", 20),
        ("right_shoulder", 24), ("left_hip", 29), ("left_ankle", 34), ("left_shoulder", 38),
    )
}  # fmt: skip
ANGLE_COLUMNS: dict[str, int] = {"right_knee": 19, "right_elbow": 28, "left_knee": 33, "left_elbow": 42}


class MotionRow(TypedDict):
    """One window (or clip part); see the module docstring for what each field holds."""

    motion: np.ndarray
    fps: float
    label: str
    text: str
    clip: str
    start: int
    id: str


class _Clips(TypedDict):
    frames: np.ndarray  # float32 (N, 43), read-only
    offsets: np.ndarray  # int64 (C+1,)
    names: np.ndarray  # str (C,)
    labels: np.ndarray  # str (C,)
    texts: np.ndarray  # str (C,)
    feature_names: np.ndarray  # str (43,)


@functools.cache
def _read() -> _Clips:
    """Read the committed archive once (layout in scripts/make_motion_data.py)."""
    if not DATA_FILE.is_file():
        raise FileNotFoundError(f"{DATA_FILE} is missing; it is made by scripts/make_motion_data.py")
    with np.load(DATA_FILE, allow_pickle=False) as z:
        version, fps = int(z["format_version"]), float(z["fps"])
        if version != FORMAT_VERSION or fps != FPS:
            raise ValueError(
                f"{DATA_FILE}: format {version} at {fps} fps, this loader reads format {FORMAT_VERSION} "
                f"at {FPS} fps; regenerate it with scripts/make_motion_data.py"
            )
        clips = _Clips(
            frames=z["frames"],
            offsets=z["offsets"].astype(np.int64),
            names=z["names"],
            labels=z["labels"],
            texts=z["texts"],
            feature_names=z["feature_names"],
        )
    frames, offsets = clips["frames"], clips["offsets"]
    if frames.shape[1:] != (NUM_FEATURES,) or offsets[0] != 0 or offsets[-1] != len(frames):
        raise ValueError(f"{DATA_FILE}: frames and offsets do not match; the file is damaged")
    frames.flags.writeable = False  # cached and shared between calls: rows get copies
    return clips


def split_point(num_frames: int) -> int:
    """Where a clip's test part begins.

    Args:
        num_frames: length of the clip in 30 fps frames.

    Returns:
        b such that frames [0, b) are "train" and [b, num_frames) are "test".
    """
    return max(0, num_frames - max(MIN_TEST_FRAMES, math.ceil(TEST_FRACTION * num_frames)))


def motion_labels() -> list[str]:
    """The 15 motion kinds, sorted ("backflip", "cartwheel", ..., "walk")."""
    return sorted({str(label) for label in _read()["labels"]})


def motion_feature_names() -> list[str]:
    """Names of the 43 features, in column order ("root_pos_x", ..., "left_elbow")."""
    return [str(name) for name in _read()["feature_names"]]


def _row(clip_TF: np.ndarray, start: int, stop: int, clips: _Clips, c: int, row_id: str) -> MotionRow:
    """Cut frames [start, stop) of one clip into a row, root x/z re-centred at its first frame."""
    motion = clip_TF[start:stop].copy()
    motion[:, [0, 2]] -= motion[0, [0, 2]]
    return MotionRow(
        motion=motion,
        fps=FPS,
        label=str(clips["labels"][c]),
        text=str(clips["texts"][c]),
        clip=str(clips["names"][c]),
        start=start,
        id=row_id,
    )


def load_motion_clips(
    split: str = "train", window: int | None = WINDOW, stride: int = STRIDE
) -> list[MotionRow]:
    """Human motion-capture windows (or clip parts) with their motion kind and a description.

    Args:
        split: "train", "test", "all" (train, then test) or "whole"; the rule is in the module docstring.
        window: frames per row; None gives one row per clip part (the clip's train or test part, or the
            whole clip for "whole"), of varying length.
        stride: frames between consecutive window starts (ignored when window is None).

    Returns:
        rows in clip order, then by start frame (for "all": the train rows, then the test rows); each
        motion float32 (window, 43) at 30 fps. A clip part shorter than `window` contributes no row.
    """
    if split == "all":
        return load_motion_clips("train", window, stride) + load_motion_clips("test", window, stride)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of frames or None, got {window}")
    if stride < 1:
        raise ValueError(f"stride must be a positive number of frames, got {stride}")
    clips = _read()
    offsets = clips["offsets"]
    rows: list[MotionRow] = []
    for c in range(len(offsets) - 1):
        clip_TF = clips["frames"][offsets[c] : offsets[c + 1]]
        n = len(clip_TF)
        lo, hi = {"train": (0, split_point(n)), "test": (split_point(n), n), "whole": (0, n)}[split]
        name = str(clips["names"][c])
        if window is None:
            if hi > lo:
                rows.append(_row(clip_TF, lo, hi, clips, c, f"{name}/{split}"))
            continue
        for start in range(lo, hi - window + 1, stride):
            rows.append(_row(clip_TF, start, start + window, clips, c, f"{name}/{start:03d}"))
    return rows
