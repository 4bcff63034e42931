"""Frame answers, fifteenth audit: a generated MOTION or AUDIO target is held in ``.targets`` by its
column, read back as data (a pose clip ``[T, J]`` in the data's units; audio filterbank frames
``[T, 80]``), so ``chain`` passes a generated motion on. ``.targets`` was empty, ``chain`` refused
the column, and ``.frames`` held the rows stacked two frames a row and standardised by the task's
statistics, which no MOTION input reads. The tests failed before the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_gen.model import GeneralistModel, Link, chain, flavour
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.modalities.signals import MEL_BINS, MotionPreprocessor


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _motion_rows(n: int = 8, T: int = 12, J: int = 6) -> list[dict]:
    """Clips ``[T, J]`` on a scale and offset far from standardised units, of two kinds."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        kind = ["wave", "still"][i % 2]
        wave = np.sin(np.arange(T)[:, None] / 2.0 + np.arange(J)) if kind == "wave" else np.zeros((T, J))
        pose = 40.0 + 15.0 * (wave + 0.1 * rng.standard_normal((T, J)))
        rows.append({"desc": f"{kind} motion", "kind": kind, "pose": pose.astype(np.float32)})
    return rows


T2M = "[TEXT:desc] -> [MOTION:pose]"
READ = "[MOTION:pose] what movement? -> [TEXT:kind,closed_set]"


@pytest.fixture(scope="module")
def motion_model(tok):
    rows = _motion_rows()
    t2m, read = Task("t2m", T2M, rows), Task("pose_kind", READ, rows)
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug"), [t2m, read], tok).eval(), t2m, read


def test_a_motion_answer_is_a_pose_clip_in_the_data_units(motion_model):
    model, t2m, _ = motion_model
    answer = model.infer(t2m, [{"desc": "wave motion"}], max_frames=5)[0]
    rows_NF = answer.frames
    clip = answer.targets["pose"]
    assert isinstance(clip, np.ndarray) and clip.dtype == np.float32
    assert clip.shape == (2 * rows_NF.shape[0], 6)  # two frames a row, unstacked
    saved = model.encoding_statistics(t2m)["motion_normalisation"]
    expected = rows_NF.reshape(-1, 6).numpy() * np.asarray(saved["std"]) + np.asarray(saved["mean"])
    np.testing.assert_allclose(clip, expected, rtol=1e-5, atol=1e-4)


def test_chain_passes_a_generated_motion_to_a_motion_input(motion_model):
    model, t2m, read = motion_model
    out = chain(model, [{"desc": "wave motion"}, {"desc": "still motion"}],
                [Link(t2m, {"pose": "pose"}, {"max_frames": 5}), Link(read, {"kind": "kind"})])
    assert all(row["pose"].shape[1] == 6 and row["kind"] in ("wave", "still") for row in out)


def test_reading_back_undoes_the_encoding_of_a_motion_target(tok):
    """Equivalence: a target clip encoded as training encodes it and read back is the clip again,
    each column by its own statistics (a task with two MOTION columns of different scales)."""
    rows = [{"past": r["pose"], "future": 3.0 * r["pose"][::-1] - 100.0} for r in _motion_rows()]
    task = Task("predict", "[MOTION:past] -> [MOTION:future]", rows)
    plan = task.plan(tok)
    target = plan.templates[0][1][0]
    for index in (0, 1):
        chunk = next(c for c in task.encode(index, tok, training=False).decoder if c.loss)
        clip = plan.preprocessor(target).rows_to_value(chunk.rows, target.name)
        np.testing.assert_allclose(clip, rows[index]["future"], rtol=1e-5, atol=1e-3)


def test_an_audio_answer_is_its_filterbank_frames(tok):
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(4800) / 16000)).astype(np.float32)
    say = Task("say", "[TEXT:word] say it -> [AUDIO:clip]", [{"word": w, "clip": tone} for w in ("low", "high")])
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [say], tok).eval()
    answer = model.infer(say, [{"word": "low"}], max_frames=3)[0]
    features = answer.targets["clip"]
    assert features.shape == (4 * answer.frames.shape[0], MEL_BINS)
    np.testing.assert_array_equal(features, answer.frames.reshape(-1, MEL_BINS).numpy())


def test_motion_rows_without_statistics_are_refused():
    with pytest.raises(ValueError, match="the task has no motion statistics to undo that with"):
        MotionPreprocessor().rows_to_value(torch.zeros(3, 12), "pose")
    with pytest.raises(ValueError, match=r"the generated rows have 12 values, not 2 frames of the task's motion "
                                         r"statistics \(mean of shape \(4,\), std \(4,\)\)"):
        MotionPreprocessor(mean=np.zeros(4), std=np.ones(4)).rows_to_value(torch.zeros(3, 12), "pose")
