"""The learning-quality benchmark's parts on small inputs, without training: the suite's splits,
classical features and options (``moe_gen.quality.suite``), and what the runner refuses, reuses
and hands the trainer (``moe_gen.quality.runner``)."""

from __future__ import annotations

import collections
import dataclasses
import json
import types

import numpy as np
import pytest

from moe_gen.quality import runner, suite
from moe_gen.quality.runner import BenchConfig
from moe_gen.quality.suite import EXTRA, SUITE, suite_tasks, table_rows

# ---- the suite ------------------------------------------------------------------------------------


def test_numeric_tables_hold_out_every_fifth_row_and_bin_diabetes_at_the_training_tertiles():
    assert [r["id"] for r in table_rows("wine", "test")] == [f"wine/{i}" for i in range(0, 178, 5)]
    with pytest.raises(ValueError, match="unknown split 'validation'; known: train, test"):
        table_rows("wine", "validation")  # (not read as the training rows)
    with pytest.raises(ValueError, match="unknown scikit-learn table 'iris'; known: diabetes, breast_cancer, wine"):
        table_rows("iris", "train")  # (not read as wine's rows)
    # thresholds at the tertiles of the training rows: a third of them in each class
    labels = collections.Counter(r["label"] for r in table_rows("diabetes", "train"))
    assert labels == {"low": 118, "medium": 117, "high": 118}
    task = suite_tasks(["table_wine"])[0].build("test")
    assert task.name == "table_wine" and len(task) == 36  # the task the report names


def test_pixel_features_pool_large_images_to_16_by_16_and_keep_8_by_8_ones():
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    pooled = suite.pixel_features([{"image": image}])
    assert pooled.shape == (1, 256)
    np.testing.assert_allclose(pooled[0], image.mean(-1).reshape(16, 2, 16, 2).mean((1, 3)).ravel(), rtol=1e-6)
    digit = np.arange(64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(suite.pixel_features([{"image": digit}], size=8)[0], digit.ravel())


def test_crop_features_read_the_pixels_inside_the_query_box():
    image = np.zeros((16, 16), np.float32)
    image[4:12, 2:6] = 1.0  # a tall box: x 2..6, y 4..12
    image[5, 3] = 7.0
    inside = suite.crop_features([{"image": image, "query_box": (2, 4, 6, 12)},
                                  {"image": image, "query_box": (3, 5, 3, 5)}])  # empty box: its one pixel
    assert inside.shape == (2, 64)
    assert inside[0].min() == pytest.approx(1.0) and inside[0].max() <= 7.0
    np.testing.assert_allclose(inside[1], 7.0)


def test_pose_features_are_mean_std_and_mean_change_of_the_frames():
    frames = np.array([[0.0, 1.0], [4.0, 1.0]])
    np.testing.assert_allclose(suite.pose_features([{"motion": frames}])[0], [2.0, 1.0, 2.0, 0.0, 4.0, 0.0])


def test_question_features_one_hot_the_question_asked_and_text_pairs_join_both_sides():
    image = np.zeros((8, 8), np.float32)
    rows = [{"image": image, "asked": "c"}, {"image": image, "asked": "b"}]
    features = suite.question_features(rows, column="asked", values=("a", "b", "c"))
    np.testing.assert_array_equal(features[:, -3:], [[0, 0, 1], [0, 1, 0]])
    assert features.shape == (2, 64 + 3)
    pair = suite.pair_text_features([{"first": "good morning", "second": "hello"}], columns=("first", "second"))
    assert pair == ["good morning ||| hello"]


def test_unseen_clip_motion_holds_out_each_kinds_last_clip_by_name():
    held = {(r["label"], r["clip"]) for r in suite.unseen_clip_rows("test")}
    assert held == {("dance", "humanoid3d_dance_b"), ("getup", "humanoid3d_getup_faceup"),
                    ("turn_left", "walker_turn_left1"), ("turn_right", "walker_turn_right1"),
                    ("walk", "walker_0walk_forward")}


def test_only_loss_and_error_metrics_are_lower_is_better():
    assert {t.name for t in SUITE + EXTRA if not t.higher_is_better} == {"text_to_speech", "image_infilling"}


def test_suite_tasks_keep_the_suite_order_and_refuse_bad_options():
    assert [t.name for t in suite_tasks(["table_wine", "digit_successor", "digit_classification"])] == \
        ["digit_classification", "table_wine", "digit_successor"]  # the suite's, then EXTRA's
    with pytest.raises(ValueError, match=r"unknown suite task\(s\) no_such_task; known: .*table_wine"):
        suite_tasks(["table_wine", "no_such_task"])
    with pytest.raises(ValueError, match="they need pose_summary"):
        suite_tasks(["motion_classification"], pose_min_length=5)


def test_a_redeclared_slot_must_appear_once_in_the_instruction(monkeypatch):
    doc_topic, = suite_tasks(["doc_topic"])
    twice = types.SimpleNamespace(instruction="[TEXT:text] or [TEXT:text]? -> [TEXT:topic,closed_set]")
    monkeypatch.setattr(suite, "preset_info", lambda name: twice)
    with pytest.raises(ValueError, match=r"suite task 'doc_topic': its instruction .* should hold \[TEXT:text\] once"):
        suite._with_preprocess(doc_topic, "[TEXT:text]", "bag_of_words", False)


# ---- the runner -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(seeds=()), "BenchConfig.seeds must name at least one seed"),
    (dict(tag_balance_window=-1), "BenchConfig.tag_balance_window must be >= 0, got -1"),
    (dict(pose_summary=True, pose_min_length=-1), "BenchConfig.pose_min_length must be >= 0"),
    (dict(upcycle_at=0.5, steps=1), r"upcycle_at needs steps >= 2 \(a step in each stage\), got 1"),
    (dict(distill=1.5), r"BenchConfig.distill must be in \[0, 1\]"),
    (dict(distill=0.5, distill_temperature=0), r"and distill_temperature > 0, got 0.5 and 0"),
    (dict(distill=0.5, specialists=False), "does not combine with specialists=False"),
    (dict(distill=0.5, specialists_from="a/quality.json"), "specialists_from"),
    (dict(distill_anneal=True), "distill_anneal is a setting of distill: set distill > 0 too"),
    (dict(distill_only_correct=True), "distill_only_correct is a setting of distill: set distill > 0 too"),
])
def test_bench_config_refuses(fields, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**fields)


def test_bench_config_accepts_every_expert_at_once_and_routes_with_its_balance_window():
    assert BenchConfig(upcycle_at=0.5, upcycle_top_k=8, num_experts=8).upcycle_top_k == 8
    router = runner._model_config(BenchConfig(tag_balance_window=8), "attribute").moe.router
    assert router.tag_balance_window == 8


def test_the_first_stage_takes_its_share_of_the_steps_and_leaves_one_for_the_second():
    assert [runner.first_stage_steps(s, at) for s, at in ((6, 0.5), (2, 0.9), (10, 0.01), (8, 0.25))] == [3, 1, 1, 2]


def test_two_stage_runs_train_the_remaining_steps_after_the_first_stage(monkeypatch):
    calls = []

    def fit(cfg, model, train, steps, seed, *args, **kwargs):
        calls.append((steps, seed))
        return model, {"loss": 0.0}, model

    monkeypatch.setattr(runner, "_fit", fit)
    train = [suite_tasks(["table_wine"])[0].build("train")]
    runner._two_stage(BenchConfig(upcycle_at=0.25, steps=8), "dense", train, 8, 3)
    assert calls == [(2, 3), (6, 10_003)]  # a new data order in the second stage


def test_fit_hands_the_trainer_a_short_warmup_and_the_lr_scales_its_model_has(monkeypatch):
    import torch

    import moe_gen.trainer

    seen = []

    class Recorder:
        def __init__(self, model, tasks, config, **kwargs):
            seen.append(config)
            raise RuntimeError("stop here")

    monkeypatch.setattr(moe_gen.trainer, "Trainer", Recorder)
    cfg = BenchConfig(warmup_steps=50, lr_scales={"weight": 2.0, "adapters.bag_of_words": 3.0})
    for steps in (30, 1000):
        with pytest.raises(RuntimeError, match="stop here"):
            runner._fit(cfg, torch.nn.Linear(1, 1), [], steps, 0)
    assert [c.warmup_steps for c in seen] == [3, 50]  # at most a tenth of a short run
    assert seen[0].lr_scales == {"weight": 2.0}  # a specialist lacks the other tasks' adapters


def test_classical_baselines_are_scored_on_the_eval_limit_rows_the_models_see(monkeypatch):
    from moe_gen.quality import baselines

    seen = {}

    def scores(task, train, test):
        seen[task.name] = (len(train), [r["id"] for r in test])
        return {}

    monkeypatch.setattr(baselines, "classical_scores", scores)
    chosen = suite_tasks(["table_wine"])
    runner._classical_baselines(BenchConfig(eval_limit=4), chosen, [t.build("train") for t in chosen])
    assert seen == {"table_wine": (142, ["wine/0", "wine/45", "wine/90", "wine/135"])}


def _earlier_report(path, cfg, classical=None, drop=()):
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}
    run = {"system": "specialist", "seed": 0, "tasks": ["table_wine"], "steps": cfg.steps,
           "scores": {"table_wine": 0.5}}
    path.write_text(json.dumps({"config": config, "runs": [run], "classical": classical or {}}))
    return run


def test_specialists_from_a_report_made_before_a_setting_existed_are_reused_at_its_default(tmp_path):
    path = tmp_path / "earlier.json"
    cfg = BenchConfig(tasks=("table_wine",), seeds=(0,), steps=4, specialists_from=str(path),
                      output_dir=str(tmp_path / "out"))
    run = _earlier_report(path, cfg, drop=("lr_scales", "pose_min_length"))
    assert runner.reused_specialists(cfg, {"table_wine": 4}) == [{**run, "reused_from": str(path)}]


def test_reused_specialists_compare_classical_baselines_without_their_cross_validated_scores(tmp_path):
    path = tmp_path / "earlier.json"
    cfg = BenchConfig(tasks=("table_wine",), seeds=(0,), steps=4, specialists_from=str(path),
                      output_dir=str(tmp_path / "out"))
    held = {"majority": 0.4, "logreg": 0.9, "knn": 0.8}
    _earlier_report(path, cfg, classical={"table_wine": held})  # made before the cross-validated scores
    ours = {"table_wine": {**held, "cv": {"logreg": 0.9, "knn": 0.8}}}
    runner.check_reused_classical(cfg, ours, ["table_wine"])
    with pytest.raises(ValueError, match="other classical baselines for table_wine"):
        runner.check_reused_classical(cfg, {"table_wine": {**held, "knn": 0.7}}, ["table_wine"])


def test_distillation_trains_the_specialists_first_and_teaches_each_generalist_its_seeds(tmp_path):
    from moe_gen.quality.runner import _jobs

    cfg = BenchConfig(tasks=("table_wine", "digit_counting"), systems=("dense", "attribute"), seeds=(0, 1),
                      distill=0.5)
    jobs = _jobs(cfg, ["table_wine", "digit_counting"], {"table_wine": 10, "digit_counting": 20}, str(tmp_path))
    specialists = [j for j in jobs if j["system"] == "specialist"]
    generalists = [j for j in jobs if j["system"] != "specialist"]
    assert len(specialists) == 4 and len(generalists) == 4
    saved = {(j["tasks"][0], j["seed"]): j["save_to"] for j in specialists}
    assert len(set(saved.values())) == 4 and all(p.startswith(str(tmp_path)) for p in saved.values())
    for job in generalists:
        assert job["teachers"] == {task: saved[(task, job["seed"])] for task in ("table_wine", "digit_counting")}
        assert "save_to" not in job
    plain = _jobs(dataclasses.replace(cfg, distill=0.0), ["table_wine"], {"table_wine": 10})
    assert not any("teachers" in j or "save_to" in j for j in plain)
