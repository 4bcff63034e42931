"""Extract the human motion-capture clips that pybullet ships into ``moe_gen/tasks/data/motion_clips.npz``.

Run once by hand; the output is committed, so tests and the package never need pybullet:

Usage:
    .venv/bin/python -m pip install pybullet==3.2.7          # only for this script
    .venv/bin/python scripts/make_motion_data.py             # writes moe_gen/tasks/data/motion_clips.npz
    .venv/bin/python scripts/make_motion_data.py --check     # rebuild in a temp dir, compare byte for byte

Source: ``pybullet_data.getDataPath()/data/motions``, the DeepMimic reference motions (Peng et al.,
2018, "DeepMimic: example-guided deep reinforcement learning of physics-based character skills").
Of its 21 files we take the 20 humanoid ones (15 ``humanoid3d_*.txt`` and 5 ``walker/*.txt``) and skip
``laikago_walk.txt``, a quadruped robot with 20 numbers per frame and another skeleton.

Each file is JSON ``{"Loop": "wrap" | "none", "Frames": [[44 floats], ...]}``. The 44 numbers of a
frame, as pybullet's own reader (pybullet_envs/deep_mimic/env/humanoid_pose_interpolator.py) uses them;
quaternions are stored (w, x, y, z), scalar first; the world is y-up, metres and radians:

    col   0        duration: seconds from this keyframe to the next (0 or a repeat on the last)
    cols  1:4      root (pelvis) position x, y, z; y is height (about 0.85 m standing)
    cols  4:8      root orientation quaternion
    cols  8:12     chest        quaternion (relative to its parent)
    cols 12:16     neck         quaternion
    cols 16:20     right hip    quaternion
    col  20        right knee   angle (1-DoF revolute joint)
    cols 21:25     right ankle  quaternion
    cols 25:29     right shoulder quaternion
    col  29        right elbow  angle
    cols 30:34     left hip     quaternion
    col  34        left knee    angle
    cols 35:39     left ankle   quaternion
    cols 39:43     left shoulder quaternion
    col  43        left elbow   angle

We store the 43 pose columns (1..43) and the durations apart; in the stored pose layout every index is
the file's minus one (root position 0:3, root quaternion 3:7, ..., left elbow 42), and the names of the
43 features are in the file (``feature_names``).

Processing: the keyframes come at 16, 24, 30 or 60 fps, and one clip (roll) mixes 1/60 s and 1/30 s
steps. For fixed-length windows to mean the same time span in every clip, every clip is resampled to
30 fps on its own keyframe times (position and the four 1-DoF angles linearly, the nine quaternions by
spherical linear interpolation). Some file quaternions are far from unit norm (down to 0.58 in
kick's right hip), so quaternions are normalised first; then each joint's quaternion track is given one
sign per frame so that consecutive frames lie in the same hemisphere (q and -q are the same rotation, and
a track that flips sign would look like a jump to a network), starting with w >= 0. The raw keyframes are
kept too, untouched apart from float32, for anyone who wants them.

File layout (keys of the .npz; C clips, N resampled frames, M raw keyframes, all arrays, no pickles):
    format_version   int64 ()          1
    fps              float32 ()        30.0, the rate of ``frames``
    feature_names    <U (43,)          "root_pos_x", ..., "root_rot_w", ..., "left_elbow"
    frames           float32 (N, 43)   resampled poses, clips end to end
    offsets          int64 (C+1,)      clip i is frames[offsets[i]:offsets[i+1]]
    raw_frames       float32 (M, 43)   the file keyframes' pose columns 1..43, unchanged
    raw_durations    float32 (M,)      the file's column 0
    raw_offsets      int64 (C+1,)      clip i is raw_frames[raw_offsets[i]:raw_offsets[i+1]]
    names            <U (C,)           "humanoid3d_walk", "walker_turn_left0", ...
    labels           <U (C,)           the motion kind: "walk", "run", "jump", "kick", ...
    texts            <U (C,)           one English sentence per clip, written for text-to-motion
    loops            bool (C,)         True where the file says "Loop": "wrap" (a cycle that repeats)
    source_files     <U (C,)           path under pybullet_data, e.g. "data/motions/humanoid3d_walk.txt"

The descriptions were written from the file names and checked against the data (which hip or shoulder
moves most, how far the root travels and turns, whether it goes upside down).

Determinism: JSON parsing and the resampling are plain arithmetic, and the archive is written with fixed
member timestamps and order (``np.savez_compressed`` stamps the current time), so two runs give identical
bytes. Another zlib could change the compressed bytes (never the arrays); ``--check`` tells.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from moe_gen.tasks.sources.npz import matches_fresh_build, write_npz

FORMAT_VERSION = 1
FPS = 30.0
OUT_FILE = Path(__file__).resolve().parents[1] / "moe_gen" / "tasks" / "data" / "motion_clips.npz"

# (file under data/motions, label, description). Label = the motion kind in the file name; the two
# dances and the two get-ups share a label, and the five "walker" clips are walk / turn_left / turn_right.
CLIPS: tuple[tuple[str, str, str], ...] = (
    ("humanoid3d_backflip.txt", "backflip",
     "a person jumps up, flips backwards through the air and lands on their feet"),
    ("humanoid3d_cartwheel.txt", "cartwheel",
     "a person does a cartwheel, going sideways over their hands and back onto their feet"),
    ("humanoid3d_crawl.txt", "crawl", "a person crawls forward on hands and knees, close to the ground"),
    ("humanoid3d_dance_a.txt", "dance",
     "a person dances, stepping and swinging both arms while turning a full circle"),
    ("humanoid3d_dance_b.txt", "dance", "a person dances on the spot, bouncing and waving bent arms"),
    ("humanoid3d_getup_facedown.txt", "getup",
     "a person lying face down pushes up off the ground and rises to standing"),
    ("humanoid3d_getup_faceup.txt", "getup", "a person lying on their back turns over and gets up"),
    ("humanoid3d_jump.txt", "jump",
     "a person swings the arms, crouches and jumps forward about a metre, landing on both feet"),
    ("humanoid3d_kick.txt", "kick", "a person with raised fists turns and kicks high with the left leg"),
    ("humanoid3d_punch.txt", "punch", "a person in a fighting stance throws a punch with the right arm"),
    ("humanoid3d_roll.txt", "roll", "a person dives into a forward roll on the ground and comes back up"),
    ("humanoid3d_run.txt", "run", "a person runs forward fast"),
    ("humanoid3d_spin.txt", "spin", "a person spins round twice on the spot"),
    ("humanoid3d_spinkick.txt", "spinkick", "a person spins round once and kicks high with the right leg"),
    ("humanoid3d_walk.txt", "walk", "a person walks forward at a steady pace"),
    ("walker/0walk_forward.txt", "walk", "a person walks straight ahead"),
    ("walker/turn_left0.txt", "turn_left", "a person walks forward, bearing slightly to the left"),
    ("walker/turn_left1.txt", "turn_left", "a person walks forward and turns to the left"),
    ("walker/turn_right0.txt", "turn_right", "a person walks forward and turns sharply to the right"),
    ("walker/turn_right1.txt", "turn_right", "a person walks forward and turns to the right"),
)  # fmt: skip

# Pose columns (after dropping the duration) that start a (w, x, y, z) quaternion, and those holding a
# 1-DoF angle; the rest (0:3) is the root position. Same order as the module docstring.
QUAT_STARTS = (3, 7, 11, 15, 20, 24, 29, 34, 38)
QUAT_NAMES = (
    "root_rot", "chest", "neck", "right_hip", "right_ankle", "right_shoulder",
    "left_hip", "left_ankle", "left_shoulder",
)  # fmt: skip
ANGLE_COLS = {19: "right_knee", 28: "right_elbow", 33: "left_knee", 42: "left_elbow"}
NUM_FEATURES = 43


def feature_names() -> list[str]:
    """Names of the 43 stored pose columns, in order ("root_pos_x", ..., "left_elbow")."""
    names = [""] * NUM_FEATURES
    names[0:3] = ["root_pos_x", "root_pos_y", "root_pos_z"]
    for start, joint in zip(QUAT_STARTS, QUAT_NAMES):
        names[start : start + 4] = [f"{joint}_{c}" for c in "wxyz"]
    for col, joint in ANGLE_COLS.items():
        names[col] = joint
    assert all(names), "every column must be named exactly once"
    return names


def read_clip(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read one DeepMimic motion file.

    Args:
        path: a ``.txt`` JSON file with "Loop" and "Frames".

    Returns:
        pose_MF float64 (M, 43) keyframe poses; durations_M float64 (M,); whether the clip loops.
    """
    data = json.loads(path.read_text())
    frames = np.asarray(data["Frames"], dtype=np.float64)
    if frames.ndim != 2 or frames.shape[1] != NUM_FEATURES + 1:
        raise ValueError(f"{path}: expected frames of {NUM_FEATURES + 1} numbers, got shape {frames.shape}")
    durations = frames[:, 0]
    # The last keyframe's duration is 0 or a copy of the step; every earlier one must move time on.
    if not np.all(durations[:-1] > 0):
        raise ValueError(f"{path}: a keyframe before the last has a non-positive duration")
    return frames[:, 1:], durations, data.get("Loop") == "wrap"


def _normalise(q_TQ: np.ndarray) -> np.ndarray:
    """Unit-normalise quaternions along the last axis (shape unchanged)."""
    return q_TQ / np.linalg.norm(q_TQ, axis=-1, keepdims=True)


def slerp(q0_T4: np.ndarray, q1_T4: np.ndarray, u_T: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions, row by row.

    Args:
        q0_T4: start quaternions (T, 4), unit norm.
        q1_T4: end quaternions (T, 4), unit norm.
        u_T: fractions in [0, 1], shape (T,).

    Returns:
        (T, 4) unit quaternions on the shorter arc from q0 to q1.
    """
    dot_T = np.sum(q0_T4 * q1_T4, axis=-1)
    # q and -q are one rotation: flip the end so that we take the short way round.
    q1_T4 = np.where(dot_T[:, None] < 0, -q1_T4, q1_T4)
    dot_T = np.clip(np.abs(dot_T), 0.0, 1.0)
    theta_T = np.arccos(dot_T)
    sin_T = np.sin(theta_T)
    # Where the two are (nearly) equal sin(theta) -> 0 and the slerp weights are 0/0; a normalised lerp
    # is exact to rounding there.
    near = sin_T < 1e-6
    safe_sin = np.where(near, 1.0, sin_T)
    w0_T = np.where(near, 1.0 - u_T, np.sin((1.0 - u_T) * theta_T) / safe_sin)
    w1_T = np.where(near, u_T, np.sin(u_T * theta_T) / safe_sin)
    return _normalise(w0_T[:, None] * q0_T4 + w1_T[:, None] * q1_T4)


def continuous_signs(q_T4: np.ndarray) -> np.ndarray:
    """Choose the sign of each quaternion so the track has no hemisphere flips.

    Args:
        q_T4: (T, 4) unit quaternions (w, x, y, z) of one joint over time.

    Returns:
        (T, 4) the same rotations; the first has w >= 0 and consecutive ones have a dot product >= 0.
    """
    step_T = np.sign(np.sum(q_T4[1:] * q_T4[:-1], axis=-1))
    step_T[step_T == 0] = 1.0
    first = -1.0 if q_T4[0, 0] < 0 else 1.0
    sign_T = np.concatenate([[first], first * np.cumprod(step_T)])
    return q_T4 * sign_T[:, None]


def resample(pose_MF: np.ndarray, durations_M: np.ndarray, fps: float = FPS) -> np.ndarray:
    """Resample one clip's keyframes to a fixed frame rate.

    Args:
        pose_MF: (M, 43) keyframe poses in the stored layout.
        durations_M: (M,) seconds from each keyframe to the next (the last is ignored).
        fps: output frame rate.

    Returns:
        (T, 43) poses at times 0, 1/fps, ... up to the last keyframe's time, quaternions unit-norm and
        sign-continuous.
    """
    times_M = np.concatenate([[0.0], np.cumsum(durations_M[:-1])])
    # The files round their steps (1/30 s is written 0.033332), so a clip meant to last a whole number
    # of output frames sums a little short; the 0.01-frame slack keeps its last frame (u is clipped to 1
    # below, so the overshoot of at most 0.01 frame never extrapolates).
    num_out = int(math.floor(times_M[-1] * fps + 0.01)) + 1
    t_T = np.arange(num_out, dtype=np.float64) / fps
    left_T = np.clip(np.searchsorted(times_M, t_T, side="right") - 1, 0, len(times_M) - 2)
    u_T = np.clip((t_T - times_M[left_T]) / (times_M[left_T + 1] - times_M[left_T]), 0.0, 1.0)
    a_TF, b_TF = pose_MF[left_T], pose_MF[left_T + 1]
    out_TF = a_TF + u_T[:, None] * (b_TF - a_TF)  # right for position and the 1-DoF angles
    for start in QUAT_STARTS:
        q = slerp(_normalise(a_TF[:, start : start + 4]), _normalise(b_TF[:, start : start + 4]), u_T)
        out_TF[:, start : start + 4] = continuous_signs(q)
    return out_TF


def motions_dir() -> Path:
    """Where pybullet_data keeps the motion files (imports pybullet_data, a data-only module)."""
    try:
        import pybullet_data
    except ImportError as err:
        raise SystemExit("this script needs pybullet: .venv/bin/python -m pip install pybullet") from err
    return Path(pybullet_data.getDataPath()) / "data" / "motions"


def build(out_path: Path) -> None:
    """Read the 20 clips, resample them and write the archive to `out_path`."""
    src = motions_dir()
    poses, raws, durs, loops = [], [], [], []
    for rel, _, _ in CLIPS:
        raw_MF, dur_M, loop = read_clip(src / rel)
        poses.append(resample(raw_MF, dur_M))
        raws.append(raw_MF)
        durs.append(dur_M)
        loops.append(loop)

    def offsets(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "fps": np.array(FPS, dtype=np.float32),
        "feature_names": np.array(feature_names()),
        "frames": np.concatenate(poses).astype(np.float32),
        "offsets": offsets(poses),
        "raw_frames": np.concatenate(raws).astype(np.float32),
        "raw_durations": np.concatenate(durs).astype(np.float32),
        "raw_offsets": offsets(raws),
        "names": np.array([rel.removesuffix(".txt").replace("/", "_") for rel, _, _ in CLIPS]),
        "labels": np.array([label for _, label, _ in CLIPS]),
        "texts": np.array([text for _, _, text in CLIPS]),
        "loops": np.array(loops, dtype=bool),
        "source_files": np.array([f"data/motions/{rel}" for rel, _, _ in CLIPS]),
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
        offsets = z["offsets"]
        print(
            f"wrote {args.out}: {len(z['names'])} clips, {offsets[-1]} frames at {float(z['fps']):g} fps "
            f"({len(z['raw_frames'])} raw keyframes), {args.out.stat().st_size / 1e6:.2f} MB"
        )
        for name, label, n in zip(z["names"], z["labels"], np.diff(offsets)):
            print(f"  {name:32s} {label:10s} {n:4d} frames  {(n - 1) / FPS:5.2f} s")


if __name__ == "__main__":
    main()
