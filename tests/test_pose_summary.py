"""MOTION read as window statistics (``preprocess=pose_summary``): the row is the classical
baseline's pose features standardised with the training rows' statistics, which are saved with
the model; windows follow ``max_length``; bad values and slots are refused naming what is wrong;
the quality suite declares motion classification with it on request."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import train_steps

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.quality.runner import BenchConfig
from moe_gen.quality.suite import pose_features, suite_tasks
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.plan import TaskDataError

INSTRUCTION = "[MOTION:motion,preprocess=pose_summary] what is the person doing? -> [TEXT:label,closed_set]"


def _rows(count: int, seed: int, frames: int = 6, features: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = ("wave", "jump")[i % 2]
        base = rng.normal(size=(frames, features)) * (1 + 3 * (i % 2))  # "jump" moves more
        rows.append({"motion": (base + 10 * rng.normal(size=features)).tolist(), "label": label})
    return rows


TRAIN, HELD_OUT = _rows(12, 0), _rows(4, 1)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def summary(task: Task, row: dict, tok: Tokenizer, statistics=None, training: bool = False, seed: int = 0):
    chunk = task.plan(tok, statistics).encode(row, 0, rng=random.Random(seed), training=training).encoder[0]
    assert chunk.adaptor == "pose_summary" and chunk.tokens is None
    return chunk.rows


def test_the_row_is_the_classical_pose_features_standardised_with_the_training_rows(tok):
    task = Task("moves", INSTRUCTION, TRAIN)
    features = pose_features(TRAIN)
    mean, std = features.mean(0), features.std(0)
    for row in TRAIN + HELD_OUT:
        expected = (pose_features([row]) - mean) / std
        got = summary(task, row, tok)
        assert got.shape == (1, 12) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    one_frame = summary(task, {"motion": [[1.0, 2.0, 3.0, 4.0]], "label": "wave"}, tok)
    np.testing.assert_allclose(one_frame[0, 8:].numpy(), (0 - mean[8:]) / std[8:], atol=1e-5)  # no change


def test_a_motion_window_may_be_fixed_with_min_length_equal_to_max_length(tok):
    """min_length == max_length is a fixed window, not an empty range: planned, and with the
    clip's own length (6 frames) every training read is the whole clip, as evaluation reads it."""
    fixed = Task("moves", INSTRUCTION.replace("pose_summary", "pose_summary,min_length=6,max_length=6"), TRAIN)
    row = dict(TRAIN[0])
    whole = summary(Task("moves", INSTRUCTION, TRAIN), row, tok)
    assert torch.equal(summary(fixed, row, tok), whole)
    for seed in range(3):
        assert torch.equal(summary(fixed, row, tok, training=True, seed=seed), whole)


def test_window_statistics_by_hand():
    """Mean, population std, then mean |frame-to-frame change|, feature by feature; two frames have
    one change, one frame none."""
    from moe_gen.tasks.modalities.pose_summary import pose_summary

    np.testing.assert_allclose(pose_summary([[0.0, 1.0], [2.0, -1.0]]), [1.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(pose_summary([[0.0], [3.0], [1.0]]), [4 / 3, np.sqrt(14) / 3, 2.5])
    np.testing.assert_allclose(pose_summary([[5.0, 6.0]]), [5.0, 6.0, 0.0, 0.0, 0.0, 0.0])


def test_windows_follow_max_length_random_in_training_and_first_otherwise(tok):
    instruction = INSTRUCTION.replace("pose_summary", "pose_summary,max_length=3")
    task = Task("moves", instruction, TRAIN)
    statistics = task.fit_statistics()["pose_summary"]["motion"]
    first = [pose_features([{"motion": r["motion"][:3]}])[0] for r in TRAIN]
    np.testing.assert_allclose(statistics["mean"], np.mean(first, 0), atol=1e-9)  # fitted on first windows
    row = TRAIN[1]
    expected = (pose_features([{"motion": row["motion"][:3]}]) - statistics["mean"]) / statistics["std"]
    np.testing.assert_allclose(summary(task, row, tok).numpy(), expected, atol=1e-5)
    drawn = {tuple(summary(task, row, tok, training=True, seed=s)[0, :4].tolist()) for s in range(12)}
    windows = {tuple(((pose_features([{"motion": row["motion"][s:s + 3]}]) - statistics["mean"])
                      / statistics["std"])[0, :4].astype(np.float32).tolist()) for s in range(4)}
    assert len(drawn) > 1 and drawn <= windows  # several of the four 3-frame windows, nothing else


def test_statistics_come_from_training_rows_and_are_saved_with_the_model(tok, tmp_path):
    train, test = Task("moves", INSTRUCTION, TRAIN), Task("moves", INSTRUCTION, HELD_OUT)
    stats = train.fit_statistics()["pose_summary"]["motion"]
    assert len(stats["mean"]) == len(stats["std"]) == 12
    assert test.fit_statistics()["pose_summary"]["motion"] != stats
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), [train], tok)
    assert model.config.adapters["pose_summary"] == 12
    train_steps(model, train, tok)
    assert model.adapters["pose_summary"].mlp[0].weight.grad.abs().sum() > 0  # the adapter trains
    model.eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "m"))
    empty = Task("moves", INSTRUCTION, [])  # nothing to fit on
    plan_stats = loaded.encoding_statistics(empty)
    for row in HELD_OUT:
        assert torch.equal(summary(empty, row, loaded.tokenizer, plan_stats), summary(train, row, tok))
    with pytest.raises(TaskDataError, match=r"task 'moves', column 'motion', row 1: pose_summary has no statistics"):
        test.encode(1, tok, statistics={})
    expected = [p.text for p in model.infer(train, HELD_OUT)]
    assert [p.text for p in loaded.infer(empty, HELD_OUT)] == expected


def test_bad_values_slots_and_statistics_are_refused_naming_them(tok):
    bad = TRAIN + [{"motion": [[1.0, float("nan"), 0.0, 0.0]], "label": "wave"},
                   {"motion": [[1.0, 2.0]] * 3, "label": "jump"}]
    task = Task("moves", INSTRUCTION, bad)
    with pytest.raises(TaskDataError, match=r"task 'moves', column 'motion', row 12: motion frames have non-finite"):
        task.encode(12, tok)
    with pytest.raises(TaskDataError, match=r"task 'moves', column 'motion', row 13: the clip has 2 features a "
                                            r"frame, the task's pose_summary statistics 4"):
        task.encode(13, tok)
    assert task.fit_statistics()["pose_summary"] == Task("moves", INSTRUCTION, TRAIN).fit_statistics()["pose_summary"]
    text = Task("moves", "[TEXT:motion,preprocess=pose_summary] -> [TEXT:label]", TRAIN)
    with pytest.raises(ValueError, match="pose_summary reads pose frames; declare the slot as MOTION"):
        text.plan(tok)
    target = Task("moves", "[TEXT:label] -> [MOTION:motion,preprocess=pose_summary]", TRAIN)
    with pytest.raises(ValueError, match="only the encoder reads; use it on an input slot"):
        target.plan(tok)
    corrupt = {"pose_summary": {"motion": {"mean": [0.0] * 12, "std": [1.0] * 11 + [0.0]}}}
    with pytest.raises(ValueError, match=r"preprocessor 'pose_summary': pose_summary statistics of column "
                                         r"'motion': need equal-length mean and std"):
        Task("moves", INSTRUCTION, HELD_OUT).plan(tok, corrupt)
    not_three = {"pose_summary": {"motion": {"mean": [0.0] * 4, "std": [1.0] * 4}}}  # 3 statistics a feature
    with pytest.raises(ValueError, match=r"pose_summary statistics of column 'motion': need equal-length mean and "
                                         r"std of 3·J values"):
        Task("moves", INSTRUCTION, HELD_OUT).plan(tok, not_three)


def test_the_suite_declares_motion_as_window_statistics_on_request():
    plain, = suite_tasks(["motion_classification"])
    summarised, = suite_tasks(["motion_classification"], pose_summary=True)

    def preprocess(task):
        return [s.attrs["preprocess"] for s in task.build("test").instruction.encoder_slots if "preprocess" in s.attrs]

    assert preprocess(plain) == [] and preprocess(summarised) == ["pose_summary"]
    both = suite_tasks(["motion_classification", "doc_topic"], pose_summary=True, bag_of_words=True)
    assert [preprocess(t) for t in both] == [["pose_summary"], ["bag_of_words"]]  # they combine
    assert BenchConfig(pose_summary=True, pretrained_inputs=True).pose_summary


def test_feature_noise_perturbs_training_rows_only_by_gaussian_noise_of_its_std(tok):
    noisy = Task("moves", INSTRUCTION.replace("pose_summary", "pose_summary,feature_noise=0.5"), TRAIN)
    clean = Task("moves", INSTRUCTION, TRAIN)
    assert noisy.fit_statistics() == clean.fit_statistics()  # statistics are read without noise
    row = TRAIN[3]
    exact = summary(clean, row, tok)
    assert torch.equal(summary(noisy, row, tok), exact)  # evaluation reads the exact row
    draws = torch.cat([summary(noisy, row, tok, training=True, seed=s) - exact for s in range(400)])
    assert torch.equal(summary(noisy, row, tok, training=True, seed=7) - exact, draws[7:8])  # seeded
    assert abs(draws.mean().item()) < 0.02 and abs(draws.std().item() - 0.5) < 0.02  # N(0, 0.5²)
    assert abs(np.corrcoef(draws[:, 0].numpy(), draws[:, 1].numpy())[0, 1]) < 0.15  # independent features
    assert torch.equal(summary(clean, row, tok, training=True, seed=7), exact)  # no noise unless asked
    with pytest.raises(ValueError, match="feature_noise perturbs window statistics; it applies to "
                                         "preprocess=pose_summary only"):
        Task("moves", "[MOTION:motion,feature_noise=0.5] what is the person doing? -> [TEXT:label]", TRAIN).plan(tok)
    with pytest.raises(ValueError, match=r"task 'moves': bad value for 'feature_noise': expected float >= 0, "
                                         r"got '-1'"):
        Task("moves", INSTRUCTION.replace("pose_summary", "pose_summary,feature_noise=-1"), TRAIN)


def test_the_bench_adds_pose_noise_to_the_summarised_motion_slot():
    noisy, = suite_tasks(["motion_classification"], pose_summary=True, pose_noise=0.75)
    slot, = [s for s in noisy.build("train").instruction.encoder_slots if "preprocess" in s.attrs]
    assert (slot.attrs["preprocess"], slot.attrs["feature_noise"]) == ("pose_summary", 0.75)
    with pytest.raises(ValueError, match="pose_noise and pose_min_length change the pose-summary rows; they need "
                                         "pose_summary"):
        suite_tasks(["motion_classification"], pose_noise=0.75)
    with pytest.raises(ValueError, match="BenchConfig.pose_noise must be >= 0"):
        BenchConfig(pose_noise=0.5)
    with pytest.raises(ValueError, match="BenchConfig.pose_noise must be >= 0"):
        BenchConfig(pose_summary=True, pose_noise=-0.5)
    cropped, = suite_tasks(["motion_classification"], pose_summary=True, pose_noise=1.0, pose_min_length=9)
    slot, = [s for s in cropped.build("train").instruction.encoder_slots if "preprocess" in s.attrs]
    assert (slot.attrs["feature_noise"], slot.attrs["min_length"]) == (1.0, 9)
    with pytest.raises(ValueError, match="BenchConfig.pose_min_length must be >= 0 and shortens"):
        BenchConfig(pose_min_length=9)


def test_min_length_summarises_a_random_stretch_of_the_window_in_training_only(tok):
    """``min_length`` on a MOTION slot: each training read takes a window of a random length from
    min_length up to max_length (or the clip) at a random start; evaluation reads the full first
    window. For pose_summary the row then holds the statistics of that stretch."""
    from moe_gen.tasks.modalities.signals import motion_window

    clip = np.arange(12 * 2, dtype=np.float64).reshape(12, 2)
    def motion_slot(instruction: str):
        return next(s for s in Task("moves", instruction, TRAIN).instruction.encoder_slots if s.modality == "MOTION")

    slot = motion_slot("[MOTION:motion,min_length=4,max_length=8] what? -> [TEXT:label]")
    assert np.array_equal(motion_window(clip, slot), clip[:8])  # evaluation: the full first window
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        window = motion_window(clip, slot, rng)
        assert 4 <= len(window) <= 8 and np.array_equal(window, clip[int(window[0, 0]) // 2:][:len(window)])
        seen.add((len(window), int(window[0, 0]) // 2))
    assert {n for n, _ in seen} == set(range(4, 9)) and {start for _, start in seen} == set(range(0, 9))
    # without min_length a training window keeps max_length frames, as before
    plain = motion_slot("[MOTION:motion,max_length=8] what? -> [TEXT:label]")
    assert {len(motion_window(clip, plain, rng)) for _ in range(50)} == {8}

    cropped = Task("moves", INSTRUCTION.replace("pose_summary", "pose_summary,min_length=3"), TRAIN)
    row = dict(TRAIN[0])
    assert torch.equal(summary(cropped, row, tok), summary(Task("moves", INSTRUCTION, TRAIN), row, tok))
    frames = np.asarray(row["motion"])
    statistics = cropped.fit_statistics()["pose_summary"]["motion"]
    mean, std = np.asarray(statistics["mean"]), np.asarray(statistics["std"])
    stretches = [pose_features([{"motion": frames[a:b]}])[0] for a in range(6) for b in range(a + 3, 7)]
    for seed in range(20):  # every training row is the standardised statistics of some stretch of >= 3 frames
        drawn = summary(cropped, row, tok, training=True, seed=seed)[0].double().numpy() * std + mean
        assert min(np.abs(drawn - stretch).max() for stretch in stretches) < 1e-3 * np.abs(std).max()
    with pytest.raises(ValueError, match=r"task 'moves': slot \[MOTION:motion,max_length=4,min_length=9\]: "
                                         r"min_length 9 is above max_length 4"):
        Task("moves", "[MOTION:motion,min_length=9,max_length=4] what? -> [TEXT:label]", TRAIN).plan(tok)
    # a target read at a random length would end there in training (its stop flag set at random cut
    # points) and whole at evaluation: refused where it is planned
    with pytest.raises(ValueError, match=r"slot \[MOTION:motion,adaptor=motion_tgt,max_length=8,min_length=3\]: "
                                         r"min_length draws "
                                         r"shorter training windows of an input; a target \(after ->\) is read whole"):
        Task("act", "[TEXT:label] -> [MOTION:motion,adaptor=motion_tgt,min_length=3,max_length=8]", TRAIN).plan(tok)
