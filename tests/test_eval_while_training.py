"""Evaluation while training (``TrainConfig.eval_every``) and keeping the best weights
(``keep_best``, ``best_metric``): what is logged, that training is the same with it, what is kept
and resumed, and the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import build_attribute as build
from helpers import quiet

from moe_gen.model import GeneralistModel
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer
from moe_gen.trainer.evaluation import eval_score, evaluate
from moe_gen.trainer.logs import read_jsonl_log

NAMES = ["digit_classification", "table_qa"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=12) for n in NAMES]


@pytest.fixture(scope="module")
def valid():
    return [load_preset(n, "test", limit=6) for n in NAMES]


def _config(**kwargs) -> TrainConfig:
    kwargs.setdefault("steps", 6)
    return quiet(batch_size=4, lr=3e-3, warmup_steps=0, eval_limit=6, log_every=1, **kwargs)


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- the score ----------------------------------------------------------------------------------

def test_eval_score_averages_first_metrics_with_losses_negated():
    results = {"a": {"accuracy": 0.5, "exact_match": 0.0}, "b": {"l1": 0.25}, "c": {"skipped": 3, "accuracy": 1.0}}
    assert eval_score(results) == pytest.approx((0.5 - 0.25 + 1.0) / 3)
    assert eval_score(results, "a/exact_match") == 0.0
    assert eval_score(results, "b/l1") == -0.25


def test_eval_score_names_what_the_results_hold_when_the_metric_is_not_there():
    results = {"a": {"accuracy": 0.5, "skipped": 1}}
    with pytest.raises(ValueError, match=r"task 'z' is not evaluated; the eval tasks are a"):
        eval_score(results, "z/accuracy")
    with pytest.raises(ValueError, match=r"task 'a' has no metric 'bleu'; it has accuracy$"):
        eval_score(results, "a/bleu")


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_every": -1}, "eval_every must be >= 0"),
    ({"keep_best": True}, "keep_best reads the evaluations while training: set eval_every > 0"),
    ({"patience": 2}, "patience reads the evaluations while training: set eval_every > 0"),
    ({"eval_every": 2, "patience": -1}, "patience must be >= 0"),
    ({"eval_every": 2, "best_metric": "accuracy"}, "best_metric must be 'mean' or '<task>/<metric>'"),
    ({"eval_every": 2, "best_metric": "/accuracy/"}, "best_metric must be 'mean' or '<task>/<metric>'"),
])
def test_bad_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


# ---- evaluation while training ------------------------------------------------------------------

def test_evaluations_are_logged_and_leave_the_training_as_it_was(tasks, valid, tok, tmp_path):
    """Every eval_every steps and at the last step: a line of eval.jsonl with the same scores as
    evaluating those weights afterwards; the weights and losses equal a run without evaluations."""
    plain = build(tasks, tok, dropout=0.1)  # dropout: training draws random numbers after each evaluation
    with Trainer(plain, tasks, _config(), output_dir=str(tmp_path / "plain")) as trainer:
        trainer.fit()
    model = build(tasks, tok, dropout=0.1)
    with Trainer(model, tasks, _config(eval_every=4), output_dir=str(tmp_path / "eval"), eval_tasks=valid) as trainer:
        summary = trainer.fit()
    assert "best_model" not in summary and "stopped_early" not in summary  # (keep_best, patience off)
    records = read_jsonl_log(str(tmp_path / "eval" / "logs" / "eval.jsonl"))
    assert [r["step"] for r in records] == [4, 6]
    assert records[-1]["eval"] == evaluate(model, valid, limit=6)
    assert records[-1]["eval_score"] == pytest.approx(eval_score(records[-1]["eval"]))
    assert set(records[0]["eval"]) == set(NAMES) and summary["best_step"] == records[-1]["best_step"]
    losses = [r["loss"] for r in read_jsonl_log(str(tmp_path / "eval" / "logs" / "train.jsonl"))]
    assert losses == [r["loss"] for r in read_jsonl_log(str(tmp_path / "plain" / "logs" / "train.jsonl"))]
    for name, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_keep_best_saves_the_weights_of_the_best_evaluation(tasks, valid, tok, tmp_path, monkeypatch):
    """Scores 0.2, 0.9, 0.5 at steps 2, 4, 6: best/ holds step 4's weights, the summary and the log say so."""
    import moe_gen.trainer.best as trainer_module  # (where evaluations while training are scored)

    scores = iter([0.2, 0.9, 0.5])
    monkeypatch.setattr(trainer_module, "eval_score", lambda results, metric: next(scores))
    at_step = {}
    model = build(tasks, tok)
    with Trainer(model, tasks, _config(eval_every=2, keep_best=True), output_dir=str(tmp_path),
                 eval_tasks=valid) as trainer:
        original = trainer._evaluate_while_training

        def remember(step, logger):
            at_step[step] = _weights(model)
            original(step, logger)

        trainer._evaluate_while_training = remember
        summary = trainer.fit()
    assert (summary["best_step"], summary["best_score"], summary["best_model"]) == (4, 0.9, str(tmp_path / "best"))
    best = GeneralistModel.from_pretrained(str(tmp_path / "best"))
    for name, value in best.state_dict().items():
        assert torch.equal(value, at_step[4][name]), name
    assert any(not torch.equal(value, at_step[6][name]) for name, value in at_step[4].items())  # (steps 5-6 trained)
    records = read_jsonl_log(str(tmp_path / "logs" / "eval.jsonl"))
    assert [(r["step"], r["eval_score"], r["best_step"]) for r in records] == [(2, 0.2, 2), (4, 0.9, 4), (6, 0.5, 4)]


def test_a_resumed_run_goes_on_comparing_with_the_best_before_it(tasks, valid, tok, tmp_path, monkeypatch):
    """The checkpoint keeps the best step and score: a resumed run's worse evaluations keep the
    earlier best weights; the log is that of one run."""
    import moe_gen.trainer.best as trainer_module  # (where evaluations while training are scored)

    scores = iter([0.2, 0.9, 0.5, 0.4])
    monkeypatch.setattr(trainer_module, "eval_score", lambda results, metric: next(scores))
    with Trainer(build(tasks, tok), tasks, _config(steps=4, eval_every=2, keep_best=True, checkpoint_every=2),
                 output_dir=str(tmp_path), eval_tasks=valid) as trainer:
        trainer.fit()
    kept = GeneralistModel.from_pretrained(str(tmp_path / "best")).state_dict()
    with Trainer(build(tasks, tok), tasks, _config(steps=8, eval_every=2, keep_best=True, checkpoint_every=2),
                 output_dir=str(tmp_path), eval_tasks=valid, resume=True) as trainer:
        summary = trainer.fit()
    assert (summary["best_step"], summary["best_score"]) == (4, 0.9)
    for name, value in GeneralistModel.from_pretrained(str(tmp_path / "best")).state_dict().items():
        assert torch.equal(value, kept[name]), name
    records = read_jsonl_log(str(tmp_path / "logs" / "eval.jsonl"))
    assert [(r["step"], r["best_step"]) for r in records] == [(2, 2), (4, 4), (6, 4), (8, 4)]


def test_a_fresh_run_removes_an_earlier_runs_best_weights(tasks, valid, tok, tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("{}")
    with Trainer(build(tasks, tok), tasks, _config(steps=2), output_dir=str(tmp_path)) as trainer:
        summary = trainer.fit()
    assert not (tmp_path / "best").exists() and "best_model" not in summary


def test_a_failed_evaluation_stops_the_run_after_a_checkpoint_of_its_step(tasks, tok, tmp_path):
    """A best_metric the results lack fails at the first evaluation: the steps trained are checkpointed."""
    config = _config(steps=6, eval_every=3, keep_best=True, best_metric="table_qa/bleu")
    with pytest.raises(ValueError, match=r"task 'table_qa' has no metric 'bleu'; it has accuracy") as info:
        with Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path)) as trainer:
            trainer.fit()
    assert any("the evaluation at step 3" in note and "step-0000003" in note for note in info.value.__notes__)
    assert trainer.latest_checkpoint().endswith("step-0000003")
    assert json.loads((tmp_path / "checkpoints" / "step-0000003" / "trainer.json").read_text())["step"] == 3


def test_patience_stops_the_run_after_that_many_evaluations_without_a_better_score(tasks, valid, tok, tmp_path,
                                                                                   monkeypatch):
    """Scores 0.5, 0.4, 0.3 with patience 2: the run stops at step 6 of 10, checkpointed there; resumed
    with the same settings it stays stopped, with more patience it trains on."""
    import moe_gen.trainer.best as trainer_module  # (where evaluations while training are scored)

    scores = iter([0.5, 0.4, 0.3, 0.6, 0.1])
    monkeypatch.setattr(trainer_module, "eval_score", lambda results, metric: next(scores))
    config = _config(steps=10, eval_every=2, patience=2)
    with Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path), eval_tasks=valid) as trainer:
        summary = trainer.fit()
    assert (summary["step"], summary["checkpoint_step"], summary["stopped_early"]) == (6, 6, True)
    assert (summary["best_step"], summary["best_score"]) == (2, 0.5)
    assert [r["step"] for r in read_jsonl_log(str(tmp_path / "logs" / "train.jsonl"))] == list(range(1, 7))
    with Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path), eval_tasks=valid, resume=True) as trainer:
        assert trainer.fit()["step"] == 6  # (no evaluation drawn from the scores either)
    with Trainer(build(tasks, tok), tasks, _config(steps=10, eval_every=2, patience=3), output_dir=str(tmp_path),
                 eval_tasks=valid, resume=True) as trainer:
        summary = trainer.fit()
    assert (summary["step"], summary["best_step"], summary["stopped_early"]) == (10, 8, False)
    records = read_jsonl_log(str(tmp_path / "logs" / "eval.jsonl"))
    assert [(r["step"], r["eval_score"], r["best_step"]) for r in records] == [
        (2, 0.5, 2), (4, 0.4, 2), (6, 0.3, 2), (8, 0.6, 8), (10, 0.1, 8)]


def test_a_nan_score_never_counts_as_the_best_unless_nothing_came_before():
    from moe_gen.trainer.best import _better

    nan = float("nan")
    assert _better(nan, None) and not _better(nan, {"score": 0.1})
    assert _better(0.0, {"score": nan}) and _better(0.2, {"score": 0.1}) and not _better(0.1, {"score": 0.1})


def test_best_weights_that_cannot_be_saved_leave_the_run_going(tasks, valid, tok, tmp_path, monkeypatch, capsys):
    """A full disk at the first (best) evaluation: the run trains on, and the next better one is kept."""
    import moe_gen.trainer.best as trainer_module  # (where evaluations while training are scored)

    scores = iter([0.5, 0.4, 0.6])
    monkeypatch.setattr(trainer_module, "eval_score", lambda results, metric: next(scores))
    original, calls = Trainer.save_model, []

    def save_model(self, directory):
        calls.append(directory)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        original(self, directory)

    monkeypatch.setattr(Trainer, "save_model", save_model)
    with Trainer(build(tasks, tok), tasks, _config(steps=6, eval_every=2, keep_best=True), output_dir=str(tmp_path),
                 eval_tasks=valid) as trainer:
        summary = trainer.fit()
    assert "the weights of step 2, the best evaluation so far, were not saved" in capsys.readouterr().out
    assert (summary["step"], summary["best_step"], summary["best_score"]) == (6, 6, 0.6)
    records = read_jsonl_log(str(tmp_path / "logs" / "eval.jsonl"))
    assert [r.get("best_step") for r in records] == [None, 4, 6]  # step 4 (0.4) became the first one kept


def test_the_empty_results_are_refused_naming_it():
    with pytest.raises(ValueError, match="the results hold no task"):
        eval_score({})


def test_each_evaluation_is_a_line_and_tensorboard_scalars_per_task_and_metric(tmp_path):
    from moe_gen.trainer.logs import RunLogger

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, key, value, step):
            self.scalars.append((key, value, step))

        def close(self):
            pass

    logger = RunLogger(str(tmp_path), 10, progress=False, tensorboard=False)
    logger._tb = writer = Writer()
    logger.log_eval({"step": 4, "eval": {"a": {"accuracy": 0.5}, "b": {"l1": 0.25}}, "eval_score": 0.125})
    logger.close()
    assert writer.scalars == [("eval/a/accuracy", 0.5, 4), ("eval/b/l1", 0.25, 4), ("eval/score", 0.125, 4)]
    assert [r["step"] for r in read_jsonl_log(str(tmp_path / "logs" / "eval.jsonl"))] == [4]


def test_a_resumed_run_drops_the_evaluations_after_its_checkpoint_and_a_fresh_run_all(tasks, valid, tok, tmp_path):
    """Step 6's checkpoint lost: resumed from step 4, eval.jsonl reads like one run (step 6 once);
    a fresh run in the directory starts without the earlier evaluations."""
    config = _config(steps=6, eval_every=2, checkpoint_every=2)
    with Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path), eval_tasks=valid) as trainer:
        trainer.fit()
    path = tmp_path / "logs" / "eval.jsonl"
    assert [r["step"] for r in read_jsonl_log(str(path))] == [2, 4, 6]
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000006")
    (tmp_path / "checkpoints" / "latest").write_text("step-0000004")  # (as if killed before step 6's)
    with Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path), eval_tasks=valid, resume=True) as trainer:
        assert trainer.fit()["step"] == 6
    assert [r["step"] for r in read_jsonl_log(str(path))] == [2, 4, 6]
    with Trainer(build(tasks, tok), tasks, _config(steps=1), output_dir=str(tmp_path), overwrite=True) as trainer:
        trainer.fit()
    assert not path.exists()


def test_no_best_kept_when_every_save_fails(tasks, valid, tok, tmp_path, monkeypatch):
    """keep_best with every save failing: the summary names no best step, score or weights."""
    def save_model(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "save_model", save_model)
    with Trainer(build(tasks, tok), tasks, _config(steps=4, eval_every=2, keep_best=True), output_dir=str(tmp_path),
                 eval_tasks=valid) as trainer:
        summary = trainer.fit()
    assert summary["step"] == 4
    assert (summary["best_step"], summary["best_score"], summary["best_model"]) == (None, None, None)
    assert not (tmp_path / "best").exists()


def test_an_evaluation_that_draws_random_numbers_leaves_the_training_as_it_was(tasks, valid, tok, tmp_path,
                                                                               monkeypatch):
    """The evaluation's draws come from a forked generator: the losses and weights after it equal a
    run without evaluations (dropout draws after each one)."""
    plain = build(tasks, tok, dropout=0.1)
    with Trainer(plain, tasks, _config(steps=4), output_dir=str(tmp_path / "plain")) as trainer:
        trainer.fit()
    original = Trainer.evaluate

    def evaluate_drawing(self, *args, **kwargs):
        torch.rand(8)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_drawing)
    model = build(tasks, tok, dropout=0.1)
    with Trainer(model, tasks, _config(steps=4, eval_every=1), output_dir=str(tmp_path / "eval"),
                 eval_tasks=valid) as trainer:
        trainer.fit()
    losses = [r["loss"] for r in read_jsonl_log(str(tmp_path / "eval" / "logs" / "train.jsonl"))]
    assert losses == [r["loss"] for r in read_jsonl_log(str(tmp_path / "plain" / "logs" / "train.jsonl"))]
    for name, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
