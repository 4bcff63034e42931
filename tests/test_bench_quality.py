"""The learning-quality benchmark: its baselines on known data, and the shape of a --quick report
(numbers of a few training steps mean nothing; the full run is scripts/bench_quality.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

from moe_gen.quality.baselines import classical_scores
from moe_gen.quality.suite import SUITE, suite_tasks, table_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_covers_modalities_and_numeric_tables():
    inputs = {m for t in SUITE for m in t.modality.split("+")}
    assert len(SUITE) >= 13 and len(inputs) >= 6
    tables = [t for t in SUITE if t.name.startswith("table_") and t.name not in ("table_species",)]
    assert len(tables) >= 3
    rows = table_rows("wine", "train")
    assert len(rows) == 142 and len(rows[0]["table"]) == 13 and isinstance(rows[0]["table"]["alcohol"], float)
    assert not set(r["id"] for r in rows) & set(r["id"] for r in table_rows("wine", "test"))  # fixed, disjoint split
    with pytest.raises(ValueError, match="unknown suite task"):
        suite_tasks(["no_such_task"])


def test_classical_baselines_on_wine():
    task = next(t for t in SUITE if t.name == "table_wine")
    scores = classical_scores(task, table_rows("wine", "train"), table_rows("wine", "test"))
    assert set(scores) == {"majority", "logreg", "knn", "cv"}
    assert scores["logreg"] >= 0.9 and scores["majority"] < 0.5  # standardised logistic regression separates wine


@pytest.mark.parametrize("name", ["table_diabetes", "reply_matching"])
def test_classical_baselines_are_the_documented_pipelines(name):
    """Numbers standardised with the training rows' statistics, text as TF-IDF of word uni- and bigrams
    (sublinear tf); logistic regression at C = 1 and 5-NN (cosine on text): the held-out scores are
    those of the same scikit-learn pipelines built here."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from moe_gen.tasks import metrics
    from moe_gen.tasks.sources.dialog import reply_rows

    task = suite_tasks([name])[0]
    if task.text_features:
        train, test = reply_rows("train")[:200], reply_rows("test")[:60]
    else:
        train, test = table_rows("diabetes", "train"), table_rows("diabetes", "test")
    x_train, x_test = task.features(train), task.features(test)
    y_train, y_test = [str(r[task.label_column]) for r in train], [str(r[task.label_column]) for r in test]

    def prep():
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) if task.text_features else StandardScaler()

    models = {"logreg": LogisticRegression(max_iter=5000, C=1.0),
              "knn": KNeighborsClassifier(5, metric="cosine" if task.text_features else "euclidean")}
    scores = classical_scores(task, train, test)
    for model_name, model in models.items():
        predicted = [str(p) for p in make_pipeline(prep(), model).fit(x_train, y_train).predict(x_test)]
        expected = metrics.compute([task.metric], predicted, y_test)[task.metric]
        assert scores[model_name] == pytest.approx(expected), model_name


def test_the_cross_validated_choice_takes_the_first_listed_baseline_on_a_tie():
    from moe_gen.quality.baselines import cv_choice

    assert cv_choice({"cv": {"logreg": 0.7, "knn": 0.7}}) == "logreg"
    assert cv_choice({"cv": {"logreg": 0.6, "knn": 0.7}}) == "knn"


def test_cross_validated_scores_use_the_training_rows_alone():
    """``cross_validated_scores`` is scikit-learn's 5-fold score (folds shuffled with seed 0) of the
    same pipelines, weighted by fold size; ``cv_choice`` picks the better of them, which may be
    the model that is worse on the held-out rows (diabetes: logistic regression, 0.528 held out,
    against 5-NN's 0.584)."""
    import numpy as np
    from sklearn.model_selection import KFold, cross_val_score

    from moe_gen.quality.baselines import _models, cross_validated_scores, cv_choice

    task = next(t for t in SUITE if t.name == "table_diabetes")
    train, test = table_rows("diabetes", "train"), table_rows("diabetes", "test")
    cv = cross_validated_scores(task, train)
    folds = KFold(5, shuffle=True, random_state=0)
    sizes = [len(held) for _, held in folds.split(train)]
    x, y = task.features(train), [row["label"] for row in train]
    for name, model in _models(text=False).items():
        assert cv[name] == pytest.approx(np.average(cross_val_score(model, x, y, cv=folds), weights=sizes)), name
    scores = classical_scores(task, train, test)
    assert scores["cv"] == cv and cv_choice(scores) == "logreg"
    assert scores["logreg"] < scores["knn"]  # the held-out rows would have picked the other model
    assert cv_choice({"logreg": 0.5, "knn": 0.6}) is None  # a report made before cross-validation


def test_quick_report_shape(tmp_path):
    out = tmp_path / "quality"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = os.path.join(ROOT, "scripts", "bench_quality.py")
    run = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    names = [t["name"] for t in report["tasks"]]
    assert names == [t.name for t in SUITE]
    assert report["systems"] == ["specialist", "dense", "token", "modality", "task", "attribute", "hybrid"]
    for system in report["systems"]:
        assert set(report["scores"][system]) == set(names)
    for name, base in report["classical"].items():
        assert set(base) == {"majority", "logreg", "knn", "cv"} and set(base["cv"]) == {"logreg", "knn"}, name
        assert name in names
    for system in ("token", "modality", "task", "attribute", "hybrid"):
        assert report["utilisation"][system], system  # every MoE run reports its layers
        assert system in report["mean_relative"] and system in report["mean_relative_learned"]
    assert "dense" not in report["utilisation"]
    # training rows scored for the classification tasks (those with classical baselines), every system
    for system in report["systems"]:
        assert set(report["fit"][system]) == set(report["classical"]), system
        entry = report["fit"][system]["table_wine"]
        assert 0 <= entry["train"]["mean"] <= 1 and entry["held_out"] == report["scores"][system]["table_wine"]
    assert all(set(r["scores_train"]) == set(report["classical"]) & set(r["tasks"]) for r in report["runs"])
    # equal active size: the MoE adds only its routers to the dense model's per-token parameters
    params = report["parameters"]
    assert params["attribute"]["active"] == pytest.approx(params["dense"]["active"], rel=0.02)
    assert params["attribute"]["total"] < params["specialist"]["total"]
    markdown = (out / "quality.md").read_text()
    assert "| task | input | metric |" in markdown and all(n in markdown for n in names)
    assert "Generalists: 26 steps of 8, temperature (τ = 2) task mixing" in markdown
    assert report["config"]["mixing"] == "temperature"
    assert (out / "quality.png").stat().st_size > 1000
    # attribute − dense, paired by seed; one seed gives no interval or test
    assert "Attribute − dense on that mean, per seed: " in markdown and "paired t-test" not in markdown
    fit_header = markdown.index("| task | specialist | dense | token | modality | task | attribute | hybrid |")
    assert markdown.index("Training rows against held-out rows (4 training rows per task") < fit_header
    wine = next(line for line in markdown[fit_header:].splitlines() if line.startswith("| table_wine |"))
    fit = report["fit"]["attribute"]["table_wine"]
    assert wine.split(" | ")[6] == f"{fit['train']['mean']:.2f} / {fit['held_out']['mean']:.2f}"
    assert "logreg_states" not in markdown and "frozen pretrained" not in markdown
    # the wrong held-out answers of every classification task: as many as the accuracy leaves
    accuracy_tasks = [t["name"] for t in report["tasks"] if t["classification"] and t["metric"] == "accuracy"]
    for system in report["systems"]:
        assert set(report["errors"][system]) == set(report["classical"]), system
        for name in accuracy_tasks:
            entry = report["errors"][system][name]
            wrong = sum(n for *_, n in entry["errors"])
            assert entry["rows"] == 4 and wrong == round((1 - report["scores"][system][name]["mean"]) * 4), name
            assert all(ref != answer and n >= 1 for ref, answer, n in entry["errors"])
    assert "Most frequent wrong answers on held-out rows" in markdown
    c = report["criteria"]  # the 95% criterion read against the cross-validated pick too
    assert sorted(c["attribute_reaches_95pct_of_cv_choice_on"] + c["attribute_below_95pct_of_cv_choice_on"]) == \
        sorted(report["classical"])
    assert "- held-out score ≥ 95% of the classical baseline picked by 5-fold cross-validation on the training " \
           f"rows on {len(c['attribute_reaches_95pct_of_cv_choice_on'])} of {len(report['classical'])}" in markdown
    # with pretrained inputs, the linear model on the frozen states gets its own column and note
    from moe_gen.quality.report import markdown as render

    report["classical"]["doc_topic"]["logreg_states"] = 0.41
    report["config"]["pretrained_inputs"] = True
    lines = render(report).splitlines()
    assert lines[0].startswith("| task | input | metric | majority | logreg | knn | logreg_states | specialist |")
    doc = next(line for line in lines if line.startswith("| doc_topic |"))
    assert doc.split(" | ")[6] == "0.410"
    wine = next(line for line in lines if line.startswith("| table_wine |"))
    assert wine.split(" | ")[6] == "—"
    assert any(line.startswith("logreg_states: logistic regression on the mean-pooled states") for line in lines)
    assert "Read through frozen pretrained encoders: doc_topic (bert_states), " \
           "spoken_word_classification (whisper_states)." in render(report)


def test_evaluation_limit_takes_rows_evenly_spaced_over_the_split():
    import types

    from moe_gen.quality.runner import held_out
    from moe_gen.tasks import Task, Tokenizer
    from moe_gen.trainer.evaluation import evaluate_task

    rows = [{"text": f"row {i}", "label": "a" if i < 50 else "b"} for i in range(100)]  # ordered by label
    task = Task("ordered", "[TEXT:text] -> [TEXT:label,closed_set]", rows, metrics=("accuracy",))
    seen = []

    def infer(task, chunk, indices, **options):
        assert [f"row {i}" for i in indices] == [r["text"] for r in chunk]  # rows named by their index
        seen.extend(r["text"] for r in chunk)
        return [types.SimpleNamespace(text="a") for _ in chunk]

    tok = Tokenizer.default()
    model = types.SimpleNamespace(tokenizer=tok, infer=infer, encoding_statistics=lambda t: {},
                                  plan=lambda t: t.plan(tok, {}))
    # the first 10 rows are all "a": a constant answer would score 1.0 on them, 0.5 on a fair sample
    assert evaluate_task(model, task, limit=10)["accuracy"] == pytest.approx(0.5)
    assert seen == [f"row {i}" for i in range(0, 100, 10)]
    assert [r["text"] for r in held_out(task, 10).data] == seen
    assert held_out(task, 500) is task
    declared = Task("opts", "[IMAGE:image] -> [TEXT:label,closed_set]", [{"image": [[0]], "label": "a"}] * 20,
                    metrics=("accuracy",), weight=2.0, on_error="skip", max_slot_positions=99,
                    preprocessor_options={"image": {"stride": 4}})
    subset = held_out(declared, 5)  # scored as declared: same preprocessing, weight and error policy
    assert len(subset) == 5 and subset.preprocessor_options == {"image": {"stride": 4}}
    assert (subset.weight, subset.on_error, subset.max_slot_positions) == (2.0, "skip", 99)
    assert subset.metrics == ("accuracy",)
    pairs = []  # (answer, reference) of every scored row, in row order
    assert evaluate_task(model, task, limit=10, pairs=pairs)["accuracy"] == pytest.approx(0.5)
    assert pairs == [("a", "a" if i < 50 else "b") for i in range(0, 100, 10)]


def test_interference_reads_rows_spread_over_each_split(monkeypatch):
    """A split ordered by label: the interference matrix's gradients come from rows spread over it
    (its first rows would hold one label), collated as the task's objective collates them."""
    from helpers import build

    import moe_gen.analysis.report as report
    from moe_gen.quality.runner import _interference
    from moe_gen.tasks import Task, Tokenizer

    tok = Tokenizer.default()
    tasks = [Task(name, "[TEXT:text] -> [TEXT:label,closed_set]",
                  [{"text": f"{name} row {i}", "label": "a" if i < 20 else "b"} for i in range(40)])
             for name in ("first", "second")]
    model = build(tasks, tok)
    seen = {}
    original = report._task_batch

    def recorded(model, task, samples, rng=None, settings=None):
        seen[task.name] = [s.index for s in samples]
        return original(model, task, samples, rng, settings)

    monkeypatch.setattr(report, "_task_batch", recorded)
    result = _interference(model, tasks, rows=4)
    assert seen == {"first": [0, 10, 20, 30], "second": [0, 10, 20, 30]}
    assert result["tasks"] == ["first", "second"] and len(result["matrix"]) == 2
    assert result["matrix"][0][1] == result["matrix"][1][0] and -1 <= result["mean_off_diagonal"] <= 1


def test_specialists_get_their_tasks_share_of_the_generalists_steps():
    from moe_gen.quality.runner import BenchConfig, specialist_steps
    from moe_gen.tasks import Task

    def task(name, n):
        return Task(name, "[TEXT:text] -> [TEXT:label,closed_set]",
                    [{"text": f"row {i}", "label": "a"} for i in range(n)])

    tasks = [task("big", 900), task("small", 100)]
    tempered = specialist_steps(BenchConfig(steps=1000), tasks)  # default: temperature 2, shares ∝ √rows
    assert tempered == {"big": 750, "small": 250}
    assert specialist_steps(BenchConfig(steps=1000, mixing="uniform"), tasks) == {"big": 500, "small": 500}
    assert specialist_steps(BenchConfig(steps=2), [task("big", 10_000), task("tiny", 1)]) == {"big": 2, "tiny": 1}
    with pytest.raises(ValueError, match="mixing"):
        BenchConfig(mixing="proportional")


def test_a_weight_averaged_run_is_scored_with_its_average_and_keeps_its_last_scores():
    import dataclasses

    from moe_gen.quality.runner import BenchConfig, _ema_decay, train_and_score

    cfg = BenchConfig(steps=4000, ema_decay=0.999)
    assert _ema_decay(cfg, 4000) == pytest.approx(0.999)  # the generalists' own decay
    assert _ema_decay(cfg, 400) == pytest.approx(0.99)  # a tenth of the steps: a tenth of the horizon
    assert _ema_decay(cfg, 2) == 0.0 and _ema_decay(BenchConfig(steps=4000), 4000) == 0.0

    small = BenchConfig(steps=6, batch_size=4, ema_decay=0.5, eval_limit=6, threads=1)
    job = {"config": dataclasses.asdict(small), "system": "attribute", "tasks": ["table_wine", "table_species"],
           "seed": 0, "steps": 6}
    result = train_and_score(job)
    assert set(result["scores_last"]) == set(result["scores"]) == {"table_wine", "table_species"}
    assert result["interference"]["tasks"] == ["table_species", "table_wine"]  # (the suite's order)
    plain = train_and_score({**job, "config": dataclasses.asdict(dataclasses.replace(small, ema_decay=0.0))})
    assert "scores_last" not in plain
    assert plain["scores"] == result["scores_last"]  # the average does not change what trains


def test_training_row_scores_average_over_seeds_beside_their_held_out_scores():
    from moe_gen.quality.report import _fit, _fit_lines

    runs = [{"system": "dense", "seed": seed, "scores": {"a": held, "b": 0.5}, "scores_train": {"a": train}}
            for seed, (train, held) in enumerate([(1.0, 0.6), (0.8, 0.7)])]
    runs.append({"system": "attribute", "seed": 0, "scores": {"a": 0.9}, "scores_train": {}})  # fit_rows=0
    fit = _fit(["dense", "attribute"], runs)
    assert list(fit) == ["dense"] and list(fit["dense"]) == ["a"]  # only tasks scored on training rows
    assert fit["dense"]["a"]["train"]["mean"] == pytest.approx(0.9)
    assert fit["dense"]["a"]["held_out"]["values"] == [0.6, 0.7]
    report = {"fit": fit, "systems": ["dense", "attribute"], "config": {"fit_rows": 50},
              "tasks": [{"name": "a"}, {"name": "b"}]}
    lines = _fit_lines(report)
    assert "| task | dense |" in lines and "| a | 0.90 / 0.65 |" in lines and not any("| b |" in x for x in lines)
    assert _fit_lines({**report, "fit": {}}) == []

    from moe_gen.quality.runner import BenchConfig

    with pytest.raises(ValueError, match="fit_rows must be >= 0"):
        BenchConfig(fit_rows=-1)


def test_expert_hidden_sets_the_active_ffn_width_of_every_system():
    """``--expert-hidden`` narrows (or widens) each expert; the dense systems keep equal active
    parameters (FFN hidden = k · expert hidden), and the report's run line says so."""
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, _model_config

    cfg = BenchConfig(expert_hidden=16, num_experts=8)
    moe, dense = _model_config(cfg, "attribute"), _model_config(cfg, "dense")
    assert (moe.moe.expert_hidden, moe.moe.num_experts) == (16, 8)
    assert dense.ffn_hidden == moe.moe.top_k * 16 and dense.moe.every == 0
    assert _model_config(BenchConfig(), "attribute").moe.expert_hidden == 64  # the debug flavour's
    # a flavour with MoE in every other block: its dense blocks narrow with the experts, as the dense twin's
    tiny = BenchConfig(flavour="tiny", expert_hidden=64)
    moe, dense = _model_config(tiny, "attribute"), _model_config(tiny, "dense")
    assert moe.moe.every == 2 and moe.ffn_hidden == dense.ffn_hidden == moe.moe.top_k * 64
    line = _run_line({**dataclasses.asdict(cfg), "seeds": [0]})
    assert "Expert hidden width 16 (dense FFNs k times it)." in line
    with pytest.raises(ValueError, match="BenchConfig.expert_hidden must be >= 1"):
        BenchConfig(expert_hidden=0)
    for limit in (0, -5):  # (was accepted, then every baseline failed: "a metric needs at least one reference")
        with pytest.raises(ValueError, match=f"BenchConfig.eval_limit must be >= 1 .*got {limit}"):
            BenchConfig(eval_limit=limit)


def test_digit_successor_asks_digit_classifications_images_for_the_next_digit():
    """The extra task that conflicts with digit_classification: the same images and answer words,
    each answer moved on by one; only its instruction's words tell the two apart."""
    from moe_gen.quality.runner import BenchConfig, _model_config
    from moe_gen.quality.suite import successor_rows
    from moe_gen.tasks import load_preset
    from moe_gen.tasks.sources.vision import DIGIT_NAMES

    digits = load_preset("digit_classification", "test")
    rows = successor_rows("test")
    assert len(rows) == len(digits) == 360
    for row, original in zip(rows, digits.data):
        assert (row["image"] == original["image"]).all() and row["id"] == original["id"]
        assert DIGIT_NAMES.index(row["label"]) == (DIGIT_NAMES.index(original["label"]) + 1) % 10
    successor, classification = suite_tasks(["digit_successor", "digit_classification"])[::-1]
    task = successor.build("train")
    assert task.name == "digit_successor" and len(task) == 1437 and successor.classification
    assert task.instruction.prompt_words() != classification.build("train").instruction.prompt_words()
    assert "digit_successor" not in {t.name for t in SUITE}  # named with --tasks only
    # the instruction-routed system is known to the benchmark, but not in its default systems
    assert _model_config(BenchConfig(systems=("instruction",)), "instruction").moe.router.strategy == "instruction"
    assert "instruction" not in BenchConfig().systems


def test_moe_attention_routes_the_attention_projections_of_the_moe_systems_only():
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, _model_config

    cfg = BenchConfig(moe_attention=True)
    assert _model_config(cfg, "attribute").moe.attention and not _model_config(BenchConfig(), "attribute").moe.attention
    assert not _model_config(cfg, "dense").moe.attention and _model_config(cfg, "dense").moe.every == 0
    assert "route their attention output projections too." in _run_line({**dataclasses.asdict(cfg), "seeds": [0]})


def test_shared_expert_takes_half_the_active_width_of_the_moe_systems_only():
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, _model_config

    cfg = BenchConfig(shared_expert=True)
    shared, plain = _model_config(cfg, "attribute"), _model_config(BenchConfig(), "attribute")
    assert shared.moe.experts.shared_expert and not plain.moe.experts.shared_expert
    k, hidden = plain.moe.top_k, plain.moe.expert_hidden
    assert (shared.moe.expert_hidden, shared.moe.experts.shared_hidden) == (hidden // 2, k * hidden // 2)
    # the same active FFN width: the dense systems (dense twins) are unchanged
    assert shared.dense_twin().ffn_hidden == plain.dense_twin().ffn_hidden == k * hidden
    assert _model_config(cfg, "dense") == _model_config(BenchConfig(), "dense")
    assert _model_config(cfg, "specialist") == _model_config(BenchConfig(), "specialist")
    assert "half their active FFN width to a shared expert" in _run_line({**dataclasses.asdict(cfg), "seeds": [0]})
    with pytest.raises(ValueError, match="does not combine with moe_attention, shared_expert"):
        BenchConfig(upcycle_at=0.5, shared_expert=True)
    # refused before any job trains (the dense systems train first)
    with pytest.raises(ValueError, match="shared_expert does not combine with moe_attention"):
        BenchConfig(shared_expert=True, moe_attention=True)
    with pytest.raises(ValueError, match="which is 65 .odd."):
        BenchConfig(shared_expert=True, expert_hidden=65)


def test_label_smoothing_reaches_every_system_and_the_report():
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, _model_config

    cfg = BenchConfig(label_smoothing=0.1)
    for system in ("dense", "specialist", "attribute", "token"):
        assert _model_config(cfg, system).label_smoothing == 0.1
        assert _model_config(BenchConfig(), system).label_smoothing == 0.0
        assert _model_config(cfg, system).replace(label_smoothing=0.0) == _model_config(BenchConfig(), system)
    assert "Label smoothing 0.1" in _run_line({**dataclasses.asdict(cfg), "seeds": [0]})
    assert "Label smoothing" not in _run_line({**dataclasses.asdict(BenchConfig()), "seeds": [0]})
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            BenchConfig(label_smoothing=bad)


def _train_config_of_fit(monkeypatch, cfg):
    """The ``TrainConfig`` that ``runner._fit`` gives the trainer for ``cfg``."""
    import torch

    import moe_gen.trainer
    from moe_gen.quality import runner

    seen = []

    class Recorder:
        def __init__(self, model, tasks, config, **kwargs):
            seen.append(config)
            raise RuntimeError("stop here")

    monkeypatch.setattr(moe_gen.trainer, "Trainer", Recorder)
    with pytest.raises(RuntimeError, match="stop here"):
        runner._fit(cfg, torch.nn.Linear(1, 1), [], 3, 0)
    return seen[0]


def test_sam_reaches_every_runs_trainer_the_report_and_the_specialist_settings(monkeypatch):
    from moe_gen.quality import runner
    from moe_gen.quality.report import _run_line

    assert [_train_config_of_fit(monkeypatch, runner.BenchConfig(sam_rho=rho)).sam_rho for rho in (0.2, 0.0)] == \
        [0.2, 0.0]
    assert "Sharpness-aware minimisation (rho 0.2)" in _run_line(
        {**dataclasses.asdict(runner.BenchConfig(sam_rho=0.2)), "seeds": [0]})
    assert "Sharpness-aware" not in _run_line({**dataclasses.asdict(runner.BenchConfig()), "seeds": [0]})
    assert "sam_rho" in runner.SPECIALIST_SETTINGS  # specialists trained without it are not reused
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match="sam_rho must be a finite number >= 0"):
            runner.BenchConfig(sam_rho=bad)


def test_one_task_batches_reach_the_generalists_trainer_and_the_report(monkeypatch):
    from moe_gen.quality import runner
    from moe_gen.quality.report import _run_line

    cfg = runner.BenchConfig(batch_tasks="single")
    assert _train_config_of_fit(monkeypatch, cfg).batch_tasks == "single"
    assert "one task per batch" in _run_line({**dataclasses.asdict(cfg), "seeds": [0]})
    assert "one task per batch" not in _run_line({**dataclasses.asdict(runner.BenchConfig()), "seeds": [0]})
    with pytest.raises(ValueError, match="batch_tasks must be one of mixed, single"):
        runner.BenchConfig(batch_tasks="task")
    # the balancing of the MoE systems' tag-routed layers (not the dense ones', which have none)
    biased = runner.BenchConfig(tag_balance="bias")
    assert runner._model_config(biased, "attribute").moe.router.tag_balance == "bias"
    assert runner._model_config(runner.BenchConfig(), "attribute").moe.router.tag_balance == "loss"
    assert "balanced by bias" in _run_line({**dataclasses.asdict(biased), "seeds": [0]})
    with pytest.raises(ValueError, match="tag_balance must be one of"):
        runner.BenchConfig(tag_balance="global")


def test_lr_scales_apply_to_every_system():
    """Specialists trained at the plain rate while the generalists' adapters had their multipliers
    (the doc-topic specialist's 0.510 became 0.633 at the generalists' ×6)."""
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, train_and_score

    small = BenchConfig(steps=4, batch_size=4, eval_limit=4, fit_rows=0, threads=1)
    scaled = dataclasses.replace(small, lr_scales={"adapters.struct_cells": 0.0})  # the cell adapter frozen
    job = {"config": dataclasses.asdict(small), "tasks": ["table_wine"], "seed": 0, "steps": 4}
    for system in ("dense", "specialist"):
        plain = train_and_score({**job, "system": system})
        other = train_and_score({**job, "system": system, "config": dataclasses.asdict(scaled)})
        assert other["final_loss"] != plain["final_loss"], system
    line = _run_line({**dataclasses.asdict(scaled), "seeds": [0], "bag_of_words": True, "pose_summary": True})
    assert "Learning rate scaled for adapters.struct_cells × 0 (every system; a specialist where its model has " \
        "the parameters)" in line
    assert ("Text read as a bag of words (TF-IDF over a vocabulary of the training rows): doc_topic (bag_of_words). "
            "Pose windows read as per-feature window statistics: motion_classification (pose_summary).") in line
    with pytest.raises(ValueError, match="lr_scales maps parameter-name prefixes to finite multipliers >= 0, "
                                         "got 'a': -1"):
        BenchConfig(lr_scales={"a": -1})


def test_two_stage_generalists_upcycle_the_moe_systems_at_the_dense_active_size():
    """``upcycle_at``: dense first, then the MoE systems' FFNs become top-1 copies behind their
    router (active size unchanged), and every system trains the rest; specialists stay one-stage."""
    from moe_gen.quality.report import _run_line
    from moe_gen.quality.runner import BenchConfig, train_and_score

    small = BenchConfig(steps=6, batch_size=4, eval_limit=4, fit_rows=0, threads=1, upcycle_at=0.5)
    job = {"config": dataclasses.asdict(small), "tasks": ["table_wine", "table_species"], "seed": 0, "steps": 6}
    dense = train_and_score({**job, "system": "dense"})
    upcycled = train_and_score({**job, "system": "attribute"})
    assert dense["utilisation"] == {} and len(upcycled["utilisation"]) == 4  # every FFN of debug's 2 + 2 blocks
    # one 128-wide copy per token, as dense's FFN: active parameters differ by the routers alone
    assert dense["active_parameters"] < upcycled["active_parameters"] < 1.02 * dense["active_parameters"]
    assert upcycled["parameters"] > 1.2 * dense["parameters"]
    assert set(upcycled["scores"]) == {"table_wine", "table_species"} and upcycled["steps"] == 6
    # specialists train in one stage: the same run with and without upcycle_at
    one = {**job, "system": "specialist", "tasks": ["table_wine"], "steps": 4}
    plain = dataclasses.asdict(dataclasses.replace(small, upcycle_at=0.0))
    assert train_and_score(one)["scores"] == train_and_score({**one, "config": plain})["scores"]
    line = _run_line({**dataclasses.asdict(small), "seeds": [0]})
    assert "trained dense for 3 steps" in line and "top-1" in line and "trained 3 more steps" in line
    with pytest.raises(ValueError, match=r"upcycle_at must be in \[0, 1\)"):
        BenchConfig(upcycle_at=1.0)
    with pytest.raises(ValueError, match="does not combine with moe_attention"):
        BenchConfig(upcycle_at=0.5, moe_attention=True)
    with pytest.raises(ValueError, match=r"upcycle_top_k must be in \[1, num_experts = 8\], got 9"):
        BenchConfig(upcycle_at=0.5, upcycle_top_k=9)
    with pytest.raises(ValueError, match="upcycle_top_k applies to upcycled systems; set upcycle_at too"):
        BenchConfig(upcycle_top_k=2)


def test_specialists_from_an_earlier_report_are_reused_when_their_settings_match(tmp_path):
    """``--specialists-from``: the earlier report's specialist runs stand in for new ones (same
    scores, nothing retrained); other settings or a missing task are refused before training."""
    from moe_gen.quality.runner import BenchConfig, run_benchmark

    tiny = dict(tasks=("table_wine",), seeds=(0,), steps=4, batch_size=4, warmup_steps=1, eval_limit=4,
                fit_rows=0, workers=1, threads=1)
    first = run_benchmark(BenchConfig(systems=("dense",), output_dir=str(tmp_path / "a"), **tiny), say=lambda _: None)
    said = []
    second = run_benchmark(BenchConfig(systems=("attribute",), specialists_from=str(tmp_path / "a" / "quality.json"),
                                       output_dir=str(tmp_path / "b"), **tiny), say=said.append)
    assert second["systems"] == ["specialist", "attribute"]
    assert not any("specialist" in line for line in said)  # only the attribute generalist trained
    assert second["scores"]["specialist"] == first["scores"]["specialist"]
    assert second["relative"]["attribute"]  # scored against the reused specialists
    assert "specialists (reused from" in (tmp_path / "b" / "quality.md").read_text()
    earlier = str(tmp_path / "a" / "quality.json")
    with pytest.raises(ValueError, match=r"other settings: steps 4 there, 6 here; lr 0.002 there, 0.001 here"):
        run_benchmark(BenchConfig(**{**tiny, "steps": 6, "lr": 1e-3}, specialists_from=earlier,
                                  output_dir=str(tmp_path / "c")), say=lambda _: None)
    missing = "has no specialist for table_species seed 0, table_species seed 1, table_wine seed 1"
    with pytest.raises(ValueError, match=missing):
        run_benchmark(BenchConfig(**{**tiny, "tasks": ("table_wine", "table_species"), "seeds": (0, 1)},
                                  specialists_from=earlier, output_dir=str(tmp_path / "d")), say=lambda _: None)
    with pytest.raises(ValueError, match="does not combine with specialists=False"):
        BenchConfig(specialists=False, specialists_from=earlier)
    from moe_gen.quality.runner import reused_specialists

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"config": {"steps": 4}, "runs": [')
    with pytest.raises(ValueError, match="corrupt.json'?: not a readable quality.json"):
        reused_specialists(BenchConfig(specialists_from=str(corrupt)), {"table_wine": 4})
    with pytest.raises(ValueError, match="is this run's own output, which the run would overwrite"):
        BenchConfig(specialists_from=earlier, output_dir=str(tmp_path / "a"))
    # a report whose classical baselines differ was scored on other held-out rows (as --merge refuses)
    stale = json.loads(Path(earlier).read_text())
    stale["classical"]["table_wine"]["logreg"] = 0.5
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="other classical baselines for table_wine"):
        reused_specialists(BenchConfig(**tiny, specialists_from=str(tmp_path / "stale.json")), {"table_wine": 4},
                           json.loads(Path(earlier).read_text())["classical"])
    assert second["seconds"] == {"attribute": second["runs"][0]["seconds"]}  # reused runs took no time here
    assert all(r["reused_from"] == earlier for r in second["runs"] if r["system"] == "specialist")
    # a specialist's steps are its task's share of the task set: from a two-task report, a
    # one-task run's specialist would train for other steps
    pair = run_benchmark(BenchConfig(**{**tiny, "tasks": ("table_wine", "table_species")}, systems=(),
                                     output_dir=str(tmp_path / "e")), say=lambda _: None)
    assert {r["steps"] for r in pair["runs"]} == {2}
    with pytest.raises(ValueError, match=r"for other steps, .*table_wine \(2 steps there, 4 here\)"):
        run_benchmark(BenchConfig(**tiny, systems=(), specialists_from=str(tmp_path / "e" / "quality.json"),
                                  output_dir=str(tmp_path / "f")), say=lambda _: None)


def test_reports_of_other_seeds_merge_into_the_report_of_all_of_them(tmp_path):
    """``merge_reports`` (``--merge``): runs on seeds 0 and 1 apart give the report one run on both
    gives, and so do runs of other systems; other settings, a system's seed in two reports or other
    classical baselines are refused."""
    from moe_gen.quality.runner import BenchConfig, merge_reports, run_benchmark

    tiny = dict(tasks=("table_wine",), systems=("dense",), steps=4, batch_size=4, warmup_steps=1, eval_limit=4,
                fit_rows=0, workers=1, threads=1)
    both = run_benchmark(BenchConfig(seeds=(0, 1), output_dir=str(tmp_path / "both"), **tiny), say=lambda _: None)
    for seed in (0, 1):
        run_benchmark(BenchConfig(seeds=(seed,), output_dir=str(tmp_path / f"s{seed}"), **tiny), say=lambda _: None)
    paths = [str(tmp_path / f"s{seed}" / "quality.json") for seed in (0, 1)]
    merged = merge_reports(paths, str(tmp_path / "merged"))
    assert tuple(merged["config"]["seeds"]) == (0, 1) and merged["config"]["output_dir"] == str(tmp_path / "merged")
    for key in ("scores", "relative", "mean_relative_learned", "classical", "fit", "errors"):
        assert merged[key] == both[key], key
    assert merged["errors"]["dense"]["table_wine"]["rows"] == 8  # 4 held-out rows, two seeds
    assert merged["wall_seconds"] == pytest.approx(sum(json.loads(Path(p).read_text())["wall_seconds"] for p in paths))
    busier = json.loads(Path(paths[1]).read_text())  # how many processes ran the jobs may differ
    busier["config"]["workers"] = 4
    (tmp_path / "busier.json").write_text(json.dumps(busier))
    assert merge_reports([paths[0], str(tmp_path / "busier.json")], str(tmp_path / "m4"))["scores"] == both["scores"]
    # one row in the score table and one in the wrong-answer table
    assert (tmp_path / "merged" / "quality.md").read_text().count("| table_wine |") == 2
    with pytest.raises(ValueError, match=r"both hold the dense run of seed 0 \(table_wine\)"):
        merge_reports([paths[0], paths[0]], str(tmp_path / "x"))
    run_benchmark(BenchConfig(**{**tiny, "steps": 6}, seeds=(2,), output_dir=str(tmp_path / "s2")), say=lambda _: None)
    with pytest.raises(ValueError, match=r"s2/quality.json' was made with other settings: steps 4 in .*, 6 here"):
        merge_reports([paths[0], str(tmp_path / "s2" / "quality.json")], str(tmp_path / "x"))
    # reports made before the classical baselines were cross-validated merge, with them computed
    older = []
    for seed in (0, 1):
        report = json.loads((tmp_path / f"s{seed}" / "quality.json").read_text())
        del report["classical"]["table_wine"]["cv"]
        (tmp_path / f"older{seed}.json").write_text(json.dumps(report))
        older.append(str(tmp_path / f"older{seed}.json"))
    for pair in ([older[0], paths[1]], older):
        assert merge_reports(pair, str(tmp_path / "m2"))["classical"] == both["classical"]
    other = json.loads((tmp_path / "s1" / "quality.json").read_text())
    other["classical"]["table_wine"]["logreg"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="has other classical baselines"):
        merge_reports([paths[0], str(tmp_path / "other.json")], str(tmp_path / "x"))
    (tmp_path / "broken.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"broken.json'?: not a readable quality.json \(no config, runs, classical\)"):
        merge_reports([paths[0], str(tmp_path / "broken.json")], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="at least two reports"):
        merge_reports(paths[:1], str(tmp_path / "x"))
    # other systems of the same seeds: a dense and an attribute run merge into the run of both
    pair = run_benchmark(BenchConfig(**{**tiny, "systems": ("dense", "attribute")}, seeds=(0, 1),
                                     output_dir=str(tmp_path / "pair")), say=lambda _: None)
    run_benchmark(BenchConfig(**{**tiny, "systems": ("attribute",)}, seeds=(0, 1), specialists=False,
                              output_dir=str(tmp_path / "attr")), say=lambda _: None)
    united = merge_reports([str(tmp_path / "attr" / "quality.json"), str(tmp_path / "both" / "quality.json")],
                           str(tmp_path / "united"))
    assert tuple(united["config"]["systems"]) == ("dense", "attribute") and united["config"]["specialists"]
    for key in ("scores", "relative", "mean_relative_learned", "fit", "errors"):
        assert united[key] == pair[key], key


def _bench_script(monkeypatch):
    return load_script("bench_quality", monkeypatch)


def test_command_line_options_reach_the_bench_config(monkeypatch, tmp_path):
    bench = _bench_script(monkeypatch)
    parser = bench.make_parser()
    argv = ["--systems", "dense", "attribute", "--no-specialists", "--seeds", "6", "7", "--steps", "120",
            "--mixing", "uniform", "--temperature", "3", "--batch-size", "8", "--lr", "1e-3",
            "--lr-scale", "adapters.bag_of_words=6", "--lr-scale", "adapters.pose_summary=3", "--flavour", "tiny",
            "--num-experts", "4", "--expert-hidden", "96", "--moe-attention",
            "--loss-average", "sample",
            "--batch-tasks", "single", "--tag-balance", "bias", "--ema-decay", "0.99", "--label-smoothing", "0.1",
            "--sam-rho", "0.2", "--bag-of-words",
            "--pose-summary", "--pose-noise", "1.5", "--pose-min-length", "9",
            "--eval-limit", "20", "--eval-every", "40", "--fit-rows", "10", "--workers", "2",
            "--threads", "1", "--tasks", "doc_topic", "motion_classification", "--out", str(tmp_path)]
    config = bench.config_from_args(parser, parser.parse_args(argv))
    expected = dict(systems=("dense", "attribute"), specialists=False, seeds=(6, 7), steps=120, mixing="uniform",
                    temperature=3.0, batch_size=8, lr=1e-3, flavour="tiny", num_experts=4, expert_hidden=96,
                    moe_attention=True, loss_average="sample", batch_tasks="single",
                    tag_balance="bias",
                    ema_decay=0.99, label_smoothing=0.1, sam_rho=0.2,
                    bag_of_words=True, pose_summary=True, pose_noise=1.5, pose_min_length=9, eval_limit=20,
                    eval_every=40, fit_rows=10, workers=2,
                    threads=1, tasks=("doc_topic", "motion_classification"), output_dir=str(tmp_path),
                    lr_scales={"adapters.bag_of_words": 6.0, "adapters.pose_summary": 3.0})
    assert {k: getattr(config, k) for k in expected} == expected
    upcycled = bench.config_from_args(parser, parser.parse_args(["--upcycle-at", "0.5", "--upcycle-top-k", "2"]))
    assert (upcycled.upcycle_at, upcycled.upcycle_top_k) == (0.5, 2)
    assert bench.config_from_args(parser, parser.parse_args(["--shared-expert"])).shared_expert
    taught = bench.config_from_args(parser, parser.parse_args(["--distill", "0.4", "--distill-temperature", "2",
                                                               "--distill-anneal", "--distill-only-correct"]))
    assert (taught.distill, taught.distill_temperature, taught.distill_anneal, taught.distill_only_correct) == (
        0.4, 2.0, True, True)
    assert bench.config_from_args(parser, parser.parse_args(["--subword-sampling", "0.25"])).subword_sampling == 0.25
    # options left out keep BenchConfig's defaults
    defaults = bench.config_from_args(parser, parser.parse_args(["--out", str(tmp_path)]))
    assert dataclasses.replace(defaults, output_dir=None) == dataclasses.replace(
        bench.BenchConfig(), output_dir=None)


def test_command_line_refuses_what_the_bench_config_refuses(monkeypatch, capsys):
    bench = _bench_script(monkeypatch)
    parser = bench.make_parser()
    for argv, message in ((["--pose-noise", "1"], "it needs pose_summary"),
                          (["--lr-scale", "adapters.bag_of_words"], "--lr-scale takes PREFIX=SCALE"),
                          # a repeat ran every job twice and the report counted the copies as other seeds
                          (["--seeds", "0", "1", "0"], "BenchConfig.seeds names 0 more than once"),
                          (["--systems", "dense", "attribute", "dense"], "BenchConfig.systems names dense more than")):
        with pytest.raises(SystemExit) as exit_info:
            bench.config_from_args(parser, parser.parse_args(argv))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_command_line_refuses_a_specialists_report_that_cannot_stand_in_as_a_usage_error(monkeypatch, tmp_path,
                                                                                         capsys):
    """A --specialists-from report of other settings ended in a traceback (exit 1), after the classical
    baselines (40 s on the suite), where --merge answers the same kind of error as a usage error."""
    from moe_gen.quality import baselines

    bench = _bench_script(monkeypatch)
    path = tmp_path / "earlier.json"
    argv = ["--tasks", "table_wine", "--systems", "dense", "--seeds", "0", "--steps", "5", "--workers", "1",
            "--specialists-from", str(path), "--out", str(tmp_path / "out")]

    def refused(earlier, message):
        path.write_text(earlier if isinstance(earlier, str) else json.dumps(earlier))
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    def fitted(*args, **kwargs):
        raise AssertionError("the classical baselines were fitted before the refusal")

    earlier = {"config": {**dataclasses.asdict(bench.BenchConfig()), "steps": 26}, "runs": [], "classical": {}}
    with monkeypatch.context() as patch:  # these refusals come before anything trains
        patch.setattr(baselines, "classical_scores", fitted)
        refused(earlier, "trained its specialists with other settings: steps 26 there, 5 here")
        refused("{", "earlier.json: not a readable quality.json")
        earlier["config"]["steps"] = 5
        refused(earlier, "has no specialist for table_wine seed 0")
    # other classical baselines need this run's: refused after them, before any model trains
    run = {"system": "specialist", "seed": 0, "tasks": ["table_wine"], "steps": 5, "scores": {"table_wine": 0.5}}
    earlier.update(runs=[run], classical={"table_wine": {"majority": 0.0, "logreg": 0.0, "knn": 0.0}})
    refused(earlier, "has other classical baselines for table_wine")
    assert not (tmp_path / "out").exists()


def test_unseen_clip_motion_holds_out_whole_clips_of_every_kind_it_asks_about():
    from moe_gen.quality.suite import suite_tasks, unseen_clip_rows

    train, test = unseen_clip_rows("train"), unseen_clip_rows("test")
    assert not {r["clip"] for r in train} & {r["clip"] for r in test}
    assert {r["label"] for r in train} == {r["label"] for r in test} == {"dance", "getup", "turn_left",
                                                                         "turn_right", "walk"}
    task = suite_tasks(["motion_unseen_clips"])[0]
    assert task.classification and len(task.build("test")) == len(test)
    with pytest.raises(ValueError, match="holds out clips whose first 70% motion_classification trains on"):
        suite_tasks(["motion_classification", "motion_unseen_clips"])
    # "all" is both splits; another split is refused (any split but "test" read as "train" before)
    assert [r["id"] for r in unseen_clip_rows("all")] == [r["id"] for r in train + test]
    for split in ("validation", "Test"):
        with pytest.raises(ValueError, match=f"unknown split '{split}'; known: train, test, all"):
            unseen_clip_rows(split)


def test_held_out_curves_are_scored_while_training_and_leave_the_last_scores_as_they_were():
    """``eval_every``: each run's curve ends at the step that is scored, with the same scores, and
    the run trains as it does without it; the report tables the mean over runs per step."""
    import dataclasses

    from moe_gen.quality.report import curve_lines
    from moe_gen.quality.runner import BenchConfig, train_and_score

    small = BenchConfig(steps=6, batch_size=4, eval_limit=6, threads=1, eval_every=4)
    job = {"config": dataclasses.asdict(small), "system": "attribute", "tasks": ["table_wine", "table_species"],
           "seed": 0, "steps": 6}
    result = train_and_score(job)
    assert [point["step"] for point in result["curve"]] == [4, 6]
    assert result["curve"][-1]["scores"] == result["scores"]
    plain = train_and_score({**job, "config": dataclasses.asdict(dataclasses.replace(small, eval_every=0))})
    assert "curve" not in plain and plain["scores"] == result["scores"]

    runs = [{"system": "dense", "seed": seed,
             "curve": [{"step": 2, "scores": {"a": a2}}, {"step": 4, "scores": {"a": a4, "b": 0.5}}]}
            for seed, (a2, a4) in enumerate([(0.2, 0.6), (0.4, 0.8)])]
    lines = curve_lines({"systems": ["dense", "attribute"], "runs": runs + [{"system": "attribute", "seed": 0}],
                         "tasks": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
    assert "Held-out scores while training, dense (mean over 2 seeds):" in lines
    assert "| a | 0.300 | 0.700 |" in lines and "| b | — | 0.500 |" in lines
    assert not any("attribute" in line or "| c |" in line for line in lines)
    with pytest.raises(ValueError, match="eval_every must be >= 0 and does not combine with upcycle_at"):
        BenchConfig(eval_every=100, upcycle_at=0.5)


def test_a_distilled_benchmark_with_every_teacher_setting_runs_to_its_report(tmp_path):
    """The specialists train without teachers (annealing and selection are settings of the
    generalists' distillation only), then teach the generalists of their seed."""
    from moe_gen.quality.runner import BenchConfig, run_benchmark

    report = run_benchmark(BenchConfig(tasks=("table_wine",), systems=("dense",), seeds=(0,), steps=4, batch_size=4,
                                       warmup_steps=1, eval_limit=4, fit_rows=0, workers=1, threads=1, distill=0.5,
                                       distill_anneal=True, distill_only_correct=True,
                                       output_dir=str(tmp_path)), say=lambda _: None)
    assert report["systems"] == ["specialist", "dense"]
    text = (tmp_path / "quality.md").read_text()
    assert "weight 0.5, falling linearly to 0 over the run, temperature 1, only at the tokens the specialist " \
           "answers right" in text
